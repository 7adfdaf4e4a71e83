"""The CPU layer for megatron-core: each patch is necessary (its code path fails, or gives
wrong RNG streams, without it) and all together make those paths work."""
import importlib.metadata

import pytest

from megatron_normistral.runtime import cpu_compat
from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.testing import cpu_compat_probes as probes
from megatron_normistral.testing.distributed import DistributedTestError, run_distributed

PP2 = ParallelConfig(pipeline_model_parallel_size=2)

# patch -> (probe, world size, kwargs, what megatron-core says without the patch)
CRASHING = {
    "current_device": (probes.wrap_for_ddp, 1, {}, "Torch not compiled with CUDA"),
    "device_mode": (probes.train_one_step, 1, {}, "Torch not compiled with CUDA"),
    "tensor_type": (probes.train_one_step, 1, {"clip_grad": 1.0}, "AssertionError"),
    "synchronize": (probes.train_one_step, 2, {"parallel": PP2}, "Torch not compiled with CUDA"),
    "get_rng_state": (probes.seed, 1, {}, "CUDA"),
    "tensor_cuda": (probes.train_one_step, 2, {"parallel": PP2, "arch": "tiny-tied"}, "Torch not compiled with CUDA"),
}


def test_every_patch_is_covered_here():
    assert set(CRASHING) | {"tracker_rng", "manual_seed"} == set(cpu_compat.PATCHES)


@pytest.mark.parametrize("patch", sorted(CRASHING))
def test_patch_is_needed(patch):
    probe, world, kwargs, message = CRASHING[patch]
    with pytest.raises(DistributedTestError, match=message):
        run_distributed(probe, world, kwargs=kwargs, cpu_compat_skip=(patch,), timeout_s=120)


def test_all_patches_make_the_paths_work():
    # Every crashing probe above, with the full layer: PP2 + tied + clip covers them all but
    # the DDP-only one, which train_one_step runs first anyway.
    losses = run_distributed(probes.train_one_step, 2, kwargs={"parallel": PP2, "arch": "tiny-tied", "clip_grad": 1.0})
    assert len(losses) == 1 and losses[0] > 0


def test_rng_streams_are_per_tensor_parallel_rank():
    assert run_distributed(probes.rng_streams, 2) == {
        "model_parallel_differs": True,
        "default_agrees": True,
        "fork_leaves_default": True,
    }


@pytest.mark.parametrize("patch", ["tracker_rng", "manual_seed"])
def test_rng_patches_are_needed(patch):
    try:
        streams = run_distributed(probes.rng_streams, 2, cpu_compat_skip=(patch,), timeout_s=120)
    except DistributedTestError:
        return  # a crash also shows the patch is needed
    assert streams != {"model_parallel_differs": True, "default_agrees": True, "fork_leaves_default": True}


def test_refuses_other_megatron_core_version(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(cpu_compat.MegatronVersionError, match="0.16.1"):
        cpu_compat._check_version()


def test_unknown_patch_name_is_an_error(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_active_mode", None)
    with pytest.raises(ValueError, match="unknown cpu_compat patches"):
        cpu_compat.activate(skip=("no_such_patch",), force=True)
