"""The tokenizer tools' inputs: streaming sampling gives what sampling every document in memory
gave (the same documents, the same order, the same tokenizer), several inputs and globs per
language, parquet files and saved datasets, and their errors."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import datasets  # optional for users (pip install -e .[data]); requirements.txt pins it, so the tests run
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_normistral.testing.tool_runs import failed_cleanly, run_tool_script
from megatron_normistral.tokenizer.corpus import iter_language, read_documents
from megatron_normistral.tokenizer.trainer import (
    SamplingConfig,
    TokenizerTrainingConfig,
    _train_bytelevel,
    _train_sentencepiece,
    _training_lines,
    stream_sample,
    train_tokenizer,
)

from .conftest import LANGS


def in_memory_sample(docs_by_lang: dict[str, list[str]], cfg: SamplingConfig) -> dict[str, list[str]]:
    """The sampling as tools/train_tokenizer.py did it before it streamed: every document of
    every language in memory, then chosen (the definition the streaming version must keep)."""
    if not cfg.share:
        return {lang: docs[::cfg.every.get(lang, 1)] for lang, docs in docs_by_lang.items()}
    shares = {lang: cfg.share.get(lang, 0.0) for lang in docs_by_lang}
    total = sum(shares.values())
    shares = {k: v / total for k, v in shares.items()}
    chars = {lang: sum(len(d) for d in docs) for lang, docs in docs_by_lang.items()}
    budget = min(chars[lang] / s for lang, s in shares.items() if s > 0)
    if cfg.max_chars is not None:
        budget = min(budget, cfg.max_chars)
    rng = random.Random(cfg.seed)
    out = {}
    for lang, docs in docs_by_lang.items():
        target = shares[lang] * budget
        order = list(range(len(docs)))
        rng.shuffle(order)
        picked, got = [], 0
        for i in order:
            if got >= target:
                break
            picked.append(docs[i])
            got += len(docs[i])
        out[lang] = picked
    return out


SAMPLINGS = {
    "every": SamplingConfig(every={"nb": 2, "nn": 3, "sv": 7, "da": 5, "en": 4}),
    "share": SamplingConfig(share={"nb": 0.3, "nn": 0.2, "se": 0.1, "sv": 0.1, "da": 0.1, "en": 0.2}),
    "share-seed-capped": SamplingConfig(share={"nb": 0.5, "se": 0.25, "en": 0.25}, seed=5, max_chars=300_000),
}


@pytest.fixture(scope="module")
def corpus_docs(corpus) -> dict[str, list[str]]:
    return {lang: read_documents(corpus[lang]) for lang in LANGS}


@pytest.mark.parametrize("name", sorted(SAMPLINGS))
def test_streaming_sample_equals_the_in_memory_sample(corpus, corpus_docs, name):
    cfg = SAMPLINGS[name]
    sources = {lang: (lambda path=corpus[lang]: iter_language([path])) for lang in LANGS}
    read: dict[str, int] = {}
    streamed: list[tuple[str, str]] = list(stream_sample(sources, cfg, read))
    expected = in_memory_sample(corpus_docs, cfg)
    assert streamed == [(lang, doc) for lang, docs in expected.items() for doc in docs]  # same documents, same order
    assert read == {lang: len(docs) for lang, docs in corpus_docs.items()}
    assert len(streamed) > 100


@pytest.mark.parametrize("backend,name", [("bytelevel", "share"), ("sentencepiece", "every")])
def test_trained_tokenizer_equals_training_on_the_in_memory_sample(tmp_path, corpus, corpus_docs, backend, name):
    langs = ("nb", "nn", "se")
    cfg = TokenizerTrainingConfig(inputs={lang: str(corpus[lang]) for lang in langs}, output=str(tmp_path / "streamed"),
                                  vocab_size=700, backend=backend, threads=1, verbose=False,
                                  sampling=SamplingConfig(**{k: {lang: v for lang, v in getattr(SAMPLINGS[name], k).items()
                                                                 if lang in langs} for k in ("every", "share")}))
    result = train_tokenizer(cfg)
    sample = in_memory_sample({lang: corpus_docs[lang] for lang in langs}, cfg.sampling)
    (tmp_path / "reference").mkdir()
    train = _train_bytelevel if backend == "bytelevel" else _train_sentencepiece
    train(list(_training_lines(d for docs in sample.values() for d in docs)), cfg, tmp_path / "reference")
    assert (tmp_path / "streamed" / "tokenizer.json").read_bytes() == (tmp_path / "reference" / "tokenizer.json").read_bytes()
    if backend == "sentencepiece":  # its model file also records the temporary folder it was trained in: compare pieces
        import sentencepiece as spm

        streamed, reference = (spm.SentencePieceProcessor(model_file=str(tmp_path / n / "tokenizer.model"))
                               for n in ("streamed", "reference"))
        assert [(streamed.id_to_piece(i), streamed.get_score(i)) for i in range(streamed.get_piece_size())] == \
            [(reference.id_to_piece(i), reference.get_score(i)) for i in range(reference.get_piece_size())]
    assert result.documents == {lang: len(docs) for lang, docs in sample.items()}
    assert result.characters == {lang: sum(map(len, docs)) for lang, docs in sample.items()}


def _write_jsonl(path: Path, texts, key="text") -> Path:
    data = "".join(json.dumps({key: t}, ensure_ascii=False) + "\n" for t in texts)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def nb_in_pieces(tmp_path_factory, corpus_docs) -> tuple[Path, list[str]]:
    """The nb corpus cut into four inputs of four kinds; in the order the flags below name them."""
    d = tmp_path_factory.mktemp("nb-pieces")
    docs = corpus_docs["nb"]
    cut = [0, 50, 90, 150, len(docs)]
    _write_jsonl(d / "nb-0.jsonl.gz", docs[cut[0]:cut[1]])
    _write_jsonl(d / "nb-1.jsonl", docs[cut[1]:cut[2]])
    pq.write_table(pa.table({"text": docs[cut[2]:cut[3]]}), d / "extra.parquet", row_group_size=16)
    datasets.Dataset.from_dict({"text": docs[cut[3]:cut[4]]}).save_to_disk(str(d / "rest"), num_shards=2)
    return d, ["--input", f"nb={d / 'nb-*.jsonl*'}", "--input", f"nb={d / 'extra.parquet'}", "--input", f"nb={d / 'rest'}"]


def test_several_inputs_and_globs_per_language(tmp_path, corpus, nb_in_pieces):
    d, nb_flags = nb_in_pieces
    common = ["--input", f"se={corpus['se']}", "--every", "nb=3", "--vocab-size", "600", "--quiet"]
    p = run_tool_script("train_tokenizer", *nb_flags, *common, "--output", tmp_path / "pieces")
    assert p.returncode == 0, p.stderr
    p = run_tool_script("train_tokenizer", "--input", f"nb={corpus['nb']}", *common, "--output", tmp_path / "whole")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "pieces" / "tokenizer.json").read_bytes() == (tmp_path / "whole" / "tokenizer.json").read_bytes()
    pieces, whole = (json.loads((tmp_path / n / "training.json").read_text()) for n in ("pieces", "whole"))
    assert (pieces["documents"], pieces["characters"]) == (whole["documents"], whole["characters"])
    assert [Path(f).name for f in pieces["inputs"]["nb"]] == ["nb-0.jsonl.gz", "nb-1.jsonl", "extra.parquet", "rest"]
    # fertility reads the same inputs: the same table
    tables = {}
    for name, flags in (("pieces", nb_flags), ("whole", ["--input", f"nb={corpus['nb']}"])):
        p = run_tool_script("fertility", "--tokenizer", tmp_path / "whole", "--label", "t", *flags, "--quiet")
        assert p.returncode == 0, p.stderr
        tables[name] = p.stdout
    assert tables["pieces"] == tables["whole"] and "| t |" in tables["whole"]


def test_json_key_names_the_column(tmp_path, corpus_docs):
    pq.write_table(pa.table({"content": corpus_docs["se"], "n": list(range(len(corpus_docs["se"])))}),
                   tmp_path / "se.parquet")
    p = run_tool_script("train_tokenizer", "--input", f"se={tmp_path / 'se.parquet'}", "--json-key", "content",
                        "--vocab-size", "400", "--quiet", "--output", tmp_path / "tok")
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "tok" / "training.json").read_text())
    assert meta["documents"] == {"se": len(corpus_docs["se"])} and meta["text_key"] == "content"


def test_input_errors_are_one_line(tmp_path, corpus):
    out = tmp_path / "tok"
    pattern = tmp_path / "nb-*.jsonl.gz"
    p = run_tool_script("train_tokenizer", "--input", f"nb={pattern}", "--output", out, "--quiet")
    failed_cleanly(p, f"--input nb='{pattern}' matches no file")
    assert not out.exists()
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "x.parquet")
    p = run_tool_script("fertility", "--tokenizer", "tekken", "--input", f"nb={tmp_path / 'x.parquet'}", "--quiet")
    failed_cleanly(p, f"{tmp_path / 'x.parquet'}: no column 'text' (columns: body)")
    pq.write_table(pa.table({"text": ["a b c", None]}), tmp_path / "null.parquet")
    p = run_tool_script("train_tokenizer", "--input", f"nb={tmp_path / 'null.parquet'}", "--output", out, "--quiet")
    failed_cleanly(p, f"{tmp_path / 'null.parquet'}:2: 'text' is null")
    assert not out.exists()
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 but nothing else")
    p = run_tool_script("train_tokenizer", "--input", f"nb={tmp_path / 'bad.parquet'}", "--output", out, "--quiet")
    failed_cleanly(p, f"{tmp_path / 'bad.parquet'}: not a readable parquet file")
    assert not out.exists()
