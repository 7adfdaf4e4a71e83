import subprocess
import sys

import pytest

from megatron_normistral.config.fields import field_help
from megatron_normistral.config.recipe import (
    MEGATRON_FLAGS,
    Recipe,
    RecipeError,
    build_parser,
    load_recipe,
    parse_recipe,
    validate_recipe,
)
from megatron_normistral.data.mixture import CorpusSpec
from megatron_normistral.testing.tiny_run import REPO
from megatron_normistral.training.schedule import ScheduleConfig, learning_rate


def curve(style, train_iters=100, warmup=10, decay=None, lr=1.0, min_lr=0.1):
    schedule = ScheduleConfig(style=style, warmup_iters=warmup, decay_iters=decay)
    return [learning_rate(s, lr, min_lr, schedule, train_iters) for s in range(train_iters)]


def test_warmup_is_linear_and_starts_above_zero():
    lrs = curve("constant")
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert set(lrs[10:]) == {1.0}


def test_cosine_reaches_min_lr():
    lrs = curve("cosine")
    assert lrs[10] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lrs[55] == pytest.approx(0.55, abs=0.02)  # half-way: the mean of lr and min_lr


def test_wsd_is_stable_then_really_decays():
    lrs = curve("wsd", decay=20)
    assert set(lrs[10:80]) == {1.0}  # stable
    decay = lrs[80:]
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly decreasing through the decay
    assert decay[-1] == pytest.approx(0.1)  # ends at min_lr on the last step
    assert decay[9] == pytest.approx(1.0 - 0.9 * 10 / 20)  # linear


def test_yaml_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  micro_batch_size: 2\n  mirco_batch: 3\n")
    with pytest.raises(RecipeError, match=r"r.yaml: training: unknown key\(s\) \['mirco_batch'\]"):
        load_recipe(path)
    path.write_text("trainer:\n  x: 1\n")
    with pytest.raises(RecipeError, match=r"unknown section\(s\) \['trainer'\]"):
        load_recipe(path)
    path.write_text("training:\n  micro_batch_size: two\n")
    with pytest.raises(RecipeError, match="training.micro_batch_size"):
        load_recipe(path)


def test_megatron_flags_override_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("parallel:\n  tensor_model_parallel_size: 1\ntraining:\n  seq_length: 64\n")
    recipe, _ = parse_recipe(["--config", str(path), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--lr", "3e-4", "--objective.masked_fraction", "0.2", "--bf16", "false",
                              "--train-iters", "7"])
    assert recipe.parallel.tensor_model_parallel_size == 2 and recipe.parallel.sequence_parallel is True
    assert recipe.optimizer.lr == 3e-4 and recipe.objective.masked_fraction == 0.2
    assert recipe.precision.bf16 is False and recipe.training.train_iters == 7 and recipe.training.seq_length == 64


def test_every_flag_has_help():
    parser = build_parser()
    for action in parser._actions:
        if action.dest not in ("help", "config", "print_config"):
            assert action.help and action.help != action.dest, f"{action.option_strings} has no help"
    sections = dict(Recipe().sections())
    assert all(field_help(type(sections[s]), f) for s, f in MEGATRON_FLAGS.values())


@pytest.mark.parametrize(
    "change,world,message",
    [
        ({"training": {"global_batch_size": 6, "micro_batch_size": 4}}, 2, "global batch 6 is not divisible by micro-batch x data-parallel = 4 x 2 = 8"),
        ({"parallel": {"tensor_model_parallel_size": 3}}, 6, r"attention heads \(4\) not divisible by tensor parallel size \(3\)"),
        ({"parallel": {"pipeline_model_parallel_size": 3}}, 2, r"world size 2 is not divisible by tensor x pipeline = 1 x 3 = 3"),
        ({"parallel": {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 3}}, 2, "4 layers cannot be split into 2 pipeline stages of chunks of 3 layers"),
    ],
)
def test_inconsistent_settings_name_the_numbers(change, world, message):
    from dataclasses import replace

    recipe = Recipe()
    recipe.data.corpora = [CorpusSpec("corpus", "nb", 1.0)]  # non-empty; no file is read by validation
    for section, values in change.items():
        setattr(recipe, section, replace(getattr(recipe, section), **values))
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe, world_size=world)


def test_virtual_stages_from_layers_per_stage():
    recipe = Recipe()
    recipe.data.corpora = [CorpusSpec("corpus", "nb", 1.0)]
    recipe.parallel.pipeline_model_parallel_size = 2
    recipe.parallel.num_layers_per_virtual_pipeline_stage = 1
    validate_recipe(recipe, world_size=2)
    assert recipe.parallel.virtual_pipeline_model_parallel_size == 2


def test_authors_recipes_load_and_validate():
    for name in ("stage2_embeddings", "stage3_full"):
        recipe = load_recipe(REPO / "examples" / "normistral_11b" / f"{name}.yaml")
        validate_recipe(recipe, world_size=256)
        assert recipe.model.architecture().num_parameters() == pytest.approx(11.43e9, rel=2e-3)
        assert recipe.training.global_batch_size * recipe.training.seq_length == 1024 * 4096
    assert load_recipe(REPO / "examples" / "normistral_11b" / "stage3_full.yaml").training.train_iters == 60_000


def test_help_runs():
    out = subprocess.run([sys.executable, str(REPO / "pretrain_normistral.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--tensor-model-parallel-size" in out.stdout and "--objective.masked_fraction" in out.stdout


def test_readme_configuration_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(module.BEGIN) + len(module.BEGIN) : readme.index(module.END)]
    assert section.strip() == module.reference().strip(), "run: python tools/config_reference.py --readme"
