"""A training recipe: the sections of every component, read from YAML and overridden on the
command line with Megatron-LM's flag names.

Each component owns its section's dataclass, next to the code that uses it (see
:class:`Recipe`); two of them are megatron-core's own config classes, subclassed
(``optimizer``, ``ddp``). This module only composes the sections, parses them (YAML, flags),
and validates the combination before any process group is created. What a section offers and
the help of every field come from the dataclasses themselves (:mod:`.fields`). There is no
global args object: the recipe is passed down explicitly.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_normistral.config.fields import (
    Note,
    convert,
    field_help,
    field_type,
    old_names,
    read_section,
    section_fields,
    strip_optional,
)
from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.model.architectures import UnknownArchitectureError
from megatron_normistral.model.provider import ModelConfig, ModelConfigError, PrecisionConfig, validate_attention, validate_layout
from megatron_normistral.runtime.parallel import ParallelConfig, ParallelConfigError
from megatron_normistral.training.checkpointer import CheckpointConfig
from megatron_normistral.training.data_setup import DataConfig
from megatron_normistral.training.ddp import DDPConfig
from megatron_normistral.training.errors import RecipeError
from megatron_normistral.training.evaluator import EvalConfig
from megatron_normistral.training.loop import TrainConfig
from megatron_normistral.training.metrics import LoggingConfig
from megatron_normistral.training.optimizer import OptimizerConfig
from megatron_normistral.training.schedule import ScheduleConfig
from megatron_normistral.training.stages import StageConfig
from megatron_normistral.runtime.logs import get_logger

log = get_logger(__name__)

__all__ = ["MEGATRON_FLAGS", "Recipe", "RecipeError", "build_parser", "flag_name", "load_recipe", "parse_recipe",
           "validate_recipe"]


@dataclass
class Recipe:
    """Every section of a run; each is the dataclass of the component that uses it."""

    model: ModelConfig = field(default_factory=ModelConfig)  # model/provider.py
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # runtime/parallel.py
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)  # model/provider.py
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # training/optimizer.py (megatron-core's)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # training/schedule.py
    training: TrainConfig = field(default_factory=TrainConfig)  # training/loop.py
    stage: StageConfig = field(default_factory=StageConfig)  # training/stages.py
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # data/objective.py
    data: DataConfig = field(default_factory=DataConfig)  # training/data_setup.py (corpora: data/mixture.py)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # training/checkpointer.py
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # training/metrics.py
    evaluation: EvalConfig = field(default_factory=EvalConfig)  # training/evaluator.py
    ddp: DDPConfig = field(default_factory=DDPConfig)  # training/ddp.py (megatron-core's)

    def to_dict(self) -> dict:
        """Every setting, as a YAML recipe gives it (what --print-config prints; load_recipe
        reads it back)."""
        return {name: {f.name: _plain(getattr(section, f.name)) for f in section_fields(type(section))}
                for name, section in self.sections()}

    def sections(self) -> list[tuple[str, object]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


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
    "--pretrained-checkpoint": ("checkpoint", "pretrained"),
    "--save-interval": ("checkpoint", "save_interval"),
    "--exit-duration-in-mins": ("checkpoint", "exit_duration_in_mins"),
    "--exit-interval": ("checkpoint", "exit_interval"),
    "--dist-ckpt-optim-fully-reshardable": ("checkpoint", "dist_ckpt_optim_fully_reshardable"),
    "--eval-interval": ("evaluation", "interval"),
    "--log-interval": ("logging", "interval"),
    "--log-json": ("logging", "json"),
    "--tensorboard-dir": ("logging", "tensorboard_dir"),
    "--wandb-project": ("logging", "wandb_project"),
    "--wandb-exp-name": ("logging", "wandb_exp_name"),
    "--wandb-save-dir": ("logging", "wandb_save_dir"),
    "--recompute-granularity": ("model", "recompute_granularity"),
    "--num-layers": ("model", "num_layers"),
    "--overlap-grad-reduce": ("ddp", "overlap_grad_reduce"),
    "--overlap-param-gather": ("ddp", "overlap_param_gather"),
    "--ddp-bucket-size": ("ddp", "bucket_size"),
}


def print_note(message: str) -> None:
    """A one-line note on stderr, from global rank 0 only (every rank reads the recipe)."""
    if os.environ.get("RANK", "0") == "0":  # before torch.distributed: the launcher's rank
        log.warning(f"note: {message}")


def load_recipe(path: str | os.PathLike | None, note: Note = print_note) -> Recipe:
    """Read a YAML recipe (sections = Recipe fields). Unknown keys are errors; old names of
    renamed fields are read, with a note."""
    if path is None:
        return Recipe()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    recipe = Recipe()
    sections = dict(recipe.sections())
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    for name, value in data.items():
        setattr(recipe, name, read_section(type(sections[name]), value or {}, f"{path}: {name}", note))
    return recipe


def _settings():
    """(section, section class, field) of every setting."""
    for name, section in Recipe().sections():
        for f in section_fields(type(section)):
            yield name, type(section), f


def _help(cls, name: str, default) -> str:
    """The field's docstring and its default; '' for a field without a docstring (a test
    checks that none is without)."""
    text = field_help(cls, name)
    return f"{text} (default: {default})".replace("%", "%%") if text else ""  # argparse %-formats help


def _bool_flag(cls, name: str) -> dict:
    """A bool flag alone means true (--sequence-parallel); it also takes a value (--bf16 false)."""
    return dict(nargs="?", const="true", metavar="BOOL") if strip_optional(field_type(cls, name)) is bool else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_normistral.py",
        description="Train NorMistral with megatron-core: stage 2 (embeddings only) or stage 3 (full), "
        "hybrid causal / masked next-token objective. Launch with torchrun. Settings come from "
        "--config (YAML) and are overridden by the flags below (Megatron-LM names where they exist, "
        "every field also as --section.field).",
        # Megatron-LM flags share prefixes (--num-layers vs --num-layers-per-virtual-pipeline-stage,
        # --lr-warmup vs --lr-warmup-iters): an abbreviation must never pick one silently.
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    aliases = {v: k for k, v in MEGATRON_FLAGS.items()}
    defaults = dict(Recipe().sections())
    for section, cls, f in _settings():
        key = f"{section}.{f.name}"
        names = [f"--{key}"]
        if (section, f.name) in aliases:
            names.insert(0, aliases[(section, f.name)])
        parser.add_argument(*names, dest=key, default=argparse.SUPPRESS, **_bool_flag(cls, f.name),
                            help=_help(cls, f.name, getattr(defaults[section], f.name)))
    for section, section_obj in defaults.items():
        for old, new in old_names(type(section_obj)).items():
            parser.add_argument(f"--{section}.{old}", dest=f"{section}.{old}", default=argparse.SUPPRESS,
                                **_bool_flag(type(section_obj), new), help=f"old name of --{section}.{new} (still accepted)")
    return parser


def parse_recipe(argv: list[str] | None = None, note: Note = print_note) -> tuple[Recipe, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(args)
    for section, section_obj in Recipe().sections():
        for old, new in old_names(type(section_obj)).items():
            if f"{section}.{old}" in given:
                if f"{section}.{new}" in given:
                    raise RecipeError(f"--{section}.{old} is the old name of --{section}.{new}; give only --{section}.{new}")
                note(f"--{section}.{old}: renamed to --{section}.{new}; the old name still works")
                given[f"{section}.{new}"] = given.pop(f"{section}.{old}")
    recipe = load_recipe(args.config, note)
    for section, cls, f in _settings():
        key = f"{section}.{f.name}"
        if key in given:
            setattr(getattr(recipe, section), f.name, convert(given[key], field_type(cls, f.name), f"--{key}", note))
    return recipe, args


# Ranges of numeric fields: (section, field, lowest allowed, whether the lowest is allowed).
# Checked before anything starts: megatron-core and torch fail much later, or not at all
# (a global batch of 0 trains nothing and ends in StopIteration).
_RANGES = (
    ("training", "micro_batch_size", 1, True),
    ("training", "global_batch_size", 1, True),
    ("training", "seq_length", 1, True),
    ("training", "train_iters", 0, True),
    ("training", "max_nonfinite_steps_in_row", 1, True),
    ("optimizer", "lr", 0.0, True),
    ("optimizer", "min_lr", 0.0, True),
    ("optimizer", "weight_decay", 0.0, True),
    ("optimizer", "adam_beta1", 0.0, True),
    ("optimizer", "adam_beta2", 0.0, True),
    ("optimizer", "adam_eps", 0.0, False),
    ("optimizer", "clip_grad", 0.0, True),
    ("schedule", "warmup_iters", 0, True),
    ("schedule", "decay_iters", 1, True),
    ("model", "vocab_size", 1, True),
    ("model", "num_layers", 1, True),
    ("model", "recompute_num_layers", 1, True),
    ("checkpoint", "save_interval", 1, True),
    ("checkpoint", "keep_last", 1, True),
    ("checkpoint", "exit_duration_in_mins", 0.0, False),
    ("checkpoint", "exit_interval", 1, True),
    ("logging", "interval", 1, True),
    ("logging", "peak_flops_per_device", 0.0, False),
    ("evaluation", "interval", 1, True),
    ("evaluation", "max_tokens", 1, True),
    ("evaluation", "max_words", 0, True),
)


def flag_name(section: str, name: str) -> str:
    """The flag users know for a field: Megatron-LM's where there is one."""
    for flag, key in MEGATRON_FLAGS.items():
        if key == (section, name):
            return flag
    return f"--{section}.{name}"


