"""The segment cache used by preprocessing gives exactly the tokenizer's own encoding, for every
kind of tokenizer it accepts, and its checks refuse settings where it would not."""
from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_normistral.tokenizer import load_tokenizer
from megatron_normistral.tokenizer.segment_cache import (
    DROP_SPACE,
    KEEP_SPACE,
    SegmentCachedEncoder,
    SegmentCacheNotExact,
    segmenter_for,
)

from .conftest import LANGS

# Characters and runs where whitespace handling, normalisation or pre-tokenisation could read
# across a segment boundary.
AWKWARD = ["a", "b", "Z", "ø", "Å", "é", "7", "42", " ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\u00a0",
           "\u3000", "\u2009", "\u0301", "\u0308", "\u00a8", "\u037a", "\u00b4", "\u200b", "\u200d", "\x07",
           "\ufb01", "\uff21", "\u2460", ",", ".", "-", "'", "'s", "\"", "(", ")", "/", "_", "\u2581", "\U0001f600",
           "<s>", "</s>", "ᚠ", "日本", "ﾊ"]

awkward_text = st.lists(st.sampled_from(AWKWARD), max_size=40).map("".join)


def _train_sentencepiece(path, texts, **options):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(path), vocab_size=600,
                                   num_threads=1, minloglevel=2, max_sentence_length=1_000_000, **options)
    return load_tokenizer(str(path) + ".model")


@pytest.fixture(scope="module")
def corpus_documents(corpus) -> list[str]:
    docs = []
    for lang in LANGS:
        with gzip.open(corpus[lang], "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs


@pytest.fixture(scope="module")
def accepted(tmp_path_factory, small_tokenizers, corpus_documents) -> dict:
    """Every kind of tokenizer the cache accepts, in the settings users meet."""
    d = tmp_path_factory.mktemp("segment_spm")
    sample = corpus_documents[::40]
    return {
        # Megatron-LM's usual model: BPE, nmt_nfkc, whitespace cleanup on, byte fallback
        "spm_bpe_nfkc": _train_sentencepiece(d / "bpe", sample, model_type="bpe", byte_fallback=True, split_digits=True),
        # case-folding NFKC, no byte fallback (unknown characters become <unk>)
        "spm_bpe_cf": _train_sentencepiece(d / "cf", sample, model_type="bpe", normalization_rule_name="nmt_nfkc_cf"),
        # our trainer's SentencePiece: identity normalisation, whitespace kept as written
        "spm_ours": load_tokenizer(small_tokenizers["sentencepiece"] / "tokenizer.model"),
        # our trainer's byte-level BPE (tokenizer.json: NFKC, Digits + ByteLevel)
        "bytelevel_ours": load_tokenizer(small_tokenizers["bytelevel"]),
    }


KINDS = ["spm_bpe_nfkc", "spm_bpe_cf", "spm_ours", "bytelevel_ours"]


@pytest.mark.parametrize("kind", KINDS)
def test_whole_corpus_encodes_identically(accepted, corpus_documents, kind):
    tok = accepted[kind]
    pattern, _ = segmenter_for(tok)
    assert pattern is (KEEP_SPACE if kind.startswith("bytelevel") else DROP_SPACE)
    cached = SegmentCachedEncoder(tok)
    mismatches = [i for i, text in enumerate(corpus_documents) if cached.encode(text) != tok.encode(text)]
    assert not mismatches, f"{len(mismatches)} documents differ, first {mismatches[:5]}"
    assert cached.hits > cached.misses  # the cache is actually used


@pytest.mark.parametrize("kind", KINDS)
def test_awkward_text_encodes_identically(accepted, kind):
    tok = accepted[kind]
    cached = SegmentCachedEncoder(tok)  # shared across examples: segments met in other contexts are reused

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(awkward_text)
    def check(text):
        assert cached.encode(text) == tok.encode(text), repr(text)

    check()


def test_cache_stays_bounded_and_exact(accepted, corpus_documents):
    tok = accepted["spm_bpe_nfkc"]
    cached = SegmentCachedEncoder(tok, max_entries=50, max_chars=8)
    for text in corpus_documents[:200]:
        assert cached.encode(text) == tok.encode(text)
        assert len(cached) <= 100
    assert cached.hits > 0
    kept = {**cached._current, **cached._previous}
    assert kept and max(map(len, kept)) <= 8


def _concatenated(tok, pattern, text):
    return [i for segment in pattern.split(text) for i in tok.encode(segment)]


def test_refused_sentencepiece_settings_would_change_tokens(tmp_path, corpus_documents):
    sample = corpus_documents[::40]
    no_prefix = _train_sentencepiece(tmp_path / "np", sample, model_type="bpe", add_dummy_prefix=False)
    pattern, why = segmenter_for(no_prefix)
    assert pattern is None and "dummy prefix" in why
    text = "Dette er en setning om Noreg."
    assert _concatenated(no_prefix, DROP_SPACE, text) != no_prefix.encode(text)
    with pytest.raises(SegmentCacheNotExact, match="not exact"):
        SegmentCachedEncoder(no_prefix)

    crossing = _train_sentencepiece(tmp_path / "cross", sample * 3, model_type="bpe", split_by_whitespace=False)
    pattern, why = segmenter_for(crossing)
    assert pattern is None and "holds a space" in why
    assert any(_concatenated(crossing, DROP_SPACE, t) != crossing.encode(t) for t in sample)

    # Unigram: equal-score segmentations are told apart by rounding of scores summed from the
    # start of the text, so a word can split differently after different prefixes.
    unigram = _train_sentencepiece(tmp_path / "uni", sample, model_type="unigram",
                                   normalization_rule_name="nmt_nfkc_cf")
    pattern, why = segmenter_for(unigram)
    assert pattern is None and "not a BPE model" in why
    assert any(_concatenated(unigram, DROP_SPACE, t) != unigram.encode(t) for t in corpus_documents)


def test_refused_hugging_face_settings(tmp_path, small_tokenizers):
    spec = json.loads((small_tokenizers["bytelevel"] / "tokenizer.json").read_text(encoding="utf-8"))
    eos = next(t for t in spec["added_tokens"] if t["content"] == "</s>")
    eos["rstrip"] = True  # the token swallows the whitespace after it
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    stripping = load_tokenizer(tmp_path)
    pattern, why = segmenter_for(stripping)
    assert pattern is None and "strips around it" in why
    text = "Slutt </s> neste dokument"
    assert _concatenated(stripping, KEEP_SPACE, text) != stripping.encode(text)
    # our SentencePiece backend's tokenizer.json (Metaspace) and Tekken are not cached
    assert segmenter_for(load_tokenizer(small_tokenizers["sentencepiece"]))[0] is None
    assert segmenter_for(load_tokenizer("tekken"))[0] is None
