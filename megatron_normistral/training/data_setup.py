"""Build the run's data: mixture dataset (plan printed and saved with the run), the batch
source of this rank, and the held-out evaluation sets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_normistral.config.recipe import CorpusEntry, Recipe
from megatron_normistral.data.mixture import CorpusSpec, MixtureConfig, MixtureDataset
from megatron_normistral.tokenizer import load_tokenizer
from megatron_normistral.training.batches import BatchSource, SpecialIds
from megatron_normistral.training.evaluation import EvalData, evaluate, prepare_eval_data


@dataclass
class RunData:
    train: BatchSource | None  # None when only evaluating
    mixture_fingerprint: str | None  # of every input of the sample index (corpora, weights, seed, ...)
    eval: list[EvalData]
    ids: SpecialIds
    recipe: Recipe

    def evaluate(self, chunks) -> dict:
        r = self.recipe
        return evaluate(chunks, self.eval, r.objective, self.ids, r.training.seq_length, r.training.micro_batch_size)


def _mixture(corpora: list[CorpusEntry], recipe: Recipe) -> MixtureConfig:
    return MixtureConfig(
        corpora=[CorpusSpec(c.prefix, c.language, c.weight, c.max_epochs) for c in corpora],
        seq_length=recipe.training.seq_length,
        seed=recipe.training.seed,
        allow_redistribute=recipe.data.allow_redistribute,
    )


def build_data(recipe: Recipe) -> RunData:
    from megatron.core import parallel_state

    t, d = recipe.training, recipe.data
    tokenizer = load_tokenizer(d.tokenizer)
    ids = SpecialIds(eod_id=tokenizer.eod_id, mask_id=tokenizer.mask_id, vocab_size=recipe.model.architecture().vocab_size)
    if tokenizer.vocab_size > ids.vocab_size:
        raise ValueError(f"tokenizer {d.tokenizer} has {tokenizer.vocab_size} entries but the model's vocabulary is {ids.vocab_size}")
    changes = [(c.at_step * t.global_batch_size, _mixture(c.corpora, recipe)) for c in d.mixture_changes]
    cache = d.cache_dir or (str(Path(recipe.checkpoint.save) / "data-cache") if recipe.checkpoint.save else None)
    rank = dist.get_rank()

    def make(verbose: bool) -> MixtureDataset:
        return MixtureDataset(_mixture(d.corpora, recipe), t.train_iters * t.global_batch_size, cache_dir=cache, changes=changes, verbose=verbose)

    dp_size = parallel_state.get_data_parallel_world_size()
    train = None
    if t.train_iters > 0:  # --train-iters 0: evaluation only
        # Rank 0 builds (and caches) the index and prints the plan; the others then load it.
        dataset = make(verbose=True) if rank == 0 else None
        dist.barrier()
        if rank != 0:
            dataset = make(verbose=False)
        if rank == 0 and recipe.checkpoint.save:
            Path(recipe.checkpoint.save).mkdir(parents=True, exist_ok=True)
            dataset.save_plan(Path(recipe.checkpoint.save) / "mixture_plan.json")
        train = BatchSource(dataset, recipe.objective, ids, t.micro_batch_size, t.global_batch_size, parallel_state.get_data_parallel_rank(), dp_size)
    eval_sets = [prepare_eval_data(e.language, e.path, tokenizer, t.seq_length, recipe.evaluation.eval_max_tokens) for e in d.eval_sets]
    fingerprint = train.dataset.fingerprint if train else None
    return RunData(train=train, mixture_fingerprint=fingerprint, eval=eval_sets, ids=ids, recipe=recipe)
