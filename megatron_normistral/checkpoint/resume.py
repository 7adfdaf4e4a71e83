"""Training checkpoints, the ones a run resumes from: model weights (:mod:`.weights`) +
optimizer state (megatron-core dist_checkpointing, torch_dist) plus the loop's state (step,
consumed samples, skipped steps, the layout, RNG), published atomically.

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

What a resume may change (``train_state.json`` records the layout it was saved at, and
:func:`check_resume_layout` refuses the rest before anything is read):

- without the distributed optimizer: anything (TP, PP, VPP, DP); model and optimizer state
  are stored per parameter in global coordinates;
- with the distributed optimizer in ``dp_reshardable`` format (the default: every rank
  writes its own shard, no gathering): DP only. Its shards are slices of megatron-core's
  flat gradient buckets, whose contents depend on TP, PP and VPP;
- with ``fully_reshardable`` (``--dist-ckpt-optim-fully-reshardable``): anything. Saving
  gathers each DP group's optimizer state on its DP rank 0 first (memory and time).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_normistral.checkpoint.errors import CheckpointError
from megatron_normistral.checkpoint.weights import load_model_weights, model_sharded_state_dict, write_model_metadata

LATEST = "latest"
# How the distributed optimizer's state is laid out in a checkpoint (megatron-core's names).
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    trainable: str = "full"
    extra: dict = field(default_factory=dict)
    # The parallel layout the checkpoint was saved at (see current_layout); {} in checkpoints
    # written before it was recorded.
    layout: dict = field(default_factory=dict)


def start_writer_immune_to(signal_names) -> None:
    """Start dist_checkpointing's long-lived writer helper now, deaf to the stop signals.

    The first ``dist_checkpointing.save`` starts a ``multiprocessing`` Manager (spawn: a new
    interpreter, whose signal dispositions are the defaults) that every later save reports
    through. torchrun forwards a stop signal to the worker's whole process group, and SLURM
    delivers it to every process of the step, so the Manager dies of SIGUSR1/SIGTERM and the
    save the signal asked for then fails (BrokenPipeError), after an earlier periodic save in
    the same process. A spawned child keeps only *ignored* dispositions across exec, so it is
    started here with the stop signals ignored; they are blocked meanwhile, so one that
    arrives in the window reaches this process's handler afterwards."""
    import signal

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "_get_write_results_queue", None)
    if start is None:  # another megatron-core: nothing known to protect
        return
    signums = [getattr(signal, name) for name in signal_names]
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    # Ignoring discards what is pending: note it first, and send it again afterwards.
    arrived = signal.sigpending() & set(signums)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        start()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in arrived:
            signal.raise_signal(signum)  # pending until unblocked below
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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


def current_layout(optimizer=None, optimizer_format: str | None = None) -> dict:
    """This process's parallel layout (parallel state must be initialised), as recorded in a
    checkpoint. ``optimizer_format`` only counts with the distributed optimizer."""
    from megatron.core import parallel_state

    distributed = bool(optimizer is not None and _distributed_optimizers(optimizer))
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "use_distributed_optimizer": distributed,
        "optimizer_format": (optimizer_format or "dp_reshardable") if distributed else None,
    }


def _describe(layout: dict) -> str:
    text = f"TP={layout['tensor_model_parallel_size']} PP={layout['pipeline_model_parallel_size']}"
    if layout.get("virtual_pipeline_model_parallel_size"):
        text += f" VPP={layout['virtual_pipeline_model_parallel_size']}"
    return text + f" DP={layout['data_parallel_size']}"


def check_resume_layout(path, saved: dict, wanted: dict) -> None:
    """Raise CheckpointError if the optimizer state saved at layout ``saved`` cannot be loaded
    at layout ``wanted`` (both as :func:`current_layout` writes them; ``wanted`` may omit
    ``data_parallel_size``). An empty ``saved`` (an older checkpoint) is not checked."""
    if not saved:
        return
    if saved["use_distributed_optimizer"] != wanted["use_distributed_optimizer"]:
        had = "with" if saved["use_distributed_optimizer"] else "without"
        flag = "add --use-distributed-optimizer" if saved["use_distributed_optimizer"] else "drop --use-distributed-optimizer"
        raise CheckpointError(
            f"{path} was saved {had} the distributed optimizer, whose optimizer state has another format: {flag} to resume it"
        )
    if saved["use_distributed_optimizer"] and saved["optimizer_format"] == "dp_reshardable":
        keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")
        if any((saved.get(k) or None) != (wanted.get(k) or None) for k in keys):
            raise CheckpointError(
                f"{path} was saved at {_describe(saved)} with the distributed optimizer in dp_reshardable format, which can "
                f"change only DP at resume: resume at TP={saved['tensor_model_parallel_size']} "
                f"PP={saved['pipeline_model_parallel_size']}"
                + (f" VPP={saved['virtual_pipeline_model_parallel_size']}" if saved.get("virtual_pipeline_model_parallel_size") else "")
                + ", or resume there once with --dist-ckpt-optim-fully-reshardable and --save-interval 1 --exit-interval 1 "
                "to write a checkpoint any layout can load"
            )


