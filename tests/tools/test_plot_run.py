"""tools/plot_run.py: PNGs of step logs written by the loop's own logger, several runs end to end,
each figure drawing the series the logs hold; bad logs fail in one line."""
from __future__ import annotations


import pytest

from megatron_normistral.reporting.run_plots import drawn_series, plot_runs, read_run_log
from megatron_normistral.testing.tool_runs import error_line, load_tool
from megatron_normistral.training.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LANGUAGES = ("nb", "nn", "se")




def _step(step: int, masked: float | None) -> dict:
    """A record with the keys the loop's StepReporter logs (NaN masked loss: a step without masked rows)."""
    return {"step": step, "loss": 5.0 - 0.01 * step, "loss_causal": 5.0 - 0.01 * step,
            "loss_masked": float("nan") if masked is None else masked, "tokens_causal": 900, "tokens_masked": 100,
            "lr": 1e-3 * min(1.0, step / 4), "grad_norm": 2.0 / step, "skipped": 0, "tokens_per_s": 1000.0 + step,
            "tflops_per_device": 0.1, "mfu": None, "memory_gb": 1.0, "consumed_samples": 8 * step, "step_time_s": 0.5,
            "trainable": "full"}


def _write_log(path, steps, eval_at=(), masked_every=2, resumed_from=None):
    """A step log through the training loop's MetricsLogger; ``resumed_from``: the steps after it
    are logged a second time (a resume from a checkpoint at that step), with other values."""
    logger = MetricsLogger(100, str(path), None, is_logger=True)
    for step in steps:
        logger.step(_step(step, 6.0 if step % masked_every == 0 else None))
        if step in eval_at:
            logger.eval(step, {lang: {"loss": 2.0, "loss_per_word": 9.0 - step / 100, "tokens_per_word": 2.5,
                                      "words": 500, "tokens": 1250, "masked_accuracy": 0.2} for lang in LANGUAGES})
    if resumed_from is not None:
        for step in steps:
            if step > resumed_from:
                logger.step({**_step(step, None), "loss_causal": 1.0})  # what the resumed run logged
    logger.close()
    return path


def test_runs_end_to_end_with_the_expected_series(tmp_path, capsys):
    stage2 = _write_log(tmp_path / "stage2.jsonl", range(1, 11), eval_at={5, 10}, resumed_from=6)
    stage3 = _write_log(tmp_path / "stage3.jsonl", range(1, 21), eval_at={20}, masked_every=10**9)  # no masked rows
    out = tmp_path / "plots"
    assert load_tool("plot_run").main(["stage2=" + str(stage2), str(stage3), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage3: 20 steps, 3 evaluation records, steps shifted by 10" in printed
    names = ["loss", "lr", "grad_norm", "throughput", "eval_loss_per_word", "eval_masked_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)  # nothing half-written left
    for name in names:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    plots = plot_runs([read_run_log(stage2, "stage2"), read_run_log(stage3)], tmp_path / "again")
    assert plots.offsets == [0, 10]
    # What each figure draws: per run and quantity for training, per language for evaluation.
    assert drawn_series(plots.figures["loss"]) == ["stage2/causal", "stage3/causal", "stage2/masked"]
    for name in ("lr", "grad_norm", "throughput"):
        assert len(drawn_series(plots.figures[name])) == 2, name
    assert drawn_series(plots.figures["eval_loss_per_word"]) == [f"all/{lang}" for lang in LANGUAGES]
    assert len(drawn_series(plots.figures["eval_masked_accuracy"])) == 3
    # Stage 3 starts where stage 2 ends; a resumed step counts once, with its last record.
    causal = {s.run: s for s in plots.series["loss"] if s.label == "causal"}
    assert causal["stage2"].steps == list(range(1, 11)) and causal["stage3"].steps == list(range(11, 31))
    assert causal["stage2"].values[6:] == [1.0] * 4 and causal["stage2"].values[5] == pytest.approx(4.94)
    masked = next(s for s in plots.series["loss"] if s.label == "masked")
    assert masked.steps == [2, 4, 6]  # steps 8 and 10 were logged again without masked rows
    line = next(ln for ln in plots.figures["loss"].axes[0].get_lines() if ln.get_gid() == "stage3/causal")
    assert list(line.get_xdata()) == list(range(11, 31))
    nb = plots.series["eval_loss_per_word"][0]
    assert nb.steps == [5, 10, 30] and nb.values == pytest.approx([8.95, 8.9, 8.8])


def test_one_run_without_evaluations(tmp_path):
    log = _write_log(tmp_path / "run.jsonl", range(1, 6))
    plots = plot_runs([read_run_log(log)], tmp_path / "out")
    assert sorted(plots.files) == ["grad_norm", "loss", "lr", "throughput"]
    assert all(path.stat().st_size > 0 for path in plots.files.values())


@pytest.mark.parametrize("case", ["not-json", "no-step", "empty", "missing"])
def test_bad_logs_fail_in_one_line(tmp_path, capsys, case):
    log = tmp_path / "bad.jsonl"
    content = {"not-json": '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n', "no-step": '{"loss": 2.0}\n', "empty": "\n"}
    if case in content:
        log.write_text(content[case])
    want = {"not-json": f"{log}:2: not JSON", "no-step": f"{log}:1: a record without an integer 'step'",
            "empty": f"{log}: no step or evaluation records", "missing": f"{log}: No such file or directory"}[case]
    rc = load_tool("plot_run").main([str(log), "--out-dir", str(tmp_path / "out")])
    error_line(rc, capsys.readouterr().err, want)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_flags_are_never_abbreviated(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load_tool("plot_run").main([str(tmp_path / "x.jsonl"), "--out-dir", str(tmp_path), "--dp", "50"])
    assert exc.value.code == 2 and "unrecognized arguments: --dp" in capsys.readouterr().err
