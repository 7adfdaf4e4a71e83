"""The training loop on the tiny model over gloo: stages, resume, signals, non-finite steps."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.faults import NanLossAt
from megatron_normistral.testing.tiny_run import (
    REPO,
    prepare_tiny_data,
    read_log,
    run_pretrain,
    run_pretrain_and_read,
    tiny_recipe,
)
from megatron_normistral.training.stages import EMBEDDING_PARAMETERS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def train_losses(log_path):
    return [r["loss"] for r in read_log(log_path) if "eval" not in r]


@pytest.mark.parametrize(
    "layout",
    [ParallelConfig(tensor_model_parallel_size=2), ParallelConfig(pipeline_model_parallel_size=2)],
    ids=["tp2", "pp2"],
)
def test_stage2_then_stage3(layout, data, tmp_path):
    # A starting checkpoint (one full step), then stage 2 for 3 steps switching to stage 3.
    base = tiny_recipe(data, tmp_path / "base", parallel=vars(layout), training={"train_iters": 1})
    run_distributed(run_pretrain, 2, args=(base,))
    start = tmp_path / "base" / "ckpt" / "iter_0000001"
    run = tiny_recipe(
        data, tmp_path / "run", parallel=vars(layout),
        training={"train_iters": 8},
        stage={"trainable": "embeddings", "switch_to_full_at": 3},
        checkpoint={"pretrained": str(start), "save_interval": 3},
        optimizer={"lr": 1e-2},
    )
    ckpts = run.checkpoint.save
    result = run_distributed(run_pretrain_and_read, 2, args=(run, [str(start), f"{ckpts}/iter_0000003", f"{ckpts}/iter_0000008"]))
    before, after_stage2, after_stage3 = result["weights"]
    for name in before:
        if name in EMBEDDING_PARAMETERS:
            assert not torch.equal(before[name], after_stage2[name]), f"{name} should train in stage 2"
        else:
            assert torch.equal(before[name], after_stage2[name]), f"{name} is frozen in stage 2 but changed"
            assert not torch.equal(after_stage2[name], after_stage3[name]), f"{name} should train in stage 3"
    losses = train_losses(run.logging.json)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2, losses
    records = [r for r in read_log(run.logging.json) if "eval" not in r]
    assert [r["trainable"] for r in records] == ["embeddings"] * 3 + ["full"] * 5
    assert all(k in records[0] for k in ("step", "loss", "loss_causal", "loss_masked", "lr", "grad_norm", "skipped", "tokens_per_s", "consumed_samples"))


def test_resume_is_exact_and_reshards(data, tmp_path):
    full = tiny_recipe(data, tmp_path / "full", training={"train_iters": 6})
    run_distributed(run_pretrain, 1, args=(full,))
    interrupted = tiny_recipe(data, tmp_path / "split", training={"train_iters": 6}, checkpoint={"exit_interval": 3})
    first = run_distributed(run_pretrain, 1, args=(interrupted,))
    assert first["state"]["step"] == 3 and (tmp_path / "split" / "ckpt" / "latest").read_text().strip() == "iter_0000003"
    # The checkpoint resumed at TP=2: same losses up to reduction-order rounding.
    other = tiny_recipe(data, tmp_path / "tp2", parallel={"tensor_model_parallel_size": 2}, training={"train_iters": 6},
                        checkpoint={"load": str(tmp_path / "split" / "ckpt")})
    run_distributed(run_pretrain, 2, args=(other,))
    expected = train_losses(full.logging.json)[3:]
    torch.testing.assert_close(torch.tensor(train_losses(other.logging.json)), torch.tensor(expected), rtol=1e-5, atol=0)

    # Resumed at the same layout: bit-identical.
    resumed = tiny_recipe(data, tmp_path / "split", training={"train_iters": 6})
    run_distributed(run_pretrain, 1, args=(resumed,))
    assert train_losses(resumed.logging.json) == train_losses(full.logging.json)


def test_nonfinite_steps_are_skipped_then_stop(data, tmp_path):
    run = tiny_recipe(data, tmp_path / "nan", training={"train_iters": 6, "max_nonfinite_steps_in_row": 2},
                      checkpoint={"save_interval": 1, "keep_last": 2})
    reads = [f"{run.checkpoint.save}/iter_0000002", f"{run.checkpoint.save}/iter_0000003"]
    result = run_distributed(run_pretrain_and_read, 1, args=(run, reads, NanLossAt(steps=(2, 3))))
    assert result["stopped"] and "2 non-finite steps in a row" in result["stopped"]
    assert (Path(run.checkpoint.save) / "latest").read_text().strip() == "iter_0000003"
    assert sorted(p.name for p in Path(run.checkpoint.save).glob("iter_*")) == ["iter_0000002", "iter_0000003"]  # keep_last 2
    before_skip, after_skip = result["weights"]
    assert all(torch.equal(before_skip[k], after_skip[k]) for k in before_skip)  # the skipped step changed nothing
    records = [r for r in read_log(run.logging.json) if "eval" not in r]
    assert [r["skipped"] for r in records] == [0, 0, 1, 2]


def test_wall_time_limit_saves_and_stops_with_tensorboard_events(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_recipe(data, tmp_path / "wall", training={"train_iters": 50},
                      checkpoint={"exit_duration_in_mins": 1e-6},  # passed by the end of the first step
                      evaluation={"interval": 1}, logging={"tensorboard_dir": str(tmp_path / "tb")})
    result = run_distributed(run_pretrain, 1, args=(run,))
    assert result["state"]["step"] == 1
    assert (Path(run.checkpoint.save) / "latest").read_text().strip() == "iter_0000001"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/loss_causal", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert tag in scalars, scalars
        assert [e.step for e in events.Scalars(tag)] == [1]
    logged = [r for r in read_log(run.logging.json) if "eval" not in r][0]
    assert events.Scalars("train/loss")[0].value == pytest.approx(logged["loss"], rel=1e-6)
    assert {f"eval/{lang}/loss" for lang in data["heldout"]} <= set(scalars)


def test_bf16_training_on_cpu(data, tmp_path):
    run = tiny_recipe(data, tmp_path / "bf16", training={"train_iters": 6}, precision={"bf16": True},
                      optimizer={"lr": 1e-2})
    result = run_distributed(run_pretrain, 2, args=(run,))
    assert result["stopped"] is None and result["state"]["step"] == 6
    losses = train_losses(run.logging.json)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.2, losses


def _write_yaml(recipe, path):
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    return path


def test_sigterm_saves_and_exits(data, tmp_path):
    run = tiny_recipe(data, tmp_path / "sig", training={"train_iters": 10_000})
    config = _write_yaml(run, tmp_path / "sig.yaml")
    env = dict(os.environ, MASTER_PORT=str(29700 + os.getpid() % 200), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain_normistral.py"), "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = Path(run.logging.json)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    latest = (Path(run.checkpoint.save) / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 2 and "stopping at step" in output and "SIGTERM" in output
    assert not list(Path(run.checkpoint.save).glob(".tmp-*"))


def test_inconsistent_settings_fail_before_process_groups(data, tmp_path):
    config = _write_yaml(tiny_recipe(data, tmp_path / "bad"), tmp_path / "bad.yaml")
    out = subprocess.run(
        [sys.executable, str(REPO / "pretrain_normistral.py"), "--config", str(config), "--global-batch-size", "7"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "global batch 7 is not divisible by micro-batch x data-parallel = 2 x 1 = 2" in out.stderr
