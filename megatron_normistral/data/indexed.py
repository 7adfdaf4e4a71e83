"""Reader and writers of megatron-core's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``).

Files written here are readable by ``megatron.core.datasets.indexed_dataset.IndexedDataset(PREFIX)``.

- :class:`IndexedDatasetWriter`: streaming writer; the C++ backend (``_helpers.IndexedWriter``)
  by default, ``backend="python"`` for the pure-Python reference (tests check byte identity).
  It writes to temporary names and renames on :meth:`~IndexedDatasetWriter.commit` only, ``.idx``
  last: a killed or failing run never leaves a ``.bin``/``.idx`` pair that looks whole.
- :class:`IndexedReader`: memory-mapped reader (no torch import).
- :func:`merge_indexed`: concatenates several datasets (e.g. shards) into one.
- :func:`token_dtype_for`: the smallest dtype that holds every id of a vocabulary.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

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


class _PyWriter:
    """Pure-Python reference writer, same methods as ``_helpers.IndexedWriter``."""

    def __init__(self, bin_file: str, idx_file: str, dtype_code: int):
        self.dtype = np.dtype(CODE_DTYPES[dtype_code])
        self.dtype_code = dtype_code
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
        self._bin.write(np.ascontiguousarray(tokens).tobytes())

    def add_documents(self, docs: Sequence[Sequence[int]]):
        info = np.iinfo(self.dtype)
        for d in docs:
            if any(t < info.min or t > info.max for t in d):
                raise ValueError("token id out of range of the output dtype")
        flat = np.array([t for d in docs for t in d], dtype=self.dtype)
        self.add_packed(flat, [len(d) for d in docs])

    def finalize(self):
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_file, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", self.dtype_code))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._doc_idx)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.array(self._doc_idx, dtype=np.int64).tobytes())

    def abort(self):
        self._bin.close()


class IndexedDatasetWriter:
    """Writes ``PREFIX.bin``/``PREFIX.idx`` atomically.

    Use as a context manager: leaving the block normally commits (renames the temporary files
    into place, ``.idx`` last, after removing any old ``.idx``); an exception removes them.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type | np.dtype, backend: str = "cpp"):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        code = DTYPE_CODES[self.dtype.type]
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        # Temporary names end in neither .bin nor .idx, so nothing globbing for datasets sees them.
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp_bin, self._tmp_idx = bin_path(self.prefix) + tag, idx_path(self.prefix) + tag
        if backend == "cpp":
            from megatron_normistral import _helpers  # built at install time; no fallback on purpose

            self._w = _helpers.IndexedWriter(self._tmp_bin, self._tmp_idx, code)
        elif backend == "python":
            self._w = _PyWriter(self._tmp_bin, self._tmp_idx, code)
        else:
            raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
        self.backend = backend
        self._done = False

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

    def add_documents(self, docs: Sequence[Sequence[int]]) -> None:
        """One sequence per document, from lists of token ids."""
        self._w.add_documents(list(docs) if not isinstance(docs, list) else docs)

    def add_document(self, tokens: Sequence[int]) -> None:
        self.add_documents([list(tokens)])

    def commit(self) -> None:
        self._w.finalize()
        final_bin, final_idx = bin_path(self.prefix), idx_path(self.prefix)
        # Old .idx goes first: between the two renames there is a new .bin and no .idx.
        if os.path.exists(final_idx):
            os.unlink(final_idx)
        os.replace(self._tmp_bin, final_bin)
        os.replace(self._tmp_idx, final_idx)
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
            self.commit()
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


def merge_indexed(prefixes: Iterable[str | os.PathLike], output_prefix: str | os.PathLike,
                  backend: str = "cpp", chunk_tokens: int = 1 << 24) -> IndexedReader:
    """Concatenate datasets (same dtype) in the order given, keeping document boundaries.
    Streams in chunks of about ``chunk_tokens`` tokens, so memory does not grow with the data."""
    readers = [IndexedReader(p) for p in prefixes]
    if not readers:
        raise ValueError("merge_indexed: no input datasets")
    dtypes = {r.dtype for r in readers}
    if len(dtypes) != 1:
        raise ValueError(f"merge_indexed: inputs have different dtypes {sorted(map(str, dtypes))}")
    with IndexedDatasetWriter(output_prefix, readers[0].dtype, backend=backend) as w:
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
