"""What a run reports: token counts and losses equal one process's at TP=2, PP=2 and DP=2
(each token counted once, whatever the layout), the step log is strict JSON (null where a
step has no masked rows), and MFU is against one torch device's peak."""
import json
import math

import pytest

from megatron_normistral.config.recipe import load_recipe

from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import REPO, prepare_tiny_data, read_log, run_pretrain_sequence, tiny_recipe

LAYOUTS = {
    "tp2": {"tensor_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
    "dp2": {},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))
    root = tmp_path_factory.mktemp("runs")
    # Every run starts from the same weights (a fresh init depends on the pipeline layout).
    start = tiny_recipe(data, root / "start", training={"train_iters": 1})
    weights = {"pretrained": str(root / "start" / "ckpt" / "iter_0000001"), "save": None, "load": None}
    training = {"train_iters": 3}
    reference = tiny_recipe(data, root / "one", training=training, checkpoint=weights)
    layouts = {name: tiny_recipe(data, root / name, parallel=parallel, training=training, checkpoint=weights)
               for name, parallel in LAYOUTS.items()}
    run_distributed(run_pretrain_sequence, 1, args=([start, reference],))
    run_distributed(run_pretrain_sequence, 2, args=(list(layouts.values()),))
    return reference, layouts


def train_records(recipe):
    return [r for r in read_log(recipe.logging.json) if "eval" not in r]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_logged_token_counts_and_losses_equal_one_process(layout, runs):
    reference, layouts = runs
    expected, got = train_records(reference), train_records(layouts[layout])
    assert len(got) == len(expected) == 3
    for r, e in zip(got, expected):
        assert (r["tokens_causal"], r["tokens_masked"]) == (e["tokens_causal"], e["tokens_masked"]), layout
        for key in ("loss", "loss_causal", "loss_masked"):
            if e[key] is None:
                assert r[key] is None
            else:
                assert r[key] == pytest.approx(e[key], rel=1e-5), (layout, key)
    assert any(e["tokens_masked"] > 0 for e in expected) and all(e["tokens_causal"] > 0 for e in expected)


def _no_nan(name):
    raise ValueError(f"{name} is not JSON")


def test_step_log_is_strict_json(runs):
    reference, _ = runs
    lines = reference.logging.json and open(reference.logging.json).read().splitlines()
    records = [json.loads(line, parse_constant=_no_nan) for line in lines]
    masked = [r["loss_masked"] for r in records if "eval" not in r]
    assert all(v is None or math.isfinite(v) for v in masked)


def test_json_safe_writes_null_for_non_finite_numbers():
    from megatron_normistral.training.metrics import json_safe

    assert json.dumps(json_safe({"a": float("nan"), "b": float("inf"), "c": 1.5, "d": 3})) == '{"a": null, "b": null, "c": 1.5, "d": 3}'


def test_11b_recipes_count_mfu_per_torch_device():
    # A torch device on an MI250X is one GCD (191.5 TFLOP/s dense bf16), not the whole card (383).
    for name in ("stage2_embeddings", "stage3_full"):
        recipe = load_recipe(REPO / "examples" / "normistral_11b" / f"{name}.yaml")
        assert recipe.logging.peak_flops_per_device == pytest.approx(191.5e12)


def test_11b_stage_recipes_log_to_separate_runs():
    # Stage 2 and stage 3 both count steps from 1: sharing a TensorBoard folder (or a JSON log)
    # would overlay stage 3's first 1,000 steps on stage 2's.
    logging = [load_recipe(REPO / "examples" / "normistral_11b" / f"{name}.yaml").logging
               for name in ("stage2_embeddings", "stage3_full")]
    for field in ("tensorboard_dir", "json"):
        stage2, stage3 = (getattr(section, field) for section in logging)
        assert stage2 and stage3 and stage2 != stage3, (field, stage2, stage3)
