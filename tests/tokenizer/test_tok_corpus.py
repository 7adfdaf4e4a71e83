"""Corpus reading, paragraph splitting, flag parsing and document sampling."""
from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_normistral.tokenizer.corpus import (
    CorpusError,
    iter_documents,
    parse_assignments,
    read_documents,
    split_paragraphs,
)
from megatron_normistral.tokenizer.trainer import SamplingConfig, sample_documents


def test_reads_bundled_corpus(corpus):
    docs = read_documents(corpus["se"])
    assert len(docs) > 10 and all(isinstance(d, str) and d for d in docs)
    with gzip.open(corpus["se"], "rt", encoding="utf-8") as f:
        direct = [json.loads(line)["text"] for line in f if line.strip()]
    assert docs == direct


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', "{not json"], ":2: not valid JSON"),
        (['{"text": "a"}', '{"body": "b"}'], ":2: no 'text' field"),
        (['[1, 2]'], ":1: expected a JSON object"),
        (['{"text": 5}'], ":1: 'text' is int"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError) as e:
        list(iter_documents(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_and_gzip(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        read_documents(tmp_path / "nope.jsonl.gz")
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"text": "hei"}\n\n{"text": "du"}\n')
    assert read_documents(path) == ["hei", "du"]


@given(st.text(alphabet=st.sampled_from(list("ab ø\n\t\r")), max_size=80))
def test_paragraph_split_keeps_every_word(text):
    paras = split_paragraphs(text)
    assert sum(len(p.split()) for p in paras) == len(text.split())
    assert all(p == p.strip() and p for p in paras)
    assert all("\n\n" not in p for p in paras)
    assert [w for p in paras for w in p.split()] == text.split()


def test_parse_assignments():
    assert parse_assignments(["nb=3", "nn=1"], "--every", int) == {"nb": 3, "nn": 1}
    for bad in (["nb"], ["=3"], ["nb="], ["nb=1", "nb=2"], ["nb=x"]):
        with pytest.raises(CorpusError, match="--every"):
            parse_assignments(bad, "--every", int)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=60), st.integers(1, 7))
def test_every_nth_document(lengths, n):
    docs = {"nb": [f"d{i}" + "x" * k for i, k in enumerate(lengths)], "nn": ["y"]}
    out = sample_documents(docs, SamplingConfig(every={"nb": n}))
    assert out["nb"] == [docs["nb"][i] for i in range(0, len(lengths), n)]
    assert out["nn"] == ["y"]


@settings(max_examples=50)
@given(
    st.lists(st.integers(1, 20), min_size=5, max_size=80),
    st.lists(st.integers(1, 20), min_size=5, max_size=80),
    st.floats(0.1, 0.9),
)
def test_share_sampling_hits_target(a_lens, b_lens, share_a):
    docs = {"a": ["a" * k for k in a_lens], "b": ["b" * k for k in b_lens]}
    out = sample_documents(docs, SamplingConfig(share={"a": share_a, "b": 1 - share_a}, seed=1))
    chars = {k: sum(map(len, v)) for k, v in out.items()}
    total_a, total_b = sum(a_lens), sum(b_lens)
    budget = min(total_a / share_a, total_b / (1 - share_a))
    # each language reaches its target and overshoots by less than one document
    for lang, share, total in (("a", share_a, total_a), ("b", 1 - share_a, total_b)):
        target = share * budget
        assert target - 1e-6 <= chars[lang] <= min(total, target + 20)
    # the scarcer language (relative to its share) is used entirely
    assert chars["a"] == total_a or chars["b"] == total_b or abs(total_a / share_a - total_b / (1 - share_a)) < 1e-6


def test_sampling_errors():
    docs = {"nb": ["a"]}
    with pytest.raises(CorpusError, match="not both"):
        sample_documents(docs, SamplingConfig(every={"nb": 2}, share={"nb": 1.0}))
    with pytest.raises(CorpusError, match="no --input"):
        sample_documents(docs, SamplingConfig(every={"sv": 2}))
    with pytest.raises(CorpusError, match="at least 1"):
        sample_documents(docs, SamplingConfig(every={"nb": 0}))
