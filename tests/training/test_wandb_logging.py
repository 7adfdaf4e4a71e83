"""Weights & Biases as an optional logger (--wandb-project, --wandb-exp-name, --wandb-save-dir):
offline runs of the tiny model, read back from W&B's own transaction log. The history holds
the JSON log's values under TensorBoard's names and steps, the config is the resolved recipe,
a resumed run continues the same W&B run with the steps after the checkpoint's, only rank 0
logs, and a run without the flags works with wandb not importable."""
import json
import math
import sys
from pathlib import Path

import pytest

from megatron_normistral.config.recipe import RecipeError, parse_recipe, validate_recipe
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import REPO, prepare_tiny_data, read_log, run_pretrain_sequence, tiny_recipe
from megatron_normistral.testing.wandb_offline import offline_runs, run_pretrain_without_wandb
from megatron_normistral.training.metrics import LoggingConfig
from megatron_normistral.training.trackers import RUN_ID_FILE, run_id_to_continue, wandb_dir

PROJECT, NAME = "normistral-tests", "tiny-wandb"
FIRST_STEPS, RESUMED_TO = 3, 5
DEAD_END = "http://127.0.0.1:9"  # the discard port: nothing listens, so any request fails at once, locally


@pytest.fixture(scope="module")
def offline_wandb(tmp_path_factory):
    """W&B offline, silent, with its files, settings and caches under tmp and every way out
    (its server, Sentry error reports, HTTP(S) proxies) pointing nowhere. The spawned ranks
    inherit this environment."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
            "WANDB_DIR": str(home / "default-dir"), "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
            "WANDB_BASE_URL": DEAD_END, "HTTP_PROXY": DEAD_END, "HTTPS_PROXY": DEAD_END,
            "http_proxy": DEAD_END, "https_proxy": DEAD_END, "NO_PROXY": "", "no_proxy": "",
        }.items():
            mp.setenv(name, value)
        mp.delenv("WANDB_API_KEY", raising=False)
        yield home


@pytest.fixture(scope="module")
def runs(offline_wandb, tmp_path_factory):
    """At DP=2: FIRST_STEPS steps with W&B, then a resume from its checkpoint to RESUMED_TO."""
    data = prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))
    root = tmp_path_factory.mktemp("wandb-runs")
    logging = {"wandb_project": PROJECT, "wandb_exp_name": NAME, "wandb_save_dir": str(root / "wandb")}
    first = tiny_recipe(data, root / "run", training={"train_iters": FIRST_STEPS},
                        logging={**logging, "json": str(root / "first.jsonl"), "tensorboard_dir": str(root / "tb")})
    resumed = tiny_recipe(data, root / "run", training={"train_iters": RESUMED_TO},
                          logging={**logging, "json": str(root / "resumed.jsonl")})
    run_distributed(run_pretrain_sequence, 2, args=([first, resumed],))
    return first, resumed, offline_runs(root / "wandb")


def test_nothing_tried_the_network(offline_wandb, runs):
    # A request W&B makes fails against DEAD_END and its debug logs name the address (seen
    # with WANDB_MODE=online and a made-up key: "dial tcp 127.0.0.1:9: connect: connection refused").
    folders = [offline_wandb, runs[2][0].path.parent.parent]
    logs = [p for folder in folders for p in folder.rglob("*.log")]
    assert logs and not [p for p in logs if DEAD_END.removeprefix("http://") in p.read_text(errors="replace")]


def train_scalars(record: dict) -> dict:
    """What TensorBoard gets of a JSON step record: train/<key> for every finite number."""
    return {f"train/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}


def test_one_offline_w_and_b_run_per_training_run_from_rank_zero_only(runs):
    first, resumed, wandb_runs = runs
    assert len(wandb_runs) == 2  # rank 1 started none
    for run in wandb_runs:
        assert run.path.parent.name.startswith("offline-run-")
        assert (run.project, run.name) == (PROJECT, NAME)


def test_history_holds_the_json_log_values_under_tensorboard_names_and_steps(runs):
    first, resumed, wandb_runs = runs
    for recipe, run in zip((first, resumed), wandb_runs):
        log = read_log(recipe.logging.json)
        train = [r for r in log if "eval" not in r]
        assert run.series("train/loss") == {r["step"]: r["loss"] for r in train}
        rows = {row["_step"]: row for row in run.history}
        for record in train:
            expected = train_scalars(record)
            assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(expected)
            assert {k: v for k, v in rows[record["step"]].items() if k.startswith("train/")} == expected
        evaluations = [r for r in log if "eval" in r]
        assert {r["eval"] for r in evaluations} == {"nb", "nn"}
        for record in evaluations:
            for key, value in record.items():
                if key not in ("step", "eval") and value is not None:
                    assert rows[record["step"]][f"eval/{record['eval']}/{key}"] == value


def test_names_and_steps_are_tensorboards(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, _, (run, _) = runs
    events = EventAccumulator(first.logging.tensorboard_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/nb/loss", "eval/nn/loss"} <= tags
    assert tags == {k for row in run.history for k in row if not k.startswith("_")}
    for tag in tags:
        tensorboard = {e.step: e.value for e in events.Scalars(tag)}
        assert run.series(tag) == pytest.approx(tensorboard, rel=1e-6), tag  # TensorBoard stores float32


def test_config_is_the_resolved_recipe(runs):
    first, resumed, wandb_runs = runs
    for recipe, run in zip((first, resumed), wandb_runs):
        config = {k: v for k, v in run.config.items() if not k.startswith("_")}
        assert config == json.loads(json.dumps(recipe.to_dict()))
    assert wandb_runs[1].config["training"]["train_iters"] == RESUMED_TO


def test_a_resumed_run_continues_the_same_w_and_b_run_after_the_checkpoint_step(runs):
    first, resumed, (first_run, resumed_run) = runs
    stored = (Path(first.checkpoint.save) / RUN_ID_FILE).read_text().strip()
    assert first_run.run_id == resumed_run.run_id == stored
    assert sorted(first_run.series("train/loss")) == list(range(1, FIRST_STEPS + 1))
    assert sorted(resumed_run.series("train/loss")) == list(range(FIRST_STEPS + 1, RESUMED_TO + 1))


def test_only_a_resumed_run_reads_the_stored_id_and_the_files_default_to_the_save_folder(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("abc123\n")
    assert run_id_to_continue(str(tmp_path), resumed=True) == "abc123"
    assert run_id_to_continue(str(tmp_path), resumed=False) is None  # a fresh start in a reused folder
    assert run_id_to_continue(str(tmp_path / "elsewhere"), resumed=True) is None  # saved without W&B
    assert wandb_dir(LoggingConfig(wandb_project=PROJECT), str(tmp_path)) == str(tmp_path / "wandb")
    assert wandb_dir(LoggingConfig(wandb_project=PROJECT, wandb_save_dir="/w"), str(tmp_path)) == "/w"
    assert wandb_dir(LoggingConfig(wandb_project=PROJECT), None) is None


def test_a_run_without_the_flags_works_with_wandb_not_importable(tmp_path):
    data = prepare_tiny_data(tmp_path / "tiny-data")
    recipe = tiny_recipe(data, tmp_path / "run", training={"train_iters": 1}, checkpoint={"save": None, "load": None})
    result = run_distributed(run_pretrain_without_wandb, 1, args=(recipe,))
    assert result["state"]["step"] == 1
    assert [r["step"] for r in read_log(recipe.logging.json) if "eval" not in r] == [1]


def _checked(argv):
    recipe, _ = parse_recipe(["--config", str(REPO / "examples" / "tiny" / "stage2_embeddings.yaml"), *argv])
    validate_recipe(recipe, world_size=2)
    return recipe


@pytest.mark.parametrize("flag", ["--wandb-exp-name", "--wandb-save-dir"])
def test_wandb_flags_without_a_project_are_refused_naming_the_flag(flag):
    with pytest.raises(RecipeError, match=f"^{flag} needs --wandb-project$"):
        _checked([flag, "x"])


def test_a_project_without_the_wandb_package_says_how_to_install_it(monkeypatch):
    assert _checked(["--wandb-project", PROJECT]).logging.wandb_project == PROJECT
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(RecipeError, match=r"pip install wandb") as error:
        _checked(["--wandb-project", PROJECT])
    assert "\n" not in str(error.value)
