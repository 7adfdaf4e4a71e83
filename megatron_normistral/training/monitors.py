"""What the loop watches after each step: non-finite steps (skipped, and the run stopped after
too many in a row) and throughput (tokens/s, TFLOP/s per device, MFU)."""
from __future__ import annotations

import math

import torch

from megatron_normistral.runtime.collectives import any_true, world


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why
    and where the last good checkpoint is."""


class NonFiniteGuard:
    """A step whose loss or gradients hold NaN/inf on any rank is not applied (the optimizer
    does not step); ``max_in_row`` such steps in a row stop the run."""

    def __init__(self, max_in_row: int, save_dir: str | None, log):
        self.max_in_row = max_in_row
        self.save_dir = save_dir
        self.log = log

    @staticmethod
    def skip_update(chunks, reports: list[dict]) -> bool:
        """train_step's ``skip_update`` hook: checked after the backward pass, before the
        update; the answer is the same on every rank."""
        local = not all(math.isfinite(float(r["causal_sum"]) + float(r["masked_sum"])) for r in reports)
        for chunk in chunks:
            for buffer in chunk.buffers:
                local = local or not bool(torch.isfinite(buffer.grad_data).all())
        return any_true(local, world())

    def record(self, state, updated: bool) -> None:
        if updated:
            state.nonfinite_in_row = 0
            return
        state.skipped_steps += 1
        state.nonfinite_in_row += 1
        self.log(f"step {state.step}: non-finite loss or gradients, update skipped ({state.nonfinite_in_row} in a row)")

    def check(self, state) -> None:
        if state.nonfinite_in_row >= self.max_in_row:
            raise TrainingStopped(
                f"stopped: {state.nonfinite_in_row} non-finite steps in a row at step {state.step}; "
                f"the last good checkpoint is still 'latest' in {self.save_dir}"
            )


class Throughput:
    """Tokens/s, model TFLOP/s per device and MFU of one step (the architecture's analytic
    training FLOPs per token, full attention matrix counted)."""

    def __init__(self, arch, seq_length: int, global_batch_size: int, world_size: int, peak_flops_per_device: float | None):
        self.tokens_per_step = global_batch_size * seq_length
        self.flops_per_step = arch.training_flops_per_token(seq_length) * self.tokens_per_step
        self.world_size = world_size
        self.peak = peak_flops_per_device

    def of_step(self, seconds: float) -> dict:
        tflops = self.flops_per_step / seconds / self.world_size / 1e12
        return {
            "tokens_per_s": self.tokens_per_step / seconds,
            "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / self.peak if self.peak else None,
        }
