"""Checks of a run's inputs before any process group exists (before GPUs are spent).

:func:`validate_recipe` checks the settings against each other; this checks them against the
files they name: every corpus ``.bin``/``.idx`` exists and they agree to the byte, no corpus
holds a token id outside the model's vocabulary, the tokenizer loads and fits the model, the
pretrained checkpoint is a megatron-core checkpoint of the recipe's architecture, the eval
sets exist, and a checkpoint to resume from can be loaded at this layout. Each failure is one
:class:`PreflightError` line naming the file or field and what to do.

Only global rank 0 looks at the files (512 ranks reading every ``.idx`` of a 250B-token
mixture would load the file system for nothing); when it fails, the launcher (torchrun,
``srun --kill-on-bad-exit``) ends the others.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_normistral.training.errors import RecipeError

if TYPE_CHECKING:
    from megatron_normistral.config.recipe import Recipe


class PreflightError(RecipeError):
    pass


def preflight(recipe: Recipe, world_size: int | None, rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        return
    arch = recipe.model.architecture()
    _check_tokenizer(recipe, arch.vocab_size)
    _check_corpora(recipe, arch.vocab_size)
    _check_eval_sets(recipe)
    if recipe.checkpoint.pretrained:
        check_pretrained_checkpoint(recipe.checkpoint.pretrained, arch, recipe)
    if recipe.checkpoint.load and world_size is not None:
        _check_resume(recipe, world_size)


def _check_tokenizer(recipe: Recipe, model_vocab: int) -> None:
    from megatron_normistral.tokenizer import load_tokenizer

    spec = recipe.data.tokenizer
    if not spec:
        raise PreflightError("data.tokenizer is empty: give the tokenizer the corpora were preprocessed with (--data.tokenizer)")
    try:
        tokenizer = load_tokenizer(spec)
    except Exception as exc:  # noqa: BLE001 - any failure to load is reported as one line
        raise PreflightError(f"data.tokenizer: {_one_line(exc)}") from None
    if tokenizer.vocab_size > model_vocab:
        raise PreflightError(
            f"data.tokenizer {spec} has {tokenizer.vocab_size} entries but the model's vocabulary is {model_vocab}: "
            f"set --model.vocab_size {tokenizer.vocab_size} (or a multiple of 128 above it)"
        )
    from megatron_normistral.training.data_setup import documents_start_with_bos

    try:  # corpora that agree on <s>, a tokenizer that has it, an id that is never a loss target
        documents_start_with_bos(recipe, tokenizer)
    except RecipeError as exc:
        raise PreflightError(str(exc)) from None


def _check_corpora(recipe: Recipe, model_vocab: int) -> None:
    from megatron_normistral.data.indexed import CorpusError, check_corpus_files, corpus_max_token_id

    for corpus in recipe.data.all_corpora():
        try:
            check_corpus_files(corpus.prefix)
            highest = corpus_max_token_id(corpus.prefix)
        except CorpusError as exc:
            raise PreflightError(f"data.corpora ({corpus.language}): {exc}") from None
        if highest >= model_vocab:
            raise PreflightError(
                f"{corpus.prefix}.bin holds token id {highest}, outside the model's vocabulary of {model_vocab}: "
                "was it preprocessed with another tokenizer? re-run tools/preprocess_data.py with data.tokenizer"
            )


def _check_eval_sets(recipe: Recipe) -> None:
    for i, eval_set in enumerate(recipe.data.eval_sets):
        if not Path(eval_set.path).is_file():
            raise PreflightError(f"data.eval_sets[{i}] ({eval_set.language}): {eval_set.path}: no such file")


def check_pretrained_checkpoint(path: str | os.PathLike, arch, recipe: Recipe | None = None) -> None:
    """``path`` is a megatron-core checkpoint (from tools/convert_checkpoint.py hf-to-mcore or a
    training run) of architecture ``arch``."""
    from megatron_normistral.checkpoint.weights import MODEL_JSON

    path = Path(path)
    field = "checkpoint.pretrained"
    if not path.is_dir():
        raise PreflightError(f"{field}: {path}: no such folder")
    if not (path / ".metadata").is_file():
        if (path / "config.json").is_file() or any(path.glob("*.safetensors")):
            layout = ""
            if recipe is not None:
                layout = f" --tp {recipe.parallel.tensor_model_parallel_size} --pp {recipe.parallel.pipeline_model_parallel_size}"
            raise PreflightError(
                f"{field}: {path} is a Hugging Face folder; convert it first: "
                f"python tools/convert_checkpoint.py hf-to-mcore --hf {path} --out {path}-mcore{layout}"
            )
        if (path / "latest").is_file():
            name = (path / "latest").read_text().strip()
            raise PreflightError(f"{field}: {path} is a folder of training checkpoints; give one of them, e.g. {path / name}")
        raise PreflightError(f"{field}: {path} is not a megatron-core checkpoint (no .metadata): "
                             "make one with tools/convert_checkpoint.py hf-to-mcore")
    from megatron_normistral.checkpoint import CheckpointError
    from megatron_normistral.checkpoint.weights import check_checkpoint_complete, read_model_metadata

    if (path / MODEL_JSON).is_file():  # else a checkpoint from another tool: megatron-core checks shapes at load
        try:
            stored, _ = read_model_metadata(path)
        except (CheckpointError, ValueError, TypeError) as exc:
            raise PreflightError(f"{field}: {_one_line(exc)}") from None
        fields = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                  "ffn_hidden_size", "vocab_size")
        diffs = [f"{k} {getattr(stored, k)} vs {getattr(arch, k)}" for k in fields if getattr(stored, k) != getattr(arch, k)]
        if diffs:
            raise PreflightError(
                f"{field}: {path} holds architecture {stored.name!r}, which differs from the recipe's {arch.name!r} "
                f"(checkpoint vs recipe: {'; '.join(diffs)}): fix --model.arch / --model.vocab_size or the checkpoint path"
            )
    try:
        check_checkpoint_complete(path)  # an interrupted save or a partial copy
    except CheckpointError as exc:
        raise PreflightError(f"{field}: {_one_line(exc)}") from None


def _check_resume(recipe: Recipe, world_size: int) -> None:
    from megatron_normistral.checkpoint import resume as ckpt

    root = Path(recipe.checkpoint.load)
    try:
        latest = ckpt.latest_checkpoint(root)
    except FileNotFoundError as exc:
        raise PreflightError(f"--load: {exc}: point {root / ckpt.LATEST} at a finished iter_* folder") from None
    if latest is None:
        return  # nothing saved yet: a fresh start
    from megatron_normistral.checkpoint.weights import check_checkpoint_complete

    try:
        check_checkpoint_complete(latest)
    except ckpt.CheckpointError as exc:
        raise PreflightError(f"--load: {_one_line(exc)}") from None
    saved = ckpt.read_train_state(latest).layout
    p = recipe.parallel
    wanted = {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
        "data_parallel_size": p.data_parallel_size(world_size),
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }
    try:
        ckpt.check_resume_layout(latest, saved, wanted)
    except ckpt.CheckpointError as exc:
        raise PreflightError(f"--load: {exc}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
