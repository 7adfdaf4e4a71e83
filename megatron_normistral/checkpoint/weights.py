"""The model part of a checkpoint: megatron-core distributed checkpoints (dist_checkpointing,
torch_dist format) of model weights, and ``normistral_model.json``, the architecture beside them.

The state dict is ``{"model": chunk.sharded_state_dict()}`` for one chunk and
``{"model0": ..., "model1": ...}`` per virtual stage; dist_checkpointing stores tensors by their
global (TP=1, PP=1) coordinates, so a checkpoint saved at any TP/PP/VPP layout loads at any
other. Training checkpoints (:mod:`.resume`) and conversion (``convert/``) both read and write
weights through this module.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from megatron_normistral.checkpoint.errors import CheckpointError
from megatron_normistral.model.architectures import ArchConfig
from megatron_normistral.model.provider import ModelConfig
from megatron_normistral.model.sharding import unwrap_model

MODEL_JSON = "normistral_model.json"
MODEL_JSON_FORMAT = 1


# ---- architecture description beside the weights ----------------------------------------
def write_model_metadata(directory: str | os.PathLike, arch: ArchConfig, **extra) -> Path:
    """Write ``normistral_model.json`` (architecture + free-form extras such as the dtype)."""
    path = Path(directory) / MODEL_JSON
    payload = {"format": MODEL_JSON_FORMAT, "arch": dataclasses.asdict(arch), **extra}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_model_metadata(directory: str | os.PathLike) -> tuple[ArchConfig, dict]:
    """(architecture, whole JSON) of a checkpoint written by this module."""
    path = Path(directory) / MODEL_JSON
    if not path.exists():
        raise CheckpointError(f"{path} not found: not a checkpoint written by megatron_normistral")
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != MODEL_JSON_FORMAT:
            raise CheckpointError(f"{path}: unknown format {payload.get('format')!r}")
        return ArchConfig(**payload["arch"]), payload
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a valid architecture record ({e}): damaged?") from None


def check_checkpoint_complete(directory: str | os.PathLike) -> None:
    """``directory`` is a whole torch_dist checkpoint: its ``.metadata`` reads, and every data
    file it names exists and is at least as long as the bytes stored in it. Catches interrupted
    saves and partial copies before anything is read or written (dist_checkpointing would fail
    midway with a bare FileNotFoundError or EOFError). Reads ``.metadata`` and file sizes only.
    Raises :class:`CheckpointError`, one line naming the file."""
    from torch.distributed.checkpoint import FileSystemReader

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such folder")
    if not (d / ".metadata").is_file():
        if (d / "config.json").is_file() or any(d.glob("*.safetensors")):
            raise CheckpointError(f"{d} is a Hugging Face folder, not a megatron-core checkpoint "
                                  "(hf-to-mcore converts it)")
        if (d / "latest").is_file():
            latest = (d / "latest").read_text().strip()
            raise CheckpointError(f"{d} is a folder of training checkpoints: give one of them, e.g. {d / latest}")
        if any(d.glob("*.distcp")):
            raise CheckpointError(f"{d / '.metadata'} is missing but data files are there: the save did not finish; "
                                  "use another checkpoint")
        raise CheckpointError(f"{d} is not a megatron-core checkpoint (no .metadata)")
    try:
        metadata = FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated pickle raises EOFError, UnpicklingError, ...
        raise CheckpointError(f"{d / '.metadata'} is unreadable ({str(e).strip() or type(e).__name__}): "
                              "the checkpoint is damaged; use another one") from None
    needed: dict[str, int] = {}  # data file -> bytes it must hold
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = [name for name in sorted(needed) if not (d / name).is_file()]
    short = [(name, (d / name).stat().st_size, end) for name, end in sorted(needed.items())
             if name not in missing and (d / name).stat().st_size < end]
    if missing or short:
        problems = []
        if missing:
            problems.append(f"{len(missing)} data file(s) missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
        if short:
            name, size, end = short[0]
            problems.append(f"{len(short)} truncated ({name}: {size:,} of {end:,} bytes{' ...' if len(short) > 1 else ''})")
        raise CheckpointError(f"checkpoint {d} is incomplete: {'; '.join(problems)}: the save was interrupted or "
                              "the copy is partial; use another checkpoint or copy it again")


def _arch_of(model_config) -> ArchConfig:
    if isinstance(model_config, ArchConfig):
        return model_config
    return model_config.architecture()  # provider.ModelConfig


@dataclasses.dataclass
class CheckpointModelConfig(ModelConfig):
    """A ``provider.ModelConfig`` of an architecture given whole (``stored``, as read from a
    checkpoint) rather than by name: ``ModelConfig`` resolves ``arch`` among the named
    architectures only, and a checkpoint converted from an HF config holds one of its own.
    ``arch`` is the stored architecture's name; the ``vocab_size``/``num_layers`` overrides
    apply as for a named one."""

    stored: ArchConfig | None = None

    def architecture(self) -> ArchConfig:
        if self.stored is None:
            return super().architecture()
        overrides = {k: v for k, v in (("vocab_size", self.vocab_size), ("num_layers", self.num_layers)) if v is not None}
        return dataclasses.replace(self.stored, **overrides) if overrides else self.stored


def model_config_from_checkpoint(directory: str | os.PathLike, **model_config_fields) -> CheckpointModelConfig:
    """A model config that builds the architecture recorded in the checkpoint, also when it
    is not one of the named architectures (e.g. converted from an HF config)."""
    stored, _ = read_model_metadata(directory)
    return CheckpointModelConfig(arch=stored.name, stored=stored, **model_config_fields)


# ---- from model chunks -------------------------------------------------------------------


def model_sharded_state_dict(chunks: Iterable[torch.nn.Module]) -> dict:
    """The model part of a dist_checkpointing state dict, keyed as training checkpoints key it."""
    chunks = [unwrap_model(c) for c in chunks]
    return {key: chunk.sharded_state_dict() for key, chunk in zip(model_state_keys(len(chunks)), chunks)}


def model_state_keys(num_chunks: int) -> list[str]:
    """Top-level keys of the model part: 'model', or 'model0', 'model1', ... per virtual stage."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def save_model_checkpoint(chunks, directory: str | os.PathLike, model_config, **metadata_extra) -> None:
    """Save the weights of this process's chunks (collective: every rank calls it).

    ``model_config``: a ``provider.ModelConfig`` (or an ``ArchConfig``), recorded in
    ``normistral_model.json``. Callers' scripts need an ``if __name__ == "__main__":`` guard:
    dist_checkpointing's writer starts a spawn multiprocessing manager.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    if rank == 0:
        dtype = next(unwrap_model(next(iter(chunks))).parameters()).dtype
        write_model_metadata(directory, _arch_of(model_config), dtype=str(dtype).removeprefix("torch."), **metadata_extra)
    if dist.is_initialized():
        dist.barrier()


def load_model_weights(chunks, directory: str | os.PathLike, also: dict | None = None) -> dict:
    """Load weights into this process's chunks, whatever layout the checkpoint was saved at;
    the one reader of model weights (a pretrained start, a training resume, conversion).

    ``also``: more of the checkpoint to read in the same pass (e.g. ``{"optimizer": ...}``,
    a sharded state dict to fill); what was read for it is returned. Without it only the
    model's keys are read (a training checkpoint's optimizer state is ignored). Every model
    tensor must be present with its global shape (megatron-core names the tensor otherwise).
    Collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if (directory / MODEL_JSON).exists():
        arch, _ = read_model_metadata(directory)
        _check_chunks_match(chunks, arch)
    request = model_sharded_state_dict(chunks)
    keys = list(request)
    request.update(also or {})
    state = dist_checkpointing.load(request, str(directory))
    for chunk, key in zip([unwrap_model(c) for c in chunks], keys):
        chunk.load_state_dict(state[key], strict=True)
    return {key: state[key] for key in (also or {})}


def _check_chunks_match(chunks, arch: ArchConfig) -> None:
    cfg = unwrap_model(next(iter(chunks))).config
    vocab = unwrap_model(next(iter(chunks))).vocab_size
    ours = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_query_groups, head_dim=cfg.kv_channels, ffn_hidden_size=cfg.ffn_hidden_size,
                vocab_size=vocab)
    diffs = [f"{k}: model {v} vs checkpoint {getattr(arch, k)}" for k, v in ours.items() if v != getattr(arch, k)]
    if diffs:
        raise CheckpointError(f"model does not match the checkpoint's architecture {arch.name!r}: " + "; ".join(diffs))
