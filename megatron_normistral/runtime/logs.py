"""The library's one logger: ``get_logger(__name__)`` in every module, nothing printed directly.

Why a logger and not ``print``: a 512-GPU run has 512 processes writing to one SLURM log, so a
line must say whether every rank writes it or only rank 0; and a user embedding the library
(a notebook, a tracker) must be able to take over the output with the ``logging`` module.

Policy, in this module only:
- Records go to the console as their bare message (the lines the tools and the loop have always
  printed): INFO to stdout, WARNING and above to stderr. A record logged with ``extra=STDERR`` goes
  to stderr at INFO: a tool's progress, which must not mix with the result it prints on stdout.
- Once ``torch.distributed`` is initialised, only rank 0 writes, unless the record is logged with
  ``extra=EVERY_RANK`` (a rank's own failure). Before that, every process is its own rank 0.
- The streams are looked up when a record is written, so redirected ``sys.stdout`` (pytest's
  capture, ``contextlib.redirect_stdout``) receives it.

Configure it as any ``logging`` hierarchy: ``logging.getLogger("megatron_normistral")`` is the
root; remove our handler (``logs.console_handler()``) or raise its level to silence it.
"""
from __future__ import annotations

import logging
import sys

ROOT = "megatron_normistral"
EVERY_RANK = {"every_rank": True}
STDERR = {"to_stderr": True}


def get_logger(name: str) -> logging.Logger:
    """The library logger for module ``name`` (pass ``__name__``); a name outside the package
    (a tool's ``__main__``) is placed under it."""
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name.rsplit('.', 1)[-1]}"
    return logging.getLogger(name)


def rank() -> int:
    """This process's rank in the default group; 0 before (or without) torch.distributed."""
    torch = sys.modules.get("torch")  # never import torch just to log a tool's line
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class _RankZeroOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or rank() == 0


class _Console(logging.Handler):
    """The bare message to stdout (INFO) or stderr (WARNING+, or ``extra=STDERR``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_stderr = record.levelno >= logging.WARNING or getattr(record, "to_stderr", False)
            stream = sys.stderr if to_stderr else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # logging must never take the run down (a closed pipe, say)
            self.handleError(record)


def console_handler() -> logging.Handler:
    """The handler this module installed on the library's root logger."""
    return _HANDLER


def progress(log: logging.Logger, verbose: bool, message: str) -> None:
    """A long tool step's progress line: to stderr (stdout stays the tool's result), only when
    ``verbose``."""
    if verbose:
        log.info(message, extra=STDERR)


def _install() -> logging.Handler:
    root = logging.getLogger(ROOT)
    for handler in root.handlers:  # a re-import (importlib.reload) keeps one handler
        if isinstance(handler, _Console):
            return handler
    handler = _Console()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_RankZeroOnly())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # an application's root handlers would print every line twice
    return handler


_HANDLER = _install()
