"""tools/inspect_data.py: the samples it shows for a step and data-parallel rank are the very
micro-batches the training loop trained on (recorded through the loop's forward_steps hook at
DP=2); a corpus's counts, decoded documents and length histogram; bad input fails in one line."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from megatron_normistral.data.indexed import IndexedReader
from megatron_normistral.reporting.data_inspection import corpus_documents, corpus_summary, step_samples
from megatron_normistral.testing.batch_recording import train_and_record
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import prepare_tiny_data, tiny_recipe
from megatron_normistral.testing.tool_runs import error_line, load_tool
from megatron_normistral.tokenizer import load_tokenizer
from megatron_normistral.tokenizer.corpus import read_documents

FIELDS = ("tokens", "labels", "loss_mask", "document_ids", "masked", "position_ids")
STEPS = 2




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Two steps of the tiny recipe at DP=2 (TP=PP=1: DP rank = global rank), every micro-batch
    the loop fed recorded; no evaluation or checkpoint (not what is tested here)."""
    run = tmp_path_factory.mktemp("dp2")
    recipe = tiny_recipe(data, run, training={"train_iters": STEPS}, checkpoint={"save": None, "load": None})
    recipe.data = replace(recipe.data, eval_sets=[])
    recorded = run_distributed(train_and_record, 2, args=(recipe,))
    config = run / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe.to_dict()))  # what --print-config gives; the tool reads it
    return recipe, recorded, config


def test_mixture_samples_are_the_batches_the_loop_trained_on(trained):
    recipe, recorded, _ = trained
    modes = []
    for step in range(1, STEPS + 1):
        for rank in (0, 1):
            view = step_samples(recipe, step, rank, 2, log=None)
            fed = recorded[rank][step]
            assert len(view.micro_batches) == len(fed) == 2
            for ours, loop in zip(view.micro_batches, fed):
                for key in FIELDS:
                    assert torch.equal(ours[key], loop[key]), (step, rank, key)
                modes += loop["masked"].tolist()
            assert len(view.samples) == recipe.training.global_batch_size // 2
    assert any(modes) and not all(modes)  # both modes were compared


def test_cli_json_is_the_loop_batch(trained, tmp_path, capsys):
    recipe, recorded, config = trained
    out = tmp_path / "step2_rank1.json"
    assert load_tool("inspect_data").main(["mixture", "--config", str(config), "--step", "2", "--dp-rank", "1", "--world-size", "2",
                         "--json", str(out), "--histogram", str(tmp_path / "lengths.png")]) == 0
    printed = capsys.readouterr().out
    assert "step 2 (after 8 consumed samples), DP rank 1 of 2: 2 micro-batches of 2, global samples 12..15" in printed
    view = json.loads(out.read_text())
    fed = [(b, r) for b in recorded[1][2] for r in range(b["tokens"].shape[0])]  # DP rank 1, step 2
    assert [s["global_index"] for s in view["samples"]] == [12, 13, 14, 15]
    for sample, (b, r) in zip(view["samples"], fed, strict=True):
        assert sample["tokens"] == b["tokens"][r].tolist()
        assert sample["labels"] == b["labels"][r].tolist()
        assert sample["loss_mask"] == b["loss_mask"][r].long().tolist()
        assert sample["document_ids"] == b["document_ids"][r].tolist()
        assert sample["mode"] == ("masked" if bool(b["masked"][r]) else "causal")
        positions = (torch.nonzero(b["loss_mask"][r]).flatten() + 1).tolist() if bool(b["masked"][r]) else []
        assert sample["masked_positions"] == positions
        starts = [a for a, _ in sample["documents"]]
        assert starts == [0] + (torch.nonzero(b["document_ids"][r][1:] != b["document_ids"][r][:-1]).flatten() + 1).tolist()
        assert sample["text"].count("\u27e8") == len(positions) and sample["text"].count("\u27e6doc") == len(starts)
    assert sum(c["samples"] for c in view["step_corpora"]) == 4
    assert [c["label"] for c in view["corpora"]] == ["nb_text_document", "nn_text_document"]
    assert (tmp_path / "lengths.png").read_bytes().startswith(b"\x89PNG")


def test_corpus_counts_documents_and_histogram(data, tmp_path, capsys):
    nb, nn = data["prefixes"]["nb"], data["prefixes"]["nn"]
    tokenizer = load_tokenizer(data["tokenizer"])
    summary = corpus_summary(nb)
    reader = IndexedReader(nb)
    assert (summary.documents, summary.tokens) == (reader.num_documents, reader.num_tokens)
    assert summary.document_lengths.sum() == reader.num_tokens and len(summary.document_lengths) == 24
    # A decoded document is its source text, between the <s> and </s> that preprocessing added.
    texts = read_documents(Path(nb).with_name("train_nb.jsonl"))
    doc = corpus_documents(nb, [3], tokenizer)[0]
    assert doc["text"].startswith("<s>") and doc["text"].endswith("</s>")
    assert tokenizer.decode(doc["ids"][1:-1]) == texts[3] and doc["tokens"] == int(summary.document_lengths[3])
    out = tmp_path / "lengths.png"
    assert load_tool("inspect_data").main(["corpus", "--prefix", nb, "--prefix", f"nynorsk={nn}", "--tokenizer", data["tokenizer"],
                         "--document", "3", "--histogram", str(out), "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "nynorsk" in printed and texts[3][:40] in printed
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 5000
    from megatron_normistral.reporting.data_inspection import plot_document_lengths

    fig = plot_document_lengths([summary, corpus_summary(nn, "nynorsk")], tmp_path / "again.png")
    assert [p.get_gid() for p in fig.axes[0].patches if p.get_gid()] == ["nb_text_document", "nynorsk"]
    listed = json.loads((tmp_path / "c.json").read_text())
    assert [c["tokens"] for c in listed["corpora"]] == [summary.tokens, corpus_summary(nn).tokens]


def test_bad_input_fails_in_one_line(data, trained, tmp_path, capsys):
    _, _, config = trained
    tool = load_tool("inspect_data")

    def fails(argv, *fragments):
        error_line(tool.main([str(a) for a in argv]), capsys.readouterr().err, *fragments)

    missing = tmp_path / "nothing_text_document"
    fails(["corpus", "--prefix", missing], f"corpus prefix {missing}: neither")
    fails(["corpus", "--prefix", data["prefixes"]["nb"], "--document", "24"], "no document 24; it has 24")
    fails(["mixture", "--config", config, "--step", "0"], "--step 0: the run has steps 1..2")
    fails(["mixture", "--config", config, "--step", "1", "--dp-rank", "2", "--world-size", "2"],
          "--dp-rank 2: data-parallel ranks are 0..1")
    fails(["mixture", "--config", config, "--step", "1", "--world-size", "3"], "global batch 8 is not divisible")
    fails(["mixture", "--config", tmp_path / "none.yaml", "--step", "1"], "none.yaml: no such recipe file")
    with pytest.raises(SystemExit) as exc:
        tool.main(["mixture", "--config", str(config), "--step", "1", "--dp", "1"])
    assert exc.value.code == 2 and "unrecognized arguments: --dp" in capsys.readouterr().err
