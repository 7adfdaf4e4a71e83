"""Reading the JSONL corpora the tokenizer tools work on, and parsing ``lang=VALUE`` flags.

A corpus file is JSON Lines (optionally gzip-compressed), one document per line, with the
document text under the ``"text"`` key. Paragraphs are separated by blank lines.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class CorpusError(ValueError):
    """Bad input: says which file (and line) and what was wrong."""


def _open_text(path: Path) -> io.TextIOBase:
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    if path.is_dir():
        raise CorpusError(f"{path}: is a folder, expected a .jsonl or .jsonl.gz file")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Yield the ``text`` of every document in a JSONL(.gz) file, in file order.

    Raises :class:`CorpusError` naming the file and line for unreadable JSON, a line that is
    not an object, or a missing / non-string ``text`` field. Blank lines are skipped."""
    path = Path(path)
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                if text_key not in obj:
                    raise CorpusError(f"{path}:{lineno}: no {text_key!r} field (keys: {sorted(obj)[:8]})")
                text = obj[text_key]
                if not isinstance(text, str):
                    raise CorpusError(f"{path}:{lineno}: {text_key!r} is {type(text).__name__}, expected a string")
                yield text
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}:{lineno + 1}: not UTF-8 ({e.reason})") from None
        except (OSError, EOFError) as e:  # truncated / corrupt gzip
            raise CorpusError(f"{path}: cannot read after line {lineno}: {e}") from None


def read_documents(path: str | os.PathLike, text_key: str = "text") -> list[str]:
    return list(iter_documents(path, text_key))


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of a document: split at blank lines (lines holding only whitespace count as
    blank), each stripped of surrounding whitespace; empty paragraphs are dropped."""
    return [p.strip() for p in _BLANK_LINE.split(text) if p.strip()]


def parse_assignments(
    items: list[str] | None, what: str, convert: Callable[[str], T] = str  # type: ignore[assignment]
) -> dict[str, T]:
    """Parse repeated ``KEY=VALUE`` flags into an ordered dict; clear errors for bad items."""
    out: dict[str, T] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value:
            raise CorpusError(f"{what}: expected LANG=VALUE, got {item!r}")
        if key in out:
            raise CorpusError(f"{what}: {key!r} given twice")
        try:
            out[key] = convert(value)
        except ValueError as e:
            raise CorpusError(f"{what}: bad value in {item!r}: {e}") from None
    return out
