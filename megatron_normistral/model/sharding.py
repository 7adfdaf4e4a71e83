"""Move weights between one full (single-process) state dict and this process's model chunks.

The full state dict uses the parameter names of a TP=1, PP=1 GPTModel
(``decoder.layers.<global index>...``). Which tensors are split, and along which dim, is read
from megatron-core's own parameter attributes (``tensor_model_parallel``, ``partition_dim``),
so this follows megatron-core rather than a second table of names. One exception needs
knowledge: the fused SwiGLU ``linear_fc1`` is ``[gate; up]`` on *each* TP rank, so its shards
are the matching slices of gate and of up, not plain chunks of the full matrix.
``linear_qkv`` is laid out per query group, so plain chunks are right for GQA.

Used by tests (every layout starts from the same weights and is compared after training) and
by checkpoint conversion. Meant for models that fit in one process's memory.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


class ShardingError(ValueError):
    pass


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Name of a chunk's parameter in the full model (layer index made global)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def _is_glu_fc1(name: str, chunk) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and chunk.config.gated_linear_unit


def shard_of(full: torch.Tensor, param: torch.nn.Parameter, name: str, chunk, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of ``full`` that ``param`` holds on TP rank ``tp_rank``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, chunk):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(shards: list[torch.Tensor], param, name: str, chunk) -> torch.Tensor:
    """Inverse of :func:`shard_of` given every TP rank's shard in rank order."""
    if len(shards) == 1 or not getattr(param, "tensor_model_parallel", False):
        return shards[0]
    dim = param.partition_dim
    if _is_glu_fc1(name, chunk):
        halves = [s.chunk(2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(shards, dim=dim)


def _tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def load_full_state_dict(chunks: Iterable[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this process's shards of ``full`` into the chunks' parameters (in place)."""
    tp_rank, tp_size = _tp_rank_size()
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            if name not in full:
                raise ShardingError(f"tensor {name!r} (local {local!r}) is missing from the full state dict")
            shard = shard_of(full[name], param, name, chunk, tp_rank, tp_size)
            if shard.shape != param.shape:
                raise ShardingError(
                    f"tensor {name!r}: full shape {tuple(full[name].shape)} gives shard {tuple(shard.shape)} "
                    f"on TP rank {tp_rank}/{tp_size}, but the model has {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(shard)


def gather_full_state_dict(chunks: Iterable[torch.nn.Module], tensor_of=None) -> dict[str, torch.Tensor]:
    """The full state dict, assembled from all TP and PP ranks; returned on every rank.

    Collective over the whole world (every rank must call it). DP replicas hold the same
    weights; the copy of DP rank 0 is used. ``tensor_of(param)`` gathers another tensor laid
    out like each parameter instead (e.g. its ``main_grad``).
    """
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        chunk = unwrap_model(chunk)
        for name, param in chunk.named_parameters():
            data = (param if tensor_of is None else tensor_of(param)).detach().float().contiguous()
            if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                shards = [torch.empty_like(data) for _ in range(tp_size)]
                dist.all_gather(shards, data, group=tp_group)
            else:
                shards = [data]
            local[global_name(chunk, name)] = unshard(shards, param, name, chunk).to(param.dtype)
    # Pipeline stages hold different layers: exchange them over the whole world.
    pieces: list = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, local if parallel_state.get_data_parallel_rank() == 0 else {})
    full: dict[str, torch.Tensor] = {}
    for piece in pieces:
        full.update(piece)
    return full


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module
