"""Reader and writers of megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

Files written here are readable by ``megatron.core.datasets.indexed_dataset.IndexedDataset(PREFIX)``.

- :class:`IndexedDatasetWriter`: streaming writer; the C++ backend (``_helpers.IndexedWriter``)
  by default, ``backend="reference"`` for the pure-Python reference (tests check byte identity;
  ``"python"``, its old name, still works).
  It writes to temporary names and renames on :meth:`~IndexedDatasetWriter.commit` only, ``.idx``
  last: a killed or failing run never leaves a ``.bin``/``.idx`` pair that looks whole.
- :class:`IndexedReader`: memory-mapped reader (no torch import).
- :func:`merge_indexed`: concatenates several datasets (e.g. shards) into one.
- :func:`token_dtype_for`: the smallest dtype that holds every id of a vocabulary.
- Checks run before training (cheap, no torch): :func:`check_corpus_files` (``.bin`` and
  ``.idx`` exist and agree to the byte) and :func:`corpus_max_token_id` (from the
  ``PREFIX.stats.json`` sidecar every writer here leaves beside its output, or a scan of the
  ``.bin`` when the sidecar is missing or stale). Both raise :class:`CorpusError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np

from megatron_normistral.data.reference import check_backend

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1

# megatron-core's DType codes (indexed_dataset.DType).
DTYPE_CODES: dict[type, int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


def token_dtype_for(vocab_size: int) -> type:
    """Smallest unsigned-or-int32 dtype holding ids 0..vocab_size-1 (uint8, uint16 or int32,
    the types megatron-core reads back as token ids)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def stats_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.stats.json"


