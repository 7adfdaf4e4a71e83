"""Resume is exact, for each optimizer kind, and a layout change is either exact or refused.

The run that matters resumes about six times (60,000 steps in 48-hour jobs), always with the
distributed optimizer, so each kind is checked the same way: train N steps uninterrupted;
train again, stopping at step K (``exit_interval``); resume to N; the resumed steps' loss and
grad norm must equal the uninterrupted run's. A wrong Adam step count after a resume (the
defect this guards) first shows at step K + 2: the loss at K + 1 is computed before any
update from the loaded state.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import REPO, prepare_tiny_data, read_log, run_pretrain_sequence, tiny_recipe

STEPS, STOP_AT = 5, 2

KINDS = {
    "plain": ({}, {}),
    "distributed": ({"use_distributed_optimizer": True}, {}),
    "distributed_bf16": ({"use_distributed_optimizer": True}, {"bf16": True}),
    # Both overlaps: the weights saved must be the updated ones, not the other ranks' shards
    # still waiting for the next forward's all-gather. In bf16 the model weights are not views
    # of the optimizer's fp32 ones, so a stale save is not repaired by loading the optimizer.
    "distributed_bf16_overlap": ({"use_distributed_optimizer": True}, {"bf16": True},
                                 {"overlap_grad_reduce": True, "overlap_param_gather": True}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def steps(recipe) -> list[tuple[float, float]]:
    """(loss, grad norm) of every training step in a run's log, in order."""
    return [(r["loss"], r["grad_norm"]) for r in read_log(recipe.logging.json) if "eval" not in r]


def split_run(data, root, parallel, precision=None, ddp=None, checkpoint=None):
    """(uninterrupted, stopped at STOP_AT, resumed from it) recipes; the last two share a folder."""
    common = dict(parallel=parallel, precision=precision or {}, ddp=ddp or {}, training={"train_iters": STEPS})
    full = tiny_recipe(data, root / "full", **common)
    stopped = tiny_recipe(data, root / "split", **common, checkpoint={"exit_interval": STOP_AT, **(checkpoint or {})})
    resumed = tiny_recipe(data, root / "split", **common, checkpoint=checkpoint or {},
                          logging={"json": str(root / "split" / "resumed.jsonl")})
    return full, stopped, resumed


@pytest.fixture(scope="module")
def dp2_runs(data, tmp_path_factory):
    """At DP=2: each optimizer kind split and resumed; plus a fully_reshardable save."""
    root = tmp_path_factory.mktemp("dp2")
    runs = {kind: split_run(data, root / kind, *settings) for kind, settings in KINDS.items()}
    reshardable = tiny_recipe(data, root / "fully_reshardable", parallel={"use_distributed_optimizer": True},
                              training={"train_iters": STEPS},
                              checkpoint={"exit_interval": STOP_AT, "dist_ckpt_optim_fully_reshardable": True})
    run_distributed(run_pretrain_sequence, 2, args=([r for kind in KINDS for r in runs[kind]] + [reshardable],))
    return runs, reshardable


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resume_at_the_same_layout_is_bit_identical(kind, dp2_runs):
    full, stopped, resumed = dp2_runs[0][kind]
    assert len(steps(stopped)) == STOP_AT
    assert steps(resumed) == steps(full)[STOP_AT:], f"{kind}: resumed steps differ from the uninterrupted run"
    state = yaml.safe_load((tmp_path_of(stopped) / "iter_0000002" / "train_state.json").read_text())
    assert state["layout"]["data_parallel_size"] == 2
    assert state["layout"]["use_distributed_optimizer"] == kind.startswith("distributed")


def tmp_path_of(recipe):
    return Path(recipe.checkpoint.save)


def checkpoint_at_stop(recipe, dest: Path) -> str:
    """A --load folder holding only the checkpoint the stopped run wrote (the resumed run
    has since published later ones in the same folder)."""
    name = f"iter_{STOP_AT:07d}"
    shutil.copytree(tmp_path_of(recipe) / name, dest / name)
    (dest / "latest").write_text(name + "\n")
    return str(dest)


