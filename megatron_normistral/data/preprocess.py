"""JSON Lines -> megatron-core indexed dataset (the library behind tools/preprocess_data.py).

Streaming pipeline: the main process reads each input (plain or ``.gz``) in blocks of about
``chunk_bytes`` cut at line ends and hands them to ``workers`` forked processes, at most
``2 * workers`` blocks in flight, so memory is bounded by workers x chunk, not by corpus size.
Workers decode, parse, validate, tokenise and pack each block into one array of the output
dtype (C++ ``pack_token_lists``); the main process writes the results in input order.
Where it gives identical tokens (SentencePiece and byte-level BPE, checked from the tokenizer's
files), workers
encode through :class:`~megatron_normistral.tokenizer.segment_cache.SegmentCachedEncoder`,
which reuses the encodings of repeated segments instead of calling the tokenizer on them.

Bad lines (invalid UTF-8, malformed JSON, not an object, missing or non-string key, empty
document) are skipped and counted; the first ``max_reported`` are reported with file:line,
the rest only counted. ``strict=True`` makes the first one fatal. Outputs are committed
(renamed into place) only after the whole input was processed; see
:class:`megatron_normistral.data.indexed.IndexedDatasetWriter`.

``split_sentences=True`` uses nltk's Punkt splitter with its built-in default parameters
(``PunktSentenceTokenizer()``, untrained): language-independent rules on sentence-final
punctuation, no abbreviation list, so nothing is downloaded at run time. Each sentence becomes
one sequence of the document, as in Megatron-LM; EOD (when asked) ends the last one.
"""
from __future__ import annotations

import collections
import glob as _glob
import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Iterator

import numpy as np

from megatron_normistral import _helpers  # built at install time; no pure-Python fallback on purpose
from megatron_normistral.data.indexed import DTYPE_CODES, IndexedDatasetWriter, token_dtype_for
from megatron_normistral.tokenizer.segment_cache import SegmentCacheNotExact, SegmentCachedEncoder


class BadInputError(ValueError):
    """Raised in strict mode for the first bad line (message starts with file:line)."""


@dataclass
class PreprocessConfig:
    inputs: list[str]                 # files or glob patterns, JSON Lines, plain or .gz
    output_prefix: str                # writes PREFIX.bin/.idx (or PREFIX-0000i-of-0000n.* with shards > 1)
    tokenizer: str                    # 'tekken' | SentencePiece .model | HF folder / tokenizer.json
    workers: int = 1                  # tokenising processes; 0 = in the calling process (tests, debugging)
    json_key: str = "text"
    append_eod: bool = False
    split_sentences: bool = False
    strict: bool = False
    shards: int = 1                   # blocks go round-robin to this many output datasets
    chunk_bytes: int = 1 << 18        # input bytes per work item (small: short idle tail at the end)
    backend: str = "cpp"              # writer: 'cpp' or the pure-Python reference 'python'
    max_reported: int = 20            # bad lines reported in full; the rest are only counted
    progress_interval: float = 2.0    # seconds between progress lines on stderr; <= 0: none
    segment_cache: bool = True        # reuse encodings of repeated segments where exact (tokenizer.segment_cache)


@dataclass
class FileStats:
    path: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0
    bytes: int = 0


@dataclass
class PreprocessResult:
    outputs: list[str]
    files: list[FileStats]
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    segment_cache: str = "off"        # "on", or why it is off
    segment_hits: int = 0
    segment_misses: int = 0

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
    """Files named or matched, in the order given (each glob sorted); missing ones are errors."""
    out: list[str] = []
    for p in patterns:
        if any(ch in p for ch in "*?["):
            matched = sorted(_glob.glob(p))
            if not matched:
                raise FileNotFoundError(f"--input {p!r} matches no file")
            out.extend(matched)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"--input {p!r}: no such file")
    return out


def shard_prefixes(prefix: str, shards: int) -> list[str]:
    if shards < 1:
        raise ValueError("shards must be >= 1")
    return [prefix] if shards == 1 else [f"{prefix}-{i:05d}-of-{shards:05d}" for i in range(shards)]