@contextlib.contextmanager
def _naming_file(path: str) -> Iterator[None]:
    """Python's file objects raise OSError without the file name on a failed write (a full
    disk): add it, as the C++ writer does."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from None


class _PyWriter:
    """Pure-Python reference writer, same methods as ``_helpers.IndexedWriter``
    (``csrc/indexed_writer.cpp``, which must write the same bytes). The layout, little-endian,
    as megatron-core's ``indexed_dataset`` reads it:

    - ``.idx``: ``MMIDIDX`` and two NUL bytes (:data:`INDEX_HEADER`) | u64 version = 1 | u8 dtype
      code (:data:`DTYPE_CODES`) | u64 sequence count | u64 document-index count | i32
      lengths[sequences] | i64 byte pointers[sequences] | i64 document_indices[documents + 1]
      (the sequence where each document starts, then the sequence count).
    - ``.bin``: the token ids of all sequences back to back, in the dtype of the header.
    """

    def __init__(self, bin_file: str, idx_file: str, dtype_code: int):
        self.dtype = np.dtype(CODE_DTYPES[dtype_code])
        self.dtype_code = dtype_code
        self._bin_file = bin_file
        self._bin = open(bin_file, "wb")
        self._idx_file = idx_file
        self._lengths: list[int] = []
        self._doc_idx: list[int] = [0]

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    def add_packed(self, tokens: np.ndarray, seq_lengths: Sequence[int], doc_seq_counts: Sequence[int] | None = None):
        tokens = np.asarray(tokens)
        if tokens.dtype.itemsize != self.dtype.itemsize:
            raise ValueError("tokens dtype does not match the writer's dtype")
        seq_lengths = [int(x) for x in seq_lengths]
        if sum(seq_lengths) != tokens.size:
            raise ValueError("sum(seq_lengths) != len(tokens)")
        counts = [1] * len(seq_lengths) if doc_seq_counts is None else [int(c) for c in doc_seq_counts]
        if sum(counts) != len(seq_lengths) or any(c < 1 for c in counts):
            raise ValueError("bad doc_seq_counts")
        for c in counts:
            self._doc_idx.append(self._doc_idx[-1] + c)
        self._lengths.extend(seq_lengths)
        with _naming_file(self._bin_file):
            self._bin.write(np.ascontiguousarray(tokens).tobytes())

    def add_documents(self, docs: Sequence[Sequence[int]]):
        info = np.iinfo(self.dtype)
        for d in docs:
            if any(t < info.min or t > info.max for t in d):
                raise ValueError("token id out of range of the output dtype")
        flat = np.array([t for d in docs for t in d], dtype=self.dtype)
        self.add_packed(flat, [len(d) for d in docs])

    def finalize(self):
        with _naming_file(self._bin_file):
            self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with _naming_file(self._idx_file), open(self._idx_file, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", self.dtype_code))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._doc_idx)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.array(self._doc_idx, dtype=np.int64).tobytes())

    def abort(self):
        with contextlib.suppress(OSError):  # the failure being cleaned up is already reported
            self._bin.close()


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin``/``PREFIX.idx`` atomically, and ``PREFIX.stats.json`` beside them.

    Use as a context manager: leaving the block normally commits (renames the temporary files
    into place, ``.idx`` last, after removing any old ``.idx`` and sidecar); an exception
    removes them. The sidecar (:class:`CorpusStats`) records the token-id range seen while
    writing, so a run can check its vocabulary without reading the ``.bin``, and what the
    caller says of the documents' format: ``bos`` (each starts with the tokenizer's BOS),
    ``eod`` (each ends with its EOD); None = not stated.
    A failed write raises ``OSError(errno, strerror, path)`` naming the temporary file.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type | np.dtype, backend: str = "cpp",
                 bos: bool | None = None, eod: bool | None = None):
        self.prefix = str(prefix)
        self.bos, self.eod = bos, eod
        self.dtype = np.dtype(dtype)
        code = DTYPE_CODES[self.dtype.type]
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # Temporary names end in neither .bin nor .idx, so nothing globbing for datasets sees them.
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp_bin, self._tmp_idx = bin_path(self.prefix) + tag, idx_path(self.prefix) + tag
        backend = check_backend(backend, old_name="python")
        if backend == "cpp":
            from megatron_normistral import _helpers  # built at install time; no fallback on purpose

            self._w = _helpers.IndexedWriter(self._tmp_bin, self._tmp_idx, code)
        else:
            self._w = _PyWriter(self._tmp_bin, self._tmp_idx, code)
        self.backend = backend
        self._done = False
        self._tokens = 0
        self._min_id: int | None = None
        self._max_id: int | None = None

    def _observe(self, tokens: np.ndarray) -> None:
        """Token count and id range (one pass of numpy min/max per chunk: cheap next to tokenising)."""
        if tokens.size:
            lo, hi = int(tokens.min()), int(tokens.max())
            self._min_id = lo if self._min_id is None else min(self._min_id, lo)
            self._max_id = hi if self._max_id is None else max(self._max_id, hi)
            self._tokens += int(tokens.size)

    @property
    def num_documents(self) -> int:
        return self._w.num_documents

    @property
    def num_sequences(self) -> int:
        return self._w.num_sequences

    def add_packed(self, tokens: np.ndarray, seq_lengths, doc_seq_counts=None) -> None:
        """``tokens`` already in the writer's dtype; ``doc_seq_counts`` None = one sequence per document."""
        self._w.add_packed(tokens, np.asarray(seq_lengths, dtype=np.int64),
                           None if doc_seq_counts is None else np.asarray(doc_seq_counts, dtype=np.int64))
        self._observe(np.asarray(tokens))

    def add_documents(self, docs: Sequence[Sequence[int]]) -> None:
        """One sequence per document, from lists of token ids."""
        docs = list(docs) if not isinstance(docs, list) else docs
        self._w.add_documents(docs)
        self._observe(np.fromiter((t for d in docs for t in d), dtype=np.int64))

    def add_document(self, tokens: Sequence[int]) -> None:
        self.add_documents([list(tokens)])

    def commit(self) -> None:
        self._w.finalize()
        final_bin, final_idx, final_stats = bin_path(self.prefix), idx_path(self.prefix), stats_path(self.prefix)
        stats = CorpusStats(
            format=STATS_FORMAT, dtype=self.dtype.name, documents=self.num_documents, sequences=self.num_sequences,
            tokens=self._tokens, min_token_id=self._min_id, max_token_id=self._max_id,
            bin_bytes=os.path.getsize(self._tmp_bin), idx_bytes=os.path.getsize(self._tmp_idx),
            fingerprint=_fingerprint(self._tmp_bin, self._tmp_idx), bos=self.bos, eod=self.eod)
        tmp_stats = final_stats + self._tmp_bin[len(bin_path(self.prefix)):]
        try:
            with _naming_file(tmp_stats), open(tmp_stats, "w") as f:
                f.write(json.dumps(dataclasses.asdict(stats), indent=1) + "\n")
            # Old .idx and sidecar go first: between the renames there is a new .bin and no
            # .idx (not a dataset), then a dataset without sidecar (its ids are scanned).
            for old in (final_stats, final_idx):
                if os.path.exists(old):
                    os.unlink(old)
            os.replace(self._tmp_bin, final_bin)
            os.replace(self._tmp_idx, final_idx)
            os.replace(tmp_stats, final_stats)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_stats)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._w.abort()
        for p in (self._tmp_bin, self._tmp_idx):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self._done = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:  # e.g. the disk filled up while flushing: leave no temporaries
                self.abort()
                raise
        else:
            self.abort()


