"""JSON Lines, parquet and saved Hugging Face datasets -> megatron-core indexed dataset (the
library behind tools/preprocess_data.py).

Streaming pipeline: the main process reads each input in blocks of about ``chunk_bytes`` and
hands them to ``workers`` forked processes, at most ``2 * workers`` blocks in flight, so memory is
bounded by workers x chunk, not by corpus size. JSON Lines (plain or ``.gz``) is read as raw
bytes cut at line ends; parquet files and saved datasets (:mod:`.sources`: one record batch of
the text column at a time) as lists of texts. Workers decode, parse, validate, tokenise and pack
each block into one array of the output dtype (C++ ``pack_token_lists``); the main process
writes the results in input order. The same documents give the same ``.bin``/``.idx`` bytes
whichever of the three formats holds them. Bad-line messages name ``file:N``: the line of a
JSON Lines file, the 1-based row of a parquet file or saved dataset.

Several text keys (Megatron-LM's ``--json-keys a b``): :func:`preprocess_json_keys` writes one
dataset per key, ``PREFIX_<key>_document`` (``_sentence`` with ``split_sentences``), as
Megatron-LM names them, one pass over the input per key; the datasets are committed together
at the end, so a failure leaves none of them.
Where it gives identical tokens (SentencePiece and byte-level BPE, checked from the tokenizer's
files), workers
encode through :class:`~megatron_normistral.tokenizer.segment_cache.SegmentCachedEncoder`,
which reuses the encodings of repeated segments instead of calling the tokenizer on them.

Bad lines (invalid UTF-8, malformed JSON, not an object, missing or non-string key, empty
document, a JSON line longer than ``max_document_bytes``) are skipped and counted; the first
``max_reported`` are reported with file:line, the rest only counted. ``strict=True`` makes the
first one fatal. An input file that yields no document at all (empty, or every line skipped:
a wrong ``json_key``) fails the run: :class:`NoDocumentsError`. A truncated or corrupt ``.gz``
fails it too, naming the file. Outputs are committed (renamed into place) only after the whole
input was processed; see :class:`megatron_normistral.data.indexed.IndexedDatasetWriter`.

Why a document-size limit: tokenisers hold tens to hundreds of bytes per input byte while
encoding one text (measured: about 180 for a Hugging Face byte-level BPE without the segment
cache, so a 50 MB line took 8.8 GB), and a line without newline would otherwise be gathered
whole by the reader. Lines over the limit are never held in memory: the reader skips to the
next newline and reports the line as "document too long".

Documents are packed as ``<s> text </s>``, as NorMistral's authors and Mistral-NeMo's training
did and as the exported Hugging Face tokenizer encodes at inference (it adds ``<s>``): BOS
before each document whenever the tokenizer has one (``bos=None``, the default; ``bos=False``
turns it off, ``True`` requires it), EOD after it with ``append_eod``. The choice is logged
and recorded in the ``PREFIX.stats.json`` sidecar (``bos``, ``eod``), which training reads to
pack its evaluation text the same way.

``split_sentences=True`` uses nltk's Punkt splitter with its built-in default parameters
(``PunktSentenceTokenizer()``, untrained): language-independent rules on sentence-final
punctuation, no abbreviation list, so nothing is downloaded at run time. Each sentence becomes
one sequence of the document, as in Megatron-LM; BOS starts the first one and EOD (when
asked) ends the last one.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import multiprocessing
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator

import numpy as np

from megatron_normistral import _helpers  # built at install time; no pure-Python fallback on purpose
from megatron_normistral.data import sources
from megatron_normistral.data.indexed import DTYPE_CODES, IndexedDatasetWriter, token_dtype_for
from megatron_normistral.runtime.progress import ProgressMeter, fraction_done
from megatron_normistral.tokenizer.segment_cache import SegmentCacheNotExact, SegmentCachedEncoder


class BadInputError(ValueError):
    """Bad input: the first bad line in strict mode (message starts with file:line), an
    unreadable input file, or an input without documents. One line naming the file."""


class NoDocumentsError(BadInputError):
    """An input file yields no document (empty file, or every line skipped)."""


DEFAULT_MAX_DOCUMENT_BYTES = 16 << 20


@dataclass
class PreprocessConfig:
    inputs: list[str]                 # files, saved-dataset folders or globs: JSON Lines (.gz), parquet, datasets
    output_prefix: str                # writes PREFIX.bin/.idx (or PREFIX-0000i-of-0000n.* with shards > 1)
    tokenizer: str                    # 'tekken' | SentencePiece .model | HF folder / tokenizer.json
    workers: int = 1                  # tokenising processes; 0 = in the calling process (tests, debugging)
    json_key: str = "text"            # the JSON key, or the column of a parquet file / saved dataset
    append_eod: bool = False
    bos: bool | None = None           # BOS before each document: None = when the tokenizer has one
    split_sentences: bool = False
    strict: bool = False
    shards: int = 1                   # blocks go round-robin to this many output datasets
    chunk_bytes: int = 1 << 18        # input bytes per work item (small: short idle tail at the end)
    backend: str = "cpp"              # writer: 'cpp' or the pure-Python 'reference' ('python': its old name)
    max_reported: int = 20            # bad lines reported in full; the rest are only counted
    progress_interval: float = 2.0    # seconds between progress lines (percentage, ETA) on stderr; <= 0: none
    segment_cache: bool = True        # reuse encodings of repeated segments where exact (tokenizer.segment_cache)
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # longer JSON lines are skipped ("document too long")


@dataclass
class FileStats:
    path: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    bytes: int = 0                    # JSON Lines: bytes of JSON read; columnar inputs: UTF-8 bytes of the texts
    first_skipped: tuple[int, str] | None = None  # (line, reason) of the first skipped line
    unit: str = "line"                # what first_skipped's number counts: "line" (JSON Lines) or "row"


@dataclass
class PreprocessResult:
    outputs: list[str]
    files: list[FileStats]
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    segment_cache: str = "off"        # "on", or why it is off
    segment_hits: int = 0
    segment_misses: int = 0
    bos_id: int | None = None         # put before every document (None: no BOS)
    eod_id: int | None = None         # put after every document (None: no EOD)

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files and saved-dataset folders named or matched, in the order given (each glob sorted);
    missing ones are errors (:func:`.sources.expand_inputs`)."""
    return sources.expand_inputs(patterns, "--input")


