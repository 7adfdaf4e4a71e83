"""Small megatron-core code paths, one per CPU-layer patch, run by the tests in fresh
processes with that patch left out (it must then fail) and with every patch (it must pass)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_normistral.model.provider import ModelConfig, PrecisionConfig, build_model
from megatron_normistral.runtime.parallel import ParallelConfig, init_model_parallel, set_seed
from megatron_normistral.testing.layouts import LayoutRun, train_layout
from megatron_normistral.training.ddp import wrap_model
from megatron_normistral.training.optimizer import OptimizerConfig


def wrap_for_ddp(rank: int, world_size: int) -> None:
    """DDP allocates its grad buffers on torch.cuda.current_device()."""
    parallel = ParallelConfig()
    init_model_parallel(parallel)
    wrap_model(build_model(ModelConfig(transformer_impl="local"), parallel, PrecisionConfig(), 32), parallel, PrecisionConfig())


def seed(rank: int, world_size: int) -> None:
    """megatron-core's RNG tracker reads torch.cuda.get_rng_state() when seeded."""
    init_model_parallel(ParallelConfig())
    set_seed(1)


def train_one_step(rank: int, world_size: int, clip_grad: float = 0.0, parallel: ParallelConfig | None = None, arch: str = "tiny") -> list[float]:
    """One training step: optimizer code passes device='cuda' literally; clip_grad > 0
    checks Tensor.type(); PP > 1 synchronises around batched p2p."""
    run = LayoutRun(
        parallel=parallel or ParallelConfig(),
        model=ModelConfig(arch=arch, transformer_impl="local"),
        optimizer=OptimizerConfig(lr=1e-3, clip_grad=clip_grad),
        steps=1,
    )
    return train_layout(rank, world_size, run)["losses"]


def rng_streams(rank: int, world_size: int) -> dict:
    """Per-TP-rank streams: after set_seed, the tracker's model-parallel stream must differ
    between TP ranks while the default stream (data order, replicated init) must agree, and
    a fork must leave the default stream where it was."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    init_model_parallel(ParallelConfig(tensor_model_parallel_size=world_size))
    set_seed(42)
    with get_cuda_rng_tracker().fork():
        model_parallel_draw = torch.rand(4)
    default_draw = torch.rand(4)
    set_seed(42)
    default_without_fork = torch.rand(4)
    draws = [None] * world_size
    dist.all_gather_object(draws, (model_parallel_draw, default_draw))
    return {
        "model_parallel_differs": not torch.equal(draws[0][0], draws[1][0]),
        "default_agrees": torch.equal(draws[0][1], draws[1][1]),
        "fork_leaves_default": torch.equal(default_draw, default_without_fork),
    }
