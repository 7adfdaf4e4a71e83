"""tools/preprocess_data.py on parquet files and saved Hugging Face datasets, globs and several
inputs, and Megatron-LM's --json-keys: the same documents give byte-identical .bin/.idx whatever
holds them; bad inputs end the run in one line naming the file."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets  # optional for users (pip install -e .[data]); requirements.txt pins it, so the tests run
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_normistral.data.indexed import IndexedReader
from megatron_normistral.data.preprocess import PreprocessConfig, preprocess
from megatron_normistral.testing.tool_runs import REPO, failed_cleanly, run_tool_script

from .conftest import progress_percentages


# Bad rows among the documents: each format skips them the same way.
AWKWARD = ["", "   \n ", "Tre ord her.", "ŋ đ š ž ǩ — “sitat” 🙂"]


@pytest.fixture(scope="module")
def documents(corpus_texts) -> list[str | None]:
    """Texts of three languages with awkward ones and nulls between them."""
    docs: list[str | None] = []
    for lang in ("nb", "se", "en"):
        docs += corpus_texts[lang][:15]
        docs += AWKWARD + [None]
    return docs


def write_jsonl(path: Path, texts, key: str = "text", extra: dict | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({key: t, "id": i, **(extra or {})}, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: Path, texts, key: str = "text", row_group_size: int = 7) -> Path:
    pq.write_table(pa.table({key: pa.array(texts, pa.string()), "id": list(range(len(texts)))}), path,
                   row_group_size=row_group_size)
    return path


def write_dataset(path: Path, texts, key: str = "text") -> Path:
    ds = datasets.Dataset.from_dict({key: texts, "id": list(range(len(texts)))},
                                    features=datasets.Features({key: datasets.Value("string"),
                                                                "id": datasets.Value("int64")}))
    ds.save_to_disk(str(path), num_shards=3)  # several Arrow files, read in order
    return path


def _run(inputs, prefix: Path, spm_model: str, **kw):
    kw.setdefault("progress_interval", 0)
    kw.setdefault("chunk_bytes", 20_000)  # several blocks per input
    return preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix), tokenizer=spm_model,
                                       **kw), log=io.StringIO())


def _same_dataset(a: Path, b: Path) -> None:
    for suffix in (".bin", ".idx"):
        assert Path(f"{a}{suffix}").read_bytes() == Path(f"{b}{suffix}").read_bytes(), f"{a}{suffix} != {b}{suffix}"


@pytest.mark.parametrize("workers", [0, 2])
def test_parquet_and_saved_dataset_give_the_jsonl_tokens(tmp_path, documents, spm_model, workers):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", documents)
    parquet = write_parquet(tmp_path / "docs.parquet", documents)
    saved = write_dataset(tmp_path / "docs_dataset", documents)
    results = {name: _run([src], tmp_path / name, spm_model, workers=workers, append_eod=True)
               for name, src in (("jsonl", jsonl), ("parquet", parquet), ("dataset", saved))}
    for name in ("parquet", "dataset"):
        _same_dataset(tmp_path / "jsonl", tmp_path / name)
        assert results[name].documents == results["jsonl"].documents
        assert results[name].files[0].skipped == results["jsonl"].files[0].skipped == 3 * 3  # "", spaces, null
    kept = [t for t in documents if t and not t.isspace()]
    assert IndexedReader(tmp_path / "dataset").num_documents == len(kept) == results["dataset"].documents


@pytest.mark.parametrize("workers", [0, 2])
def test_progress_of_parquet_and_saved_datasets_counts_rows_up_to_100_percent(tmp_path, documents, spm_model,
                                                                               workers):
    # more rows than a record batch holds (1,024), so that each input is read in several
    texts = documents + [f"kort tekst nummer {i}" for i in range(2500)]
    parquet = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=500)
    dataset = write_dataset(tmp_path / "ds", texts)
    parquet_bytes = parquet.stat().st_size
    total = parquet_bytes + sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
    log = io.StringIO()
    preprocess(PreprocessConfig(inputs=[str(parquet), str(dataset)], output_prefix=str(tmp_path / "out"),
                                tokenizer=spm_model, workers=workers, chunk_bytes=3000, progress_interval=1e-9), log=log)
    percentages = progress_percentages(log.getvalue())
    assert percentages == sorted(percentages) and percentages[-1] == 100.0
    # rows read / rows, times the input's bytes on disk: the parquet file ends exactly at its
    # share, and each input moves on as its rows are read
    share = float(f"{parquet_bytes / total:.1%}".rstrip("%"))
    assert share in percentages
    assert len([p for p in percentages if p < share]) >= 2 and len([p for p in percentages if share < p < 100]) >= 2


def test_globs_and_several_inputs_of_mixed_kinds(tmp_path, documents, spm_model):
    """Inputs are read in the order given, each glob sorted: parts in three formats equal the whole."""
    parts = [documents[:20], documents[20:45], documents[45:]]
    write_jsonl(tmp_path / "part-0.jsonl", parts[0])
    write_parquet(tmp_path / "part-1.parquet", parts[1])
    write_parquet(tmp_path / "part-2.parquet", parts[2][:5])
    write_dataset(tmp_path / "rest_dataset", parts[2][5:])
    whole = write_jsonl(tmp_path / "whole.jsonl", documents)
    _run([whole], tmp_path / "whole", spm_model, workers=0)
    result = _run([tmp_path / "part-0.jsonl", str(tmp_path / "part-*.parquet"), tmp_path / "rest_dataset"],
                  tmp_path / "parts", spm_model, workers=2)
    _same_dataset(tmp_path / "whole", tmp_path / "parts")
    assert [Path(f.path).name for f in result.files] == ["part-0.jsonl", "part-1.parquet", "part-2.parquet",
                                                          "rest_dataset"]


def test_json_keys_writes_one_dataset_per_key_as_megatron_lm_names_them(tmp_path, corpus_texts, spm_model):
    texts, titles = corpus_texts["nb"][:10], [t.split("\n")[0][:60] for t in corpus_texts["nn"][:10]]
    src = tmp_path / "docs.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for text, title in zip(texts, titles):
            f.write(json.dumps({"text": text, "title": title}, ensure_ascii=False) + "\n")
    common = ["--tokenizer", spm_model, "--workers", "1", "--progress-interval", "0"]
    p = run_tool_script("preprocess_data", "--input", src, "--output-prefix", tmp_path / "multi", "--json-keys",
                        "text", "title", *common)
    assert p.returncode == 0, p.stderr
    for key in ("text", "title"):
        single = run_tool_script("preprocess_data", "--input", src, "--output-prefix", tmp_path / f"single_{key}",
                                 "--json-key", key, *common)
        assert single.returncode == 0, single.stderr
        _same_dataset(tmp_path / f"multi_{key}_document", tmp_path / f"single_{key}")
    assert not (tmp_path / "multi.bin").exists()
    # parquet columns too, and the sentence level's name
    write_parquet(tmp_path / "docs.parquet", texts)
    p = run_tool_script("preprocess_data", "--input", tmp_path / "docs.parquet", "--output-prefix", tmp_path / "sent",
                        "--json-keys", "text", "--split-sentences", *common)
    assert p.returncode == 0, p.stderr
    assert IndexedReader(tmp_path / "sent_text_sentence").num_documents == len(texts)


def test_json_keys_failure_leaves_no_dataset(tmp_path, corpus_texts, spm_model):
    src = write_jsonl(tmp_path / "docs.jsonl", corpus_texts["nb"][:5])
    p = run_tool_script("preprocess_data", "--input", src, "--output-prefix", tmp_path / "out" / "m", "--json-keys",
                        "text", "body", "--tokenizer", spm_model, "--workers", "0", "--progress-interval", "0")
    failed_cleanly(p, f"{src}: no documents", "missing key 'body'")
    assert sorted(os.listdir(tmp_path / "out")) == []  # 'text' was done, but is not published alone
    p = run_tool_script("preprocess_data", "--input", src, "--output-prefix", tmp_path / "m", "--json-keys", "text",
                        "text", "--tokenizer", spm_model)
    failed_cleanly(p, "--json-keys: 'text' given twice")
    p = run_tool_script("preprocess_data", "--input", src, "--output-prefix", tmp_path / "m", "--json-key", "text",
                        "--json-keys", "text", "--tokenizer", spm_model)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


# ---- bad inputs: exit 2, one line naming the file and the reason, nothing written ----------
def _fails(tmp_path, spm_model, inputs, *fragments, extra=()):
    p = run_tool_script("preprocess_data", "--input", *inputs, "--output-prefix", tmp_path / "out" / "ds",
                        "--tokenizer", spm_model, "--workers", "1", "--progress-interval", "0", *extra)
    line = failed_cleanly(p, *fragments)
    assert not (tmp_path / "out").exists() or sorted(os.listdir(tmp_path / "out")) == []
    return line


def test_glob_matching_nothing(tmp_path, spm_model):
    _fails(tmp_path, spm_model, [str(tmp_path / "nb-*.parquet")], f"--input '{tmp_path / 'nb-*.parquet'}' matches no file")


@pytest.mark.parametrize("damage", ["truncated", "not parquet"])
def test_unreadable_parquet(tmp_path, documents, spm_model, damage):
    good = write_parquet(tmp_path / "good.parquet", documents)
    bad = tmp_path / "bad.parquet"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a parquet file at all\n")
    _fails(tmp_path, spm_model, [good, bad], f"{bad}: not a readable parquet file")


def test_missing_or_non_text_column(tmp_path, documents, spm_model):
    parquet = write_parquet(tmp_path / "docs.parquet", documents, key="content")
    _fails(tmp_path, spm_model, [parquet], f"{parquet}: no column 'text' (columns: content, id)", "--json-key")
    _fails(tmp_path, spm_model, [parquet], f"{parquet}: column 'id' holds int64, not text", extra=["--json-key", "id"])
    saved = write_dataset(tmp_path / "ds", documents, key="content")
    _fails(tmp_path, spm_model, [saved], f"{saved}: no column 'body'", extra=["--json-keys", "content", "body"])


def test_folders_that_are_not_one_saved_dataset(tmp_path, documents, spm_model):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["c"]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    _fails(tmp_path, spm_model, [tmp_path / "dd"], f"{tmp_path / 'dd'}: a DatasetDict with splits train, test",
           f"{tmp_path / 'dd' / 'train'}")
    (tmp_path / "plain").mkdir()
    _fails(tmp_path, spm_model, [tmp_path / "plain"], f"{tmp_path / 'plain'}: a folder, but not a dataset saved")


def test_without_pyarrow_one_line_says_what_to_install(tmp_path, documents, spm_model):
    parquet = write_parquet(tmp_path / "docs.parquet", documents)
    blocked = ("import runpy, sys; sys.modules['pyarrow'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", blocked, str(REPO / "tools" / "preprocess_data.py"), "--input",
                        str(parquet), "--output-prefix", str(tmp_path / "out"), "--tokenizer", spm_model],
                       capture_output=True, text=True, timeout=120)
    failed_cleanly(p, f"reading {parquet} (parquet) needs the optional package 'pyarrow'", "pip install")