def megatron_output_prefix(prefix: str, key: str, split_sentences: bool = False) -> str:
    """Where Megatron-LM's ``--json-keys`` writes a key's dataset: ``PREFIX_<key>_document``
    (``PREFIX_<key>_sentence`` when sentences are split)."""
    return f"{prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def shard_prefixes(prefix: str, shards: int) -> list[str]:
    if shards < 1:
        raise ValueError("shards must be >= 1")
    return [prefix] if shards == 1 else [f"{prefix}-{i:05d}-of-{shards:05d}" for i in range(shards)]


@dataclass
class ReadPosition:
    """How far a reader has got through one input, for the progress percentage: ``done`` of
    ``total`` bytes of the file on disk for JSON Lines (of a ``.gz``: compressed bytes, the
    offset in the file under the decompressor), ``done`` of ``total`` rows for a parquet file or
    a saved dataset. ``total`` None: unknown (a pipe has no size)."""

    done: int = 0
    total: int | None = None

    @property
    def fraction(self) -> float | None:
        return None if self.total is None else fraction_done(self.done, self.total)


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _on_disk(f: IO[bytes]) -> IO[bytes]:
    """The file on disk under a reader: a GzipFile's compressed file (its ``fileobj``, which
    its decompressor reads from, so its ``tell()`` is the compressed offset), else the reader."""
    return f.fileobj if isinstance(f, gzip.GzipFile) else f


def _read_failure(path: str, line: int, exc: BaseException) -> BadInputError:
    """One-line error for an input that cannot be read to its end."""
    where = f"after line {line - 1:,}" if line > 1 else "before its first line"
    todo = "re-download or re-compress it"
    if isinstance(exc, EOFError):
        why = "the gzip stream ends early (truncated file?)"
    elif isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        why = f"corrupt gzip data ({exc})"
    else:
        why, todo = f"read failed ({getattr(exc, 'strerror', None) or exc})", "check the file and the file system"
    return BadInputError(f"{path}: {why} {where}; {todo} (nothing was written)")


