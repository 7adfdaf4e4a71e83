"""The recipe's sections: each lives with its component and nothing below ``config/`` imports
``config/``; the optimizer and DDP sections are megatron-core's configs, passed on whole, with
the fields other sections own set from them; help comes from the field docstrings; renamed
fields still read their old names; one corpus schema, which ``tools/plan_mixture.py --recipe``
plans as the run does."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megatron_normistral.config.fields import field_help, section_fields
from megatron_normistral.config.recipe import Recipe, RecipeError, build_parser, load_recipe, parse_recipe, validate_recipe
from megatron_normistral.data.indexed import IndexedDatasetWriter
from megatron_normistral.data.mixture import CorpusSpec, MixtureConfig, MixtureDataset
from megatron_normistral.testing.tiny_run import REPO
from megatron_normistral.training.data_setup import DataConfig, EvalSet, MixtureChange, mixture_plans
from megatron_normistral.training.ddp import DDPConfig
from megatron_normistral.training.optimizer import OptimizerConfig, build_optimizer

IMPORT_CHECK = """
import importlib, pkgutil, sys
found = {}
for layer in ("training", "data", "model", "runtime"):
    package = importlib.import_module(f"megatron_normistral.{layer}")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"megatron_normistral.{layer}.{info.name}")
        config = sorted(m for m in sys.modules if m.startswith("megatron_normistral.config"))
        if config:
            found = {f"megatron_normistral.{layer}.{info.name}": config}
            break
    if found:
        break
print(found)
"""


def test_no_module_below_config_imports_it():
    """config/ composes the sections of training/, data/, model/ and runtime/; none of them may
    import config/ back (megatron_normistral.pretrain, above both, joins them)."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT_CHECK], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "{}", f"imports config/ at import time: {out.stdout.strip()}"


def test_optimizer_and_ddp_sections_are_megatron_core_configs(monkeypatch):
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.distributed import DistributedDataParallelConfig

    recipe = Recipe()
    assert isinstance(recipe.optimizer, mcore_optimizer.OptimizerConfig)
    assert isinstance(recipe.ddp, DistributedDataParallelConfig)
    o = recipe.optimizer  # the authors' defaults, not megatron-core's (lr None, wd 0.01, beta2 0.999)
    assert (o.lr, o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (1e-4, 0.1, 0.9, 0.95, 1e-8, 1.0)
    assert o.optimizer == "adam" and recipe.ddp.grad_reduce_in_fp32 is True

    recipe.precision.bf16, recipe.parallel.use_distributed_optimizer = True, True
    handed = {}
    monkeypatch.setattr(mcore_optimizer, "get_megatron_optimizer",
                        lambda config, chunks, config_overrides: handed.update(config=config, overrides=config_overrides))
    build_optimizer([], recipe.optimizer, recipe.parallel, recipe.precision)
    config = handed["config"]
    assert type(config) is OptimizerConfig and config.lr == 1e-4 and handed["overrides"] is None
    assert config.bf16 and config.params_dtype == torch.bfloat16 and config.use_distributed_optimizer
    assert recipe.optimizer.bf16 is False  # the section itself is left as the recipe gave it
    assert recipe.ddp.resolved(recipe.parallel).use_distributed_optimizer is True


def test_fields_another_section_owns_are_refused_in_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  bf16: true\n")
    with pytest.raises(RecipeError, match=r"r.yaml: optimizer.bf16: set by precision.bf16; give it there"):
        load_recipe(path)
    path.write_text("ddp:\n  use_distributed_optimizer: true\n")
    with pytest.raises(RecipeError, match=r"ddp.use_distributed_optimizer: set by parallel.use_distributed_optimizer"):
        load_recipe(path)
    recipe = Recipe(data=DataConfig(corpora=[CorpusSpec("corpus", "nb", 1.0)]))
    recipe.optimizer.bf16 = True  # set in code, while precision.bf16 is False
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe, world_size=1)
    assert str(error.value) == ("OptimizerConfig.bf16 = True, but precision.bf16 gives False: bf16 comes from "
                                "precision.bf16; set it there only")
    recipe.optimizer.bf16, recipe.ddp.use_distributed_optimizer = False, True
    with pytest.raises(RecipeError, match=r"DDPConfig.use_distributed_optimizer = True, but parallel"):
        validate_recipe(recipe, world_size=1)


def test_help_is_the_field_docstrings():
    from megatron.core.distributed import DistributedDataParallelConfig

    # A field documented here uses ours; one declared without a docstring, megatron-core's.
    assert field_help(OptimizerConfig, "lr") == "Peak learning rate (reached at the end of warmup)."
    assert field_help(OptimizerConfig, "adam_eps").startswith("Term added to the denominator")
    assert field_help(DDPConfig, "bucket_size") == field_help(DistributedDataParallelConfig, "bucket_size") != ""
    undocumented = []
    for cls in [type(section) for _, section in Recipe().sections()] + [CorpusSpec, EvalSet, MixtureChange]:
        undocumented += [f"{cls.__name__}.{f.name}" for f in section_fields(cls) if not field_help(cls, f.name)]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    text = " ".join(build_parser().format_help().split())
    assert "Held-out words per language per evaluation: the first N words of each file" in text
    assert "(default: 32768)" in text


