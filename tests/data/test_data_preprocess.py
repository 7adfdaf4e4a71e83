"""tools/preprocess_data.py and its library: token equality, bad input, strict mode,
interrupted runs, shards + merge, sentence splitting."""
from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_normistral.data.indexed import IndexedReader, corpus_max_token_id, merge_indexed, read_stats_sidecar
from megatron_normistral.data.preprocess import (
    BadInputError,
    PreprocessConfig,
    ReadPosition,
    iter_blocks,
    preprocess,
    preprocess_json_keys,
)
from megatron_normistral.testing.tool_runs import failed_cleanly, run_tool_script

from .conftest import progress_percentages

ROOT = Path(__file__).resolve().parents[2]


def _write_jsonl(path: Path, texts, gz=False):
    data = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _doc(tokenizer, text, eod=False) -> list[int]:
    """What preprocessing writes for one document by default: <s> text (</s>)."""
    return [tokenizer.bos_id] + tokenizer.encode(text) + ([tokenizer.eod_id] if eod else [])


def _cfg(inputs, prefix, spm_model, **kw):
    kw.setdefault("progress_interval", 0)
    return PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix), tokenizer=spm_model, **kw)


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, corpus_texts):
    d = tmp_path_factory.mktemp("in")
    texts = {lang: corpus_texts[lang][:12] for lang in ("nb", "se", "en")}
    _write_jsonl(d / "a_nb.jsonl", texts["nb"])
    _write_jsonl(d / "b_se.jsonl.gz", texts["se"], gz=True)
    _write_jsonl(d / "c_en.jsonl.gz", texts["en"], gz=True)
    return d, texts["nb"] + texts["se"] + texts["en"]


@pytest.mark.parametrize("workers,eod", [(0, True), (2, False)])
def test_tokens_equal_tokenizer_encoding(tmp_path, small_inputs, spm_model, tokenizer, workers, eod):
    d, texts = small_inputs
    log = io.StringIO()
    res = preprocess(_cfg([d / "a_nb.jsonl", str(d / "*.jsonl.gz")], tmp_path / "out", spm_model, workers=workers,
                          append_eod=eod, chunk_bytes=20_000), log=log)
    r = IndexedReader(tmp_path / "out")
    assert r.dtype == np.uint16  # vocab 800: too big for uint8
    assert r.num_documents == len(texts) == res.documents
    expect = [_doc(tokenizer, t, eod) for t in texts]
    assert tokenizer.bos_id == 1 and res.bos_id == 1
    assert [r[i].tolist() for i in range(len(texts))] == expect
    assert [f.documents for f in res.files] == [12, 12, 12] and res.tokens == sum(map(len, expect))
    out = log.getvalue()
    assert "b_se.jsonl.gz" in out and "total" in out and "tokens/s" in out  # summary per file
    assert res.segment_cache == "on" and res.segment_hits > 0 and "found in the cache" in out


def test_segment_cache_output_byte_identical(tmp_path, small_inputs, spm_model):
    """The default (segment cache on for this BPE model) writes exactly what plain encoding does."""
    d, _ = small_inputs
    logs, results = {}, {}
    for cached in (True, False):
        logs[cached] = io.StringIO()
        results[cached] = preprocess(_cfg([str(d / "*")], tmp_path / str(cached), spm_model, workers=2,
                                          append_eod=True, segment_cache=cached, chunk_bytes=10_000), log=logs[cached])
    assert results[True].segment_hits > 0 and results[False].segment_hits == results[False].segment_misses == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"True{ext}").read_bytes() == (tmp_path / f"False{ext}").read_bytes()
    assert "segment cache: on" in logs[True].getvalue()
    assert "segment cache: off (turned off)" in logs[False].getvalue()


def test_python_writer_pipeline_byte_identical(tmp_path, small_inputs, spm_model):
    d, _ = small_inputs
    for backend in ("cpp", "reference"):
        preprocess(_cfg([str(d / "*")], tmp_path / backend, spm_model, workers=0, append_eod=True,
                        backend=backend, chunk_bytes=10_000), log=io.StringIO())
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"cpp{ext}").read_bytes() == (tmp_path / f"reference{ext}").read_bytes()


