"""How the tools in ``tools/`` fail and publish their output.

Failing: one line on stderr, ``error: <file>: <reason>; <what to do>``, exit status 2, no
traceback (:func:`run_tool`). Publishing: output folders are written under a hidden temporary
name next to the final one and renamed into place when complete (:func:`staged_folder`), so a
failed or interrupted run never leaves a folder that looks finished (datasets do the same per
file: :class:`megatron_normistral.data.indexed.IndexedDatasetWriter`).

Bad input is what the libraries raise as ``ValueError`` (their own error types derive from
it), ``OSError`` (missing files, a full disk) and ``EOFError``. Anything else is a bug and
keeps its traceback. ``NORMISTRAL_TRACEBACK=1`` prints the traceback of bad input too.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import traceback
from pathlib import Path
from typing import Callable, Iterator

from megatron_normistral.runtime.logs import EVERY_RANK, get_logger

log = get_logger(__name__)

EXIT_BAD_INPUT = 2
BAD_INPUT_ERRORS = (ValueError, OSError, EOFError)

# What to do about the OS errors a long write meets.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free disk space (df -h) or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "a file size limit was reached (ulimit -f, or the file system's largest file)",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "check the permissions",
}


def one_line(exc: BaseException) -> str:
    """The exception as one line; an OSError with a file name as ``file: reason (ECODE); hint``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
        if exc.errno in _OS_ERROR_HINTS:
            text += f"; {_OS_ERROR_HINTS[exc.errno]}"
    elif isinstance(exc, KeyError) and exc.args:  # str() of a KeyError quotes its message
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_tool(body: Callable[[], int], also: tuple[type[BaseException], ...] = ()) -> int:
    """``body()``, with bad input (and the exception types in ``also``) reported as one line
    and exit status 2."""
    try:
        return body()
    except BAD_INPUT_ERRORS + also as exc:
        if os.environ.get("NORMISTRAL_TRACEBACK"):
            traceback.print_exc()
        log.error(f"error: {one_line(exc)}", extra=EVERY_RANK)
        return EXIT_BAD_INPUT


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, replace_existing: bool = False) -> Iterator[Path]:
    """A fresh hidden folder ``.NAME.partial-PID`` next to ``out_dir``, published as ``out_dir``
    when the block succeeds and removed when it fails (only SIGKILL leaves it behind, under a
    name that does not look like the output).

    ``replace_existing=False``: ``out_dir`` must be missing or an empty folder (``ValueError``).
    ``True``: an existing ``out_dir`` is replaced only once the new one is complete (moved
    aside, the new one renamed in, the old one removed)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder: remove it or choose another")
    occupied = out_dir.is_dir() and any(out_dir.iterdir())
    if occupied and not replace_existing:
        raise ValueError(f"output {out_dir} exists and is not empty: remove it or choose another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out_dir.is_dir() and any(out_dir.iterdir()):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)  # takes the place of a missing or empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
