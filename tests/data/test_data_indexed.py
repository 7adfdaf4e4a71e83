"""Indexed .bin/.idx format: C++ writer == Python reference (bytes), megatron-core reads it,
atomic commit, merge."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_normistral.data.indexed import (IndexedDatasetWriter, IndexedReader, merge_indexed,
                                              token_dtype_for)


def _random_docs(rng, n, vocab):
    return [rng.integers(0, vocab, size=int(rng.integers(1, 50))).tolist() for _ in range(n)]


@pytest.mark.parametrize("dtype,vocab", [(np.uint8, 256), (np.uint16, 32000), (np.int32, 131072)])
def test_cpp_writer_byte_identical_to_python_reference(tmp_path, dtype, vocab):
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, 300, vocab)
    # Multi-sequence documents too (sentence splitting): 2 batches, different shapes.
    seqs = _random_docs(rng, 40, vocab)
    counts = [1, 3, 2, 4, 10, 20]
    for backend in ("cpp", "reference"):
        with IndexedDatasetWriter(tmp_path / backend, dtype, backend=backend) as w:
            w.add_documents(docs[:100])
            w.add_packed(np.array([t for d in docs[100:] for t in d], dtype=dtype), [len(d) for d in docs[100:]])
            w.add_packed(np.array([t for s in seqs for t in s], dtype=dtype), [len(s) for s in seqs], counts)
    for ext in (".bin", ".idx"):
        a, b = (tmp_path / f"cpp{ext}").read_bytes(), (tmp_path / f"reference{ext}").read_bytes()
        assert len(a) > 0 and a == b, ext


def test_megatron_core_reads_what_we_write(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(1)
    docs = _random_docs(rng, 50, 32000)
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_documents(docs[:30])
        w.add_packed(np.array([t for d in docs[30:] for t in d], dtype=np.uint16), [len(d) for d in docs[30:40]] +
                     [len(d) for d in docs[40:]], [1] * 10 + [2] * 5)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 50
    assert ds.index.dtype == np.uint16
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert ds.document_indices.tolist() == list(range(41)) + [42, 44, 46, 48, 50]
    # Our reader agrees with megatron-core's.
    r = IndexedReader(tmp_path / "d")
    assert np.array_equal(r.sequence_lengths, ds.sequence_lengths)
    assert np.array_equal(r.document_indices, ds.document_indices)
    assert r.num_tokens == sum(len(d) for d in docs) and r.is_contiguous()


def test_document_indices_of_multi_sequence_documents(tmp_path):
    seqs = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    with IndexedDatasetWriter(tmp_path / "s", np.uint16) as w:
        w.add_packed(np.arange(1, 10, dtype=np.uint16), [len(s) for s in seqs], [2, 1, 2])
    r = IndexedReader(tmp_path / "s")
    assert r.document_indices.tolist() == [0, 2, 3, 5]
    assert [x.tolist() for x in r.document(2)] == [[7], [8, 9]]


def test_token_dtype_for():
    assert token_dtype_for(256) is np.uint8
    assert token_dtype_for(257) is np.uint16
    assert token_dtype_for(65536) is np.uint16
    assert token_dtype_for(65537) is np.int32
    assert token_dtype_for(131072) is np.int32


def test_out_of_range_token_is_refused(tmp_path):
    for backend in ("cpp", "reference"):
        w = IndexedDatasetWriter(tmp_path / backend, np.uint8, backend=backend)
        with pytest.raises(ValueError):
            w.add_documents([[1, 2, 256]])
        w.abort()
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_dataset_and_keeps_the_old_one(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_documents([[1, 2, 3]])
    old = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_documents([[4, 5, 6, 7]])
            raise RuntimeError("interrupted")
    assert ((tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()) == old
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx", "d.stats.json"]  # temporaries removed
    with IndexedDatasetWriter(tmp_path / "new", np.uint16) as w:
        w.add_documents([[1]])
        assert not (tmp_path / "new.bin").exists() and not (tmp_path / "new.idx").exists()  # only at commit


def test_merge_concatenates_documents(tmp_path):
    rng = np.random.default_rng(2)
    parts = [_random_docs(rng, n, 1000) for n in (5, 0, 17)]
    for i, docs in enumerate(parts):
        with IndexedDatasetWriter(tmp_path / f"p{i}", np.uint16) as w:
            if docs:
                w.add_documents(docs)
    merged = merge_indexed([tmp_path / f"p{i}" for i in range(3)], tmp_path / "m", chunk_tokens=40)
    flat = [d for docs in parts for d in docs]
    assert merged.num_documents == len(flat)
    assert [merged[i].tolist() for i in range(len(flat))] == flat
    with IndexedDatasetWriter(tmp_path / "ref", np.uint16, backend="reference") as w:
        w.add_documents(flat)
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_reader_detects_non_contiguous_and_truncated_files(tmp_path):
    import struct

    # A hand-made index whose second sequence does not start where the first ends.
    (tmp_path / "g.bin").write_bytes(np.arange(10, dtype=np.uint16).tobytes())
    with open(tmp_path / "g.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3))
        f.write(np.array([3, 4], np.int32).tobytes() + np.array([0, 8], np.int64).tobytes())
        f.write(np.array([0, 1, 2], np.int64).tobytes())
    r = IndexedReader(tmp_path / "g")
    assert r[1].tolist() == [4, 5, 6, 7] and not r.is_contiguous()
    with pytest.raises(ValueError, match="back to back"):
        merge_indexed([tmp_path / "g"], tmp_path / "m")
    (tmp_path / "g.bin").write_bytes(np.arange(5, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match="truncated"):
        IndexedReader(tmp_path / "g")
