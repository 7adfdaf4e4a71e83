"""A training recipe: the typed configs of every component, read from YAML and overridden on
the command line with Megatron-LM's flag names.

Each component owns its dataclass (ParallelConfig in runtime/, ModelConfig in model/, ...);
this module only composes them, parses, and validates the combination before any process
group is created. There is no global args object: the recipe is passed down explicitly.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.model.provider import ModelConfig, ModelConfigError, PrecisionConfig, validate_layout
from megatron_normistral.runtime.parallel import ParallelConfig, ParallelConfigError
from megatron_normistral.training.setup import OptimizerConfig


class RecipeError(ValueError):
    pass


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    train_iters: int = 10
    seed: int = 1234
    # Fault injection for tests of non-finite handling: the loss of these steps is made NaN.
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    # Stop (with a message; the last good checkpoint stays 'latest') after this many
    # non-finite steps in a row. Each one is skipped and counted.
    max_nonfinite_steps_in_row: int = 5
    # 'micro_batch': mean over counted tokens per micro-batch, micro-batches weighted equally
    # (the authors'); 'token': every counted token in the global batch weighs the same.
    loss_weighting: Literal["micro_batch", "token"] = "micro_batch"


@dataclass
class ScheduleConfig:
    style: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_iters: int = 0
    # cosine: decay from the end of warmup to `decay_iters` (default: train_iters).
    # wsd (warmup-stable-decay): the last `decay_iters` steps decay linearly to min_lr.
    decay_iters: int | None = None


@dataclass
class StageConfig:
    # 'embeddings' = stage 2 (only input embeddings and LM head train); 'full' = stage 3.
    trainable: Literal["embeddings", "full"] = "full"
    # Switch from 'embeddings' to 'full' at this step within one run (None: never).
    switch_to_full_at: int | None = None


@dataclass
class CorpusEntry:
    prefix: str
    language: str
    weight: float
    max_epochs: float = math.inf


@dataclass
class EvalSet:
    language: str
    path: str  # JSON Lines (optionally .gz) with a "text" key: held-out documents


@dataclass
class MixtureChange:
    at_step: int  # these weights apply from this step on (earlier samples are unchanged)
    corpora: list[CorpusEntry] = field(default_factory=list)


@dataclass
class DataConfig:
    tokenizer: str = ""  # tokenizer of the training data (HF folder, .model, or 'tekken')
    corpora: list[CorpusEntry] = field(default_factory=list)
    eval_sets: list[EvalSet] = field(default_factory=list)
    mixture_changes: list[MixtureChange] = field(default_factory=list)
    cache_dir: str | None = None  # mixture-index cache (default: <save>/data-cache)
    allow_redistribute: bool = False  # over an epoch cap: move weight to the others instead of failing


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory of training checkpoints (iter_XXXXXXX + 'latest')
    load: str | None = None  # resume from this directory's 'latest' if it has one
    pretrained_checkpoint: str | None = None  # model-only start (tools/convert_checkpoint.py hf-to-mcore)
    save_interval: int | None = None
    keep_last: int | None = None  # delete older checkpoints, keeping this many
    exit_duration_in_mins: float | None = None  # save and stop after this much wall time
    exit_interval: int | None = None  # save and stop at the first step divisible by this
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class LoggingConfig:
    log_interval: int = 1
    log_json: str | None = None  # append one JSON object per step to this file
    tensorboard_dir: str | None = None
    # Peak dense bf16 FLOP/s of one device, for MFU (e.g. 989e12 for H100 SXM). None: not shown.
    peak_flops_per_device: float | None = None


@dataclass
class EvalConfig:
    eval_interval: int | None = None  # also evaluated at the end when eval sets exist
    eval_max_tokens: int = 65_536  # tokens per language per evaluation


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Megatron-LM flag names users know -> (section, field). Every field is also settable as
# --section.field (e.g. --objective.masked_fraction 0.2).
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": ("parallel", "tensor_model_parallel_size"),
    "--pipeline-model-parallel-size": ("parallel", "pipeline_model_parallel_size"),
    "--num-layers-per-virtual-pipeline-stage": ("parallel", "num_layers_per_virtual_pipeline_stage"),
    "--sequence-parallel": ("parallel", "sequence_parallel"),
    "--use-distributed-optimizer": ("parallel", "use_distributed_optimizer"),
    "--micro-batch-size": ("training", "micro_batch_size"),
    "--global-batch-size": ("training", "global_batch_size"),
    "--seq-length": ("training", "seq_length"),
    "--train-iters": ("training", "train_iters"),
    "--seed": ("training", "seed"),
    "--lr": ("optimizer", "lr"),
    "--min-lr": ("optimizer", "min_lr"),
    "--weight-decay": ("optimizer", "weight_decay"),
    "--clip-grad": ("optimizer", "clip_grad"),
    "--lr-warmup-iters": ("schedule", "warmup_iters"),
    "--lr-decay-style": ("schedule", "style"),
    "--lr-decay-iters": ("schedule", "decay_iters"),
    "--bf16": ("precision", "bf16"),
    "--fp8-format": ("precision", "fp8_format"),
    "--fp8-recipe": ("precision", "fp8_recipe"),
    "--fp8-amax-history-len": ("precision", "fp8_amax_history_len"),
    "--save": ("checkpoint", "save"),
    "--load": ("checkpoint", "load"),
    "--pretrained-checkpoint": ("checkpoint", "pretrained_checkpoint"),
    "--save-interval": ("checkpoint", "save_interval"),
    "--exit-duration-in-mins": ("checkpoint", "exit_duration_in_mins"),
    "--exit-interval": ("checkpoint", "exit_interval"),
    "--eval-interval": ("evaluation", "eval_interval"),
    "--log-interval": ("logging", "log_interval"),
    "--log-json": ("logging", "log_json"),
    "--tensorboard-dir": ("logging", "tensorboard_dir"),
    "--recompute-granularity": ("model", "recompute_granularity"),
}

HELP = {
    "parallel.tensor_model_parallel_size": "tensor-parallel size (TP): splits attention heads and FFN over this many GPUs",
    "parallel.pipeline_model_parallel_size": "pipeline-parallel size (PP): splits the layers into this many stages",
    "parallel.num_layers_per_virtual_pipeline_stage": "layers per virtual stage: enables the interleaved 1F1B schedule",
    "parallel.virtual_pipeline_model_parallel_size": "model chunks per pipeline rank (interleaved schedule); or use --num-layers-per-virtual-pipeline-stage",
    "parallel.sequence_parallel": "sequence parallelism: shard norms/dropout activations over the TP group (needs TP > 1)",
    "parallel.use_distributed_optimizer": "shard optimizer state over data-parallel ranks (ZeRO-1)",
    "training.micro_batch_size": "sequences per micro-batch per data-parallel rank",
    "training.global_batch_size": "sequences per optimizer step over all ranks; must be a multiple of micro-batch x DP",
    "training.seq_length": "tokens per sequence (windows of seq_length + 1 are read for the shift)",
    "training.train_iters": "optimizer steps in the run",
    "training.seed": "seed of model init and of the data order / objective (the data depend on it only)",
    "training.inject_nonfinite_steps": "testing: make the loss NaN at these steps (comma-separated)",
    "training.max_nonfinite_steps_in_row": "stop after this many consecutive non-finite (skipped) steps",
    "training.loss_weighting": "micro_batch (authors': mean per micro-batch) or token (every counted token equal)",
    "optimizer.lr": "peak learning rate",
    "optimizer.min_lr": "learning rate at the end of decay (cosine, wsd)",
    "optimizer.weight_decay": "AdamW weight decay",
    "optimizer.adam_beta1": "AdamW beta1",
    "optimizer.adam_beta2": "AdamW beta2",
    "optimizer.adam_eps": "AdamW epsilon",
    "optimizer.clip_grad": "clip the global gradient norm to this (0: no clipping)",
    "optimizer.decay_norms_and_biases": "also apply weight decay to norm weights and biases",
    "schedule.style": "learning-rate schedule after warmup: constant, cosine, or wsd (warmup-stable-decay)",
    "schedule.warmup_iters": "linear warmup steps from 0 to lr",
    "schedule.decay_iters": "cosine: step where decay ends (default train_iters); wsd: length of the final decay",
    "precision.bf16": "bf16 parameters and activations (fp32 master weights in the optimizer)",
    "precision.fp8_format": "FP8 via Transformer Engine: hybrid or e4m3 (needs TE layers)",
    "precision.fp8_recipe": "FP8 scaling recipe: delayed or tensorwise",
    "precision.fp8_amax_history_len": "FP8 delayed scaling: amax history length",
    "precision.fp8_amax_compute_algo": "FP8 delayed scaling: max or most_recent",
    "model.arch": "architecture name (mistral-nemo-12b, normistral-11b, tiny, tiny-tekken, ...)",
    "model.vocab_size": "override the architecture's vocabulary size (a new tokenizer)",
    "model.num_layers": "override the number of layers",
    "model.transformer_impl": "auto (Transformer Engine if importable with CUDA), local, or transformer_engine",
    "model.attention_mask": "causal or arbitrary: attention-mask type of the layer spec (arbitrary for TE with per-sample masks)",
    "model.init_method_std": "std of the normal weight init (for layers not loaded from a checkpoint)",
    "model.recompute_granularity": "activation recomputation: full or selective",
    "model.recompute_num_layers": "layers per recomputation block (full)",
    "stage.trainable": "embeddings (stage 2: only embeddings + LM head train) or full (stage 3)",
    "stage.switch_to_full_at": "switch from embeddings-only to full training at this step",
    "objective.masked_fraction": "share of sequences trained with masked next-token prediction (rest: causal)",
    "objective.mask_rate": "share of a masked sequence's tokens chosen for masking",
    "objective.max_span": "masked spans have lengths 1..max_span",
    "objective.mask_prob": "chosen span -> <mask> with this probability",
    "objective.random_prob": "chosen span -> random tokens with this probability (else kept)",
    "objective.num_special_tokens": "ids below this are specials: never masked, never scored",
    "objective.attention": "document (block-diagonal over packed documents) or causal (whole sequence)",
    "objective.seed": "seed of the objective (modes, spans); results depend on it and the global sample index only",
    "data.tokenizer": "tokenizer of the corpora (for evaluation text and special ids)",
    "data.corpora": "corpora: list of {prefix, language, weight, max_epochs} (YAML)",
    "data.eval_sets": "held-out sets: list of {language, path to JSONL} (YAML)",
    "data.mixture_changes": "new corpus weights from a step on: list of {at_step, corpora} (YAML)",
    "data.cache_dir": "where the mixture index is cached (default <save>/data-cache)",
    "data.allow_redistribute": "over an epoch cap, move the excess weight to the other corpora instead of failing",
    "checkpoint.save": "directory for training checkpoints",
    "checkpoint.load": "resume from this directory's latest checkpoint (if any)",
    "checkpoint.pretrained_checkpoint": "model weights to start from (megatron checkpoint from tools/convert_checkpoint.py)",
    "checkpoint.save_interval": "save every N steps",
    "checkpoint.keep_last": "keep only the newest K checkpoints",
    "checkpoint.exit_duration_in_mins": "save and exit after this many minutes of wall time",
    "checkpoint.exit_interval": "save and exit at the first step divisible by N (resumable)",
    "checkpoint.exit_signals": "signals that trigger a save and a clean exit (SLURM sends SIGUSR1 before the end)",
    "logging.log_interval": "print a line every N steps",
    "logging.log_json": "append one JSON object per step to this file",
    "logging.tensorboard_dir": "write TensorBoard events here",
    "logging.peak_flops_per_device": "peak FLOP/s of one device, to report MFU",
    "evaluation.eval_interval": "evaluate on the held-out sets every N steps (and at the end)",
    "evaluation.eval_max_tokens": "held-out tokens per language per evaluation",
}


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(value: Any, tp, where: str):
    """Coerce a YAML or command-line value to the field's type, with a clear error."""
    tp = _strip_optional(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError(f"expected one of {list(choices)}, got {value!r}")
            return value
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if dataclasses.is_dataclass(item_tp):
                return [_build(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
            return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _convert(v, _field_type(cls, k), f"{where}.{k}") for k, v in data.items()})


def load_recipe(path: str | os.PathLike | None) -> Recipe:
    """Read a YAML recipe (sections = Recipe fields). Unknown keys are errors."""
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    recipe = Recipe()
    for name, value in data.items():
        setattr(recipe, name, _build(type(getattr(recipe, name)), value or {}, f"{path}: {name}"))
    return recipe


def _all_fields():
    for section in dataclasses.fields(Recipe):
        cls = type(getattr(Recipe(), section.name))
        for f in dataclasses.fields(cls):
            yield section.name, cls, f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_normistral.py",
        description="Train NorMistral with megatron-core: stage 2 (embeddings only) or stage 3 (full), "
        "hybrid causal / masked next-token objective. Launch with torchrun. Settings come from "
        "--config (YAML) and are overridden by the flags below (Megatron-LM names where they exist, "
        "every field also as --section.field).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    aliases = {v: k for k, v in MEGATRON_FLAGS.items()}
    for section, cls, f in _all_fields():
        key = f"{section}.{f.name}"
        names = [f"--{key}"]
        if (section, f.name) in aliases:
            names.insert(0, aliases[(section, f.name)])
        tp = _strip_optional(_field_type(cls, f.name))
        kwargs = dict(dest=key, default=argparse.SUPPRESS, help=HELP.get(key, key))
        if tp is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        parser.add_argument(*names, **kwargs)
    return parser


def parse_recipe(argv: list[str] | None = None) -> tuple[Recipe, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = load_recipe(args.config)
    for section, cls, f in _all_fields():
        key = f"{section}.{f.name}"
        if key in vars(args):
            setattr(getattr(recipe, section), f.name, _convert(vars(args)[key], _field_type(cls, f.name), f"--{key}"))
    return recipe, args


def validate_recipe(recipe: Recipe, world_size: int) -> None:
    """Everything that can be checked before process groups exist, with the numbers."""
    p, t = recipe.parallel, recipe.training
    try:
        p.resolve_virtual_stages(recipe.model.architecture().num_layers)
        p.validate(world_size)
        validate_layout(recipe.model.architecture(), p)
    except (ParallelConfigError, ModelConfigError) as exc:
        raise RecipeError(str(exc)) from None
    dp = p.data_parallel_size(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise RecipeError(
            f"global batch {t.global_batch_size} is not divisible by micro-batch x data-parallel = "
            f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
        )
    if p.sequence_parallel and t.seq_length % p.tensor_model_parallel_size:
        raise RecipeError(f"sequence length {t.seq_length} not divisible by TP {p.tensor_model_parallel_size} (sequence parallel)")
    if recipe.stage.switch_to_full_at is not None and recipe.stage.trainable != "embeddings":
        raise RecipeError("stage.switch_to_full_at needs stage.trainable: embeddings")
    if recipe.checkpoint.save_interval and not recipe.checkpoint.save:
        raise RecipeError("--save-interval needs --save")
    if not recipe.data.corpora:
        raise RecipeError("data.corpora is empty: give the corpora in the recipe (see examples/)")
