"""Output files of the reporting tools, published whole: written under a hidden name next to the
final one and renamed into place, so an interrupted or failed run never leaves a half-written PNG
or JSON that looks finished (as megatron_normistral.tool_io does for folders)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def publish_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(partial)`` writes the content to ``partial``; it then becomes ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> Path:
    return publish_file(path, lambda partial: fig.savefig(partial, dpi=dpi, format="png"))


def save_json(path: str | os.PathLike, payload, indent: int | None = None) -> Path:
    text = json.dumps(payload, ensure_ascii=False, indent=indent) + "\n"
    return publish_file(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def save_text(path: str | os.PathLike, text: str) -> Path:
    return publish_file(path, lambda partial: partial.write_text(text, encoding="utf-8"))
