"""Step metrics: one console line per log interval, JSON lines (--log-json), TensorBoard."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


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
    """Combine every rank's totals (only last-stage ranks have any) into step losses."""
    import torch.distributed as dist

    from megatron_normistral.runtime.parallel import device

    t = totals.as_tensor().to(device())  # NCCL reduces device tensors only
    dist.all_reduce(t)
    causal_sum, causal_tokens, masked_sum, masked_tokens, mean_sum, micro_batches = t.cpu().tolist()
    nan = float("nan")
    return {
        "loss": mean_sum / micro_batches if micro_batches else nan,
        "loss_causal": causal_sum / causal_tokens if causal_tokens else nan,
        "loss_masked": masked_sum / masked_tokens if masked_tokens else nan,
        "tokens_causal": int(causal_tokens),
        "tokens_masked": int(masked_tokens),
    }


class MetricsLogger:
    def __init__(self, log_interval: int, log_json: str | None, tensorboard_dir: str | None, is_logger: bool):
        self.log_interval = log_interval
        self.is_logger = is_logger
        self.json_file = None
        self.writer = None
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
            self.json_file.write(json.dumps(record) + "\n")
            self.json_file.flush()
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if record["step"] % self.log_interval == 0:
            parts = [
                f"step {record['step']:>6}",
                f"loss {record['loss']:.4f}",
                f"(causal {record['loss_causal']:.4f} masked {record['loss_masked']:.4f})",
                f"lr {record['lr']:.3e}",
                f"grad-norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad-norm -",
                f"skipped {record['skipped']}",
                f"{record['tokens_per_s']:,.0f} tok/s",
                f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
            ]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            parts.append(f"mem {record['memory_gb']:.2f} GB")
            print(" | ".join(parts), flush=True)

    def eval(self, step: int, results: dict) -> None:
        if not self.is_logger:
            return
        for language, values in results.items():
            line = " ".join(f"{k} {v:.4f}" for k, v in values.items())
            print(f"eval step {step} [{language}] {line}", flush=True)
            if self.writer:
                for k, v in values.items():
                    self.writer.add_scalar(f"eval/{language}/{k}", v, step)
            if self.json_file:
                self.json_file.write(json.dumps({"step": step, "eval": language, **values}) + "\n")
                self.json_file.flush()

    def close(self) -> None:
        if self.json_file:
            self.json_file.close()
        if self.writer:
            self.writer.close()


def memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return psutil.Process().memory_info().rss / 1e9


def print_rank0(*args) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True, file=sys.stdout)
