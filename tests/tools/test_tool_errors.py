"""Every tool fails the same way on bad input (exit 2, one line naming the file and the reason,
no traceback), refuses abbreviated flags, and publishes output folders only when complete.
The preprocessing and conversion cases live with their libraries' tests (tests/data,
tests/convert); this file covers the other tools and megatron_normistral.tool_io itself."""
from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_normistral.data.indexed import IndexedDatasetWriter
from megatron_normistral.testing.tool_runs import REPO, error_line, load_tool
from megatron_normistral.tool_io import one_line, staged_folder

CORPUS = REPO / "examples" / "data" / "corpus"




def _fails(capsys, name: str, argv, *fragments) -> str:
    rc = load_tool(name).main([str(a) for a in argv])
    return error_line(rc, capsys.readouterr().err, *fragments)


# Each ends with an abbreviation of a real flag (--json-key, --writer, --train-samples, ...).
ABBREVIATED = {
    "preprocess_data": ["--input", "x", "--output-prefix", "y", "--tokenizer", "t", "--json", "k"],
    "merge_datasets": ["--input", "x", "--output-prefix", "y", "--wr", "cpp"],
    "plan_mixture": ["mix.json", "--train", "10"],
    "train_tokenizer": ["--input", "nb=x", "--output", "o", "--vocab", "300"],
    "fertility": ["--tokenizer", "tekken", "--input", "nb=x", "--max-doc", "3"],
    "transfer_embeddings": ["--source", "s", "--source-tokenizer", "tekken", "--target-tokenizer", "t", "--output", "o",
                            "--se", "3"],
    "convert_checkpoint": ["hf-to-mcore", "--hf", "h", "--out", "o", "--ar", "tiny"],
}


@pytest.mark.parametrize("name", sorted(ABBREVIATED))
def test_abbreviated_flags_are_refused(name, capsys):
    with pytest.raises(SystemExit) as e:
        load_tool(name).main(ABBREVIATED[name])
    assert e.value.code == 2
    assert "unrecognized arguments: " + ABBREVIATED[name][-2] in capsys.readouterr().err


def _dataset(prefix: Path, docs) -> Path:
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(docs)
    return prefix


def test_merge_datasets_refuses_missing_and_mismatched_inputs(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [[1, 2], [3]])
    _fails(capsys, "merge_datasets", ["--input", a, tmp_path / "typo", "--output-prefix", tmp_path / "m"],
           f"corpus prefix {tmp_path / 'typo'}: neither {tmp_path / 'typo'}.bin nor")
    _fails(capsys, "merge_datasets", ["--input", tmp_path / "zz-*", "--output-prefix", tmp_path / "m"],
           f"--input '{tmp_path / 'zz-*'}' matches no dataset")
    b = _dataset(tmp_path / "b", [[4, 5, 6]])
    with open(f"{b}.bin", "ab") as f:
        f.write(b"\0\0")
    _fails(capsys, "merge_datasets", ["--input", a, b, "--output-prefix", tmp_path / "m"],
           f"{b}.bin: 8 bytes, but {b}.idx describes 6", "produced with this .idx")
    assert not list(tmp_path.glob("m.*"))


def test_plan_mixture_refuses_missing_or_malformed_config_and_corpora(tmp_path, capsys):
    _fails(capsys, "plan_mixture", [tmp_path / "mix.json", "--train-samples", "10"], f"{tmp_path / 'mix.json'}: no such file")
    cfg = tmp_path / "mix.json"
    cfg.write_text('{"seq_length": 16, "corpora": [{"prefix": "x"}]}')
    _fails(capsys, "plan_mixture", [cfg, "--train-samples", "10"], f"{cfg}: not a valid mixture config (missing key")
    cfg.write_text(json.dumps({"seq_length": 16, "corpora": [{"prefix": str(tmp_path / "nb"), "language": "nb",
                                                               "weight": 1.0}]}))
    _fails(capsys, "plan_mixture", [cfg, "--train-samples", "10"], f"corpus prefix {tmp_path / 'nb'}: neither")


