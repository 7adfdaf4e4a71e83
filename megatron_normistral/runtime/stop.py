"""When a run stops before its last step: a signal (SLURM's warning ``--signal=USR1@600``,
SIGTERM at a job's end or from ``scancel``) or the wall-time limit, agreed on by all ranks.

Two pieces, because a 12B run spends minutes importing, building the model and loading a
checkpoint before its first step, and the default action of SIGUSR1/SIGTERM is death:

- :func:`capture_early` runs first thing in the launcher script, before torch is imported,
  and only *remembers* a stop signal that arrives during start-up.
- :class:`StopRequest` (a context manager around the training loop) takes over: it installs
  the handlers of the recipe's ``exit_signals``, adopts what arrived early, and restores the
  previous handlers on exit. Its wall-time clock counts from the start of the process (as
  Megatron-LM's ``_TRAIN_START_TIME``), the earliest over all ranks, and from SLURM's job
  start when SLURM says it, so ``exit_duration_in_mins: 2870`` in a 2880-minute job keeps its
  margin however long start-up took.

This module imports nothing heavy at import time (no torch), so that capturing can start at
once.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable

# Signals received before a StopRequest took over, in arrival order (names).
_early: list[str] = []
_early_previous: dict[int, object] = {}


def _remember(signum, frame) -> None:
    _early.append(signal.Signals(signum).name)


def capture_early(names: Iterable[str] = ("SIGTERM", "SIGUSR1")) -> None:
    """From now on, remember these signals instead of dying of them (main thread only)."""
    for name in names:
        signum = getattr(signal, name)
        if signum not in _early_previous:
            _early_previous[signum] = signal.signal(signum, _remember)


def process_start_time() -> float:
    """Wall-clock time (seconds since the epoch) at which this process started.

    The kernel's record of the start (psutil reads /proc), not the time this function is first
    called: interpreter start-up and imports count. With SLURM >= 23.02, ``SLURM_JOB_START_TIME``
    is the job's start, earlier still when srun and torchrun took their time."""
    import psutil

    started = psutil.Process().create_time()
    slurm = os.environ.get("SLURM_JOB_START_TIME", "")
    if slurm.isdigit():
        started = min(started, float(slurm))
    return started


class StopRequest:
    """Decides whether the run stops after the current step, and why.

    ``agree(flag)`` must return True on every rank when ``flag`` is True on any rank (a MAX
    all-reduce over the world): a signal delivered to one rank stops every rank at the same
    step, so they save one consistent checkpoint together."""

    def __init__(self, signals: Iterable[str], exit_minutes: float | None, started_at: float,
                 agree: Callable[[bool], bool]):
        self.signals = [getattr(signal, name) for name in signals]
        self.exit_minutes = exit_minutes
        self.deadline = started_at + exit_minutes * 60 if exit_minutes else None
        self.agree = agree
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def restart_clock(self, started_at: float) -> None:
        """Count the wall-time limit from ``started_at`` (e.g. the earliest start over ranks)."""
        if self.deadline is not None:
            self.deadline = started_at + self.exit_minutes * 60

    def __enter__(self) -> "StopRequest":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        # Signals that arrived during start-up: ours stop the run at its first step; any other
        # captured signal gets the fate it would have had without capturing (its default).
        wanted = {signal.Signals(s).name for s in self.signals}
        for name in _early:
            if name in wanted:
                self.received = self.received or name
        leftover = [name for name in _early if name not in wanted]
        _early.clear()
        for signum, previous in list(_early_previous.items()):
            if signum not in self.signals:
                signal.signal(signum, previous)
                del _early_previous[signum]
        for name in leftover:
            os.kill(os.getpid(), getattr(signal, name))
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # What was there before capture_early, if it captured this signal.
            signal.signal(signum, _early_previous.pop(signum, previous))
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.received:
            return self.received
        if self.deadline is not None and time.time() >= self.deadline:
            return "wall-time limit"
        return None

    def should_stop(self) -> str | None:
        """Collective: the reason on this rank, "signal on another rank", or None."""
        local = self.local_reason()
        if self.agree(local is not None):
            return local or "stop requested on another rank"
        return None
