"""Run megatron-core on a machine without CUDA (CPU + gloo).

megatron-core 0.16.1 assumes CUDA in a handful of places. Everything needed to run it on CPU
lives here and nowhere else, and is switched on by :func:`activate` only when CUDA is absent.
Each patch below names what breaks without it; ``tests/runtime/test_cpu_compat.py`` shows
each one necessary by running the failing megatron-core code path with that patch left out.

The patches are written against one megatron-core version (``TESTED_MEGATRON_CORE``): on
another version, :func:`activate` refuses to run, because a silently wrong patch (for
example, RNG streams that are not per-rank) is worse than a crash.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_CORE = "0.16.1"
CPU = torch.device("cpu")

# Every patch, by name. ``activate(skip=...)`` leaves some out, for the tests that show each
# one is necessary.
PATCHES = (
    "current_device",  # torch.cuda.current_device() is used as the allocation device everywhere
    "device_mode",  # literal device="cuda" arguments and Tensor.to("cuda")
    "tensor_type",  # Tensor.type() compared with 'torch.cuda.FloatTensor' (clip_grads, optimizers)
    "synchronize",  # torch.cuda.synchronize() in p2p communication and checkpoint saving
    "get_rng_state",  # torch.cuda.get_rng_state() in CudaRNGStatesTracker.add
    "tracker_rng",  # megatron's _get/_set_cuda_rng_state used by the RNG tracker's fork()
    "manual_seed",  # torch.cuda.manual_seed is a silent no-op on CPU builds
    "tensor_cuda",  # Tensor.cuda() for tied embeddings with PP>1
)

_active_mode: "CudaAsCpu | None" = None
_applied: set[str] = set()


class MegatronVersionError(RuntimeError):
    pass


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class CudaAsCpu(TorchFunctionMode):
    """Redirects CUDA device arguments to the CPU, and makes CPU tensors report CUDA types.

    megatron-core passes ``device="cuda"`` (or ``torch.cuda.current_device()``, an int)
    literally in optimizer, clip-grad, schedule and mask code. ``Tensor.type()`` is used as a
    dtype check against ``'torch.cuda.FloatTensor'``; answering with the CUDA name keeps those
    checks meaningful for the dtype part.
    """

    def __init__(self, map_devices: bool = True, cuda_type_names: bool = True):
        super().__init__()
        self.map_devices = map_devices
        self.cuda_type_names = cuda_type_names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.map_devices:
            device = kwargs.get("device")
            if device is not None and (_is_cuda(device) or (isinstance(device, int) and not isinstance(device, bool))):
                kwargs["device"] = CPU
            if func is torch.Tensor.to and len(args) > 1 and (_is_cuda(args[1])):
                args = (args[0], CPU, *args[2:])
        out = func(*args, **kwargs)
        if (
            self.cuda_type_names
            and func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and isinstance(out, str)
            and out.startswith("torch.")
            and not out.startswith("torch.cuda.")
        ):
            out = "torch.cuda." + out[len("torch."):]
        return out


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found != TESTED_MEGATRON_CORE:
        raise MegatronVersionError(
            f"megatron_normistral.runtime.cpu_compat was written and tested for megatron-core "
            f"{TESTED_MEGATRON_CORE}, but {found} is installed. Its CUDA-to-CPU patches may be "
            f"wrong for this version (some failures are silent). Install megatron-core=="
            f"{TESTED_MEGATRON_CORE} to run on CPU, or run on a CUDA machine."
        )


def is_active() -> bool:
    return _active_mode is not None


def applied_patches() -> frozenset[str]:
    return frozenset(_applied)


def activate(skip: Iterable[str] = (), force: bool = False) -> bool:
    """Apply the CPU layer if CUDA is absent (or ``force``). Returns True if it is active.

    Idempotent. ``skip`` names patches (from ``PATCHES``) to leave out; only tests use it.
    """
    global _active_mode
    if _active_mode is not None:
        return True
    if torch.cuda.is_available() and not force:
        return False
    skip = set(skip)
    unknown = skip - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown cpu_compat patches {sorted(unknown)}; known: {PATCHES}")
    _check_version()

    import megatron.core.tensor_parallel.random as mcore_random

    def on(name: str) -> bool:
        if name in skip:
            return False
        _applied.add(name)
        return True

    if on("current_device"):
        torch.cuda.current_device = lambda: CPU
    if on("synchronize"):
        torch.cuda.synchronize = lambda *a, **k: None
    if on("get_rng_state"):
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    if on("tracker_rng"):
        mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mcore_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
        # The tracker's fork() now swaps the (only) CPU generator, which megatron-core warns
        # about on every fork; here that is the intended behaviour.
        logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    if on("manual_seed"):
        torch.cuda.manual_seed = torch.manual_seed
    if on("tensor_cuda"):
        torch.Tensor.cuda = lambda self, *a, **k: self
    map_devices = on("device_mode")
    cuda_type_names = on("tensor_type")
    mode = CudaAsCpu(map_devices=map_devices, cuda_type_names=cuda_type_names)
    mode.__enter__()  # stays on for the life of the process
    _active_mode = mode
    return True