def test_tokenizer_tools_refuse_missing_inputs(tmp_path, capsys):
    missing = tmp_path / "nb.jsonl"
    _fails(capsys, "train_tokenizer", ["--input", f"nb={missing}", "--output", tmp_path / "tok", "--quiet"],
           f"{missing}: no such file")
    assert not (tmp_path / "tok").exists()
    _fails(capsys, "fertility", ["--tokenizer", "tekken", "--input", f"nb={missing}", "--quiet"], f"{missing}: no such file")
    _fails(capsys, "fertility", ["--tokenizer", tmp_path / "tok.model", "--input", f"nb={CORPUS / 'nb.jsonl.gz'}"],
           f"tokenizer '{tmp_path / 'tok.model'}'")
    _fails(capsys, "transfer_embeddings", ["--source", tmp_path / "hf", "--source-tokenizer", "tekken",
                                           "--target-tokenizer", tmp_path, "--output", tmp_path / "out"],
           f"{tmp_path / 'hf'}: no config.json")
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_replaces_its_output_only_when_complete(tmp_path, capsys):
    out = tmp_path / "tok"
    args = ["--input", f"se={CORPUS / 'se.jsonl.gz'}", "--vocab-size", "400", "--output", out, "--quiet"]
    assert load_tool("train_tokenizer").main([str(a) for a in args]) == 0
    first = (out / "tokenizer.json").read_text()
    assert json.loads(first)["model"]["type"] == "BPE"
    # A second run that fails (the vocabulary is too small) leaves the first tokenizer whole.
    _fails(capsys, "train_tokenizer", args[:2] + ["--vocab-size", "100"] + args[4:], "--vocab-size 100 is too small")
    assert (out / "tokenizer.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_transfer_embeddings_publishes_its_output_only_when_complete(tmp_path, capsys, monkeypatch):
    tool = load_tool("transfer_embeddings")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    seen = {}

    def fake_transfer(cfg):  # stands in for the library: writes into the folder it is given
        seen["output"] = cfg.output
        (Path(cfg.output) / "config.json").write_text('{"new": true}')
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(cfg.output) / "model.safetensors"))
        return dataclasses.replace(_REPORT, output=Path(cfg.output))

    monkeypatch.setattr(tool, "transfer_embeddings", fake_transfer)
    argv = ["--source", str(tmp_path / "src"), "--source-tokenizer", "tekken", "--target-tokenizer", str(tmp_path),
            "--output", str(out)]
    fail = True
    assert tool.main(argv) == 2
    assert "model.safetensors: No space left on device (ENOSPC); free disk space" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"old": true}' and Path(seen["output"]) != out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fail = False
    assert tool.main(argv) == 0
    assert (out / "config.json").read_text() == '{"new": true}'
    assert f"embedding transfer -> {out}:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _report():
    from megatron_normistral.tokenizer.transfer import TransferReport

    return TransferReport(Path("."), 10, 12, {"mean": 12}, {}, {}, 3, 0.1)


_REPORT = _report()


def test_one_line_names_the_file_and_the_errno():
    assert one_line(OSError(errno.EFBIG, "File too large", "/data/x.bin")) == (
        "/data/x.bin: File too large (EFBIG); a file size limit was reached (ulimit -f, or the file system's largest file)")
    assert one_line(KeyError("unknown architecture 'x'")) == "unknown architecture 'x'"
    assert one_line(ValueError("first\n  second\n")) == "first second"


def test_staged_folder_publishes_only_complete_output(tmp_path):
    out = tmp_path / "o"
    with staged_folder(out) as staging:
        (staging / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1"
    with pytest.raises(ValueError, match="exists and is not empty"):
        with staged_folder(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_folder(out, replace_existing=True) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with staged_folder(out, replace_existing=True) as staging:
        (staging / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
