"""Settings are read as written and checked before anything starts: flags are never
abbreviations of other flags, numbers out of range fail with the flag's name, --print-config
needs no launcher, and the wall-time limit and stop signals count from process start."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_normistral.config.recipe import RecipeError, parse_recipe, validate_recipe
from megatron_normistral.runtime.stop import StopRequest, capture_early, process_start_time
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import REPO, prepare_tiny_data, read_log, tiny_recipe

ENTRY = str(REPO / "pretrain_normistral.py")
RECIPE_11B = str(REPO / "examples" / "normistral_11b" / "stage3_full.yaml")


def test_megatron_flags_are_never_taken_as_abbreviations():
    recipe, _ = parse_recipe(["--config", RECIPE_11B, "--num-layers", "2"])
    assert recipe.model.num_layers == 2  # Megatron-LM's --num-layers, not ...-per-virtual-pipeline-stage
    assert recipe.parallel.num_layers_per_virtual_pipeline_stage is None
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe(["--config", RECIPE_11B, "--lr-warmup", "5"])  # not --lr-warmup-iters
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--global-batch-size", "0"], "--global-batch-size 0: must be >= 1"),
        (["--lr", "-0.001"], "--lr -0.001: must be >= 0.0"),
        (["--seq-length", "-5"], "--seq-length -5: must be >= 1"),
        (["--micro-batch-size", "0"], "--micro-batch-size 0: must be >= 1"),
        (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins 0.0: must be > 0.0"),
        (["--objective.masked_fraction", "1.5"], "objective: masked_fraction must be in [0, 1], got 1.5"),
        (["--checkpoint.exit_signals", "SIGUSR9"], "'SIGUSR9' is not a signal name"),
    ],
)
def test_numbers_out_of_range_name_the_flag(flags, message):
    recipe, _ = parse_recipe(["--config", RECIPE_11B, *flags])
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe, world_size=512)
    assert message in str(error.value)


def test_bad_number_fails_in_one_line_before_any_process_group():
    # MASTER_PORT 1 cannot be bound: reaching process-group creation would fail differently.
    env = dict(os.environ, WORLD_SIZE="512", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = subprocess.run([sys.executable, ENTRY, "--config", RECIPE_11B, "--global-batch-size", "0"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "pretrain_normistral.py: error: --global-batch-size 0: must be >= 1"


def test_print_config_needs_no_launcher():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, ENTRY, "--config", RECIPE_11B, "--print-config"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["parallel"]["tensor_model_parallel_size"] == 2 and printed["training"]["train_iters"] == 60_000


def test_wall_time_limit_counts_from_the_given_start():
    started = time.time() - 61
    stop = StopRequest([], exit_minutes=1.0, started_at=started, agree=lambda flag: flag)
    assert stop.local_reason() == "wall-time limit" and stop.should_stop() == "wall-time limit"
    stop.restart_clock(time.time())
    assert stop.should_stop() is None


def test_process_start_time_includes_start_up():
    code = ("import time; time.sleep(1.5); from megatron_normistral.runtime.stop import process_start_time; "
            "print(time.time() - process_start_time())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert float(out.stdout) >= 1.4


def test_stop_request_restores_handlers_and_adopts_early_signals():
    before = signal.getsignal(signal.SIGUSR1)
    capture_early(["SIGUSR1"])
    os.kill(os.getpid(), signal.SIGUSR1)  # "during start-up": remembered, not fatal
    with StopRequest(["SIGUSR1", "SIGTERM"], None, time.time(), agree=lambda flag: flag) as stop:
        assert stop.should_stop() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before  # what there was before capture_early


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def slow_start_then_train(rank, world_size, recipe, start_up_s):
    """Worker: a start-up that takes ``start_up_s`` (as a 12B model build does), then the loop."""
    from megatron_normistral.testing.tiny_run import run_pretrain

    time.sleep(start_up_s)
    return run_pretrain(rank, world_size, recipe)


def test_wall_time_limit_includes_start_up_in_the_loop(data, tmp_path):
    # 3 s limit, 4 s of start-up: the first step is already past the limit. A clock started
    # after start-up would train ~10 steps of the tiny model before stopping.
    run = tiny_recipe(data, tmp_path, training={"train_iters": 200}, checkpoint={"exit_duration_in_mins": 0.05})
    result = run_distributed(sys.modules[__name__].slow_start_then_train, 1, args=(run, 4.0))
    assert result["state"]["step"] == 1
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000001"


def test_signal_during_start_up_stops_at_the_first_step_with_a_checkpoint(data, tmp_path):
    run = tiny_recipe(data, tmp_path, training={"train_iters": 10_000})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(run.to_dict()))
    env = dict(os.environ, MASTER_PORT=str(29000 + os.getpid() % 500), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, ENTRY, "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # importing torch and megatron-core, long before the first step
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "stopping at step 1: SIGUSR1" in output
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000001"
    assert len([r for r in read_log(run.logging.json) if "eval" not in r]) == 1
