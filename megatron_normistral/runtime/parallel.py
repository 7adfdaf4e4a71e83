"""Distributed start-up: torch.distributed from torchrun's environment, then megatron-core's
model-parallel groups from a :class:`ParallelConfig`.

The backend follows the hardware: NCCL where CUDA is available (NVIDIA, and AMD through
ROCm's torch.cuda API), gloo otherwise, with the CPU layer for megatron-core switched on.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_normistral.runtime import cpu_compat


class ParallelConfigError(ValueError):
    pass


@dataclass
class ParallelConfig:
    """The recipe's ``parallel`` section: how the model is laid out over processes. DP is
    derived: world size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP): attention heads and FFN split over this many devices."""

    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP): the layers split into this many stages."""

    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (the interleaved 1F1B schedule); None: plain 1F1B. Or give
    num_layers_per_virtual_pipeline_stage."""

    num_layers_per_virtual_pipeline_stage: int | None = None
    """Layers per virtual pipeline stage (Megatron-LM's way of asking for interleaving); sets
    virtual_pipeline_model_parallel_size once the number of layers is known."""

    sequence_parallel: bool = False
    """Sequence parallelism: shard the norm and dropout activations over the TP group (needs TP > 1)."""

    use_distributed_optimizer: bool = False
    """Shard the optimizer state over the data-parallel ranks (ZeRO-1). Also sets the optimizer's
    and DDP's use_distributed_optimizer (not settable there)."""

    def validate(self, world_size: int | None = None) -> None:
        tp, pp, vpp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ParallelConfigError(f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be >= 1")
        if vpp is not None and (vpp < 2 or pp < 2):
            raise ParallelConfigError(
                f"virtual pipeline size {vpp} needs pipeline size >= 2 (got {pp}) and >= 2 chunks per rank"
            )
        if self.sequence_parallel and tp == 1:
            raise ParallelConfigError("sequence parallelism needs tensor parallel size > 1 (got 1)")
        if world_size is not None and world_size % (tp * pp) != 0:
            raise ParallelConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline = {tp} x {pp} = {tp * pp}"
            )

    def resolve_virtual_stages(self, num_layers: int) -> None:
        per_stage = self.num_layers_per_virtual_pipeline_stage
        if per_stage is None:
            return
        pp = self.pipeline_model_parallel_size
        if per_stage < 1 or num_layers % (pp * per_stage):
            raise ParallelConfigError(
                f"{num_layers} layers cannot be split into {pp} pipeline stages of chunks of {per_stage} layers"
            )
        self.virtual_pipeline_model_parallel_size = num_layers // (pp * per_stage)
        if self.virtual_pipeline_model_parallel_size == 1:
            self.virtual_pipeline_model_parallel_size = None  # one chunk per rank: plain 1F1B

    def data_parallel_size(self, world_size: int) -> int:
        self.validate(world_size)
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


def free_port() -> int:
    """A free TCP port on the loopback interface (single-machine process groups)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). A plain ``python script.py`` runs as a world of one.

    Returns (rank, world_size). Idempotent.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        cpu_compat.activate()
        backend = "gloo"
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return rank, world_size


def init_model_parallel(config: ParallelConfig) -> None:
    """Create megatron-core's TP/PP/DP groups for ``config`` (torch.distributed must be up)."""
    from megatron.core import parallel_state

    config.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_model_parallel_size,
    )


def set_seed(seed: int) -> None:
    """Seed every generator. Python/numpy/torch get the same seed on every rank (so data
    order and replicated init agree); megatron-core's tracker derives the per-TP-rank stream
    for tensor-parallel weights and dropout from it."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down process groups; gloo aborts at exit without this. A no-op (that imports
    nothing) when none was created, e.g. after a failed preflight."""
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
