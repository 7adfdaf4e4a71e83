"""The checks training runs on its corpora before any process group (data.indexed):
.bin/.idx exist and agree to the byte, the largest token id from the PREFIX.stats.json
sidecar or a scan of the .bin; and writers that name the file when the disk is full."""
from __future__ import annotations

import errno
import io
import json
import os

import numpy as np
import pytest

from megatron_normistral.data import indexed
from megatron_normistral.data.indexed import (CorpusError, IndexedDatasetWriter, check_corpus_files,
                                              corpus_max_token_id, merge_indexed, read_stats_sidecar)


def _write(prefix, docs, dtype=np.uint16, backend="cpp"):
    with IndexedDatasetWriter(prefix, dtype, backend=backend) as w:
        if docs:
            w.add_documents(docs)
    return str(prefix)


DOCS = [[5, 9, 2], [7], [1, 300, 4, 4]]


def test_agreeing_pair_passes_and_reports_counts(tmp_path):
    info = check_corpus_files(_write(tmp_path / "c", DOCS))
    assert (info.documents, info.sequences, info.tokens, info.bin_bytes) == (3, 3, 8, 16)
    assert info.dtype == np.uint16


@pytest.mark.parametrize("case", ["bin from another corpus", "bin truncated", "idx truncated", "no idx", "no files",
                                  "extension given", "empty"])
def test_each_mismatch_is_one_line_naming_the_file(tmp_path, case):
    prefix = _write(tmp_path / "c", DOCS)
    if case == "bin from another corpus":  # the case: a larger .bin trained on silently
        other = _write(tmp_path / "other", DOCS * 3)
        os.replace(other + ".bin", prefix + ".bin")
        want = [f"{prefix}.bin: 48 bytes, but {prefix}.idx describes 16", "produced with this .idx",
                "tools/preprocess_data.py"]
    elif case == "bin truncated":
        os.truncate(prefix + ".bin", 10)
        want = [f"{prefix}.bin: 10 bytes", "describes 16"]
    elif case == "idx truncated":
        os.truncate(prefix + ".idx", os.path.getsize(prefix + ".idx") - 8)
        want = [f"{prefix}.idx:", "truncated or damaged"]
    elif case == "no idx":
        os.unlink(prefix + ".idx")
        want = [f"{prefix}.idx not found", "incomplete"]
    elif case == "no files":
        prefix = str(tmp_path / "typo")
        want = [f"neither {prefix}.bin nor {prefix}.idx exists", "without .bin/.idx"]
    elif case == "extension given":
        prefix = prefix + ".bin"
        want = ["without the extension"]
    else:
        prefix = _write(tmp_path / "e", [])
        want = [f"corpus {prefix}: holds no documents"]
    with pytest.raises(CorpusError) as e:
        check_corpus_files(prefix)
    assert "\n" not in str(e.value)
    for fragment in want:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_empty_corpus_accepted_when_asked(tmp_path):
    assert check_corpus_files(_write(tmp_path / "e", []), allow_empty=True).documents == 0
    assert corpus_max_token_id(tmp_path / "e") == -1


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_sidecar_records_what_was_written(tmp_path, backend):
    prefix = _write(tmp_path / "c", DOCS, backend=backend)
    stats = json.loads(open(prefix + ".stats.json").read())
    assert {k: stats[k] for k in ("documents", "sequences", "tokens", "min_token_id", "max_token_id", "bin_bytes",
                                  "dtype")} == dict(documents=3, sequences=3, tokens=8, min_token_id=1,
                                                    max_token_id=300, bin_bytes=16, dtype="uint16")
    assert read_stats_sidecar(prefix)[0] is not None


def test_max_id_comes_from_the_sidecar_without_reading_the_bin(tmp_path, monkeypatch):
    prefix = _write(tmp_path / "c", DOCS)
    monkeypatch.setattr(indexed, "scan_token_id_range", lambda *a, **k: pytest.fail("scanned despite a valid sidecar"))
    assert corpus_max_token_id(prefix) == 300


