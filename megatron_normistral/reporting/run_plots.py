"""PNG plots of one or more runs' step logs, the runs placed end to end on one step axis.

A step log is what ``logging.json`` (``--log-json``) collects (:mod:`megatron_normistral.training.metrics`):
one JSON object per training step (``step``, ``loss_causal``, ``loss_masked``, ``lr``,
``grad_norm``, ``tokens_per_s``, ...) and one per language per evaluation (``step``, ``eval``: the
language, ``loss_per_word``, ``masked_accuracy``, ...). Runs given in order (stage 2, then stage 3)
are drawn end to end: the steps of run k are shifted by the last steps of runs 0..k-1, so stage
2's steps 1..1000 and stage 3's 1..60000 read as 1..61000; a dashed line and the run's label mark
where each run starts. A run that only evaluates (step 0) is a point at the place it is given.

A step logged twice (a resumed run logs again the steps after its last checkpoint) counts once,
with its last record: the run continued from that one.

    from megatron_normistral.reporting.run_plots import plot_runs, read_run_log

    plots = plot_runs([read_run_log("logs/stage2.jsonl"), read_run_log("logs/stage3.jsonl")], "plots/")
    plots.files      # {"loss": Path("plots/loss.png"), "lr": ..., "eval_loss_per_word": ...}
    plots.series     # what each figure draws: {"loss": [Series(run="stage2", label="causal", ...), ...]}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_normistral.reporting.files import save_png

# Figures of the training records: (file name, y label, [(record key, series label), ...]).
TRAIN_FIGURES = (
    ("loss", "training loss per token", (("loss_causal", "causal"), ("loss_masked", "masked"))),
    ("lr", "learning rate", (("lr", "learning rate"),)),
    ("grad_norm", "gradient norm (before clipping)", (("grad_norm", "gradient norm"),)),
    ("throughput", "tokens per second (whole run)", (("tokens_per_s", "tokens/s"),)),
)
# Figures of the evaluation records, one series per language: (file name, y label, record key).
EVAL_FIGURES = (
    ("eval_loss_per_word", "held-out loss per word (nats)", "loss_per_word"),
    ("eval_masked_accuracy", "held-out masked-token accuracy", "masked_accuracy"),
)
BOUNDARY = "boundary"  # gid of the lines that mark where a run starts


@dataclass
class RunLog:
    """One run's step log: its training records (one per step, in step order) and evaluation
    records (one per step and language, in step order)."""

    label: str
    path: str
    train: list[dict]
    evals: list[dict]

    @property
    def last_step(self) -> int:
        return max([r["step"] for r in self.train + self.evals], default=0)


def read_run_log(path: str | os.PathLike, label: str | None = None) -> RunLog:
    """Read a step log (``logging.json``). Raises ValueError naming the file and line for a line
    that is not a step record, OSError for a file that cannot be read."""
    path = Path(path)
    train: dict[int, dict] = {}
    evals: dict[tuple[int, str], dict] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg}): is this a step log (logging.json)?") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{number}: a record without an integer 'step': not a step log of "
                                 f"pretrain_normistral.py (logging.json)")
            if "eval" in record:
                evals[(record["step"], str(record["eval"]))] = record
            else:
                train[record["step"]] = record
    if not train and not evals:
        raise ValueError(f"{path}: no step or evaluation records (empty log)")
    return RunLog(label=label or path.stem, path=str(path), train=[train[s] for s in sorted(train)],
                  evals=[evals[k] for k in sorted(evals)])


def parse_run_argument(text: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` or ``PATH`` (the label is then the file's stem)."""
    label, sep, path = text.partition("=")
    if sep and label and path and "/" not in label:
        return label, path
    return None, text


def end_to_end_offsets(runs: Sequence[RunLog]) -> list[int]:
    """The shift of each run's steps: the sum of the last steps of the runs before it."""
    offsets, total = [], 0
    for run in runs:
        offsets.append(total)
        total += run.last_step
    return offsets


@dataclass
class Series:
    """One line of a figure: global steps (run step + the run's offset) and values."""

    label: str
    run: str | None  # None: the series spans every run (evaluation, per language)
    steps: list[int]
    values: list[float]