class IndexedReader:
    """Memory-mapped reader of ``PREFIX.bin``/``PREFIX.idx`` (no torch; cheap to open)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        with open(idx_path(self.prefix), "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != INDEX_HEADER:
            raise ValueError(f"{idx_path(self.prefix)}: not a megatron indexed dataset index")
        version, = struct.unpack("<Q", head[9:17])
        if version != INDEX_VERSION:
            raise ValueError(f"{idx_path(self.prefix)}: unsupported version {version}")
        code = head[17]
        if code not in CODE_DTYPES:
            raise ValueError(f"{idx_path(self.prefix)}: unknown dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        nseq, ndoc = struct.unpack("<QQ", head[18:34])
        idx = np.memmap(idx_path(self.prefix), mode="r", dtype=np.uint8)
        off = 34
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=nseq, offset=off)
        off += 4 * nseq
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=nseq, offset=off)
        off += 8 * nseq
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=ndoc, offset=off)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path(self.prefix))
        if nseq and int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize > bin_size:
            raise ValueError(f"{bin_path(self.prefix)}: shorter than its index says (truncated?)")
        self._bin = np.memmap(bin_path(self.prefix), mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start:start + int(self.sequence_lengths[i])])

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences (one unless written with sentence splitting) of document ``d``."""
        return [self[i] for i in range(int(self.document_indices[d]), int(self.document_indices[d + 1]))]

    def is_contiguous(self) -> bool:
        """True when sequences lie back to back in order, so the .bin is the token stream."""
        pos = 0
        block = 1 << 22  # bounded temporaries for corpora of tens of millions of documents
        for s in range(0, len(self), block):
            nbytes = self.sequence_lengths[s:s + block].astype(np.int64) * self.dtype.itemsize
            expect = pos + np.concatenate([[0], np.cumsum(nbytes[:-1])])
            if not np.array_equal(expect, self.sequence_pointers[s:s + block]):
                return False
            pos = int(expect[-1] + nbytes[-1])
        return True

    @property
    def tokens(self) -> np.ndarray:
        """All tokens, memory-mapped (the documents' token stream when :meth:`is_contiguous`)."""
        return self._bin


def exists(prefix: str | os.PathLike) -> bool:
    return os.path.exists(bin_path(prefix)) and os.path.exists(idx_path(prefix))


_FORMAT_WORDS = {"bos": "start with <s> (BOS)", "eod": "end with </s> (EOD)"}


def _agreed_format(prefixes: list[str]) -> dict[str, bool | None]:
    """{"bos": ..., "eod": ...}: what the inputs' sidecars agree on (None where one does not
    state it). Inputs stating different values are refused: their merge would mix formats."""
    sidecars = {prefix: read_stats_sidecar(prefix)[0] for prefix in prefixes}
    agreed: dict[str, bool | None] = {}
    for key, words in _FORMAT_WORDS.items():
        stated = {p: getattr(st, key) if st is not None else None for p, st in sidecars.items()}
        if None in stated.values():
            agreed[key] = None
            continue
        if len(set(stated.values())) > 1:
            yes = next(p for p, v in stated.items() if v)
            no = next(p for p, v in stated.items() if not v)
            raise ValueError(f"merge_indexed: the documents of {yes} {words}, those of {no} do not; "
                             f"preprocess both the same way before merging")
        agreed[key] = next(iter(stated.values()))
    return agreed