BAD_LINES = [
    (b'{"text": "Dette er bra."}', None),
    (b'{"text": "broken', "malformed JSON"),
    (b'{"other": "no text key"}', "missing key 'text'"),
    (b'{"text": 42}', "key 'text' is int, not a string"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid UTF-8"),
    (b'{"text": ""}', "empty document"),
    (b'{"text": "   \\n  "}', "empty document"),
    (b'["text", "a list"]', "not a JSON object"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid UTF-8"),
    (b'   ', "empty line"),
    (b'{"text": "Ogs\xc3\xa5 bra."}', None),
]


def _bad_file(path: Path) -> Path:
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return path


def test_bad_input_skipped_counted_and_reported_with_file_line(tmp_path, spm_model, tokenizer):
    src = _bad_file(tmp_path / "bad.jsonl")
    log = io.StringIO()
    res = preprocess(_cfg([src], tmp_path / "out", spm_model, workers=0), log=log)
    out = log.getvalue()
    for lineno, (_, why) in enumerate(BAD_LINES, start=1):
        if why is None:
            assert f"bad.jsonl:{lineno}:" not in out
        else:
            assert f"bad.jsonl:{lineno}: {why}" in out, (lineno, why, out)
    nbad = sum(why is not None for _, why in BAD_LINES)
    assert res.files[0].skipped == nbad and res.files[0].documents == 2
    assert sum(res.skipped_by_reason.values()) == nbad
    r = IndexedReader(tmp_path / "out")
    assert [r[0].tolist(), r[1].tolist()] == [_doc(tokenizer, "Dette er bra."), _doc(tokenizer, "Også bra.")]


def test_only_first_20_bad_lines_in_full_then_counts(tmp_path, spm_model):
    src = tmp_path / "many.jsonl"
    src.write_text("".join('{"text": "ok"}\n' if i % 2 else "{oops\n" for i in range(60)))
    log = io.StringIO()
    res = preprocess(_cfg([src], tmp_path / "out", spm_model, workers=2, chunk_bytes=64), log=log)
    out = log.getvalue()
    assert len(re.findall(r"skipped \S*many\.jsonl:\d+: ", out)) == 20
    assert "many.jsonl:1: malformed JSON" in out and "many.jsonl:39: malformed JSON" in out
    assert "many.jsonl:41:" not in out
    assert res.skipped_by_reason == {"malformed JSON": 30} and "malformed JSON: 30" in out


def test_strict_fails_at_first_bad_line_and_writes_nothing(tmp_path, spm_model):
    src = _bad_file(tmp_path / "bad.jsonl")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess(_cfg([src], tmp_path / "out", spm_model, workers=2, strict=True), log=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_strict_cli_exit_code(tmp_path, spm_model):
    src = _bad_file(tmp_path / "bad.jsonl")
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
                        "--output-prefix", str(tmp_path / "o"), "--tokenizer", spm_model, "--workers", "1",
                        "--strict"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "bad.jsonl:2: malformed JSON" in p.stderr
    assert not (tmp_path / "o.idx").exists() and not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_never_leaves_a_whole_looking_pair(tmp_path, spm_model, corpus_texts, sig):
    # Input through a FIFO: the tool blocks mid-input, deterministically, until we kill it.
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out" / "ds"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(fifo),
                             "--output-prefix", str(out), "--tokenizer", spm_model, "--workers", "1",
                             "--chunk-mb", "0.01", "--progress-interval", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(fifo, "wb") as f:
        for t in corpus_texts["nb"][:40]:
            f.write((json.dumps({"text": t}) + "\n").encode())
        f.flush()
        deadline = time.time() + 60
        while not any(p.name.startswith("ds.bin.tmp") for p in out.parent.glob("*")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # let it write some blocks
        assert proc.poll() is None
        proc.send_signal(sig)
        proc.wait(timeout=30)
    assert proc.returncode != 0
    names = sorted(p.name for p in out.parent.iterdir())
    assert "ds.bin" not in names and "ds.idx" not in names, names
    if sig == signal.SIGTERM:  # orderly exit: temporaries removed too
        assert names == [], names
    else:
        assert any(n.startswith("ds.bin.tmp") for n in names)  # it was indeed mid-write


def test_shards_then_merge_hold_every_document(tmp_path, small_inputs, spm_model, tokenizer):
    d, texts = small_inputs
    res = preprocess(_cfg([str(d / "*")], tmp_path / "sh", spm_model, workers=2, shards=3, chunk_bytes=3000,
                          append_eod=True), log=io.StringIO())
    assert len(res.outputs) == 3 and all(Path(p + ".idx").exists() for p in res.outputs)
    assert all(IndexedReader(p).num_documents > 0 for p in res.outputs)
    sys.argv = ["merge"]
    spec = importlib.util.spec_from_file_location("merge_datasets", ROOT / "tools" / "merge_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--input", str(tmp_path / "sh-*-of-00003"), "--output-prefix", str(tmp_path / "merged")]) == 0
    m = IndexedReader(tmp_path / "merged")
    got = sorted(tuple(m[i].tolist()) for i in range(m.num_documents))
    assert got == sorted(tuple(_doc(tokenizer, t, eod=True)) for t in texts)
    assert merge_indexed(res.outputs, tmp_path / "m2").num_tokens == res.tokens
    stats, _ = read_stats_sidecar(tmp_path / "merged")  # the merge keeps the shards' document format
    assert (stats.bos, stats.eod) == (True, True)


def test_split_sentences(tmp_path, spm_model, tokenizer):
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    texts = ["Dette er én setning. Her er en til! Og en tredje?", "Bare én."]
    src = _write_jsonl(tmp_path / "s.jsonl", texts)
    preprocess(_cfg([src], tmp_path / "out", spm_model, workers=0, split_sentences=True, append_eod=True),
               log=io.StringIO())
    r = IndexedReader(tmp_path / "out")
    assert r.document_indices.tolist() == [0, 3, 4]
    sents = PunktSentenceTokenizer().tokenize(texts[0])
    assert len(sents) == 3
    assert [x.tolist() for x in r.document(0)] == [_doc(tokenizer, sents[0]), tokenizer.encode(sents[1]),
                                                   tokenizer.encode(sents[2]) + [tokenizer.eod_id]]


def test_cli_help_explains_every_flag():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--input", "--output-prefix", "--tokenizer", "--workers", "--json-key", "--append-eod",
                 "--split-sentences", "--strict", "--shards", "--chunk-mb", "--writer", "--max-reported",
                 "--no-segment-cache", "--progress-interval", "--max-document-mb", "--no-bos"):
        assert flag in p.stdout


def test_tekken_and_hugging_face_tokenizers(tmp_path, corpus_texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron_normistral.tokenizer import load_tokenizer

    texts = corpus_texts["se"][:5]
    src = _write_jsonl(tmp_path / "se.jsonl", texts)
    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(corpus_texts["se"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    for spec, dtype in (("tekken", np.int32), (str(tmp_path), np.uint16)):
        tok = load_tokenizer(spec)
        preprocess(_cfg([src], tmp_path / "out", spec, workers=1, append_eod=True), log=io.StringIO())
        r = IndexedReader(tmp_path / "out")
        assert r.dtype == dtype
        assert [r[i].tolist() for i in range(len(texts))] == [_doc(tok, t, eod=True) for t in texts]


def test_sidecar_holds_the_token_id_range(tmp_path, small_inputs, spm_model, tokenizer):
    d, texts = small_inputs
    preprocess(_cfg([str(d / "*")], tmp_path / "out", spm_model, workers=0, append_eod=True), log=io.StringIO())
    ids = [i for t in texts for i in _doc(tokenizer, t, eod=True)]
    stats, _ = read_stats_sidecar(tmp_path / "out")
    assert (stats.max_token_id, stats.min_token_id, stats.tokens, stats.documents) == (max(ids), min(ids), len(ids),
                                                                                       len(texts))
    assert corpus_max_token_id(tmp_path / "out") == max(ids)


# ---- inputs that end the run: exit 2, one line naming the file and the reason, no output ---
def _run_tool(src, out_prefix, spm_model, *extra, **kw):
    return run_tool_script("preprocess_data", "--input", src, "--output-prefix", out_prefix, "--tokenizer", spm_model,
                           "--progress-interval", "0", *extra, **kw)


def _nothing_written(folder: Path) -> None:
    assert not folder.exists() or sorted(os.listdir(folder)) == [], sorted(os.listdir(folder))


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_damaged_gz_fails_naming_the_file(tmp_path, spm_model, corpus_dir, damage):
    src = tmp_path / "nb.jsonl.gz"
    data = (corpus_dir / "nb.jsonl.gz").read_bytes()
    src.write_bytes(data[: len(data) // 2] if damage == "truncated" else gzip.decompress(data)[:5000])
    p = _run_tool(src, tmp_path / "out" / "nb", spm_model, "--workers", "1", "--chunk-mb", "0.01")
    want = ["the gzip stream ends early", "after line"] if damage == "truncated" else ["corrupt gzip data"]
    failed_cleanly(p, f"{src}:", *want, "nothing was written")
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("writer,workers", [("cpp", "1"), ("reference", "0")])
def test_full_disk_fails_naming_the_file_and_the_os_error(tmp_path, spm_model, corpus_dir, writer, workers):
    import resource

    def small_file_limit():  # the kernel refuses writes past 64 KiB with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    out = tmp_path / "out"
    p = _run_tool(corpus_dir / "nb.jsonl.gz", out / "nb", spm_model, "--workers", workers, "--writer", writer,
                  preexec_fn=small_file_limit)
    failed_cleanly(p, f"error: {out / 'nb'}.bin.tmp-", "File too large (EFBIG)", "ulimit -f")
    _nothing_written(out)


@pytest.mark.parametrize("case", ["wrong --json-key", "empty file", "second of two inputs empty", "--strict"])
def test_input_without_documents_fails(tmp_path, spm_model, case):
    src = _write_jsonl(tmp_path / "in.jsonl", ["Dette er bra.", "Også bra."])
    inputs, extra = [src], ["--workers", "0"]
    if case == "wrong --json-key":
        extra += ["--json-key", "txt"]
        want = [f"{src}: no documents: all 2 lines were skipped (first: line 1: missing key 'txt'); check --json-key"]
    elif case == "--strict":
        extra += ["--json-key", "txt", "--strict"]
        want = [f"{src}:1: missing key 'txt'"]
    else:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        inputs = [empty] if case == "empty file" else [src, empty]
        want = [f"{empty}: no documents: the file is empty"]
    p = run_tool_script("preprocess_data", "--input", *inputs, "--output-prefix", tmp_path / "out" / "ds",
                        "--tokenizer", spm_model, *extra)
    failed_cleanly(p, *want)
    _nothing_written(tmp_path / "out")


def test_reader_drops_over_long_lines_without_holding_them():
    import io as _io

    lines = [b'{"text": "kort"}', b"x" * 100_000, b'{"text": "etter"}', b"y" * 3000, b'{"text": "slutt"}', b"z" * 5000]
    data = b"\n".join(lines)  # the last line has no newline
    path = "mem.jsonl"
    blocks = []
    import megatron_normistral.data.preprocess as pre

    real_open = pre._open
    pre._open = lambda p: _io.BytesIO(data)
    try:
        for first, block, long_lines in iter_blocks(path, chunk_bytes=256, max_line_bytes=1000):
            assert len(block) <= 1000 + 256  # never the whole 100 kB line
            blocks.append((first, block, long_lines))
    finally:
        pre._open = real_open
    kept = [(first + i, line) for first, block, _ in blocks for i, line in enumerate(block.split(b"\n")[:-1])]
    dropped = {n: size for _, _, long_lines in blocks for n, size in long_lines.items()}
    assert dropped == {2: 100_000, 4: 3000, 6: 5000}
    assert [(n, line) for n, line in kept if line] == [(1, lines[0]), (3, lines[2]), (5, lines[4])]
    assert all(line == b"" for n, line in kept if n in dropped)  # stand-ins keep the line numbers


def test_over_long_document_is_skipped_and_reported(tmp_path, spm_model, tokenizer):
    texts = ["Kort dokument.", "lang " * 4000, "Etter det lange."]
    src = _write_jsonl(tmp_path / "in.jsonl", texts)
    log = io.StringIO()
    res = preprocess(_cfg([src], tmp_path / "out", spm_model, workers=0, chunk_bytes=512, max_document_bytes=1000),
                     log=log)
    assert f"in.jsonl:2: document too long (20,0" in log.getvalue() and "limit 1,000: raise --max-document-mb" in log.getvalue()
    assert res.skipped_by_reason == {"document too long": 1}
    r = IndexedReader(tmp_path / "out")
    assert [r[i].tolist() for i in range(len(r))] == [_doc(tokenizer, texts[0]), _doc(tokenizer, texts[2])]
    p = _run_tool(src, tmp_path / "strict" / "ds", spm_model, "--workers", "0", "--max-document-mb", "0.001", "--strict")
    failed_cleanly(p, f"{src}:2: document too long", "--max-document-mb")
    _nothing_written(tmp_path / "strict")


# ---- progress lines ------------------------------------------------------------------------
def _percent(part: float, whole: float) -> float:
    return float(f"{part / whole:.1%}".rstrip("%"))


@pytest.mark.parametrize("workers", [0, 2])
def test_progress_lines_count_input_bytes_on_disk_up_to_100_percent(tmp_path, corpus_texts, spm_model, workers):
    plain = _write_jsonl(tmp_path / "a_nb.jsonl", corpus_texts["nb"][:30])
    packed = _write_jsonl(tmp_path / "b_en.jsonl.gz", corpus_texts["en"][:30], gz=True)
    total = plain.stat().st_size + packed.stat().st_size
    log = io.StringIO()
    preprocess(_cfg([plain, packed], tmp_path / "out", spm_model, workers=workers, chunk_bytes=4096,
                    progress_interval=1e-9), log=log)
    percentages = progress_percentages(log.getvalue())
    assert len(percentages) > 5 and percentages == sorted(percentages) and percentages[-1] == 100.0
    # The first line counts the first block alone (4096 bytes of the plain file), although the
    # reader runs blocks ahead of the workers; the plain file's last block ends at its share.
    assert percentages[0] == _percent(4096, total)
    assert _percent(plain.stat().st_size, total) in percentages


def test_gz_read_position_is_the_compressed_offset(corpus_dir):
    path = corpus_dir / "nb.jsonl.gz"
    size = path.stat().st_size
    position, seen, text_bytes = ReadPosition(), [], 0
    for _, block, _ in iter_blocks(str(path), chunk_bytes=16384, position=position):
        seen.append(position.done)
        text_bytes += len(block)
    assert text_bytes > 2 * size  # the text is larger than the file: positions are not text bytes
    assert position.total == size and seen[-1] == size
    assert seen == sorted(seen) and len(set(seen)) >= 2 and seen[0] < size


def test_progress_of_json_keys_counts_every_pass(tmp_path, corpus_texts, spm_model):
    src = tmp_path / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for text in corpus_texts["nb"][:20]:
            f.write(json.dumps({"text": text, "title": text[:300]}, ensure_ascii=False) + "\n")
    log = io.StringIO()
    preprocess_json_keys(_cfg([src], tmp_path / "multi", spm_model, chunk_bytes=4096, progress_interval=1e-9),
                         ["text", "title"], log=log)
    first, second = log.getvalue().split("[preprocess] key 'title'")
    first_pass, second_pass = progress_percentages(first), progress_percentages(second)
    assert len(first_pass) > 3 and first_pass == sorted(first_pass) and first_pass[-1] == 50.0
    assert 50.0 < second_pass[0] and second_pass == sorted(second_pass) and second_pass[-1] == 100.0


def test_no_progress_lines_with_interval_zero(tmp_path, small_inputs, spm_model):
    d, _ = small_inputs
    log = io.StringIO()
    preprocess(_cfg([d / "a_nb.jsonl"], tmp_path / "out", spm_model, progress_interval=0), log=log)
    assert progress_percentages(log.getvalue()) == [] and "\r" not in log.getvalue()
