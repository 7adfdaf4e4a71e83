"""Shared fixtures of the data-pipeline tests: the corpus copy in examples/data/corpus and a
small SentencePiece model trained from it once per session (no download); and the parser of
preprocessing's progress lines."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

CORPUS_DIR = Path(__file__).resolve().parents[2] / "examples" / "data" / "corpus"
LANGS = ["nb", "nn", "se", "sv", "da", "en"]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    assert (CORPUS_DIR / "README.md").exists(), "examples/data/corpus (copy of the shared corpus) is missing"
    return CORPUS_DIR


@pytest.fixture(scope="session")
def corpus_texts(corpus_dir) -> dict[str, list[str]]:
    out = {}
    for lang in LANGS:
        with gzip.open(corpus_dir / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            out[lang] = [json.loads(line)["text"] for line in f]
    return out


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_texts) -> str:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    texts = [t for lang in ("nb", "se", "en") for t in corpus_texts[lang][:60]]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(d / "tiny"), vocab_size=800, model_type="bpe",
        num_threads=1, minloglevel=2, max_sentence_length=1_000_000, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return str(d / "tiny.model")


@pytest.fixture(scope="session")
def tokenizer(spm_model):
    from megatron_normistral.tokenizer import load_tokenizer

    return load_tokenizer(spm_model)


_PROGRESS_LINE = re.compile(r"\[preprocess\] (\d+\.\d)% \| [\d,]+ docs \(.*\) \| elapsed \d+:\d\d:\d\d \| "
                            r"ETA (?:\d+:\d\d:\d\d|-)")


def progress_percentages(log: str) -> list[float]:
    """The percentages of a preprocessing log's progress lines, in order (every such line must
    have the full form: percentage, counts and rates, elapsed, ETA)."""
    lines = [line for line in log.splitlines() if line.startswith("[preprocess] ") and " docs (" in line]
    for line in lines:
        assert _PROGRESS_LINE.fullmatch(line), line
    return [float(_PROGRESS_LINE.fullmatch(line).group(1)) for line in lines]
