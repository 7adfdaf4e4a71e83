"""tools/plan_run.py and reporting/run_plan.py: the planned memory equals what a built model
holds (tiny configurations on CPU, one and two processes), the 11B recipes give plausible
figures, a plan that does not fit says so with exit status 1, bad input is one line (exit 2).

Tolerances: weights, gradients and optimizer state within 1% (the plan leaves out megatron-core's
buffer padding and Adam's step counters: 0.06% at most here). Activations within 2%: the plan
enumerates every tensor the layers save, and measures 0.003% off at most (the batch's own storage:
a token slice that keeps its uncut row); 2% leaves room for a small tensor a torch or
megatron-core version adds, while leaving out any per-layer tensor of the model fails (the
smallest, RoPE's cos and sin, is at least 2.8% of each configuration's total).
"""
from __future__ import annotations

import json

import pytest

from megatron_normistral.config.recipe import load_recipe
from megatron_normistral.reporting.run_plan import GIB, PlanOptions, plan_run
from megatron_normistral.testing.memory_probes import CASES, compare
from megatron_normistral.testing.tool_runs import REPO, error_line, load_tool

STAGE3 = REPO / "examples" / "normistral_11b" / "stage3_full.yaml"
STAGE2 = REPO / "examples" / "normistral_11b" / "stage2_embeddings.yaml"
STATE_TOLERANCE = 0.01
ACTIVATION_TOLERANCE = 0.02




@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan_matches_a_built_model(case):
    rows = compare(case)
    assert [item for item, *_ in rows] == ["weights", "gradients", "optimizer", "activations, none",
                                           "activations, selective", "activations, full"]
    for item, planned, measured, error in rows:
        tolerance = ACTIVATION_TOLERANCE if item.startswith("activations") else STATE_TOLERANCE
        assert measured > 0 and abs(error) <= tolerance, f"{case.name}, {item}: planned {planned:,} vs measured {measured:,}"
    by_item = {item: measured for item, _, measured, _ in rows}
    # The measurement itself distinguishes the modes (a check that sees no recomputation would pass nothing).
    assert by_item["activations, full"] < by_item["activations, selective"] < by_item["activations, none"]


def test_11b_stage3_on_512_gpus_is_plausible():
    recipe = load_recipe(STAGE3)
    arch = recipe.model.architecture()
    plan = plan_run(recipe, PlanOptions(gpus=512, gpu_memory_gib=64), name="stage3")
    assert (plan.tensor_parallel, plan.pipeline_parallel, plan.data_parallel, plan.micro_batches_per_step) == (2, 2, 128, 8)
    first, last = plan.stages
    # bf16 weights: the parameters split over TP x PP (stages differ by the embedding and head).
    for stage in plan.stages:
        assert stage.weights == pytest.approx(arch.num_parameters() * 2 / 4, rel=0.03)
        assert stage.gradients == 2 * stage.weights  # fp32 gradient buffer, everything trains
        assert stage.optimizer == pytest.approx(12 * stage.parameters / 128, rel=1e-6)  # sharded over DP 128
    # 1F1B: the first stage holds 2 micro-batches, the last one.
    assert (first.activations["none"].in_flight, last.activations["none"].in_flight) == (2, 1)
    # One layer of one micro-batch without recomputation: 40-200 bytes per token per hidden unit
    # over TP (Korthikanti et al. count 34 for a GPT layer with a 4h MLP; SwiGLU's 2.8h x 3 adds).
    per_layer = (first.activations["none"].per_micro_batch / first.layers) / (4096 * arch.hidden_size / 2)
    assert 20 < per_layer < 100
    for stage in plan.stages:
        assert stage.activations["full"].peak < stage.activations["selective"].peak <= stage.activations["none"].peak
    assert plan.fits() and 20 * GIB < plan.peak("none") < 45 * GIB
    tokens = 60_000 * 1024 * 4096
    assert plan.tokens == tokens
    assert plan.gpu_hours == pytest.approx(tokens * arch.training_flops_per_token(4096) / (0.4 * 191.5e12) / 3600)
    assert plan.flops_per_token == pytest.approx(6 * arch.num_parameters(), rel=0.15)


def test_11b_stage2_trains_only_the_embeddings():
    plan = plan_run(load_recipe(STAGE2), PlanOptions(gpus=256, gpu_memory_gib=64))
    arch = load_recipe(STAGE2).model.architecture()
    vocab_rows_per_rank = arch.vocab_size * arch.hidden_size // 2
    for stage in plan.stages:
        assert stage.trainable_parameters == vocab_rows_per_rank  # the embedding, or the LM head
        assert stage.gradients == 4 * vocab_rows_per_rank
    full = plan_run(load_recipe(STAGE3), PlanOptions(gpus=256, gpu_memory_gib=64))
    # Frozen linears keep no inputs.
    assert plan.stages[0].activations["none"].per_micro_batch < full.stages[0].activations["none"].per_micro_batch


def test_the_tool_prints_the_plan_and_its_json(capsys):
    tool = load_tool("plan_run")
    assert tool.main([str(STAGE3), "--gpus", "512", "--gpu-memory", "64"]) == 0
    out = capsys.readouterr().out
    assert "fits: " in out and "GPU-hours at MFU 0.4 of 191.5 TFLOP/s" in out and "of which core attention (flex)" in out
    # With the dense backend it does not fit (exit status 1), JSON or not.
    assert tool.main([str(STAGE3), "--gpus", "512", "--gpu-memory", "64", "--json", "--attention-backend", "dense",
                      "--peak-tflops", "989"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["attention_backend"] == "dense" and data["peak_flops"] == 989e12 and data["fits"] is False
    # The dense backend keeps [b, heads, s, s] probabilities per layer (fp32 and bf16: 1.5 GiB a layer here).
    assert data["peak_by_recompute"]["none"] > 80 * GIB


def test_too_little_memory_does_not_fit(capsys):
    rc = load_tool("plan_run").main([str(STAGE3), "--gpus", "512", "--gpu-memory", "16"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "does not fit: " in out and "with full recomputation: " in out


@pytest.mark.parametrize("argv, fragments", [
    (["missing.yaml", "--gpus", "8", "--gpu-memory", "80"], ("missing.yaml", "no such recipe file")),
    ([str(STAGE3), "--gpus", "6", "--gpu-memory", "80"], ("world size 6", "tensor x pipeline = 2 x 2")),
    ([str(STAGE3), "--gpus", "8192", "--gpu-memory", "80"], ("global batch 1024", "at 8192 GPUs")),
    ([str(STAGE3), "--gpus", "512", "--gpu-memory", "80", "--mfu", "1.5"], ("--mfu 1.5", "(0, 1]")),
    ([str(STAGE3), "--gpus", "512", "--gpu-memory", "0"], ("--gpu-memory 0",)),
])
def test_bad_input_is_one_line(capsys, argv, fragments):
    rc = load_tool("plan_run").main(argv)
    error_line(rc, capsys.readouterr().err, *fragments)


def test_every_flag_has_help():
    for action in load_tool("plan_run").build_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no --help text"
