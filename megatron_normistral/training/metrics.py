"""Step metrics: one console line per log interval, JSON lines (--log-json), TensorBoard."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import psutil

from megatron_normistral.runtime.logs import get_logger
from megatron_normistral.runtime.progress import clock

if TYPE_CHECKING:
    from megatron_normistral.training.trackers import WandbWriter

log = get_logger(__name__)


@dataclass
class LoggingConfig:
    """The recipe's ``logging`` section: what the run reports per step, and where."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"log_interval": "interval", "log_json": "json"}

    interval: int = 1
    """Print a line every N steps (the JSON lines and TensorBoard get every step)."""

    json: str | None = None
    """Append one JSON object per step (and per evaluation) to this file."""

    tensorboard_dir: str | None = None
    """Write TensorBoard events here."""

    peak_flops_per_device: float | None = None
    """Peak dense bf16 FLOP/s of one device, for MFU (e.g. 989e12 for an H100/H200 SXM); None: no MFU."""

    wandb_project: str | None = None
    """Also log the TensorBoard scalars to this Weights & Biases project (pip install wandb;
    WANDB_MODE=offline keeps the run on disk); None: no W&B, and the package is not needed."""

    wandb_exp_name: str | None = None
    """Name of the W&B run (needs wandb_project); None: W&B picks one."""

    wandb_save_dir: str | None = None
    """Folder of the W&B run files (needs wandb_project); None: the folder wandb in
    checkpoint.save, or W&B's own default (WANDB_DIR, else ./wandb) without a save folder."""


@dataclass
class LossTotals:
    """Sums over a step's micro-batches, split by objective mode."""

    causal_sum: float = 0.0
    causal_tokens: int = 0
    masked_sum: float = 0.0
    masked_tokens: int = 0
    micro_batch_means: list[float] = field(default_factory=list)

    def add(self, report: dict) -> None:
        self.causal_sum += float(report["causal_sum"])
        self.causal_tokens += int(report["causal_tokens"])
        self.masked_sum += float(report["masked_sum"])
        self.masked_tokens += int(report["masked_tokens"])
        tokens = int(report["causal_tokens"]) + int(report["masked_tokens"])
        self.micro_batch_means.append((float(report["causal_sum"]) + float(report["masked_sum"])) / max(tokens, 1))

    def as_tensor(self):
        import torch

        return torch.tensor(
            [self.causal_sum, self.causal_tokens, self.masked_sum, self.masked_tokens, sum(self.micro_batch_means), len(self.micro_batch_means)],
            dtype=torch.float64,
        )


def reduce_losses(totals: LossTotals) -> dict:
    """Step losses and token counts over the whole global batch, on every rank.

    The loss is computed on the last pipeline stage, where the tensor-parallel ranks hold
    identical copies of it: only TP rank 0 of that stage contributes, one copy per
    data-parallel replica (summing every rank's copy counted each token TP times). The sum
    runs over the world so that every rank, rank 0 (the logger) included, has the result."""
    import torch
    from megatron.core import parallel_state

    from megatron_normistral.runtime.collectives import sum_over, world

    owner = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0
    values = totals.as_tensor() if owner else torch.zeros_like(totals.as_tensor())
    causal_sum, causal_tokens, masked_sum, masked_tokens, mean_sum, micro_batches = sum_over(values, world()).tolist()
    nan = float("nan")
    return {
        "loss": mean_sum / micro_batches if micro_batches else nan,
        "loss_causal": causal_sum / causal_tokens if causal_tokens else nan,
        "loss_masked": masked_sum / masked_tokens if masked_tokens else nan,
        "tokens_causal": int(causal_tokens),
        "tokens_masked": int(masked_tokens),
    }