def _open(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_blocks(path: str, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, 1-based; block of whole lines)."""
    line = 1
    rest = b""
    with _open(path) as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                break
            data = rest + data
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            block, rest = data[:cut + 1], data[cut + 1:]
            yield line, block
            line += block.count(b"\n")
    if rest:
        yield line, rest


# --- worker side --------------------------------------------------------------------------

_W: dict = {}  # per-process state: tokenizer, config, dtype code, sentence splitter


def _setup_worker(tokenizer, cfg: PreprocessConfig, dtype_code: int, cached: SegmentCachedEncoder | None) -> None:
    _W.clear()
    _W.update(tok=tokenizer, cfg=cfg, code=dtype_code, eod=tokenizer.eod_id if cfg.append_eod else None, cached=cached)
    if cfg.split_sentences:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        _W["splitter"] = PunktSentenceTokenizer()  # default parameters: no data download


def _parse(block: bytes, first_line: int, key: str):
    texts: list[str] = []
    lines: list[int] = []
    bad: list[tuple[int, str]] = []
    parts = block.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    loads = json.loads
    for i, raw in enumerate(parts):
        n = first_line + i
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


def _process_block(item: tuple[int, int, bytes]):
    """Returns (block number, tokens array, seq lengths, doc seq counts | None, docs, bad,
    (segment cache hits, misses))."""
    block_no, first_line, block = item
    cfg: PreprocessConfig = _W["cfg"]
    tok, eod, code = _W["tok"], _W["eod"], _W["code"]
    texts, lines, bad = _parse(block, first_line, cfg.json_key)
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


class _Progress:
    def __init__(self, interval: float, stream=sys.stderr):
        self.interval, self.stream = interval, stream
        self.t0 = self.last = time.perf_counter()

    def maybe(self, docs: int, nbytes: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self.interval <= 0 or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        print(f"[preprocess] {docs:,} docs ({docs / dt:,.0f} docs/s) | {nbytes / 1e6:,.1f} MB "
              f"({nbytes / 1e6 / dt:,.2f} MB/s) | {tokens / 1e6:,.2f}M tokens ({tokens / 1e6 / dt:,.3f}M tokens/s)",
              file=self.stream, flush=True)


def preprocess(cfg: PreprocessConfig, tokenizer=None, log=sys.stderr) -> PreprocessResult:
    """Run the pipeline; returns per-file statistics. Raises BadInputError in strict mode."""
    from megatron_normistral.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    files = expand_inputs(cfg.inputs)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    if cfg.append_eod:
        _ = tok.eod_id  # fail early if the tokenizer has no EOD
    dtype = token_dtype_for(tok.vocab_size)
    code = DTYPE_CODES[dtype]
    cached, cache_state = _segment_cache(tok, cfg.segment_cache)
    shown = f"on ({cached.basis})" if cached is not None else f"off ({cache_state})"
    print(f"[preprocess] segment cache: {shown}", file=log)
    hits = misses = 0
    stats = [FileStats(p) for p in files]
    reasons: collections.Counter = collections.Counter()
    reported = 0
    outputs = shard_prefixes(cfg.output_prefix, cfg.shards)
    progress = _Progress(cfg.progress_interval, log)
    meta: dict[int, tuple[int, int]] = {}  # block number -> (file index, bytes)

    def items() -> Iterator[tuple[int, int, bytes]]:
        b = 0
        for fi, path in enumerate(files):
            for first_line, block in iter_blocks(path, cfg.chunk_bytes):
                meta[b] = (fi, len(block))
                yield b, first_line, block
                b += 1

    writers: list[IndexedDatasetWriter] = []
    pool = None
    try:
        for p in outputs:  # one by one, so a failure still aborts the ones already opened
            writers.append(IndexedDatasetWriter(p, dtype, backend=cfg.backend))
        _setup_worker(tok, cfg, code, cached)
        if cfg.workers <= 0:
            results = map(_process_block, items())
        else:
            # fork: workers inherit the loaded tokenizer (and this state) instead of loading it again.
            pool = multiprocessing.get_context("fork").Pool(cfg.workers)
            results = _ordered_bounded(pool, _process_block, items(), 2 * cfg.workers)
        docs_total = tokens_total = bytes_total = 0
        for block_no, tokens, lengths, counts, ndocs, bad, (block_hits, block_misses) in results:
            fi, nbytes = meta.pop(block_no)
            hits += block_hits
            misses += block_misses
            st = stats[fi]
            if bad:
                if cfg.strict:
                    n, why = bad[0]
                    raise BadInputError(f"{st.path}:{n}: {why}")
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
            progress.maybe(docs_total, bytes_total, tokens_total)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for w in writers:
            w.commit()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for w in writers:
            w.abort()
        raise
    finally:
        _W.clear()
    result = PreprocessResult(outputs, stats, dict(reasons), time.perf_counter() - t0, cache_state, hits, misses)
    progress.maybe(result.documents, result.bytes, result.tokens, force=True)
    print_summary(result, log)
    return result


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
