"""Small reductions the training loop needs, each over the process group it names.

Device tensors throughout: NCCL (and RCCL on ROCm) reduce only tensors on the GPU; gloo
reduces CPU tensors, which is what ``device()`` gives on a machine without one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_normistral.runtime.parallel import device


def any_true(flag: bool, group) -> bool:
    """True on every rank of ``group`` if ``flag`` is True on any of them."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def min_float(value: float, group) -> float:
    """The smallest ``value`` over the ranks of ``group`` (float64: exact for epoch seconds)."""
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return float(t.item())


def sum_over(values: torch.Tensor, group) -> torch.Tensor:
    """``values`` summed over the ranks of ``group``; returned on the CPU, as float64."""
    t = values.to(device=device(), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.cpu()


def world():
    """The default group, named: every rank of the job."""
    return dist.group.WORLD
