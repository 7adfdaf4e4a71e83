"""The shared "pct | elapsed | ETA" text and line throttling (runtime.progress), on a fake clock."""
from __future__ import annotations

from megatron_normistral.runtime.progress import ProgressMeter, clock, progress_text
from megatron_normistral.training.metrics import Progress


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_clock_text():
    assert clock(0) == "0:00:00"
    assert clock(62.9) == "0:01:02"
    assert clock(27 * 3600 + 3 * 60 + 9) == "27:03:09"  # hours are not wrapped at a day
    assert clock(float("nan")) == "-"


def test_percent_elapsed_and_eta_at_the_mean_rate():
    # 41.3% done in 12 s: the other 58.7% at the same rate take 12 / 41.3 * 58.7 = 17.06 s
    assert progress_text(41.3, 100, 12.0) == "41.3% | elapsed 0:00:12 | ETA 0:00:17"
    assert progress_text(0, 100, 5.0) == "0.0% | elapsed 0:00:05 | ETA -"      # no rate yet
    assert progress_text(100, 100, 75.0) == "100.0% | elapsed 0:01:15 | ETA 0:00:00"
    assert progress_text(7, None, 3.0) == "elapsed 0:00:03"                      # total unknown (a pipe)
    assert progress_text(0, 0, 1.0) == "100.0% | elapsed 0:00:01 | ETA 0:00:00"  # nothing to do


def test_meter_counts_from_its_start_and_throttles_lines():
    now = FakeClock()
    meter = ProgressMeter(total=1000, interval=10.0, now=now)
    now.t += 4
    assert not meter.due()                       # 4 s < 10 s since the start
    assert meter.text(100) == "10.0% | elapsed 0:00:04 | ETA 0:00:36"
    now.t += 6
    assert meter.due()                           # 10 s: a line, and the next one 10 s later
    now.t += 9.5
    assert not meter.due()
    assert meter.due(force=True)                 # a final line comes whatever the interval
    now.t += 1
    assert not meter.due()                       # ... and counts as the last line written
    assert meter.percent(250) == "25.0%" and meter.times(250) == "elapsed 0:00:20 | ETA 0:01:01"
    always = ProgressMeter(total=None, interval=0, now=now)
    assert always.due() and always.due() and always.percent(5) == ""


def test_training_step_line_uses_the_same_clock_text():
    progress = Progress(total_steps=100)
    progress.of(10, now=0.0)
    assert progress.of(20, now=3725.0) == "/100 (20.0%) | elapsed 1:02:05 | ETA 8:16:40"  # 10 steps in 3725 s, 80 left