def merge_indexed(prefixes: Iterable[str | os.PathLike], output_prefix: str | os.PathLike,
                  backend: str = "cpp", chunk_tokens: int = 1 << 24) -> IndexedReader:
    """Concatenate datasets (same dtype) in the order given, keeping document boundaries and
    the documents' format their sidecars state (``bos``, ``eod``; inputs that disagree are
    refused). Streams in chunks of about ``chunk_tokens`` tokens, so memory does not grow with
    the data."""
    readers = [IndexedReader(p) for p in prefixes]
    if not readers:
        raise ValueError("merge_indexed: no input datasets")
    dtypes = {r.dtype for r in readers}
    if len(dtypes) != 1:
        raise ValueError(f"merge_indexed: inputs have different dtypes {sorted(map(str, dtypes))}")
    document_format = _agreed_format([r.prefix for r in readers])
    with IndexedDatasetWriter(output_prefix, readers[0].dtype, backend=backend, **document_format) as w:
        for r in readers:
            if not r.is_contiguous():
                raise ValueError(f"{r.prefix}: sequences are not stored back to back; cannot merge by copy")
            doc_idx = np.asarray(r.document_indices)
            lengths = np.asarray(r.sequence_lengths, dtype=np.int64)
            seq_end_tok = np.cumsum(lengths)
            d = 0
            ndocs = r.num_documents
            while d < ndocs:
                # Whole documents up to ~chunk_tokens tokens (at least one document).
                s0 = int(doc_idx[d])
                tok0 = int(seq_end_tok[s0 - 1]) if s0 else 0
                d1 = int(np.searchsorted(seq_end_tok[doc_idx[1:] - 1], tok0 + chunk_tokens, side="right"))
                d1 = max(d1, d + 1)
                s1 = int(doc_idx[d1])
                tok1 = int(seq_end_tok[s1 - 1]) if s1 else 0
                w.add_packed(np.ascontiguousarray(r.tokens[tok0:tok1]), lengths[s0:s1], np.diff(doc_idx[d:d1 + 1]))
                d = d1
    return IndexedReader(output_prefix)


# ---- checks before training: files agree, token-id range --------------------------------
class CorpusError(ValueError):
    """A corpus prefix whose files are missing, damaged, or disagree. The message is one line
    naming the file and what to do."""


_HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8
_REDO = "re-run tools/preprocess_data.py"


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """What :func:`check_corpus_files` read from the ``.idx`` header (and the ``.bin`` size)."""

    prefix: str
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int
    bin_bytes: int


def _read_index_header(prefix: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document-index count) from the first bytes of ``PREFIX.idx``."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise CorpusError(f"{path}: not a megatron indexed-dataset index (no MMIDIDX header); {_REDO}")
    version, = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise CorpusError(f"{path}: index version {version}, only {INDEX_VERSION} is supported; {_REDO}")
    if head[17] not in CODE_DTYPES:
        raise CorpusError(f"{path}: unknown token dtype code {head[17]}; {_REDO}")
    nseq, ndoc_idx = struct.unpack("<QQ", head[18:34])
    return np.dtype(CODE_DTYPES[head[17]]), nseq, ndoc_idx


def _missing_files_message(prefix: str) -> str:
    have_bin, have_idx = os.path.exists(bin_path(prefix)), os.path.exists(idx_path(prefix))
    if prefix.endswith((".bin", ".idx")):
        return f"corpus prefix {prefix}: give it without the extension ({prefix[:-4]})"
    if not have_bin and not have_idx:
        return (f"corpus prefix {prefix}: neither {bin_path(prefix)} nor {idx_path(prefix)} exists "
                f"(a prefix is the path without .bin/.idx; make the files with tools/preprocess_data.py)")
    present, absent = (bin_path(prefix), idx_path(prefix)) if have_bin else (idx_path(prefix), bin_path(prefix))
    return f"{absent} not found (only {present} exists): the pair is incomplete; {_REDO}"