@dataclass
class RunPlots:
    files: dict[str, Path] = field(default_factory=dict)      # figure name -> the PNG written
    figures: dict[str, object] = field(default_factory=dict)  # figure name -> matplotlib Figure
    series: dict[str, list[Series]] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)          # shift of each run's steps, in run order


def _value(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _points(records: list[dict], key: str, offset: int) -> tuple[list[int], list[float]]:
    points = [(offset + r["step"], v) for r in records if (v := _value(r, key)) is not None]
    return [s for s, _ in points], [v for _, v in points]


def train_series(runs: Sequence[RunLog], offsets: Sequence[int]) -> dict[str, list[Series]]:
    """Per training figure, one series per run and quantity that has values."""
    out: dict[str, list[Series]] = {}
    for name, _, keys in TRAIN_FIGURES:
        out[name] = [Series(label, run.label, *_points(run.train, key, offset))
                     for key, label in keys for run, offset in zip(runs, offsets)]
        out[name] = [s for s in out[name] if s.steps]
    return out


def eval_series(runs: Sequence[RunLog], offsets: Sequence[int]) -> dict[str, list[Series]]:
    """Per evaluation figure, one series per language over every run (loss per word compares
    across tokenizers, so a language's line continues from one run to the next)."""
    out: dict[str, list[Series]] = {}
    languages = list(dict.fromkeys(r["eval"] for run in runs for r in run.evals))
    for name, _, key in EVAL_FIGURES:
        series = []
        for language in languages:
            steps, values = [], []
            for run, offset in zip(runs, offsets):
                s, v = _points([r for r in run.evals if r["eval"] == language], key, offset)
                steps += s
                values += v
            if steps:
                series.append(Series(language, None, steps, values))
        out[name] = series
    return out


def _figure(series: list[Series], ylabel: str, runs: Sequence[RunLog], offsets: Sequence[int]):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    colours: dict[str, str] = {}  # one colour per quantity or language, the same in every run
    for s in series:
        in_legend = s.label in colours
        colour = colours.setdefault(s.label, f"C{len(colours) % 10}")
        (line,) = ax.plot(s.steps, s.values, color=colour, label=f"_{s.label}" if in_legend else s.label,
                          marker="." if len(s.steps) < 50 else None, linewidth=1)
        line.set_gid(f"{s.run or 'all'}/{s.label}")
    if len(runs) > 1:
        right = max(max(s.steps) for s in series)
        ax.set_xlim(left=-0.02 * right)  # every run's start (and label) in view, the first one's too
        for run, offset in zip(runs, offsets):
            if offset:
                ax.axvline(offset, color="0.6", linestyle="--", linewidth=0.8, gid=BOUNDARY)
            ax.annotate(run.label, (offset, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize=8, color="0.35")
    ax.set_xlabel("step" if len(runs) == 1 else "step (runs end to end)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_runs(runs: Sequence[RunLog], out_dir: str | os.PathLike, dpi: int = 100) -> RunPlots:
    """Write ``loss.png``, ``lr.png``, ``grad_norm.png``, ``throughput.png`` (training records)
    and ``eval_loss_per_word.png``, ``eval_masked_accuracy.png`` (evaluation records) into
    ``out_dir``; a figure with nothing to draw is not written."""
    if not runs:
        raise ValueError("no runs to plot: give at least one step log")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    offsets = end_to_end_offsets(runs)
    plots = RunPlots(offsets=offsets)
    ylabels = {name: ylabel for name, ylabel, _ in TRAIN_FIGURES + EVAL_FIGURES}
    for name, series in {**train_series(runs, offsets), **eval_series(runs, offsets)}.items():
        if not series:
            continue
        fig = _figure(series, ylabels[name], runs, offsets)
        path = out_dir / f"{name}.png"
        save_png(fig, path, dpi)
        plots.files[name], plots.figures[name], plots.series[name] = path, fig, series
    return plots


def drawn_series(fig) -> list[str]:
    """The gids (``RUN/LABEL``) of the data lines a figure draws (run-start markers left out)."""
    return [line.get_gid() for ax in fig.axes for line in ax.get_lines() if line.get_gid() != BOUNDARY]
