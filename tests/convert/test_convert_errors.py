"""tools/convert_checkpoint.py on bad input: exit 2, one line naming the file and the reason, no
traceback, and no output folder (nor its hidden staging folder) left behind."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from megatron_normistral.convert import ConversionError, mcore_io
from megatron_normistral.testing.convert_workers import make_hf_checkpoint
from megatron_normistral.model.architectures import get_architecture
from megatron_normistral.testing.tool_runs import REPO, error_line, failed_cleanly, run_tool_script

TINY = get_architecture("tiny")


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


cli = _load_cli()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("convert_errors")
    make_hf_checkpoint(work / "hf", TINY, torch.float32, seed=0)
    make_hf_checkpoint(work / "hf_sharded", TINY, torch.float32, seed=0, max_shard_size="100KB")
    assert cli(["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore"), "--arch", "tiny"]) == 0
    return work


def _fails(capsys, argv, *fragments) -> str:
    rc = cli([str(a) for a in argv])
    return error_line(rc, capsys.readouterr().err, *fragments)


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.partial"))


def _damaged_copy(work: Path, source: str, name: str, damage) -> Path:
    target = work / name
    if not target.exists():
        shutil.copytree(work / source, target)
        damage(target)
    return target


@pytest.mark.parametrize("case", ["truncated safetensors", "truncated shard", "broken config.json", "no such folder",
                                  "--tp 3", "architecture mismatch", "unknown architecture", "unknown model_type",
                                  "non-empty --out", "megatron checkpoint as --hf"])
def test_hf_to_mcore_refuses(work, capsys, case):
    hf, extra = work / "hf", []
    if case == "truncated safetensors":
        hf = _damaged_copy(work, "hf", "hf_cut", lambda d: _truncate(d / "model.safetensors", 500_000))
        want = [f"{hf / 'model.safetensors'}: not a readable safetensors file", "truncated or damaged"]
    elif case == "truncated shard":
        shard = sorted(p.name for p in (work / "hf_sharded").glob("*.safetensors"))[1]
        hf = _damaged_copy(work, "hf_sharded", "hf_shard_cut", lambda d: _truncate(d / shard, 1000))
        want = [f"{hf / shard}: not a readable safetensors file"]
    elif case == "broken config.json":
        hf = _damaged_copy(work, "hf", "hf_bad_config", lambda d: (d / "config.json").write_text('{"hidden_'))
        want = [f"{hf / 'config.json'}: not valid JSON"]
    elif case == "no such folder":
        hf = work / "typo"
        want = [f"{hf}: no such folder"]
    elif case == "--tp 3":
        extra = ["--tp", "3"]
        want = ["layout tp=3 pp=1", f"does not fit the model in {hf}", "heads (4) not divisible by tensor parallel size (3)"]
    elif case == "architecture mismatch":
        extra = ["--arch", "tiny-tekken"]
        want = [f"architecture 'tiny-tekken' does not match the HF config in {hf}", "hidden_size: 128 vs 64"]
    elif case == "unknown architecture":
        extra = ["--arch", "tiny-typo"]
        want = ["unknown architecture 'tiny-typo'; known:"]
    elif case == "unknown model_type":
        def to_llama(d):
            (d / "config.json").write_text((d / "config.json").read_text().replace('"mistral"', '"llama"'))
        hf = _damaged_copy(work, "hf", "hf_llama", to_llama)
        want = [f"{hf / 'config.json'}: model_type 'llama' belongs to no registered model family",
                "registered: mistral (model_type mistral)", "register_family"]
    elif case == "non-empty --out":
        (work / "occupied").mkdir(exist_ok=True)
        (work / "occupied" / "notes.txt").write_text("mine")
        want = [f"output {work / 'occupied'} exists and is not an empty folder"]
    else:
        hf = work / "mcore"
        want = [f"{hf} is a megatron-core checkpoint, not a Hugging Face folder"]
    out = work / ("occupied" if case == "non-empty --out" else f"out_{case.replace(' ', '_')}")
    _fails(capsys, ["hf-to-mcore", "--hf", hf, "--out", out, *extra], *want)
    if case == "non-empty --out":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
    assert _left_behind(out) == []


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


DISTCP = "p00003__0_1.distcp"


@pytest.mark.parametrize("case", ["no .metadata", "missing .distcp", "truncated .distcp", "truncated .metadata",
                                  "Hugging Face folder", "folder of training checkpoints", "non-empty --out"])
def test_mcore_to_hf_refuses_partly_written_checkpoints(work, capsys, case):
    mcore = work / "mcore"
    if case == "no .metadata":
        mcore = _damaged_copy(work, "mcore", "m_no_md", lambda d: (d / ".metadata").unlink())
        want = [f"{mcore / '.metadata'} is missing but data files are there: the save did not finish"]
    elif case == "missing .distcp":
        mcore = _damaged_copy(work, "mcore", "m_missing", lambda d: (d / DISTCP).unlink())
        want = [f"checkpoint {mcore} is incomplete: 1 data file(s) missing ({DISTCP})", "interrupted"]
    elif case == "truncated .distcp":
        mcore = _damaged_copy(work, "mcore", "m_cut", lambda d: _truncate(d / DISTCP, 50_000))
        want = [f"checkpoint {mcore} is incomplete: 1 truncated ({DISTCP}: 50,000 of "]
    elif case == "truncated .metadata":
        mcore = _damaged_copy(work, "mcore", "m_md_cut", lambda d: _truncate(d / ".metadata", 3000))
        want = [f"{mcore / '.metadata'} is unreadable", "damaged"]
    elif case == "Hugging Face folder":
        mcore = work / "hf"
        want = [f"{mcore} is a Hugging Face folder, not a megatron-core checkpoint"]
    elif case == "folder of training checkpoints":
        mcore = work / "m_root"  # a --save folder: checkpoints inside, named by `latest`
        if not mcore.exists():
            shutil.copytree(work / "mcore", mcore / "iter_0000007")
            (mcore / "latest").write_text("iter_0000007\n")
        want = [f"{mcore} is a folder of training checkpoints: give one of them, e.g. {mcore / 'iter_0000007'}"]
    else:
        (work / "occupied2").mkdir(exist_ok=True)
        (work / "occupied2" / "config.json").write_text("{}")
        want = [f"output {work / 'occupied2'} exists and is not an empty folder"]
    out = work / ("occupied2" if case == "non-empty --out" else f"hf_{case.replace(' ', '_')}")
    _fails(capsys, ["mcore-to-hf", "--mcore", mcore, "--out", out], *want)
    if case == "non-empty --out":
        assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    else:
        assert not out.exists()  # used to be an empty folder or one holding a .partial shard
    assert _left_behind(out) == []


def test_a_failure_mid_write_leaves_no_output(work, capsys, monkeypatch):
    real_read = mcore_io.read_megatron_tensors
    calls = []

    def read_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # shards are being written by now
            raise ConversionError("simulated read failure")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(mcore_io, "read_megatron_tensors", read_then_fail)
    out = work / "hf_mid_write"
    _fails(capsys, ["mcore-to-hf", "--mcore", work / "mcore", "--out", out], "simulated read failure")
    assert not out.exists() and _left_behind(out) == []

    monkeypatch.setattr(mcore_io.LayerwiseCheckpointWriter, "finalize",
                        lambda self: (_ for _ in ()).throw(OSError(28, "No space left on device", str(self.directory))))
    out = work / "mcore_mid_write"
    _fails(capsys, ["hf-to-mcore", "--hf", work / "hf", "--out", out], "No space left on device (ENOSPC)")
    assert not out.exists() and _left_behind(out) == []


def test_an_existing_empty_folder_receives_the_output(work, capsys):
    out = work / "empty_target"
    out.mkdir()
    assert cli(["mcore-to-hf", "--mcore", str(work / "mcore"), "--out", str(out), "--dtype", "fp32"]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    assert _left_behind(out) == []


def test_the_script_fails_cleanly_too(work):
    # As a user runs it (a subprocess: the interpreter's own exit path, stderr as printed).
    mcore = _damaged_copy(work, "mcore", "m_cut", lambda d: _truncate(d / DISTCP, 50_000))
    p = run_tool_script("convert_checkpoint", "mcore-to-hf", "--mcore", mcore, "--out", work / "hf_script")
    failed_cleanly(p, f"checkpoint {mcore} is incomplete")
    assert not (work / "hf_script").exists()