def iter_blocks(path: str, chunk_bytes: int, max_line_bytes: int | None = None,
                position: ReadPosition | None = None) -> Iterator[tuple[int, bytes, dict[int, int]]]:
    """(number of the block's first line, 1-based; block of whole lines; {line number: length}
    of the block's lines longer than ``max_line_bytes``). Such a line is not kept: the reader
    skips to its newline and the block holds an empty line in its place (line numbers stay
    right), so memory stays bounded by about ``max_line_bytes + chunk_bytes``.
    ``position``, if given, is kept at the bytes of the file on disk read so far (compressed
    bytes of a .gz) whenever a block is yielded; its total is the file's size.
    Raises :class:`BadInputError` when the file cannot be read to its end (truncated .gz)."""
    line = 1
    rest = b""          # start of an unfinished line
    dropping = 0        # > 0: length so far of an over-long line being skipped
    long_lines: dict[int, int] = {}
    limit = max_line_bytes if max_line_bytes is not None else float("inf")
    try:
        with _open(path) as f:
            on_disk = _on_disk(f)
            # A pipe cannot tell() its offset and has no size: its position stays unknown.
            track = position is not None and on_disk.seekable()
            if track:
                position.total = os.fstat(on_disk.fileno()).st_size
            while True:
                data = f.read(chunk_bytes)
                if track:
                    position.done = on_disk.tell()
                if not data:
                    break
                if dropping:
                    end = data.find(b"\n")
                    if end < 0:
                        dropping += len(data)
                        continue
                    long_lines[line] = dropping + end
                    dropping = 0
                    data = data[end:]  # its newline stays: the empty stand-in line
                data = rest + data
                cut = data.rfind(b"\n")
                block, rest = (data[:cut + 1], data[cut + 1:]) if cut >= 0 else (b"", data)
                if block:
                    yield line, block, long_lines
                    line += block.count(b"\n")
                    long_lines = {}
                if len(rest) > limit:
                    dropping, rest = len(rest), b""
    except (EOFError, OSError, zlib.error) as e:
        raise _read_failure(path, line, e) from None
    if dropping:
        yield line, b"\n", {line: dropping}
    elif rest:
        yield line, rest, long_lines


def iter_column_blocks(path: str, key: str, chunk_bytes: int,
                       position: ReadPosition | None = None) -> Iterator[tuple[int, list[str | None], int]]:
    """(first row, 1-based; about ``chunk_bytes`` of texts of column ``key``, None for a null;
    their UTF-8 bytes) of a parquet file or saved dataset, read one record batch at a time.
    ``position``, if given, is kept at the rows read so far (of the input's rows) whenever a
    block is yielded."""
    reader = sources.ColumnReader(path, key)
    if position is not None:
        position.total = reader.rows
    first, values, nbytes = 1, [], 0
    for row, batch, batch_bytes in reader.batches():
        if not values:
            first = row
        values.extend(batch)
        nbytes += batch_bytes
        if nbytes >= chunk_bytes:
            if position is not None:
                position.done = first - 1 + len(values)
            yield first, values, nbytes
            values, nbytes = [], 0
    if values:
        if position is not None:
            position.done = first - 1 + len(values)
        yield first, values, nbytes


# --- worker side --------------------------------------------------------------------------

_W: dict = {}  # per-process state: tokenizer, config, dtype code, sentence splitter


def document_bos_id(tokenizer, bos: bool | None) -> int | None:
    """The id put before every document: the tokenizer's BOS unless ``bos`` is False (None:
    when the tokenizer has one; True: it must have one)."""
    if bos is False:
        return None
    if tokenizer.bos_id is None and bos:
        raise ValueError(f"tokenizer {tokenizer.name} has no BOS token (<s>) to start documents with; "
                         f"run without it (--no-bos)")
    return tokenizer.bos_id


def describe_documents(tokenizer, bos_id: int | None, eod_id: int | None) -> str:
    """How each document is written, for the log, e.g. ``<s> (id 1) + text + </s> (id 2)``."""
    parts = [f"{tokenizer.piece(bos_id)} (id {bos_id})"] if bos_id is not None else []
    parts.append("text")
    if eod_id is not None:
        parts.append(f"{tokenizer.piece(eod_id)} (id {eod_id})")
    return " + ".join(parts)


