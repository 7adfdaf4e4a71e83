"""The run's checkpoint policy: when to save (interval, the last step, a stop), how many to
keep, when a run exits on its own (``exit_interval``), and where a run resumes from. The
format itself is :mod:`megatron_normistral.checkpoint`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from megatron_normistral.checkpoint import resume as ckpt


@dataclass
class CheckpointConfig:
    """The recipe's ``checkpoint`` section: where a run saves, resumes and starts from, and when
    it saves and exits by itself."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"pretrained_checkpoint": "pretrained"}

    save: str | None = None
    """Directory of the run's training checkpoints (iter_XXXXXXX folders and 'latest')."""

    load: str | None = None
    """Resume from this directory's 'latest' checkpoint, if it has one (usually = save)."""

    pretrained: str | None = None
    """Model weights to start from (a megatron-core checkpoint: tools/convert_checkpoint.py
    hf-to-mcore, or an iter_XXXXXXX folder of an earlier stage); ignored when resuming."""

    save_interval: int | None = None
    """Save every N steps (and always at the last step and when stopping)."""

    keep_last: int | None = None
    """Keep only the newest K checkpoints, deleting older ones."""

    exit_duration_in_mins: float | None = None
    """Save and stop after this much wall time, counted from process start."""

    exit_interval: int | None = None
    """Save and stop at the first step divisible by N (resumable)."""

    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make the run save and stop cleanly (SLURM sends SIGUSR1 before a job's time
    limit when asked to, e.g. #SBATCH --signal=USR1@600)."""

    dist_ckpt_optim_fully_reshardable: bool = False
    """Distributed optimizer: save its state so that a resume may change TP/PP/VPP too
    (megatron-core's fully_reshardable; gathers each DP group's state on its rank 0 at save).
    Off: dp_reshardable, every rank writes its shard, and a resume may change DP only."""


class Checkpointer:
    def __init__(self, config: CheckpointConfig, arch, log, state_extras: Callable[[ckpt.TrainState], dict] | None = None):
        """``config``: the recipe's ``checkpoint`` section. ``state_extras(state)``: what to
        record in ``train_state.json`` beside the loop's counters at each save (e.g. the data
        mixture's fingerprints)."""
        self.config = config
        self.arch = arch
        self.log = log
        self.state_extras = state_extras or (lambda state: {})
        self.optimizer_format = "fully_reshardable" if config.dist_ckpt_optim_fully_reshardable else "dp_reshardable"
        self.last_saved_step: int | None = None

    # ---- resume ------------------------------------------------------------------------
    def resume_point(self) -> Path | None:
        """The checkpoint a run continues from: ``latest`` in ``--load``, if any."""
        return ckpt.latest_checkpoint(self.config.load) if self.config.load else None

    def initial_state(self, trainable: str) -> ckpt.TrainState:
        """The loop's state before the model is built: the checkpoint's (its stage decides
        what the model trains), or a fresh one."""
        resume = self.resume_point()
        return ckpt.read_train_state(resume) if resume else ckpt.TrainState(trainable=trainable)

    def restore(self, model) -> ckpt.TrainState | None:
        """Load the resume point into ``model`` (chunks and optimizer); None for a fresh run."""
        resume = self.resume_point()
        if resume is None:
            return None
        state = ckpt.load_checkpoint(resume, model.chunks, model.optimizer)
        self.log(f"resumed from {resume} at step {state.step} ({state.consumed_samples} samples consumed)")
        self.last_saved_step = state.step
        return state

    # ---- saving ------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config.save)

    def exit_reason(self, step: int) -> str | None:
        """The run stops by itself at the first step divisible by ``exit_interval`` (resumable)."""
        interval = self.config.exit_interval
        return f"exit interval {interval}" if interval and step and step % interval == 0 else None

    def should_save(self, step: int, last_step: bool, stopping: bool) -> bool:
        if not self.enabled or self.last_saved_step == step:
            return False
        interval = self.config.save_interval
        return stopping or last_step or bool(interval and step % interval == 0)

    def save(self, state: ckpt.TrainState, model) -> Path:
        from megatron_normistral.training.ddp import sync_params

        sync_params(model.chunks)  # with overlap_param_gather, other ranks' shards arrive only at the next forward
        state.extra.update(self.state_extras(state))
        path = ckpt.save_checkpoint(self.config.save, model.chunks, model.optimizer, state, self.arch,
                                    self.config.keep_last, optimizer_format=self.optimizer_format)
        self.last_saved_step = state.step
        self.log(f"saved checkpoint {path}")
        return path
