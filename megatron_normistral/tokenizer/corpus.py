"""Reading the corpora the tokenizer tools work on, and parsing ``lang=VALUE`` flags.

A corpus input is a JSON Lines file (gzip-compressed or not, told by its first bytes), one
document per line with the text under the ``"text"`` key (``text_key``); or a parquet file or a
saved Hugging Face dataset folder with the text in that column (:mod:`megatron_normistral.data.sources`).
A language may have several inputs (``--input nb=a --input nb=b``) and globs
(``--input 'nb=corpus/nb/*.jsonl.gz'``): :func:`parse_language_inputs`, :func:`language_files`.
Every reader streams: one document at a time, whatever the size of the corpus.
Paragraphs are separated by blank lines.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

from megatron_normistral.data import sources

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
    """Yield the ``text`` of every document of one input, in order: a JSONL(.gz) file, a
    parquet file or a saved Hugging Face dataset folder.

    JSONL: raises :class:`CorpusError` naming the file and line for unreadable JSON, a line that
    is not an object, or a missing / non-string ``text`` field; blank lines are skipped.
    Parquet / datasets: a missing or non-text column fails on opening, a null value names the
    file and its 1-based row."""
    if Path(path).exists() and sources.input_kind(path) != sources.JSONL:
        yield from _iter_column(path, text_key)
        return
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


def _iter_column(path: str | os.PathLike, text_key: str) -> Iterator[str]:
    for first_row, values, _ in sources.ColumnReader(path, text_key).batches():
        for row, text in enumerate(values, first_row):
            if text is None:
                raise CorpusError(f"{path}:{row}: {text_key!r} is null, expected a string")
            yield text


def read_documents(path: str | os.PathLike, text_key: str = "text") -> list[str]:
    return list(iter_documents(path, text_key))


def iter_language(paths: Sequence[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """The documents of a language's inputs, one file after the other."""
    for path in paths:
        yield from iter_documents(path, text_key)


def add_language_input_flags(parser, read_note: str = "") -> None:
    """``--input LANG=PATH_OR_GLOB`` (repeatable) and ``--json-key``, as every tokenizer tool
    takes them (parsed by :func:`parse_language_inputs`); ``read_note`` ends --input's help."""
    parser.add_argument("--input", action="append", required=True, metavar="LANG=PATH_OR_GLOB",
                        help="a language's corpus: JSONL or JSONL.gz (one document per line), a parquet file or a "
                             "saved Hugging Face dataset folder, text under --json-key; a glob (quote it) names "
                             "several. Repeat per language, and for more inputs of one language" + read_note)
    parser.add_argument("--json-key", default="text",
                        help="JSON key, or column of a parquet file / dataset, holding the text (default %(default)s)")


def parse_language_inputs(items: list[str] | None, what: str = "--input") -> dict[str, list[str]]:
    """Repeated ``LANG=PATH_OR_GLOB`` flags -> {language: [paths or globs]}, languages in the
    order first given; a language given again gets one more input."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value:
            raise CorpusError(f"{what}: expected LANG=VALUE (e.g. nb=corpus/nb.jsonl.gz), got {item!r}")
        out.setdefault(key, []).append(value)
    return out


def language_files(inputs: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
                   what: str = "--input") -> dict[str, list[str]]:
    """{language: input files}, each glob expanded (sorted) and every path checked to exist.
    A value is one path or glob, or a list of them."""
    out: dict[str, list[str]] = {}
    for lang, value in inputs.items():
        patterns = [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]
        try:
            out[lang] = sources.expand_inputs(patterns, f"{what} {lang}=")
        except sources.SourceError as e:
            raise CorpusError(str(e)) from None
    return out


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