def _check_ranges(recipe: Recipe) -> None:
    for section, name, lowest, inclusive in _RANGES:
        value = getattr(getattr(recipe, section), name)
        if value is None:
            continue
        if value < lowest or (value == lowest and not inclusive) or value != value:  # NaN too
            bound = f">= {lowest}" if inclusive else f"> {lowest}"
            raise RecipeError(f"{flag_name(section, name)} {value}: must be {bound}")
    for name in ("adam_beta1", "adam_beta2"):
        if getattr(recipe.optimizer, name) >= 1:
            raise RecipeError(f"{flag_name('optimizer', name)} {getattr(recipe.optimizer, name)}: must be < 1")
    for phase, corpora in [("data.corpora", recipe.data.corpora)] + [
        (f"data.mixture_changes[{i}].corpora", c.corpora) for i, c in enumerate(recipe.data.mixture_changes)
    ]:
        for i, corpus in enumerate(corpora):
            if not corpus.weight >= 0 or not corpus.max_epochs > 0:
                raise RecipeError(f"{phase}[{i}] ({corpus.prefix}): weight must be >= 0 and max_epochs > 0, "
                                  f"got {corpus.weight} and {corpus.max_epochs}")
        if corpora and not sum(c.weight for c in corpora) > 0:
            raise RecipeError(f"{phase}: the weights sum to 0; give at least one corpus a weight > 0")
    import signal

    for name in recipe.checkpoint.exit_signals:
        if not isinstance(getattr(signal, str(name), None), signal.Signals):
            raise RecipeError(f"checkpoint.exit_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    try:
        recipe.objective.__post_init__()  # flags set fields one by one, after construction
    except ValueError as exc:
        raise RecipeError(f"objective: {exc}") from None


def _check_components(recipe: Recipe) -> None:
    """The attention backend and layers that will run here; DDP overlap needs; the fields the
    optimizer and DDP configs take from precision and parallel, never set twice."""
    try:
        validate_attention(recipe.model)
        recipe.ddp.validate(recipe.parallel)
        recipe.optimizer.resolved(recipe.parallel, recipe.precision)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def _check_wandb(logging) -> None:
    """W&B's other flags need a project; a project needs the package (looked up, not imported)."""
    import importlib.util

    if not logging.wandb_project:
        for name in ("wandb_exp_name", "wandb_save_dir"):
            if getattr(logging, name):
                raise RecipeError(f"{flag_name('logging', name)} needs --wandb-project")
    elif importlib.util.find_spec("wandb") is None:
        raise RecipeError("--wandb-project: the wandb package is not installed (pip install wandb)")


def validate_recipe(recipe: Recipe, world_size: int | None) -> None:
    """Everything that can be checked before process groups exist, with the numbers.
    ``world_size`` None (no launcher: ``--print-config``) skips what depends on it."""
    p, t = recipe.parallel, recipe.training
    _check_ranges(recipe)
    try:
        p.resolve_virtual_stages(recipe.model.architecture().num_layers)
        p.validate(world_size)
        validate_layout(recipe.model.architecture(), p)
    except (ParallelConfigError, ModelConfigError) as exc:
        raise RecipeError(str(exc)) from None
    except UnknownArchitectureError as exc:
        raise RecipeError(f"--model.arch: {exc.args[0]}") from None
    dp = p.data_parallel_size(world_size) if world_size is not None else None
    if dp is not None and t.global_batch_size % (t.micro_batch_size * dp):
        raise RecipeError(
            f"global batch {t.global_batch_size} is not divisible by micro-batch x data-parallel = "
            f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
        )
    if dp is None and t.global_batch_size % t.micro_batch_size:
        raise RecipeError(f"global batch {t.global_batch_size} is not divisible by micro-batch {t.micro_batch_size}")
    if p.sequence_parallel and t.seq_length % p.tensor_model_parallel_size:
        raise RecipeError(f"sequence length {t.seq_length} not divisible by TP {p.tensor_model_parallel_size} (sequence parallel)")
    if recipe.stage.switch_to_full_at is not None and recipe.stage.trainable != "embeddings":
        raise RecipeError("stage.switch_to_full_at needs stage.trainable: embeddings")
    if recipe.checkpoint.save_interval and not recipe.checkpoint.save:
        raise RecipeError("--save-interval needs --save")
    _check_wandb(recipe.logging)
    if not recipe.data.corpora:
        raise RecipeError("data.corpora is empty: give the corpora in the recipe (see examples/)")
    if t.train_iters > 0:  # the change points of data.mixture_changes
        recipe.data.mixture_phases(t.seq_length, t.seed, t.global_batch_size, t.train_iters)
    _check_components(recipe)