def _setup_worker(tokenizer, cfg: PreprocessConfig, dtype_code: int, cached: SegmentCachedEncoder | None,
                  bos_id: int | None = None) -> None:
    _W.clear()
    _W.update(tok=tokenizer, cfg=cfg, code=dtype_code, eod=tokenizer.eod_id if cfg.append_eod else None, cached=cached,
              bos=bos_id)
    if cfg.split_sentences:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        _W["splitter"] = PunktSentenceTokenizer()  # default parameters: no data download


def _too_long(nbytes: int, limit: int, what: str = "JSON") -> str:
    return f"document too long ({nbytes:,} bytes of {what}; limit {limit:,}: raise --max-document-mb)"


def _parse(block: bytes, first_line: int, key: str, max_bytes: int | None = None,
           long_lines: dict[int, int] | None = None):
    texts: list[str] = []
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    parts = block.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    loads = json.loads
    limit = max_bytes if max_bytes is not None else float("inf")
    for i, raw in enumerate(parts):
        n = first_line + i
        if long_lines and n in long_lines:  # dropped by the reader, which kept an empty line
            bad.append((n, _too_long(long_lines[n], max_bytes)))
            continue
        if len(raw) > limit:
            bad.append((n, _too_long(len(raw), max_bytes)))
            continue
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append((n, f"invalid UTF-8 (byte {e.start})"))
            continue
        if not s.strip():
            bad.append((n, "empty line"))
            continue
        try:
            obj = loads(s)
        except ValueError as e:
            bad.append((n, f"malformed JSON ({getattr(e, 'msg', e)})"))
            continue
        if not isinstance(obj, dict):
            bad.append((n, f"not a JSON object ({type(obj).__name__})"))
            continue
        text = obj.get(key, _MISSING)
        if text is _MISSING:
            bad.append((n, f"missing key {key!r}"))
            continue
        if not isinstance(text, str):
            bad.append((n, f"key {key!r} is {type(text).__name__}, not a string"))
            continue
        if not text or text.isspace():
            bad.append((n, "empty document"))
            continue
        if not text.isascii():
            try:  # a JSON \\udXXX escape can carry a lone surrogate: not encodable UTF-8
                text.encode("utf-8")
            except UnicodeEncodeError:
                bad.append((n, "invalid UTF-8 (unpaired surrogate escape)"))
                continue
        texts.append(text)
        lines.append(n)
    return texts, lines, bad


_MISSING = object()


def _parse_values(values: list[str | None], first_row: int, key: str, max_bytes: int | None = None):
    """``_parse`` for the texts of a column: the same checks where they apply (Arrow strings are
    valid UTF-8 already), rows numbered from ``first_row``."""
    texts: list[str] = []
    rows: list[int] = []
    bad: list[tuple[int, str]] = []
    limit = max_bytes if max_bytes is not None else float("inf")
    for i, text in enumerate(values):
        n = first_row + i
        if text is None:
            bad.append((n, f"key {key!r} is null, not a string"))
            continue
        if not text or text.isspace():
            bad.append((n, "empty document"))
            continue
        if len(text) * 4 > limit:  # a character is at most 4 bytes: encode only the long ones
            nbytes = len(text.encode("utf-8"))
            if nbytes > limit:
                bad.append((n, _too_long(nbytes, max_bytes, "text")))
                continue
        texts.append(text)
        rows.append(n)
    return texts, rows, bad


