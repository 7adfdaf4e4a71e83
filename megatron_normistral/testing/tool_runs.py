"""Running the scripts in ``tools/`` from tests, and checking that a failure is a clean one:
exit status 2, exactly one ``error:`` line on stderr holding the expected fragments (the file,
the reason), no traceback (megatron_normistral.tool_io)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    """``tools/NAME.py`` imported as a module (tools/ is not a package), to call its ``main(argv)``
    or ``build_parser()`` in-process."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool_script(name: str, *args, timeout: float = 300, env: dict | None = None,
                    preexec_fn=None) -> subprocess.CompletedProcess:
    """``python tools/NAME.py ARGS...``; stdout and stderr captured as text."""
    cmd = [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
                          env={**os.environ, **(env or {})})


def error_line(returncode: int, stderr: str, *fragments: str) -> str:
    """The one ``error:`` line of a clean failure; AssertionError with the stderr otherwise."""
    assert returncode == 2, f"exit status {returncode}, expected 2; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line; stderr:\n{stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def failed_cleanly(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    return error_line(proc.returncode, proc.stderr, *fragments)