def json_safe(record: dict) -> dict:
    """NaN and infinities as null: JSON has no literal for them (Python writes ``NaN``, which
    other readers reject); a step without masked rows has no masked loss."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _number(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


class Progress:
    """'/total (pct) | elapsed H:MM:SS | ETA H:MM:SS' for a step line, as Megatron-LM's log shows
    them. Elapsed counts from this process's first logged step; the ETA is the mean step time of
    this process's steps so far times the steps left (a resumed run starts its own mean)."""

    def __init__(self, total_steps: int | None):
        self.total = total_steps
        self._first: tuple[int, float] | None = None  # (step before the first timed one, time)

    def of(self, step: int, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        if self.total is None:
            return ""
        if self._first is None:
            self._first = (step - 1, now)  # the first step's own time is in the record, not here
            return f"/{self.total} ({step / self.total:.1%})"
        first_step, started = self._first
        elapsed, done = now - started, step - first_step - 1
        eta = elapsed / done * (self.total - step) if done > 0 else math.nan  # clock() shows nan as "-"
        return f"/{self.total} ({step / self.total:.1%}) | elapsed {clock(elapsed)} | ETA {clock(eta)}"


class MetricsLogger:
    def __init__(self, log_interval: int, log_json: str | None, tensorboard_dir: str | None, is_logger: bool,
                 total_steps: int | None = None, wandb: "WandbWriter | None" = None):
        """``wandb``: a started W&B run (rank 0 only, :class:`~.trackers.WandbWriter`); it gets
        the scalars TensorBoard gets, under the same names and steps."""
        self.log_interval = log_interval
        self.progress = Progress(total_steps)
        self.is_logger = is_logger
        self.json_file = None
        self.writer = None
        self.wandb = wandb if is_logger else None
        if is_logger and log_json:
            Path(log_json).parent.mkdir(parents=True, exist_ok=True)
            self.json_file = open(log_json, "a")
        if is_logger and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self._last = time.perf_counter()

    def step(self, record: dict) -> None:
        if not self.is_logger:
            return
        if self.json_file:
            self.json_file.write(json.dumps(json_safe(record)) + "\n")
            self.json_file.flush()
        self._scalars({f"train/{key}": value for key, value in record.items()
                       if isinstance(value, (int, float)) and key != "step" and math.isfinite(value)}, record["step"])
        progress = self.progress.of(record["step"])  # every step, so the first printed line has an ETA
        if record["step"] % self.log_interval == 0:
            parts = [
                f"step {record['step']:>6}{progress}",
                f"loss {record['loss']:.4f}",
                f"(causal {_number(record['loss_causal'], '.4f')} masked {_number(record['loss_masked'], '.4f')})",
                f"lr {record['lr']:.3e}",
                f"grad-norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad-norm -",
                f"skipped {record['skipped']}",
                f"{record['tokens_per_s']:,.0f} tok/s",
                f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
            ]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            parts.append(f"mem {record['memory_gb']:.2f} GB")
            log.info(" | ".join(parts))

    def eval(self, step: int, results: dict) -> None:
        if not self.is_logger:
            return
        for language, values in results.items():
            line = " ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {_number(v, '.4f')}" for k, v in values.items())
            log.info(f"eval step {step} [{language}] {line}")
            if self.json_file:
                self.json_file.write(json.dumps(json_safe({"step": step, "eval": language, **values})) + "\n")
                self.json_file.flush()
        self._scalars({f"eval/{language}/{k}": v for language, values in results.items() for k, v in values.items()}, step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        """The same names and values to every scalar sink (W&B in one call: one row per step)."""
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log(scalars, step)

    def close(self) -> None:
        if self.json_file:
            self.json_file.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.close()


class StepReporter:
    """One record per training step (losses, lr, grad norm, throughput, memory) to the logger."""

    def __init__(self, logger: "MetricsLogger", throughput):
        self.logger = logger
        self.throughput = throughput

    def report(self, state, result, lr: float, seconds: float) -> None:
        totals = LossTotals()
        for report in result.reports:
            totals.add(report)
        self.logger.step({
            "step": state.step, **reduce_losses(totals), "lr": lr, "grad_norm": result.grad_norm,
            "skipped": state.skipped_steps, **self.throughput.of_step(seconds), "memory_gb": memory_gb(),
            "consumed_samples": state.consumed_samples, "step_time_s": seconds, "trainable": state.trainable,
        })

    def evaluation(self, step: int, results: dict) -> None:
        self.logger.eval(step, results)

    def close(self) -> None:
        self.logger.close()


def memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return psutil.Process().memory_info().rss / 1e9