def _process_block(item: tuple[int, int, bytes, dict[int, int]]):
    """Returns (block number, tokens array, seq lengths, doc seq counts | None, docs, bad,
    (segment cache hits, misses))."""
    block_no, first_line, block, long_lines = item
    cfg: PreprocessConfig = _W["cfg"]
    tok, bos, eod, code = _W["tok"], _W["bos"], _W["eod"], _W["code"]
    if isinstance(block, bytes):
        texts, lines, bad = _parse(block, first_line, cfg.json_key, cfg.max_document_bytes, long_lines)
    else:  # the texts of a parquet / saved-dataset column
        texts, lines, bad = _parse_values(block, first_line, cfg.json_key, cfg.max_document_bytes)
    # One document at a time, not encode_batch: batch encoders (SentencePiece, HF) start their
    # own thread pools, which oversubscribes the cores the worker processes already use (and
    # measured slower here); parallelism comes from the workers.
    cached = _W["cached"]
    hits0, misses0 = (cached.hits, cached.misses) if cached is not None else (0, 0)
    encode = cached.encode if cached is not None else tok.encode
    counts = None
    if cfg.split_sentences:
        splitter = _W["splitter"]
        sents_per_doc = [splitter.tokenize(t) for t in texts]
        flat = [encode(s) for ss in sents_per_doc for s in ss]
        seqs: list[list[int]] = []
        counts = []
        pos = 0
        kept_lines = []
        for n, ss in zip(lines, sents_per_doc):
            doc = [ids for ids in flat[pos:pos + len(ss)] if ids]
            pos += len(ss)
            if not doc:
                bad.append((n, "empty document (no tokens)"))
                continue
            if bos is not None:
                doc[0].insert(0, bos)
            if eod is not None:
                doc[-1].append(eod)
            seqs.extend(doc)
            counts.append(len(doc))
            kept_lines.append(n)
        lines = kept_lines
    else:
        ids = [encode(t) for t in texts]
        seqs = []
        kept_lines = []
        for n, x in zip(lines, ids):
            if not x:
                bad.append((n, "empty document (no tokens)"))
                continue
            if bos is not None:
                x.insert(0, bos)
            if eod is not None:
                x.append(eod)
            seqs.append(x)
            kept_lines.append(n)
        lines = kept_lines
    if cfg.backend == "cpp":
        tokens, lengths = _helpers.pack_token_lists(seqs, code)
    else:  # reference path, plain numpy
        dt = next(d for d, c in DTYPE_CODES.items() if c == code)
        lengths = np.array([len(x) for x in seqs], dtype=np.int64)
        tokens = np.array([t for x in seqs for t in x], dtype=dt)
    bad.sort()
    segments = (cached.hits - hits0, cached.misses - misses0) if cached is not None else (0, 0)
    counts_array = np.array(counts, dtype=np.int64) if counts is not None else None
    return block_no, tokens, lengths, counts_array, len(lines), bad, segments


# --- main side ------------------------------------------------------------------------------

def _ordered_bounded(pool, fn, items: Iterator, window: int):
    """Like pool.imap but never more than ``window`` items submitted and unconsumed
    (pool.imap reads its whole input eagerly, which would defeat bounded memory)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def input_sizes(files: list[str]) -> list[int | None]:
    """Bytes on disk of each input: a file's size, a saved dataset folder's files together;
    None for an input without a size (a pipe)."""
    sizes: list[int | None] = []
    for path in files:
        if os.path.isdir(path):
            sizes.append(sum(os.path.getsize(os.path.join(folder, name))
                             for folder, _, names in os.walk(path) for name in names))
        else:
            sizes.append(os.path.getsize(path) if os.path.isfile(path) else None)
    return sizes


class _Progress:
    """The periodic ``[preprocess]`` line of one pass over the inputs (one key), every
    ``interval`` seconds (<= 0: none); plain lines, no carriage returns, so a batch job's log
    holds one line per interval.

    Percentage and ETA count bytes of the inputs on disk, over every pass of the run (the
    shared ``meter``; ``done_before``: the bytes of the passes already done). Why bytes on disk:
    their total is known before reading starts (file sizes) and the read position is exact for
    JSON Lines, the common case. A ``.gz`` counts its compressed offset, since its size on disk
    is compressed. A parquet file or saved dataset has no byte offset per row (its column chunks
    are compressed whole), so it counts rows read / rows, times its size: exact at each end of
    the file, and in between as even as the rows' lengths. Rates (docs/s, ...) count this pass."""

    def __init__(self, interval: float, stream, meter: ProgressMeter, done_before: float = 0.0):
        self.interval, self.stream, self.meter, self.done_before = interval, stream, meter, done_before
        self.t0 = time.perf_counter()

    def maybe(self, read_bytes: float, docs: int, nbytes: int, tokens: int, force: bool = False) -> None:
        """``read_bytes``: bytes on disk of this pass's inputs processed so far."""
        if self.interval <= 0 or not self.meter.due(force):
            return
        done = self.done_before + read_bytes
        dt = max(time.perf_counter() - self.t0, 1e-9)
        percent = self.meter.percent(done)
        print(f"[preprocess] {percent + ' | ' if percent else ''}{docs:,} docs ({docs / dt:,.0f} docs/s) | "
              f"{nbytes / 1e6:,.1f} MB ({nbytes / 1e6 / dt:,.2f} MB/s) | {tokens / 1e6:,.2f}M tokens "
              f"({tokens / 1e6 / dt:,.3f}M tokens/s) | {self.meter.times(done)}", file=self.stream, flush=True)


