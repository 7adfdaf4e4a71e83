"""A tiny but real training setup for tests: a small SentencePiece tokenizer trained on the
bundled corpus, two preprocessed languages, held-out text, and a recipe for the tiny model."""
from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

from megatron_normistral.config.recipe import Recipe
from megatron_normistral.data.mixture import CorpusSpec
from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.model.provider import ModelConfig
from megatron_normistral.training.checkpointer import CheckpointConfig
from megatron_normistral.training.data_setup import DataConfig, EvalSet
from megatron_normistral.training.evaluator import EvalConfig
from megatron_normistral.training.loop import TrainConfig
from megatron_normistral.training.metrics import LoggingConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "data" / "corpus"
TOKENIZER_VOCAB = 512  # 16 specials + 256 byte pieces + the characters and a few merges: small, fast


def _subset(lang: str, out: Path, skip: int, take: int) -> Path:
    with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][skip : skip + take]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def prepare_tiny_data(workdir: str | Path, languages=("nb", "nn"), train_docs: int = 24, eval_docs: int = 4) -> dict:
    """Writes tokenizer/, <lang>_text_document.{bin,idx}, heldout_<lang>.jsonl. Idempotent."""
    from megatron_normistral.data.preprocess import PreprocessConfig, preprocess
    from megatron_normistral.tokenizer.trainer import SamplingConfig, TokenizerTrainingConfig, train_tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    done = workdir / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    train_files = {lang: _subset(lang, workdir / f"train_{lang}.jsonl", 0, train_docs) for lang in languages}
    heldout = {lang: str(_subset(lang, workdir / f"heldout_{lang}.jsonl", train_docs, eval_docs)) for lang in languages}
    tokenizer_dir = workdir / "tokenizer"
    train_tokenizer(
        TokenizerTrainingConfig(
            inputs={k: str(v) for k, v in train_files.items()}, output=str(tokenizer_dir), vocab_size=TOKENIZER_VOCAB,
            backend="sentencepiece", sampling=SamplingConfig(), threads=1, verbose=False,
        )
    )
    prefixes = {}
    for lang, path in train_files.items():
        prefix = str(workdir / f"{lang}_text_document")
        preprocess(PreprocessConfig(inputs=[str(path)], output_prefix=prefix, tokenizer=str(tokenizer_dir), workers=0,
                                    append_eod=True, progress_interval=0), log=open("/dev/null", "w"))
        prefixes[lang] = prefix
    info = {"tokenizer": str(tokenizer_dir), "prefixes": prefixes, "heldout": heldout}
    done.write_text(json.dumps(info))
    return info


def tiny_recipe(data: dict, run_dir: str | Path, **sections) -> Recipe:
    """The tiny model on the prepared data; ``sections`` replace fields per section, e.g.
    ``training={"train_iters": 4}``."""
    run_dir = Path(run_dir)
    recipe = Recipe(
        model=ModelConfig(arch="tiny", vocab_size=TOKENIZER_VOCAB, transformer_impl="local"),
        training=TrainConfig(micro_batch_size=2, global_batch_size=8, seq_length=64, train_iters=4, seed=7),
        objective=ObjectiveConfig(masked_fraction=0.25),
        data=DataConfig(
            tokenizer=data["tokenizer"],
            corpora=[CorpusSpec(prefix=p, language=lang, weight=1.0, max_epochs=1000) for lang, p in data["prefixes"].items()],
            eval_sets=[EvalSet(language=lang, path=p) for lang, p in data["heldout"].items()],
            cache_dir=str(run_dir / "data-cache"),
        ),
        checkpoint=CheckpointConfig(save=str(run_dir / "ckpt"), load=str(run_dir / "ckpt")),
        logging=LoggingConfig(json=str(run_dir / "log.jsonl")),
        evaluation=EvalConfig(interval=None, max_words=500),
    )
    recipe.optimizer = replace(recipe.optimizer, lr=3e-3, weight_decay=0.01)
    for section, values in sections.items():
        setattr(recipe, section, replace(getattr(recipe, section), **values))
    return recipe


def run_pretrain(rank: int, world_size: int, recipe: Recipe, forward_steps=None) -> dict:
    """Worker: run the training loop; returns the final train state and log records.
    ``forward_steps``: the loop's hook for a faulty forward step (testing.faults)."""
    from dataclasses import asdict

    from megatron_normistral.pretrain import pretrain
    from megatron_normistral.training.monitors import TrainingStopped

    try:
        state = asdict(pretrain(recipe, forward_steps))
        stopped = None
    except TrainingStopped as exc:
        state, stopped = None, str(exc)
    return {"state": state, "stopped": stopped}


def run_pretrain_sequence(rank: int, world_size: int, recipes: list[Recipe]) -> list[dict]:
    """Worker: several runs one after another in the same process group (each sets up its
    own model-parallel groups), to pay for process start-up once."""
    return [run_pretrain(rank, world_size, recipe) for recipe in recipes]


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def checkpoint_weights(recipe: Recipe, paths: list[str]) -> list[dict]:
    """Full weights stored in each training checkpoint (collective; parallel state must be
    initialised for recipe's layout)."""
    from megatron_normistral.model.provider import build_model
    from megatron_normistral.model.sharding import gather_full_state_dict
    from megatron_normistral.checkpoint.weights import load_model_weights

    weights = []
    for path in paths:
        chunks = build_model(recipe.model, recipe.parallel, recipe.precision, recipe.training.seq_length)
        load_model_weights(chunks, path)
        weights.append(gather_full_state_dict(chunks))
    return weights


def run_pretrain_and_read(rank: int, world_size: int, recipe: Recipe, read: list[str], forward_steps=None) -> dict:
    """Worker: train, then read back the weights of the checkpoints in ``read``."""
    result = run_pretrain(rank, world_size, recipe, forward_steps)
    result["weights"] = checkpoint_weights(recipe, read)
    return result
