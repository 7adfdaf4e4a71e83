"""The "pct | elapsed | ETA" part of a progress line, and when the next line is due.

One helper for every place a user waits outside the training loop (preprocessing, checkpoint
conversion, embedding transfer) and for the loop's own step line (its clock text): the same
words and the same H:MM:SS everywhere, so a SLURM log reads the same whichever tool wrote it.

Why plain throttled lines and not tqdm (a declared dependency): a batch job's stderr is a file,
and a carriage-return bar written there is either one line per redraw or one line at the end.
A line every ``interval`` seconds is readable in a log and on a terminal alike.

The ETA assumes the rest goes at the mean rate so far: ``elapsed / done * (total - done)``.
Every caller measures ``done`` in a unit that grows with the work (bytes read, parameters
converted, rows written), not in items of uneven size.
"""
from __future__ import annotations

import math
import time
from typing import Callable


def clock(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded: ``27:03:09``) of a non-negative duration; "-" when unknown."""
    if not math.isfinite(seconds):
        return "-"
    minutes, s = divmod(int(max(seconds, 0.0)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def fraction_done(done: float, total: float) -> float:
    """``done / total`` clipped to [0, 1]; nothing to do (``total`` <= 0) counts as all done."""
    if total <= 0:
        return 1.0
    return min(max(done / total, 0.0), 1.0)


def eta_seconds(done: float, total: float, elapsed: float) -> float:
    """Seconds left at the mean rate so far; ``nan`` before anything is done (no rate yet)."""
    if fraction_done(done, total) >= 1.0:
        return 0.0
    if done <= 0:
        return math.nan
    return elapsed / done * (total - done)


def percent_text(done: float, total: float) -> str:
    """``41.3%``."""
    return f"{fraction_done(done, total):.1%}"


def times_text(done: float, total: float | None, elapsed: float) -> str:
    """``elapsed 0:00:12 | ETA 0:00:17``; only the elapsed part when ``total`` is unknown."""
    if total is None:
        return f"elapsed {clock(elapsed)}"
    return f"elapsed {clock(elapsed)} | ETA {clock(eta_seconds(done, total, elapsed))}"


def progress_text(done: float, total: float | None, elapsed: float) -> str:
    """``41.3% | elapsed 0:00:12 | ETA 0:00:17`` (``elapsed 0:00:12`` when ``total`` is unknown)."""
    if total is None:
        return times_text(done, None, elapsed)
    return f"{percent_text(done, total)} | {times_text(done, total, elapsed)}"


class ProgressMeter:
    """Work of ``total`` units started now: :meth:`text` formats a line's progress part and
    :meth:`due` says whether a line may be written, at most one per ``interval`` seconds.

    ``total`` None: the amount of work is unknown (an input read from a pipe), so lines show
    the elapsed time only. ``now`` is the clock (a test passes a fake one)."""

    def __init__(self, total: float | None, interval: float, now: Callable[[], float] = time.perf_counter):
        self.total, self.interval, self._now = total, interval, now
        self.started = now()
        self._last_line: float | None = None

    def elapsed(self) -> float:
        return self._now() - self.started

    def due(self, force: bool = False) -> bool:
        """True (and counted as a line written) when ``interval`` seconds have passed since the
        last line, or since the start before the first; always with ``force`` (a final line)."""
        now = self._now()
        since = now - (self._last_line if self._last_line is not None else self.started)
        if not force and since < self.interval:
            return False
        self._last_line = now
        return True

    def percent(self, done: float) -> str:
        """``41.3%``, or "" when the total is unknown."""
        return percent_text(done, self.total) if self.total is not None else ""

    def times(self, done: float) -> str:
        """``elapsed 0:00:12 | ETA 0:00:17``."""
        return times_text(done, self.total, self.elapsed())

    def text(self, done: float) -> str:
        """``41.3% | elapsed 0:00:12 | ETA 0:00:17``."""
        return progress_text(done, self.total, self.elapsed())