def check_corpus_files(prefix: str | os.PathLike, allow_empty: bool = False) -> CorpusInfo:
    """``PREFIX.bin`` and ``PREFIX.idx`` exist, the index is whole, and the ``.bin`` size is, to
    the byte, what the index describes (sum of sequence lengths x dtype size, and the last
    sequence's pointer + length). Reads the index's lengths array (4 bytes per sequence), never
    the ``.bin``. ``allow_empty``: accept a corpus of no documents. Raises :class:`CorpusError`."""
    prefix = os.fspath(prefix)
    if not (os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))):
        raise CorpusError(_missing_files_message(prefix))
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    dtype, nseq, ndoc_idx = _read_index_header(prefix)
    expected_idx = _HEADER_BYTES + 4 * nseq + 8 * nseq + 8 * ndoc_idx
    idx_bytes, bin_bytes = os.path.getsize(ipath), os.path.getsize(bpath)
    if idx_bytes != expected_idx:
        raise CorpusError(f"{ipath}: {idx_bytes:,} bytes, but its header describes {expected_idx:,} ({nseq:,} sequences, "
                          f"{max(ndoc_idx - 1, 0):,} documents): truncated or damaged; {_REDO}")
    index = np.memmap(ipath, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=nseq, offset=_HEADER_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=nseq, offset=_HEADER_BYTES + 4 * nseq)
    doc_idx = np.frombuffer(index, dtype=np.int64, count=ndoc_idx, offset=_HEADER_BYTES + 12 * nseq)
    if ndoc_idx < 1 or int(doc_idx[0]) != 0 or int(doc_idx[-1]) != nseq:
        raise CorpusError(f"{ipath}: its document index does not span its {nseq:,} sequences: damaged; {_REDO}")
    tokens = sum(int(lengths[s:s + (1 << 24)].sum(dtype=np.int64)) for s in range(0, nseq, 1 << 24))
    described = tokens * dtype.itemsize
    if nseq and int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize != described:
        raise CorpusError(f"{ipath}: the last sequence ends at byte {int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize:,}"
                          f" but the sequences hold {described:,} bytes: damaged; {_REDO}")
    if bin_bytes != described:
        raise CorpusError(f"{bpath}: {bin_bytes:,} bytes, but {ipath} describes {described:,} ({tokens:,} tokens of "
                          f"{dtype.name}): was the .bin produced with this .idx? {_REDO}")
    if ndoc_idx - 1 == 0 and not allow_empty:
        raise CorpusError(f"corpus {prefix}: holds no documents; {_REDO} on the right input")
    return CorpusInfo(prefix, dtype, nseq, ndoc_idx - 1, tokens, bin_bytes)


STATS_FORMAT = 1
_FINGERPRINT_WINDOW = 1 << 16  # bytes per sampled window
_FINGERPRINT_WINDOWS = 16      # windows of the .bin (first and last included)


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    """Content of ``PREFIX.stats.json``, written by :class:`IndexedDatasetWriter` at commit."""

    format: int
    dtype: str
    documents: int
    sequences: int
    tokens: int
    min_token_id: int | None  # None: no tokens
    max_token_id: int | None
    bin_bytes: int
    idx_bytes: int
    fingerprint: str          # :func:`_fingerprint`: detects a .bin/.idx replaced after the sidecar
    # The documents' format, as the writer's caller stated it (None: not stated; sidecars
    # written before these fields existed read as None too).
    bos: bool | None = None   # every document starts with the tokenizer's BOS (<s>)
    eod: bool | None = None   # every document ends with the tokenizer's EOD (</s>)


def _fingerprint(bin_file: str, idx_file: str) -> str:
    """sha256 of the two sizes, the whole .idx head and tail (1 MiB each) and 16 windows of 64 KiB
    spread over the .bin. Reads about 3 MiB whatever the corpus size; a .bin or .idx rewritten
    by another run (other tokenizer, other corpus) differs in size or in these bytes."""
    h = hashlib.sha256()
    for path, windows, width in ((idx_file, 2, 1 << 20), (bin_file, _FINGERPRINT_WINDOWS, _FINGERPRINT_WINDOW)):
        size = os.path.getsize(path)
        h.update(struct.pack("<Q", size))
        starts = sorted({int(x) for x in np.linspace(0, max(size - width, 0), windows)})
        with open(path, "rb") as f:
            for start in starts:
                f.seek(start)
                h.update(f.read(width))
    return "sha256:" + h.hexdigest()


