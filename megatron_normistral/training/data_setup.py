"""Build the run's data: mixture dataset (plan printed and saved with the run), the batch
source of this rank, and the held-out evaluation sets.

Evaluation text is packed as the training corpora pack documents: with ``<s>`` first when
their ``PREFIX.stats.json`` sidecars say so (preprocessing's default whenever the tokenizer
has a BOS), and ``<s>`` must then be a special id (below ``objective.num_special_tokens``) so
that it is never a loss target and never masked."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_normistral.data.indexed import check_corpus_files, read_stats_sidecar
from megatron_normistral.data.mixture import (CorpusSpec, MixtureConfig, MixtureDataset, MixturePlan, corpus_num_tokens,
                                              plan_phases)
from megatron_normistral.data.preprocess import describe_documents
from megatron_normistral.tokenizer import load_tokenizer
from megatron_normistral.training.batches import BatchSource, SpecialIds
from megatron_normistral.training.errors import RecipeError
from megatron_normistral.training.evaluation import EvalData, EvalPacking, evaluate, prepare_eval_data
from megatron_normistral.runtime.logs import get_logger

log = get_logger(__name__)

if TYPE_CHECKING:
    from megatron_normistral.config.recipe import Recipe


@dataclass
class EvalSet:
    """One held-out set of ``data.eval_sets``."""

    language: str
    """The language its scores are reported under."""

    path: str
    """JSON Lines (optionally .gz) with a "text" key: held-out documents."""


@dataclass
class MixtureChange:
    """One entry of ``data.mixture_changes``."""

    at_step: int
    """These corpora and weights apply from this step on (the samples before it are unchanged)."""

    corpora: list[CorpusSpec] = field(default_factory=list)
    """The mixture from at_step on, as data.corpora gives it."""


@dataclass
class DataConfig:
    """The recipe's ``data`` section: the corpora of the mixture (data/mixture.py's
    :class:`~megatron_normistral.data.mixture.CorpusSpec`, the schema ``tools/plan_mixture.py``
    reads too), its changes during the run, the held-out sets and the tokenizer."""

    tokenizer: str = ""
    """Tokenizer the corpora were preprocessed with (HF folder, .model file, or 'tekken'): for
    the evaluation text and the special ids."""

    corpora: list[CorpusSpec] = field(default_factory=list)
    """The mixture: a list of {prefix, language, weight, max_epochs, name} (YAML)."""

    eval_sets: list[EvalSet] = field(default_factory=list)
    """Held-out sets: a list of {language, path} (YAML)."""

    mixture_changes: list[MixtureChange] = field(default_factory=list)
    """New corpora or weights from a step on: a list of {at_step, corpora} (YAML)."""

    cache_dir: str | None = None
    """Where the mixture index is cached (default: the folder data-cache in checkpoint.save)."""

    allow_redistribute: bool = False
    """Over an epoch cap, move the excess weight to the other corpora instead of failing."""

    def all_corpora(self) -> list[CorpusSpec]:
        """Every corpus of every mixture phase, once per prefix (its first appearance)."""
        first: dict[str, CorpusSpec] = {}
        for corpus in self.corpora + [c for change in self.mixture_changes for c in change.corpora]:
            first.setdefault(corpus.prefix, corpus)
        return list(first.values())

    def mixture_phases(self, seq_length: int, seed: int, global_batch_size: int,
                       train_iters: int) -> list[tuple[int, MixtureConfig]]:
        """The run's mixture, ``[(first global sample, MixtureConfig), ...]``: ``corpora`` from
        sample 0, each change from ``at_step x global_batch_size`` on; what the training reads
        and ``tools/plan_mixture.py --recipe`` plans."""
        steps = [change.at_step for change in self.mixture_changes]
        if any(not 0 < step < train_iters for step in steps) or steps != sorted(set(steps)):
            raise RecipeError(f"data.mixture_changes: at_step must increase and lie inside (0, train_iters "
                              f"{train_iters}), got {steps}")

        def mixture(corpora: list[CorpusSpec]) -> MixtureConfig:
            return MixtureConfig(corpora=list(corpora), seq_length=seq_length, seed=seed,
                                 allow_redistribute=self.allow_redistribute)

        return [(0, mixture(self.corpora))] + [(c.at_step * global_batch_size, mixture(c.corpora))
                                               for c in self.mixture_changes]


def mixture_plans(recipe: Recipe) -> list[MixturePlan]:
    """The plan of each mixture phase of the run (samples, epochs and tokens per corpus), as the
    training prints and saves it, without building the sample index: what
    ``tools/plan_mixture.py --recipe`` prints. The corpus files are checked first."""
    t, d = recipe.training, recipe.data
    if t.train_iters <= 0:
        raise RecipeError(f"training.train_iters is {t.train_iters}: the run reads no training data, so there is no "
                          f"mixture to plan")
    corpora = d.all_corpora()
    for corpus in corpora:
        check_corpus_files(corpus.prefix)
    phases = d.mixture_phases(t.seq_length, t.seed, t.global_batch_size, t.train_iters)
    return plan_phases(phases, t.train_iters * t.global_batch_size, {c.prefix: corpus_num_tokens(c.prefix) for c in corpora})


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


def documents_start_with_bos(recipe: Recipe, tokenizer) -> bool:
    """Whether the run's documents start with BOS: what the corpora's sidecars state (every
    corpus of every mixture phase; corpora that do not state it are left out), else whether
    the tokenizer has a BOS (what preprocessing does by default). Raises :class:`RecipeError`
    when corpora disagree, when they start with BOS and the tokenizer has none, or when BOS is
    used and its id is not below ``objective.num_special_tokens``."""
    d = recipe.data
    prefixes = [c.prefix for c in d.all_corpora()]
    stated = {}
    for prefix in prefixes:
        stats, _ = read_stats_sidecar(prefix)
        if stats is not None and stats.bos is not None:
            stated[prefix] = stats.bos
    if len(set(stated.values())) > 1:
        yes = next(p for p, v in stated.items() if v)
        no = next(p for p, v in stated.items() if not v)
        raise RecipeError(f"data.corpora: the documents of {yes} start with <s> (BOS), those of {no} do not; "
                          f"preprocess them the same way (tools/preprocess_data.py, with or without --no-bos)")
    bos = next(iter(stated.values())) if stated else tokenizer.bos_id is not None
    if bos and tokenizer.bos_id is None:
        raise RecipeError(f"data.corpora start documents with <s> (BOS), but data.tokenizer {d.tokenizer} has none: "
                          f"were they preprocessed with another tokenizer?")
    limit = recipe.objective.num_special_tokens
    if bos and tokenizer.bos_id >= limit:
        raise RecipeError(f"data.tokenizer {d.tokenizer}: its BOS {tokenizer.piece(tokenizer.bos_id)} has id "
                          f"{tokenizer.bos_id}, not below objective.num_special_tokens {limit}, so it would be a loss "
                          f"target and could be masked; set --objective.num_special_tokens {tokenizer.bos_id + 1} or "
                          f"more, or preprocess with --no-bos")
    return bos


def prepare_eval_sets(recipe: Recipe, tokenizer, bos_id: int | None) -> list[EvalData]:
    """The held-out sets of the recipe, packed as the training documents are; one log line each."""
    e = recipe.evaluation
    packing = EvalPacking(recipe.training.seq_length, max_words=e.max_words, max_tokens=e.max_tokens,
                          bos_id=bos_id, num_special_tokens=recipe.objective.num_special_tokens)
    layout = describe_documents(tokenizer, bos_id, tokenizer.eod_id)
    sets = []
    for entry in recipe.data.eval_sets:
        data = prepare_eval_data(entry.language, entry.path, tokenizer, packing)
        log.info(f"[eval] {entry.language}: {data.words:,} words, {data.tokens:,} tokens "
                    f"({data.tokens / data.words:.3f} per word) of {entry.path}; each paragraph: {layout}")
        if data.cut_by_max_tokens:
            log.warning(f"[eval] WARNING: evaluation.max_tokens {e.max_tokens:,} cut {entry.language} to "
                        f"{data.words:,} words: another tokenizer is scored on other words; set "
                        f"evaluation.max_words instead to compare tokenizers")
        sets.append(data)
    return sets


def build_data(recipe: Recipe) -> RunData:
    from megatron.core import parallel_state

    t, d = recipe.training, recipe.data
    tokenizer = load_tokenizer(d.tokenizer)
    bos_id = tokenizer.bos_id if documents_start_with_bos(recipe, tokenizer) else None
    ids = SpecialIds(eod_id=tokenizer.eod_id, mask_id=tokenizer.mask_id, vocab_size=recipe.model.architecture().vocab_size,
                     bos_id=bos_id)
    if tokenizer.vocab_size > ids.vocab_size:
        raise ValueError(f"tokenizer {d.tokenizer} has {tokenizer.vocab_size} entries but the model's vocabulary is {ids.vocab_size}")
    cache = d.cache_dir or (str(Path(recipe.checkpoint.save) / "data-cache") if recipe.checkpoint.save else None)
    rank = dist.get_rank()

    def make(verbose: bool) -> MixtureDataset:
        (_, first), *changes = d.mixture_phases(t.seq_length, t.seed, t.global_batch_size, t.train_iters)
        return MixtureDataset(first, t.train_iters * t.global_batch_size, cache_dir=cache, changes=changes, verbose=verbose)

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
    eval_sets = prepare_eval_sets(recipe, tokenizer, bos_id)
    fingerprint = train.dataset.fingerprint if train else None
    return RunData(train=train, mixture_fingerprint=fingerprint, eval=eval_sets, ids=ids, recipe=recipe)
