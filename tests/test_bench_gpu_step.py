"""benchmarks/gpu_step.py (issues 8, 13) at tiny size on CPU, so the GPU benchmark cannot rot.

Runs the script as a subprocess (it owns its process group) with ``--tiny`` and checks that
every config ran a finite training step and that every ratio and the table came out.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_step.py"
CONFIGS = ["ours_dense", "plain", "ours", "ours_small_vocab", "ours_small_vocab_objective_causal", "ours_small_vocab_hybrid",
           "ours_small_vocab_hybrid_dense", "ours_small_vocab_objective_causal_long", "ours_small_vocab_hybrid_long",
           "ours_small_vocab_hybrid_dense_long", "ours_dense_repeat"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_step_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": "29631"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert report["layers"] == 2 and report["args"]["seq"] == 32
    assert report["matmul"]["peak_tflops"] > 0
    assert list(report["configs"]) == CONFIGS
    for name in CONFIGS:
        r = report["configs"][name]
        assert "error" not in r and "skipped" not in r, (name, r)
        assert len(r["step_times_s"]) == report["args"]["steps"]
        assert r["step_s"] > 0 and r["mfu"] > 0 and r["mfu_nominal"] > 0
        # needed FLOPs: only the allowed attention pairs (under half the matrix once causal)
        assert 0 < r["needed_flops_per_step"] < r["model_flops_per_step"] and 0 < r["allowed_attention_pairs"] <= 0.5 + 1 / r["seq"]
        assert math.isfinite(r["last_step"]["loss"]) and r["last_step"]["updated"], (name, r["last_step"])
    assert report["configs"]["plain"]["stack"] == "plain"
    assert report["configs"]["ours"]["attention"] == "auto" and report["configs"]["ours_dense"]["attention"] == "dense"
    assert report["configs"]["ours_small_vocab_hybrid_long"]["seq"] == 64
    assert report["configs"]["ours_small_vocab"]["vocab"] == 128
    hybrid = report["configs"]["ours_small_vocab_hybrid"]["objective_batches"]
    assert hybrid["timed_masked_micro_batches"] >= 1  # the masked (MNTP) path really ran, timed
    assert report["configs"]["ours_small_vocab_objective_causal"]["objective_batches"]["masked_micro_batches"] == 0
    for key, value in report["ratios"].items():
        assert value is not None and value > 0, key

    # Same seed, same batches: timing the base config twice trains the same thing, plain
    # megatron-core is the same model (its norm computes in bf16, ours in fp32), and the fast
    # attention trains what the dense one trains (bf16 rounding apart).
    configs = report["configs"]
    dense, plain, fast = (configs[n]["last_step"] for n in ("ours_dense", "plain", "ours"))
    assert plain["loss"] == pytest.approx(dense["loss"], rel=1e-3)
    assert plain["grad_norm"] == pytest.approx(dense["grad_norm"], rel=1e-2)
    assert fast["loss"] == pytest.approx(dense["loss"], rel=1e-2)
    assert configs["ours_small_vocab_hybrid"]["last_step"]["loss"] == pytest.approx(
        configs["ours_small_vocab_hybrid_dense"]["last_step"]["loss"], rel=1e-2)
    assert dense["loss"] == pytest.approx(configs["ours_dense_repeat"]["last_step"]["loss"], rel=1e-6)

    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("hybrid (10% masked) / causal-only step time, fast path:")
    assert any(line.startswith("ours_dense / plain step time:") for line in lines[-6:])
    assert any(line.startswith("| plain | dense | 32 | 256 |") for line in lines)


def test_layer_choice_fits_the_card():
    """The layer count follows the card: the 8-layer 131k slice on an H200, fewer on an H100."""
    bench = _load_script()
    gib = bench.GIB
    assert bench.pick_layers("mistral-nemo-12b", 131_072, 4096, 1, [8, 6, 4, 2], 0.9 * 140 * gib) == 8
    h100 = bench.pick_layers("mistral-nemo-12b", 131_072, 4096, 1, [8, 6, 4, 2], 0.9 * 79 * gib)
    assert 2 <= h100 < 8
