"""Both loss weightings (``training.loss_weighting``) give the gradient of the loss they name,
on one process and with data parallelism (where token counts differ between ranks)."""
import pytest
import torch

from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.layouts import LayoutRun, step_gradients


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def single():
    return {w: run_distributed(step_gradients, 1, args=(LayoutRun(), w)) for w in ("micro_batch", "token")}


@pytest.mark.parametrize("weighting", ["micro_batch", "token"])
def test_gradient_is_that_of_the_named_loss(single, weighting):
    _close(single[weighting]["megatron"], single[weighting]["reference"])


def test_weightings_differ_when_counts_differ(single):
    # synthetic batches drop ~20% of tokens at random, so micro-batches count different numbers
    a, b = single["micro_batch"]["reference"], single["token"]["reference"]
    assert any(not torch.allclose(a[n], b[n], rtol=1e-4, atol=0) for n in a)


@pytest.mark.parametrize("weighting", ["micro_batch", "token"])
def test_data_parallel_gives_the_same_gradient(single, weighting):
    dp2 = run_distributed(step_gradients, 2, args=(LayoutRun(parallel=ParallelConfig()), weighting))
    _close(dp2["megatron"], single[weighting]["reference"])