def _run_meter(cfg: PreprocessConfig, sizes: list[int | None], passes: int) -> ProgressMeter:
    """The clock of the whole run: ``passes`` times the inputs' bytes (unknown with a pipe)."""
    total = None if any(size is None for size in sizes) else passes * sum(sizes)
    return ProgressMeter(total, cfg.progress_interval)


def preprocess(cfg: PreprocessConfig, tokenizer=None, log=sys.stderr) -> PreprocessResult:
    """Run the pipeline for the text under ``cfg.json_key``, writing ``cfg.output_prefix``;
    returns per-file statistics. Raises BadInputError in strict mode."""
    from megatron_normistral.tokenizer import load_tokenizer

    files = _checked_inputs(cfg.inputs, [cfg.json_key])
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    return _preprocess(cfg, files, tok, log)


def preprocess_json_keys(cfg: PreprocessConfig, keys: list[str], tokenizer=None,
                         log=sys.stderr) -> dict[str, PreprocessResult]:
    """Megatron-LM's ``--json-keys``: one dataset per key, ``PREFIX_<key>_document``
    (:func:`megatron_output_prefix`), one pass over the input per key. Nothing is published until
    every key is done; a failure leaves none."""
    from megatron_normistral.tokenizer import load_tokenizer

    if not keys:
        raise BadInputError("--json-keys: give at least one key")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise BadInputError(f"--json-keys: {repeated[0]!r} given twice")
    files = _checked_inputs(cfg.inputs, keys)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    pending: list[IndexedDatasetWriter] = []
    results: dict[str, PreprocessResult] = {}
    sizes = input_sizes(files)
    meter = _run_meter(cfg, sizes, passes=len(keys))  # the percentage counts every key's pass
    pass_bytes = sum(size or 0 for size in sizes)
    try:
        for n, key in enumerate(keys):
            one = dataclasses.replace(cfg, json_key=key,
                                      output_prefix=megatron_output_prefix(cfg.output_prefix, key, cfg.split_sentences))
            print(f"[preprocess] key {key!r} -> {one.output_prefix}", file=log)
            results[key] = _preprocess(one, files, tok, log, pending, meter=meter, done_before=n * pass_bytes,
                                       sizes=sizes)
        for writer in pending:
            writer.commit()
    except BaseException:
        for writer in pending:
            writer.abort()
        raise
    return results


def _checked_inputs(patterns: list[str], keys: list[str]) -> list[str]:
    """The input files; parquet files and saved datasets are opened now and must hold every key
    as a text column, so such a mistake fails before anything is tokenised."""
    files = expand_inputs(patterns)
    for path in files:
        if sources.input_kind(path) != sources.JSONL:
            for key in keys:
                sources.ColumnReader(path, key)
    return files