def test_renamed_fields_still_read_their_old_names(tmp_path):
    notes = []
    path = tmp_path / "old.yaml"
    path.write_text("evaluation:\n  eval_interval: 50\n  eval_max_words: 100\n  eval_max_tokens: 900\n"
                    "logging:\n  log_interval: 5\n  log_json: log.jsonl\ncheckpoint:\n  pretrained_checkpoint: start\n")
    recipe = load_recipe(path, note=notes.append)
    e, g = recipe.evaluation, recipe.logging
    assert (e.interval, e.max_words, e.max_tokens, g.interval, g.json, recipe.checkpoint.pretrained) == \
        (50, 100, 900, 5, "log.jsonl", "start")
    assert f"{path}: evaluation.eval_interval: renamed to interval; the old name still works" in notes
    assert len(notes) == 6 and all("\n" not in n for n in notes)

    path.write_text("evaluation:\n  eval_interval: 50\n  interval: 60\n")
    with pytest.raises(RecipeError, match=r"evaluation: both eval_interval and interval are given"):
        load_recipe(path, note=notes.append)

    notes.clear()
    recipe, _ = parse_recipe(["--evaluation.eval_max_words", "7", "--eval-interval", "3", "--logging.log_json", "x.jsonl"],
                             note=notes.append)
    assert (recipe.evaluation.max_words, recipe.evaluation.interval, recipe.logging.json) == (7, 3, "x.jsonl")
    assert "--evaluation.eval_max_words: renamed to --evaluation.max_words; the old name still works" in notes
    with pytest.raises(RecipeError, match="--evaluation.eval_interval is the old name of --evaluation.interval"):
        parse_recipe(["--evaluation.eval_interval", "3", "--evaluation.interval", "4"], note=notes.append)


def test_printed_recipe_reads_back_the_same(tmp_path):
    recipe = load_recipe(REPO / "examples" / "normistral_11b" / "stage3_full.yaml")
    recipe.data.mixture_changes = [MixtureChange(100, [CorpusSpec("data/x", "nb", 1.0, name="x")])]
    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    assert "params_dtype" not in text and "timers" not in text  # megatron-core's fields that are not settings
    (tmp_path / "printed.yaml").write_text(text)
    again = load_recipe(tmp_path / "printed.yaml")
    assert again.to_dict() == recipe.to_dict() and again.optimizer == recipe.optimizer
    assert again.data.mixture_changes[0].corpora == [CorpusSpec("data/x", "nb", 1.0, name="x")]
    assert yaml.safe_load(text)["data"]["corpora"][0] == {"prefix": "data/normistral/nb_text_document", "language": "nb",
                                                          "weight": 0.488, "max_epochs": 16.0, "name": ""}


def _corpus(prefix, n_docs, seed):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents([rng.integers(16, 500, size=int(rng.integers(20, 60))).tolist() for _ in range(n_docs)])
    return str(prefix)


def test_plan_mixture_plans_a_recipe_as_the_run_reads_it(tmp_path, capsys):
    nb, se, en = (_corpus(tmp_path / lang, n, i) for i, (lang, n) in enumerate((("nb", 80), ("se", 30), ("en", 60))))
    recipe_path = tmp_path / "run.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "training": {"seq_length": 32, "global_batch_size": 4, "train_iters": 50, "seed": 3},
        "data": {"corpora": [{"prefix": nb, "language": "nb", "weight": 0.7, "max_epochs": 20},
                             {"prefix": se, "language": "se", "weight": 0.3, "max_epochs": 20}],
                 "mixture_changes": [{"at_step": 20, "corpora": [{"prefix": nb, "language": "nb", "weight": 0.5},
                                                                 {"prefix": en, "language": "en", "weight": 0.5}]}]},
    }))
    spec = importlib.util.spec_from_file_location("plan_mixture", REPO / "tools" / "plan_mixture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--recipe", str(recipe_path), "--save", str(tmp_path / "plan.json")]) == 0
    printed = capsys.readouterr().out
    assert "Mixture plan: global samples [0, 80)" in printed and "Mixture plan: global samples [80, 200)" in printed

    # The run: the first mixture for samples [0, 20 x 4), the change from there (by hand, not
    # through the recipe code).
    first = MixtureConfig([CorpusSpec(nb, "nb", 0.7, 20), CorpusSpec(se, "se", 0.3, 20)], seq_length=32, seed=3)
    then = MixtureConfig([CorpusSpec(nb, "nb", 0.5), CorpusSpec(en, "en", 0.5)], seq_length=32, seed=3)
    run = MixtureDataset(first, 200, changes=[(80, then)], verbose=False)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved == {"phases": [plan.to_dict() for plan in run.plans]}
    assert [plan.to_dict() for plan in mixture_plans(load_recipe(recipe_path))] == saved["phases"]

    # Change points the run could not use are refused before anything is planned or trained.
    recipe = load_recipe(recipe_path)
    recipe.data.mixture_changes[0].at_step = 50
    with pytest.raises(RecipeError, match=r"data.mixture_changes: at_step must increase and lie inside \(0, train_iters 50\)"):
        validate_recipe(recipe, world_size=1)
