"""The step line's progress (step N/total, elapsed, ETA) and the library logger's policy."""
import io
import logging
from contextlib import redirect_stderr, redirect_stdout

from megatron_normistral.runtime import logs
from megatron_normistral.training.metrics import Progress


def test_progress_counts_from_the_first_logged_step_and_projects_the_mean_step_time():
    progress = Progress(total_steps=100)
    assert progress.of(11, now=50.0) == "/100 (11.0%)"  # resumed at step 10: nothing timed yet
    # Steps 12..15 took 40 s in all (10 s each); 85 steps are left.
    assert progress.of(15, now=90.0) == "/100 (15.0%) | elapsed 0:00:40 | ETA 0:14:10"
    assert Progress(total_steps=None).of(3, now=1.0) == ""


def test_library_logger_writes_bare_lines_to_the_streams_of_the_moment():
    log = logs.get_logger("megatron_normistral.some.module")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        log.info("a status line")
        log.warning("note: a warning")
        logs.progress(log, True, "tool progress")
        logs.progress(log, False, "not shown")
    assert out.getvalue() == "a status line\n"
    assert err.getvalue() == "note: a warning\ntool progress\n"


def test_only_rank_zero_writes_once_distributed_unless_every_rank_is_asked(monkeypatch):
    log = logs.get_logger("tool_main")  # a name outside the package goes under it
    assert log.name == "megatron_normistral.tool_main"
    monkeypatch.setattr(logs, "rank", lambda: 1)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        log.info("rank 0's line")
        log.error("this rank failed", extra=logs.EVERY_RANK)
    assert out.getvalue() == ""
    assert err.getvalue() == "this rank failed\n"


def test_the_handler_can_be_taken_over_with_the_logging_module():
    handler = logs.console_handler()
    assert handler in logging.getLogger(logs.ROOT).handlers
    out = io.StringIO()
    handler.setLevel(logging.WARNING)
    try:
        with redirect_stdout(out):
            logs.get_logger("megatron_normistral.x").info("silenced")
    finally:
        handler.setLevel(logging.NOTSET)
    assert out.getvalue() == ""