def _preprocess(cfg: PreprocessConfig, files: list[str], tok, log,
                pending: list[IndexedDatasetWriter] | None = None, meter: ProgressMeter | None = None,
                done_before: float = 0.0, sizes: list[int | None] | None = None) -> PreprocessResult:
    """The pipeline for one key. ``pending`` None: commit the outputs here; else append the
    finished (uncommitted) writers to it, for the caller to commit or abort. ``meter``: the
    run's progress clock (default: this pass alone); ``done_before``: its bytes already done;
    ``sizes``: :func:`input_sizes` of ``files`` when the caller has them (one walk per run)."""
    t0 = time.perf_counter()
    eod_id = tok.eod_id if cfg.append_eod else None  # fails early if the tokenizer has no EOD
    bos_id = document_bos_id(tok, cfg.bos)
    why = " (the tokenizer has no BOS)" if bos_id is None and cfg.bos is None else ""
    print(f"[preprocess] each document: {describe_documents(tok, bos_id, eod_id)}{why}", file=log)
    dtype = token_dtype_for(tok.vocab_size)
    code = DTYPE_CODES[dtype]
    cached, cache_state = _segment_cache(tok, cfg.segment_cache)
    shown = f"on ({cached.basis})" if cached is not None else f"off ({cache_state})"
    print(f"[preprocess] segment cache: {shown}", file=log)
    hits = misses = 0
    kinds = [sources.input_kind(p) for p in files]
    stats = [FileStats(p, unit="line" if kind == sources.JSONL else "row") for p, kind in zip(files, kinds)]
    reasons: collections.Counter = collections.Counter()
    reported = 0
    outputs = shard_prefixes(cfg.output_prefix, cfg.shards)
    sizes = sizes if sizes is not None else input_sizes(files)
    before = [sum(size or 0 for size in sizes[:fi]) for fi in range(len(files))]  # bytes of the earlier inputs
    meter = meter if meter is not None else _run_meter(cfg, sizes, passes=1)
    progress = _Progress(cfg.progress_interval, log, meter, done_before)
    # block number -> (file index, bytes, bytes on disk of the inputs up to the block's end).
    # Taken when the block is read and shown when its result is written: with workers the
    # reader runs up to 2 x workers blocks ahead, and those are not done yet.
    meta: dict[int, tuple[int, int, float]] = {}

    def read_through(fi: int, position: ReadPosition) -> float:
        fraction = position.fraction
        return before[fi] + (sizes[fi] or 0) * (fraction if fraction is not None else 0.0)

    def items() -> Iterator[tuple[int, int, bytes | list[str | None], dict[int, int]]]:
        b = 0
        for fi, path in enumerate(files):
            position = ReadPosition()
            if kinds[fi] == sources.JSONL:
                for first_line, block, long_lines in iter_blocks(path, cfg.chunk_bytes, cfg.max_document_bytes,
                                                                 position):
                    meta[b] = (fi, len(block) + sum(long_lines.values()), read_through(fi, position))
                    yield b, first_line, block, long_lines
                    b += 1
            else:
                for first_row, values, nbytes in iter_column_blocks(path, cfg.json_key, cfg.chunk_bytes, position):
                    meta[b] = (fi, nbytes, read_through(fi, position))
                    yield b, first_row, values, {}
                    b += 1

    writers: list[IndexedDatasetWriter] = []
    pool = None
    try:
        for p in outputs:  # one by one, so a failure still aborts the ones already opened
            writers.append(IndexedDatasetWriter(p, dtype, backend=cfg.backend, bos=bos_id is not None,
                                                eod=eod_id is not None))
        _setup_worker(tok, cfg, code, cached, bos_id)
        if cfg.workers <= 0:
            results = map(_process_block, items())
        else:
            # fork: workers inherit the loaded tokenizer (and this state) instead of loading it again.
            pool = multiprocessing.get_context("fork").Pool(cfg.workers)
            results = _ordered_bounded(pool, _process_block, items(), 2 * cfg.workers)
        docs_total = tokens_total = bytes_total = 0
        for block_no, tokens, lengths, counts, ndocs, bad, (block_hits, block_misses) in results:
            fi, nbytes, read_bytes = meta.pop(block_no)
            hits += block_hits
            misses += block_misses
            st = stats[fi]
            if bad:
                if cfg.strict:
                    n, why = bad[0]
                    raise BadInputError(f"{st.path}:{n}: {why} (--strict stops at the first bad line)")
                if st.first_skipped is None:
                    st.first_skipped = bad[0]
                for n, why in bad:
                    reasons[why.split(" (")[0]] += 1
                    if reported < cfg.max_reported:
                        print(f"[preprocess] skipped {st.path}:{n}: {why}", file=log)
                        reported += 1
                        if reported == cfg.max_reported:
                            print("[preprocess] further bad lines are only counted", file=log)
            writers[block_no % len(writers)].add_packed(tokens, lengths, counts)
            st.documents += ndocs
            st.tokens += int(tokens.size)
            st.skipped += len(bad)
            st.bytes += nbytes
            docs_total += ndocs
            tokens_total += int(tokens.size)
            bytes_total += nbytes
            progress.maybe(read_bytes, docs_total, bytes_total, tokens_total)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        _check_every_file_has_documents(stats, cfg)
        if pending is None:
            for w in writers:
                w.commit()
        else:
            pending.extend(writers)
    except BaseException as exc:
        if pool is not None:
            if isinstance(exc, Exception):
                # Bad input or a full disk: the workers are healthy, so let the few blocks in
                # flight finish (the ordinary close + join). terminate() is kept for signals:
                # right after start-up it hung here (a worker not yet in its task loop waited
                # for the queue lock terminate() holds; CPython gh-96995 is this class of hang).
                pool.close()
            else:
                pool.terminate()
            pool.join()
        for w in writers:
            w.abort()
        raise
    finally:
        _W.clear()
    result = PreprocessResult(outputs, stats, dict(reasons), time.perf_counter() - t0, cache_state, hits, misses,
                              bos_id, eod_id)
    progress.maybe(sum(size or 0 for size in sizes), result.documents, result.bytes, result.tokens, force=True)
    print_summary(result, log)
    return result


