"""Training checkpoints: model + optimizer (megatron-core dist_checkpointing, torch_dist, so a
run resumes at another TP/PP layout) plus the loop's state (step, consumed samples, skipped
steps, RNG), published atomically.

Layout of ``save/``::

    iter_0000100/          a finished checkpoint
      normistral_model.json  architecture (tools/convert_checkpoint.py mcore-to-hf reads it)
      train_state.json       step, consumed samples, stage, mixture plan fingerprint, ...
      rng/rank_00000.pt      per-rank RNG states
      ... torch_dist files (model under "model"/"model0.."; optimizer under "optimizer")
    latest                 text file naming the newest finished checkpoint

A checkpoint is written into ``.tmp-iter_XXXXXXX`` and renamed when every rank has finished
writing; ``latest`` is then replaced with ``os.replace``. A crash mid-save leaves a ``.tmp-``
folder (removed by the next save) and ``latest`` still naming the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_normistral.convert.mcore_io import model_sharded_state_dict, model_state_keys, write_model_metadata
from megatron_normistral.model.sharding import unwrap_model

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    trainable: str = "full"
    extra: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def read_train_state(path: str | os.PathLike) -> TrainState:
    return TrainState(**json.loads((Path(path) / "train_state.json").read_text()))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "train_state.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is not a finished checkpoint")
    return path


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool) -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        # dp_reshardable: DP size may change at resume, TP/PP may not with this optimizer.
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        if is_loading:
            for o in getattr(optimizer, "chained_optimizers", [optimizer]):
                # torch Adam creates its state lazily; loading needs it to exist.
                o._init_optimizer_states_with_dummy_values()
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)


def save_checkpoint(root: str | os.PathLike, chunks, optimizer, state: TrainState, arch, keep_last: int | None = None) -> Path:
    """Collective. Returns the published checkpoint's path."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    rank = dist.get_rank()
    final = root / checkpoint_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd = model_sharded_state_dict(chunks)
    sharded = dict(model_sd)
    sharded["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        write_model_metadata(tmp, arch)
        # train_state.json last: its presence marks the folder as complete.
        (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        if keep_last:
            finished = sorted(p for p in root.glob("iter_*") if p.is_dir())
            for old in finished[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, chunks, optimizer, load_optimizer: bool = True) -> TrainState:
    """Load a training checkpoint into chunks (and optimizer). Collective."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = read_train_state(path)
    model_sd = model_sharded_state_dict(chunks)
    request = dict(model_sd)
    if load_optimizer:
        request["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True)
    loaded = dist_checkpointing.load(request, str(path))
    keys = model_state_keys(len(chunks))
    for chunk, key in zip(chunks, keys):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if load_optimizer:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    saved_ranks = len(list((path / "rng").glob("rank_*.pt")))
    if rng_file.exists() and saved_ranks == dist.get_world_size():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(saved: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    get_cuda_rng_tracker().set_states(saved["tracker"])
