"""Workers that build models in a process group (for tests of the model provider)."""
from __future__ import annotations

from megatron_normistral.model.provider import ModelConfig, PrecisionConfig, build_model
from megatron_normistral.runtime.parallel import ParallelConfig, init_model_parallel


def count_parameters(rank: int, world_size: int, model: ModelConfig, parallel: ParallelConfig) -> int:
    """Parameters allocated on this rank's chunks, summed over TP and PP ranks (DP rank 0)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    init_model_parallel(parallel)
    chunks = build_model(model, parallel, PrecisionConfig(), max_sequence_length=32)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # Replicated tensors (norms) exist on every TP rank: count them once.
    local = sum(
        p.numel()
        for c in chunks
        for p in c.parameters()
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0
    )
    if parallel_state.get_data_parallel_rank() != 0:
        local = 0
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)