def _optimizer_metadata(optimizer_format: str) -> dict:
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format {optimizer_format!r}: expected one of {OPTIMIZER_FORMATS}")
    # mem_efficient: gather each DP group's state on its DP rank 0 over gloo, in host
    # memory, instead of an all-gather to every rank (a whole model's Adam state per GPU).
    return {"distrib_optim_sharding_type": optimizer_format, "distrib_optim_fully_reshardable_mem_efficient": True}


def _optimizer_sharded_state_dict(optimizer, model_sd: dict, is_loading: bool, optimizer_format: str) -> dict:
    dist_opts = _distributed_optimizers(optimizer)
    if not dist_opts:
        return optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if is_loading:
        for o in dist_opts:
            # torch Adam creates its state lazily; loading needs it to exist.
            o._init_optimizer_states_with_dummy_values()
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_optimizer_metadata(optimizer_format))


@contextlib.contextmanager
def _adam_step_may_be_missing(optimizer):
    """megatron-core 0.16.1's ``fully_reshardable`` load hands ``_set_main_param_and_optimizer_states``
    no "step" (torch Adam keeps one per parameter; the format keeps it in the param groups)
    and that method copies every state key, so it fails with ``KeyError: 'step'``. For the
    duration of the load, copy only the keys the checkpoint has (the steps are repaired after
    the load by _give_each_param_its_own_adam_step)."""
    patched = []
    for dist_opt in _distributed_optimizers(optimizer):
        if dist_opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue  # that branch copies only the given keys already

        def set_states(model_param, tensors, _opt=dist_opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            targets = {"param": main_param, **_opt.optimizer.state[main_param]}
            for key, target in targets.items():
                if key in tensors:
                    target.copy_(tensors[key])

        dist_opt._set_main_param_and_optimizer_states = set_states
        patched.append(dist_opt)
    try:
        yield
    finally:
        for dist_opt in patched:
            del dist_opt._set_main_param_and_optimizer_states  # the class's method again


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _give_each_param_its_own_adam_step(optimizer) -> None:
    """Repair torch Adam's step counters after the distributed optimizer's load.

    On the torch-Adam path (no Apex/TE fused Adam: this CPU build, or ROCm without them),
    megatron-core 0.16.1 keeps Adam's step in the param groups of the checkpoint and, when
    loading, puts *one* tensor in every parameter's state (``s["step"] = step`` in a loop),
    then ``dp_reshardable``'s parameter-state load copies the pre-load dummy step (1) into
    it. Adam then increments that shared tensor once per parameter per update, so the bias
    correction of every later step is wrong: the loss drifts from the uninterrupted run from
    the second step after a resume (measured: 5.509 vs 5.527 at step 7), silently.
    The saved value is in each param group's ``step`` (set by the load); every parameter
    gets its own tensor of it, as an uninterrupted run has."""
    for dist_opt in _distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue  # fused Adam (TE/Apex) keeps the step in the group only
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def save_checkpoint(root: str | os.PathLike, chunks, optimizer, state: TrainState, arch, keep_last: int | None = None,
                    optimizer_format: str = "dp_reshardable") -> Path:
    """Collective. Returns the published checkpoint's path. ``optimizer_format`` is the
    distributed optimizer's (see the module docstring); the layout is recorded in
    ``train_state.json``."""
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
    state.layout = current_layout(optimizer, optimizer_format)
    model_sd = model_sharded_state_dict(chunks)
    sharded = dict(model_sd)
    sharded["optimizer"] = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False, optimizer_format=optimizer_format)
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


def load_checkpoint(path: str | os.PathLike, chunks, optimizer) -> TrainState:
    """Resume: load a training checkpoint's weights into ``chunks``, its optimizer state into
    ``optimizer`` and this rank's RNG state; returns the loop's state. Collective. Raises
    CheckpointError, before reading anything, when the optimizer state was saved at a layout
    it cannot be loaded at (see :func:`check_resume_layout`). For the weights alone (a
    pretrained start, conversion) use :func:`~.weights.load_model_weights`."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    path = Path(path)
    state = read_train_state(path)
    optimizer_format = state.layout.get("optimizer_format") or "dp_reshardable"
    check_resume_layout(path, state.layout, current_layout(optimizer))
    model_sd = model_sharded_state_dict(chunks)  # the optimizer's state is keyed by the model's
    optimizer_sd = _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=True, optimizer_format=optimizer_format)
    try:
        loaded = load_model_weights(chunks, path, also={"optimizer": optimizer_sd})
    except (KeyError, CheckpointingException) as exc:
        if state.layout:
            raise
        # A checkpoint from before layouts were recorded, read at another layout.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: its optimizer state does not fit this layout ({first_line[:200]}); resume at the layout it was saved at"
        ) from None
    missing_step_ok = _adam_step_may_be_missing(optimizer) if optimizer_format == "fully_reshardable" else contextlib.nullcontext()
    with torch.no_grad(), missing_step_ok:
        optimizer.load_state_dict(loaded["optimizer"])
    _give_each_param_its_own_adam_step(optimizer)
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
