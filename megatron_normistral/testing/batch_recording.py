"""Record the micro-batches the training loop feeds the model, through its ``forward_steps`` hook,
so tests can compare what a tool says the loop trains on with what it did train on."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from megatron_normistral.training.step import lm_forward_step

# Logged step (1-based) -> the micro-batches of this process, in the order they were fed.
RECORDED: dict[int, list[dict]] = {}


def _recording_forward_step(step: int, data_iterator, model):
    batch = next(data_iterator)
    RECORDED.setdefault(step + 1, []).append({k: v.detach().cpu().clone() for k, v in batch.items()
                                              if isinstance(v, torch.Tensor)})
    return lm_forward_step(iter([batch]), model)


@dataclass(frozen=True)
class RecordBatches:
    """``forward_steps`` for :func:`~megatron_normistral.training.loop.pretrain` (the loop passes
    its step count before the step, 0-based; it is recorded under the logged step, 1-based)."""

    def __call__(self, step: int):
        return partial(_recording_forward_step, step)


def train_and_record(rank: int, world_size: int, recipe) -> dict[int, dict[int, list[dict]]]:
    """Worker: train as the recipe says; returns {global rank: {step: micro-batches}} of every
    rank (gathered to all)."""
    import torch.distributed as dist

    from megatron_normistral.testing.tiny_run import run_pretrain

    run_pretrain(rank, world_size, recipe, RecordBatches())
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (dist.get_rank(), dict(RECORDED)))
    return dict(gathered)