def assert_steps_close(got, expected, rtol):
    assert len(got) == len(expected)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def dp1_runs(data, tmp_path_factory, dp2_runs):
    """At DP=1 with the distributed optimizer: a split run, and the DP=2 checkpoint resumed."""
    root = tmp_path_factory.mktemp("dp1")
    runs = split_run(data, root, {"use_distributed_optimizer": True})
    full_dp2, stopped_dp2, _ = dp2_runs[0]["distributed"]
    from_dp2 = tiny_recipe(data, root / "from_dp2", parallel={"use_distributed_optimizer": True},
                           training={"train_iters": STEPS}, checkpoint={"load": checkpoint_at_stop(stopped_dp2, root / "dp2-at-stop")})
    run_distributed(run_pretrain_sequence, 1, args=(list(runs) + [from_dp2],))
    return runs, from_dp2


@pytest.fixture(scope="module")
def resharded_runs(data, tmp_path_factory, dp1_runs, dp2_runs):
    """World 2: the DP=1 checkpoint at DP=2; the fully_reshardable DP=2 checkpoint at TP=2 and at PP=2."""
    root = tmp_path_factory.mktemp("world2")
    (_, stopped_dp1, _), _ = dp1_runs
    reshardable = checkpoint_at_stop(dp2_runs[1], root / "reshardable-at-stop")
    dist = {"use_distributed_optimizer": True}
    recipes = {
        "dp1_to_dp2": tiny_recipe(data, root / "dp2", parallel=dist, training={"train_iters": STEPS},
                                  checkpoint={"load": checkpoint_at_stop(stopped_dp1, root / "dp1-at-stop")}),
        "to_tp2": tiny_recipe(data, root / "tp2", parallel={**dist, "tensor_model_parallel_size": 2},
                              training={"train_iters": STEPS}, checkpoint={"load": reshardable}),
        "to_pp2": tiny_recipe(data, root / "pp2", parallel={**dist, "pipeline_model_parallel_size": 2},
                              training={"train_iters": STEPS}, checkpoint={"load": reshardable}),
    }
    run_distributed(run_pretrain_sequence, 2, args=(list(recipes.values()),))
    return recipes


def test_distributed_optimizer_resume_changes_dp(dp1_runs, dp2_runs, resharded_runs):
    (full_dp1, _, resumed_dp1), from_dp2 = dp1_runs
    full_dp2 = dp2_runs[0]["distributed"][0]
    assert steps(resumed_dp1) == steps(full_dp1)[STOP_AT:]  # DP=1 -> DP=1: bit-identical too
    # DP=2 -> DP=1 and DP=1 -> DP=2: only the order of the data-parallel reduction changes.
    assert_steps_close(steps(from_dp2), steps(full_dp2)[STOP_AT:], rtol=1e-6)
    assert_steps_close(steps(resharded_runs["dp1_to_dp2"]), steps(full_dp1)[STOP_AT:], rtol=1e-6)


@pytest.mark.parametrize("layout", ["to_tp2", "to_pp2"])
def test_fully_reshardable_optimizer_resumes_at_another_tp_pp(layout, dp2_runs, resharded_runs):
    full_dp2 = dp2_runs[0]["distributed"][0]
    assert_steps_close(steps(resharded_runs[layout]), steps(full_dp2)[STOP_AT:], rtol=1e-5)


def test_tp_change_with_dp_reshardable_optimizer_is_refused_before_loading(data, dp2_runs, tmp_path):
    _, stopped, _ = dp2_runs[0]["distributed"]
    recipe = tiny_recipe(data, tmp_path, parallel={"use_distributed_optimizer": True}, training={"train_iters": STEPS},
                         checkpoint={"load": checkpoint_at_stop(stopped, tmp_path / "at-stop")})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe.to_dict()))
    # One process that believes it is rank 0 of 2: the refusal must come before any process
    # group is created (there is no second rank to create one with).
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = subprocess.run([sys.executable, str(REPO / "pretrain_normistral.py"), "--config", str(config),
                          "--tensor-model-parallel-size", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "saved at TP=1 PP=1 DP=2 with the distributed optimizer in dp_reshardable format" in lines[0]
    assert "resume at TP=1 PP=1" in lines[0] and "--dist-ckpt-optim-fully-reshardable" in lines[0]
