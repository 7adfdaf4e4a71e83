"""Fertility: the counting rule, the tables, the chart, the CLI."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_normistral.tokenizer.corpus import read_documents, split_paragraphs
from megatron_normistral.tokenizer.fertility import (
    FERTILITY_RULE,
    FertilityConfig,
    count_fertility,
    measure_fertility,
)
from megatron_normistral.tokenizer.wrappers import Tokenizer, load_tokenizer

from .conftest import REPO


class CharTokenizer(Tokenizer):
    """One token per character: fertility = characters per word, computable by hand."""

    name = "chars"

    def encode(self, text):
        return [ord(c) for c in text]


@settings(max_examples=60)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab cø\n")), max_size=30), max_size=8))
def test_count_matches_hand_computation(texts):
    paras = [p for t in texts for p in split_paragraphs(t)]
    cell = count_fertility(CharTokenizer(), paras, batch=3)
    assert cell.tokens == sum(len(p) for p in paras)
    assert cell.words == sum(len(p.split()) for p in paras)


def test_tekken_counts_match_direct_encoding(tmp_path, corpus):
    docs = read_documents(corpus["se"])[:5]
    tok = load_tokenizer("tekken")
    cfg = FertilityConfig(tokenizers=["tekken"], inputs={"se": str(corpus["se"])}, max_documents=5, verbose=False)
    res = measure_fertility(cfg)
    paras = [p.strip() for d in docs for p in re.split(r"\n\s*\n", d) if p.strip()]
    tokens = sum(len(tok._tok.encode(p, bos=False, eos=False)) for p in paras)
    words = sum(len(p.split()) for p in paras)
    assert (res.cells[("tekken", "se")].tokens, res.cells[("tekken", "se")].words) == (tokens, words)
    assert res.fertility("tekken", "se") == pytest.approx(tokens / words)


def test_cli_tables_chart_and_rule(tmp_path, corpus, small_tokenizers):
    md, png = tmp_path / "f.md", tmp_path / "f.png"
    args = [sys.executable, str(REPO / "tools" / "fertility.py"), "--tokenizer", "tekken",
            "--tokenizer", str(small_tokenizers["bytelevel"]), "--label", "tekken", "--label", "ours",
            "--input", f"nn={corpus['nn']}", "--input", f"en={corpus['en']}", "--max-documents", "40",
            "--markdown", str(md), "--plot", str(png), "--quiet"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    text = md.read_text()
    assert FERTILITY_RULE in text and text == r.stdout.rstrip("\n") + "\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    res = measure_fertility(FertilityConfig(
        tokenizers=["tekken", str(small_tokenizers["bytelevel"])], labels=["tekken", "ours"],
        inputs={"nn": str(corpus["nn"]), "en": str(corpus["en"])}, max_documents=40, verbose=False))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ours")}
    assert f"{res.fertility('ours', 'nn'):.3f}" in text
    assert f"{res.relative_length('ours', 'nn'):.3f}" in text and rows
    # a tokenizer trained on Norwegian needs fewer tokens per Nynorsk word than Tekken
    assert res.fertility("ours", "nn") < 0.95 * res.fertility("tekken", "nn")
    assert res.relative_length("tekken", "en") == 1.0
    help_text = subprocess.run(args[:2] + ["--help"], capture_output=True, text=True).stdout
    assert "total tokens / total words" in help_text and "--markdown" in help_text and "--plot" in help_text


def test_cli_errors(tmp_path, corpus):
    tool = str(REPO / "tools" / "fertility.py")
    r = subprocess.run([sys.executable, tool, "--tokenizer", str(tmp_path / "nope"), "--input", f"se={corpus['se']}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    r = subprocess.run([sys.executable, tool, "--tokenizer", "tekken", "--input", f"se={bad}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"{bad}:2" in r.stderr


@pytest.mark.parametrize("content,why", [("", "it holds no documents"),
                                         ('{"text": ""}\n{"text": "  \\n\\n "}\n', "its 2 documents are empty")])
def test_input_without_words_fails_in_one_line(tmp_path, content, why):
    """Fertility of no words would be 0 / 0: a table of nan with exit 0 before; now one line, exit 2."""
    from megatron_normistral.testing.tool_runs import failed_cleanly, run_tool_script

    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    p = run_tool_script("fertility", "--tokenizer", "tekken", "--input", f"nb={empty}", "--quiet")
    failed_cleanly(p, f"{empty} (--input nb): no words to measure", why)
    assert "nan" not in p.stdout