def _check_every_file_has_documents(stats: list[FileStats], cfg: PreprocessConfig) -> None:
    """An input without a single document is a mistake (wrong --json-key, wrong file), not data."""
    empty = [st for st in stats if st.documents == 0]
    if not empty:
        return
    st = empty[0]
    if st.first_skipped is None:
        why = "the file is empty"
    else:
        n, reason = st.first_skipped
        hint = (f"; check --json-key (now {cfg.json_key!r})" if "key" in reason
                else "" if reason.startswith("document too long")  # the reason names the flag
                else "; is it JSON Lines (one JSON object per line)?")
        why = f"all {st.skipped:,} {st.unit}s were skipped (first: {st.unit} {n}: {reason}){hint}"
    more = f" ({len(empty) - 1} more input files have none)" if len(empty) > 1 else ""
    raise NoDocumentsError(f"{st.path}: no documents: {why}{more}; nothing was written")


def _segment_cache(tok, wanted: bool) -> tuple[SegmentCachedEncoder | None, str]:
    """(encoder, "on") where the cache is exact for ``tok`` and wanted, else (None, why not).
    Built once here; forked workers inherit it (each then fills its own copy)."""
    if not wanted:
        return None, "turned off"
    try:
        return SegmentCachedEncoder(tok), "on"
    except SegmentCacheNotExact as e:
        return None, e.reason


def print_summary(result: PreprocessResult, stream=sys.stderr) -> None:
    w = max([len(f.path) for f in result.files] + [5])
    print(f"{'file':<{w}} {'documents':>10} {'tokens':>13} {'skipped':>8} {'bytes':>13}", file=stream)
    for f in result.files:
        print(f"{f.path:<{w}} {f.documents:>10,} {f.tokens:>13,} {f.skipped:>8,} {f.bytes:>13,}", file=stream)
    print(f"{'total':<{w}} {result.documents:>10,} {result.tokens:>13,} {sum(f.skipped for f in result.files):>8,} "
          f"{result.bytes:>13,}", file=stream)
    if result.skipped_by_reason:
        print("skipped by reason: " + ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped_by_reason.items())),
              file=stream)
    if result.segment_hits or result.segment_misses:
        lookups = result.segment_hits + result.segment_misses
        print(f"segment cache: {lookups:,} segments, {result.segment_hits / lookups:.1%} found in the cache",
              file=stream)
    dt = max(result.seconds, 1e-9)
    print(f"{result.seconds:.2f} s: {result.tokens / dt / 1e6:.3f}M tokens/s, {result.documents / dt:,.0f} docs/s, "
          f"{result.bytes / dt / 1e6:.2f} MB/s -> {', '.join(result.outputs)}", file=stream, flush=True)
