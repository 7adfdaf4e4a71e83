"""tools/evaluate_model.py: on a model exported from a training checkpoint, the held-out loss per
word, tokens per word and masked-token accuracy equal what the training loop's evaluation logged
for the same weights and text; several models (other tokenizers) are scored on the same words in
one table; bad input fails in one line."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_normistral.model.architectures import get_architecture
from megatron_normistral.reporting.model_evaluation import evaluate_model, settings_from_recipe
from megatron_normistral.testing.convert_workers import make_hf_checkpoint
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import prepare_tiny_data, read_log, run_pretrain, tiny_recipe
from megatron_normistral.testing.tool_runs import error_line, load_tool

STEPS = 2




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny recipe trained 2 steps (the loop evaluates the held-out sets after the last step
    and saves), its checkpoint exported to Hugging Face in fp32 with the run's tokenizer."""
    work = tmp_path_factory.mktemp("evaluate")
    data = prepare_tiny_data(work / "data")
    recipe = tiny_recipe(data, work / "run", training={"train_iters": STEPS})
    run_distributed(run_pretrain, 1, args=(recipe,))
    logged = {r["eval"]: r for r in read_log(recipe.logging.json) if "eval" in r and r["step"] == STEPS}
    assert sorted(logged) == ["nb", "nn"]
    hf = work / "hf"
    assert load_tool("convert_checkpoint").main(["mcore-to-hf", "--mcore", str(work / "run" / "ckpt" / f"iter_{STEPS:07d}"),
                                             "--out", str(hf), "--tokenizer", data["tokenizer"], "--dtype", "fp32"]) == 0
    return {"recipe": recipe, "data": data, "logged": logged, "hf": hf, "work": work}


def _assert_equals_the_loop(scores: dict, logged: dict) -> None:
    for language, loop in logged.items():
        ours = scores[language]
        assert (ours["words"], ours["tokens"]) == (loop["words"], loop["tokens"]) == (500, loop["tokens"])
        assert ours["tokens_per_word"] == loop["tokens_per_word"]
        assert ours["loss_per_word"] == pytest.approx(loop["loss_per_word"], rel=1e-6)
        assert ours["masked_accuracy"] == loop["masked_accuracy"]  # the same argmax at the same positions
        assert ours["masked_positions"] > 200


def test_equals_the_training_loop_evaluation(exported):
    """The run's own settings, at another micro-batch size (3, the run's is 2)."""
    settings = settings_from_recipe(exported["recipe"], micro_batch_size=3, generation_tokens=0)
    result = evaluate_model(exported["hf"], settings, log=None)
    assert result.num_special_tokens == 16 and result.bos
    _assert_equals_the_loop({k: vars(v) for k, v in result.languages.items()}, exported["logged"])


def test_cli_scores_models_of_other_tokenizers_on_the_same_words(exported, capsys):
    """The exported model and a Tekken model (131,072 entries, a random tiny one, no tokenizer in
    its folder) in one command with explicit flags: the same words, different token counts."""
    tekken_model = exported["work"] / "tekken-hf"
    make_hf_checkpoint(tekken_model, get_architecture("tiny-tekken"), torch.float32, seed=0, init_std=0.02)
    data, out = exported["data"], exported["work"] / "eval.json"
    argv = ["--model", str(exported["hf"]), "--model", str(tekken_model), "--tokenizer", "own", "--tokenizer", "tekken",
            "--label", "exported", "--label", "tekken", "--eval", f"nb={data['heldout']['nb']}",
            "--eval", f"nn={data['heldout']['nn']}", "--max-words", "500", "--seq-length", "64",
            "--generation-tokens", "4", "--json", str(out)]
    assert load_tool("evaluate_model").main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4 and table[1].startswith("| exported | nb | 500 |")
    exported_model, tekken = json.loads(out.read_text())["models"]
    _assert_equals_the_loop(exported_model["languages"], exported["logged"])
    assert tekken["num_special_tokens"] == 1000 and tekken["vocab_size"] == 131072
    for language, ours in exported_model["languages"].items():
        theirs = tekken["languages"][language]
        assert theirs["words"] == ours["words"] == 500 and theirs["tokens"] < ours["tokens"]
        assert theirs["masked_accuracy"] is None  # Tekken has no <mask>
        for model in (exported_model, tekken):
            gen, lang = model["generation"], model["languages"][language]
            assert gen["new_tokens"] == 4 and gen["seconds"] > 0
            assert lang["generation_s_per_1000_words"] == pytest.approx(gen["s_per_token"] * lang["tokens_per_word"] * 1000)


def test_bad_input_fails_in_one_line(exported, tmp_path, capsys):
    tool = load_tool("evaluate_model")
    heldout = exported["data"]["heldout"]["nb"]

    def fails(argv, *fragments):
        error_line(tool.main([str(a) for a in argv]), capsys.readouterr().err, *fragments)

    fails(["--model", tmp_path, "--eval", f"nb={heldout}"], f"{tmp_path}: not a Hugging Face model folder (no config.json)")
    fails(["--model", exported["hf"], "--eval", f"nb={tmp_path / 'none.jsonl'}"], "none.jsonl: held-out text for nb not found")
    fails(["--model", exported["hf"]], "no held-out text: give --eval LANG=PATH")
    fails(["--model", exported["hf"], "--eval", "nb"], "--eval: expected LANG=VALUE, got 'nb'")
    fails(["--model", exported["hf"], "--label", "a", "--label", "b", "--eval", f"nb={heldout}"],
          "--label given 2 times for 1 --model folders")
    fails(["--model", exported["hf"], "--eval", f"nb={heldout}", "--seq-length", "0"], "--seq-length 0: must be >= 1")
    with pytest.raises(SystemExit) as exc:
        tool.main(["--model", str(exported["hf"]), "--eval", f"nb={heldout}", "--max-word", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --max-word" in capsys.readouterr().err
