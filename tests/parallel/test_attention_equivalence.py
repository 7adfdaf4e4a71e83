"""The fast attention path against the dense one: fp32 training of the tiny model where each
step's batches are one attention case (all causal, all masked, both modes in a micro-batch,
one-token documents, one document filling the window), the fast backend (``auto``: per-document
SDPA on CPU) in every layout against megatron-core's dense-mask attention on one process.
Loss and grad norm of every step, every weight gradient of every step (before its update)
and the final weights agree to 1e-5 relative. Full and selective activation recomputation
ride along on two of the layouts, so the document description is shown to reach the core
attention through both."""
import pytest
import torch

from megatron_normistral.model.provider import ModelConfig
from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.layouts import ATTENTION_CASES, LayoutRun, train_layout

RTOL = 1e-5

LAYOUTS = {
    "one_process": (1, ParallelConfig(), None),
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2), None),
    "tp2_sp_selective_recompute": (2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), "selective"),
    "pp2_1f1b_full_recompute": (2, ParallelConfig(pipeline_model_parallel_size=2), "full"),
    "pp2_interleaved": (2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), None),
    "dp2": (2, ParallelConfig(), None),
}


def run_for(backend: str, parallel: ParallelConfig = ParallelConfig(), recompute: str | None = None) -> LayoutRun:
    model = ModelConfig(arch="tiny", transformer_impl="local", attention_backend=backend, recompute_granularity=recompute)
    return LayoutRun(parallel=parallel, model=model, steps=len(ATTENTION_CASES), cases=ATTENTION_CASES, return_gradients=True)


@pytest.fixture(scope="module")
def dense():
    return run_distributed(train_layout, 1, args=(run_for("dense"),))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_equivalent(result: dict, reference: dict) -> None:
    for step, case in enumerate(ATTENTION_CASES):
        for key in ("losses", "grad_norms"):
            got, want = result[key][step], reference[key][step]
            assert abs(got - want) <= RTOL * abs(want), f"step {step} ({case}): {key} {got} vs {want}"
        grads, expected = result["gradients"][step], reference["gradients"][step]
        assert grads.keys() == expected.keys()
        worst = max(expected, key=lambda name: relative_error(grads[name], expected[name]))
        assert relative_error(grads[worst], expected[worst]) <= RTOL, (
            f"step {step} ({case}): gradient of {worst} off by {relative_error(grads[worst], expected[worst]):.2e} relative")
    for name, expected in reference["weights"].items():
        torch.testing.assert_close(result["weights"][name], expected, rtol=RTOL, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_the_cases_differ(dense):
    """The reference really trains, and each case is a different attention: the same weights
    give other losses under other masks (so a path that ignored the mask would fail)."""
    assert len(dense["losses"]) == len(ATTENTION_CASES) and all(g > 0 for g in dense["grad_norms"])
    assert len(set(round(loss, 6) for loss in dense["losses"])) == len(ATTENTION_CASES)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_attention_matches_dense(layout, dense):
    world, parallel, recompute = LAYOUTS[layout]
    fast = run_distributed(train_layout, world, args=(run_for("auto", parallel, recompute),))
    assert_equivalent(fast, dense)