def read_stats_sidecar(prefix: str | os.PathLike) -> tuple[CorpusStats | None, str]:
    """(stats, "") when ``PREFIX.stats.json`` exists and matches the ``.bin``/``.idx`` now on
    disk (sizes and :func:`_fingerprint`); else (None, why it is not used)."""
    prefix = os.fspath(prefix)
    path = stats_path(prefix)
    if not os.path.exists(path):
        return None, f"no {path}"
    try:
        stats = CorpusStats(**json.loads(Path(path).read_text()))
    except (ValueError, TypeError) as e:
        return None, f"{path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if stats.format != STATS_FORMAT:
        return None, f"{path} has format {stats.format}, not {STATS_FORMAT}"
    if stats.bin_bytes != os.path.getsize(bin_path(prefix)) or stats.idx_bytes != os.path.getsize(idx_path(prefix)):
        return None, f"{path} is stale (it describes another .bin/.idx: sizes differ)"
    if stats.fingerprint != _fingerprint(bin_path(prefix), idx_path(prefix)):
        return None, f"{path} is stale (the .bin/.idx content changed since it was written)"
    return stats, ""


SCAN_CHUNK_BYTES = 1 << 27
SCAN_PROGRESS_MIN_BYTES = 1 << 28  # progress lines only for .bin files at least this big


def scan_token_id_range(prefix: str | os.PathLike, log: IO[str] | None = sys.stderr,
                        progress_min_bytes: int = SCAN_PROGRESS_MIN_BYTES,
                        progress_interval: float = 2.0) -> tuple[int | None, int | None]:
    """(min id, max id) of ``PREFIX.bin``, read in chunks of 128 MiB (memory does not grow with
    the file); (None, None) when it holds no tokens. Writes nothing; for a ``.bin`` of at least
    ``progress_min_bytes``, a progress line on ``log`` every ``progress_interval`` seconds."""
    prefix = os.fspath(prefix)
    dtype, _, _ = _read_index_header(prefix)
    size = os.path.getsize(bin_path(prefix))
    if size == 0:
        return None, None
    data = np.memmap(bin_path(prefix), mode="r", dtype=dtype, shape=(size // dtype.itemsize,))
    chunk = SCAN_CHUNK_BYTES // dtype.itemsize
    show = log is not None and size >= progress_min_bytes
    if show:
        print(f"[corpus] scanning {bin_path(prefix)} ({size / 1e9:,.2f} GB) for its largest token id", file=log, flush=True)
    lo = hi = None
    last = time.perf_counter()
    for start in range(0, len(data), chunk):
        block = data[start:start + chunk]
        b_lo, b_hi = int(block.min()), int(block.max())
        lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
        now = time.perf_counter()
        if show and now - last >= progress_interval:
            last = now
            done = min(start + chunk, len(data)) * dtype.itemsize
            print(f"[corpus] {bin_path(prefix)}: {done / size:.0%} ({done / 1e9:,.2f} of {size / 1e9:,.2f} GB)",
                  file=log, flush=True)
    return lo, hi


def corpus_max_token_id(prefix: str | os.PathLike, log: IO[str] | None = sys.stderr) -> int:
    """The largest token id in ``PREFIX.bin`` (-1 when it holds no tokens): from the
    ``PREFIX.stats.json`` sidecar when it matches the files on disk, else from a scan of the
    ``.bin`` (:func:`scan_token_id_range`; the reason the sidecar was not used is logged for
    files big enough to show progress). Writes nothing. Raises :class:`CorpusError` on a
    negative id (a damaged int32 corpus)."""
    prefix = os.fspath(prefix)
    stats, why_not = read_stats_sidecar(prefix)
    if stats is not None:
        lo, hi = stats.min_token_id, stats.max_token_id
    else:
        if log is not None and os.path.getsize(bin_path(prefix)) >= SCAN_PROGRESS_MIN_BYTES:
            print(f"[corpus] {why_not}", file=log, flush=True)
        lo, hi = scan_token_id_range(prefix, log=log)
    if lo is not None and lo < 0:
        raise CorpusError(f"{bin_path(prefix)}: holds negative token id {lo}: damaged; {_REDO}")
    return -1 if hi is None else hi