def test_without_sidecar_the_bin_is_scanned_in_chunks_and_nothing_is_written(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=50).tolist() for _ in range(40)]
    docs[33][7] = 65000  # the maximum, deep inside a later chunk
    prefix = _write(tmp_path / "c", docs)
    os.unlink(prefix + ".stats.json")
    monkeypatch.setattr(indexed, "SCAN_CHUNK_BYTES", 128)  # 64 tokens per chunk: many chunks
    before = sorted(os.listdir(tmp_path))
    assert corpus_max_token_id(prefix) == 65000
    assert sorted(os.listdir(tmp_path)) == before


def test_scan_of_a_big_file_prints_progress(tmp_path):
    prefix = _write(tmp_path / "c", DOCS)
    log = io.StringIO()
    assert indexed.scan_token_id_range(prefix, log=log, progress_min_bytes=0, progress_interval=0) == (1, 300)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith(f"[corpus] scanning {prefix}.bin") and lines[-1].endswith("100% (0.00 of 0.00 GB)")


@pytest.mark.parametrize("how", ["other size", "same size, other content"])
def test_stale_sidecar_is_detected_and_the_bin_scanned(tmp_path, how):
    prefix = _write(tmp_path / "c", DOCS)
    sidecar = open(prefix + ".stats.json").read()
    # The pair is rewritten by another run (another tokenizer) that leaves no sidecar; the old one stays.
    new_docs = [[5, 9, 2], [7], [1, 4000, 4, 4]] if how == "same size, other content" else DOCS + [[4000]]
    _write(tmp_path / "c", new_docs)
    open(prefix + ".stats.json", "w").write(sidecar)
    stats, why = read_stats_sidecar(prefix)
    assert stats is None and "stale" in why
    assert corpus_max_token_id(prefix) == 4000


def test_negative_id_of_a_damaged_int32_corpus_is_refused(tmp_path):
    prefix = _write(tmp_path / "c", [[1, 2, 3]], dtype=np.int32)
    os.unlink(prefix + ".stats.json")
    with open(prefix + ".bin", "r+b") as f:
        f.seek(4)
        f.write(np.array([-7], np.int32).tobytes())
    with pytest.raises(CorpusError, match=r"c\.bin: holds negative token id -7"):
        corpus_max_token_id(prefix)


def test_merge_output_gets_a_sidecar(tmp_path):
    # Extremes in the first and a middle chunk: the range is kept over every chunk written.
    a, b = _write(tmp_path / "a", [[5, 40000], [7], [1, 9]]), _write(tmp_path / "b", [[300, 8]])
    merge_indexed([a, b], tmp_path / "m", chunk_tokens=1)
    stats, _ = read_stats_sidecar(tmp_path / "m")
    assert (stats.documents, stats.tokens, stats.max_token_id, stats.min_token_id) == (4, 7, 40000, 1)


# ---- a full disk names the file and the OS error, in both writers -------------------------
def _dev_full_writer(backend: str, bin_file: str, idx_file: str):
    from megatron_normistral import _helpers

    code = indexed.DTYPE_CODES[np.uint16]
    return _helpers.IndexedWriter(bin_file, idx_file, code) if backend == "cpp" else indexed._PyWriter(bin_file, idx_file, code)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("where", ["bin write", "bin flush at finalize", "idx"])
def test_full_disk_raises_oserror_naming_the_file(tmp_path, backend, where):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is Linux-only")
    bin_file = "/dev/full" if where != "idx" else str(tmp_path / "x.bin")
    idx_file = "/dev/full" if where == "idx" else str(tmp_path / "x.idx")
    w = _dev_full_writer(backend, bin_file, idx_file)
    # 16 MiB exceeds any stdio/io buffer, so the write itself fails; 10 tokens fail at the flush.
    n = 8 << 20 if where == "bin write" else 10
    with pytest.raises(OSError) as e:
        w.add_packed(np.zeros(n, np.uint16), np.array([n], np.int64), None)
        w.finalize()
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full"
    w.abort()
