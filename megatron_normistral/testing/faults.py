"""Faults the tests inject through the loop's ``forward_steps`` hook (never through a recipe:
production code carries no test switches)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from megatron_normistral.training.step import lm_forward_step


def _nan_loss(loss_func, *args, **kwargs):
    loss_sum, count, report = loss_func(*args, **kwargs)
    return loss_sum * float("nan"), count, report


def nan_forward_step(data_iterator, model):
    """``lm_forward_step`` whose loss is NaN (so are the gradients of the backward pass)."""
    output, loss_func = lm_forward_step(data_iterator, model)
    return output, partial(_nan_loss, loss_func)


@dataclass(frozen=True)
class NanLossAt:
    """``forward_steps`` for :func:`~megatron_normistral.pretrain.pretrain`: the loss of
    the steps in ``steps`` (0-based, as the loop counts before the step) is NaN. Picklable,
    for the gloo test helper's spawned workers."""

    steps: tuple[int, ...]

    def __call__(self, step: int):
        return nan_forward_step if step in self.steps else lm_forward_step
