"""Shared fixtures for the tokenizer tests: the bundled corpus and small trained tokenizers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("NORMISTRAL_TEST_CORPUS", REPO / "examples" / "data" / "corpus"))
LANGS = ("nb", "nn", "se", "sv", "da", "en")


def corpus_file(lang: str) -> Path:
    path = CORPUS / f"{lang}.jsonl.gz"
    if not path.exists():
        pytest.fail(f"bundled corpus file missing: {path}")
    return path


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    return {lang: corpus_file(lang) for lang in LANGS}


def _train(out: Path, backend: str, vocab: int, inputs: dict[str, Path], every: dict[str, int]) -> Path:
    from megatron_normistral.tokenizer.trainer import SamplingConfig, TokenizerTrainingConfig, train_tokenizer

    cfg = TokenizerTrainingConfig(
        inputs={k: str(v) for k, v in inputs.items()},
        output=str(out),
        vocab_size=vocab,
        backend=backend,
        sampling=SamplingConfig(every=every),
        verbose=False,
    )
    train_tokenizer(cfg)
    return out


@pytest.fixture(scope="session")
def small_tokenizers(tmp_path_factory, corpus) -> dict[str, Path]:
    """Both backends, vocabulary 3000, trained on every document of nn/se and the even nb
    documents (odd nb documents stay unseen), plus every 10th sv/da/en document."""
    root = tmp_path_factory.mktemp("tok")
    inputs = {k: corpus[k] for k in LANGS}
    every = {"nb": 2, "sv": 10, "da": 10, "en": 10}
    return {b: _train(root / b, b, 3000, inputs, every) for b in ("bytelevel", "sentencepiece")}
