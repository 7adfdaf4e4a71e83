"""Tokenizer training: fixed special ids, Hugging Face equivalence, round trips, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from megatron_normistral.tokenizer.corpus import read_documents, split_paragraphs
from megatron_normistral.tokenizer.trainer import (
    MAX_PIECE_CHARS,
    SPECIAL_TOKENS,
    SamplingConfig,
    TokenizerTrainingConfig,
    encode_native,
    hf_roundtrip_normalise,
    train_tokenizer,
)
from megatron_normistral.tokenizer.wrappers import load_tokenizer

from .conftest import REPO

BACKENDS = ("bytelevel", "sentencepiece")


@pytest.fixture(scope="module")
def auto(small_tokenizers):
    from transformers import AutoTokenizer

    return {b: AutoTokenizer.from_pretrained(str(d)) for b, d in small_tokenizers.items()}


@pytest.fixture(scope="module")
def wrapped(small_tokenizers):
    return {b: load_tokenizer(d) for b, d in small_tokenizers.items()}


@pytest.fixture(scope="module")
def held_out_paragraphs(corpus):
    """Paragraphs of odd nb documents (never seen in training) and sv/da/en documents 5, 15, ..."""
    paras = [p for d in read_documents(corpus["nb"])[1::2][:40] for p in split_paragraphs(d)]
    for lang in ("sv", "da", "en", "se"):
        paras += [p for d in read_documents(corpus[lang])[5::10][:20] for p in split_paragraphs(d)]
    return paras


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_ids_and_vocab(small_tokenizers, auto, backend):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_tokenizers[backend] / "tokenizer.json"))
    assert tok.get_vocab_size() == 3000
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    hf = auto[backend]
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    wrapped = load_tokenizer(small_tokenizers[backend])
    assert (wrapped.unk_id, wrapped.bos_id, wrapped.eos_id, wrapped.pad_id, wrapped.mask_id) == (0, 1, 2, 3, 4)
    # regular tokens start at 16 with the 256 single bytes (SentencePiece: in byte order)
    single = [wrapped.token_surface(i) for i in range(16, 16 + 256)]
    assert sorted(single) == [bytes([b]) for b in range(256)]
    if backend == "sentencepiece":
        assert single == [bytes([b]) for b in range(256)]
    assert all(wrapped.token_surface(i) is None for i in range(16))
    if backend == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(small_tokenizers[backend] / "tokenizer.model"))
        assert [sp.id_to_piece(i) for i in range(16)] == list(SPECIAL_TOKENS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_piece_length_and_single_digits(small_tokenizers, backend):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_tokenizers[backend] / "tokenizer.json"))
    wrapped = load_tokenizer(small_tokenizers[backend])
    for piece, i in tok.get_vocab().items():
        if i < 16:
            continue
        assert len(piece) <= MAX_PIECE_CHARS, piece
        surface = wrapped.token_surface(i)
        digits = [c for c in surface if 0x30 <= c <= 0x39]
        if digits:  # a digit only ever stands alone (SentencePiece may keep its space marker)
            assert surface.strip(b" ") in {bytes([d]) for d in digits} and len(digits) == 1, surface


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_tokenizer_encodes_like_native(small_tokenizers, auto, held_out_paragraphs, backend):
    hf = auto[backend]
    native = encode_native(small_tokenizers[backend], held_out_paragraphs)
    got = hf(held_out_paragraphs, add_special_tokens=False)["input_ids"]
    mismatches = [i for i in range(len(native)) if native[i] != got[i]]
    assert not mismatches, held_out_paragraphs[mismatches[0]][:200]
    with_bos = hf(held_out_paragraphs[:20])["input_ids"]
    assert with_bos == [[1] + ids for ids in native[:20]]
    # the native encodings actually use the learned vocabulary
    assert sum(map(len, native)) < 0.6 * sum(len(p.encode()) for p in held_out_paragraphs)


def test_sentencepiece_never_unknown(small_tokenizers, held_out_paragraphs):
    enc = encode_native(small_tokenizers["sentencepiece"], held_out_paragraphs + ["漢字 🙂 ʻ ŋ \x00"])
    assert all(0 not in ids for ids in enc)


text_strategy = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from(list(" \n\t  æøåÆØÅáčđŋšŧž0123456789\u2581ﬁ①")),
    ),
    max_size=60,
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_roundtrip_property(small_tokenizers, auto, wrapped, backend, text):
    assume(not any(s in text or s in hf_roundtrip_normalise(text, "bytelevel") for s in SPECIAL_TOKENS))
    hf = auto[backend]
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == hf_roundtrip_normalise(text, backend)
    assert encode_native(small_tokenizers[backend], [text])[0] == ids
    assert 0 not in ids  # never unknown
    assert wrapped[backend].encode(text) == ids
    assert wrapped[backend].decode(ids) == hf_roundtrip_normalise(text, backend)
    # surfaces spell the (normalised) text: SentencePiece adds its dummy-prefix space
    surfaces = b"".join(wrapped[backend].token_surface(i) for i in ids)
    prefix = b" " if backend == "sentencepiece" and text else b""
    assert surfaces == prefix + hf_roundtrip_normalise(text, backend).encode()


def test_roundtrip_normalisation_is_real(auto):
    # NFKC is the tokenizers library's (Python's unicodedata may be newer)
    assert hf_roundtrip_normalise("\U00010781", "bytelevel") == auto["bytelevel"].decode(
        auto["bytelevel"]("\U00010781", add_special_tokens=False)["input_ids"])
    # the documented normalisation is not the identity: NFKC folds ligatures / circled digits
    hf = auto["bytelevel"]
    assert hf.decode(hf("ﬁ①", add_special_tokens=False)["input_ids"]) == "fi1"
    sp = auto["sentencepiece"]
    assert sp.decode(sp("a\u2581b", add_special_tokens=False)["input_ids"]) == "a b"
    assert sp.decode(sp("ﬁ①", add_special_tokens=False)["input_ids"]) == "ﬁ①"


def test_train_share_sampling_and_errors(tmp_path, corpus):
    cfg = TokenizerTrainingConfig(
        inputs={"nb": str(corpus["nb"]), "se": str(corpus["se"])},
        output=str(tmp_path / "t"),
        vocab_size=600,
        backend="bytelevel",
        sampling=SamplingConfig(share={"nb": 0.5, "se": 0.5}),
        verbose=False,
    )
    result = train_tokenizer(cfg)
    meta = json.loads((tmp_path / "t" / "training.json").read_text())
    assert meta["characters"] == result.characters
    se_chars = sum(len(d) for d in read_documents(corpus["se"]))
    assert result.characters["se"] == se_chars  # the scarce language is used entirely
    assert se_chars <= result.characters["nb"] < se_chars + max(len(d) for d in read_documents(corpus["nb"]))
    cfg.vocab_size = 100
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(cfg)


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_cli_help_and_errors(tmp_path, corpus):
    help_text = _cli("--help").stdout
    for flag in ("--input", "--every", "--share", "--vocab-size", "--backend", "--output", "NFKC", "byte fallback", "<mask>=4"):
        assert flag in help_text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    r = _cli("--input", f"nb={bad}", "--output", str(tmp_path / "o"), "--vocab-size", "400")
    assert r.returncode == 2 and f"{bad}:2" in r.stderr
    r = _cli("--input", "nb", "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "LANG=VALUE" in r.stderr


def test_cli_trains(tmp_path, corpus):
    out = tmp_path / "cli"
    r = _cli("--input", f"se={corpus['se']}", "--input", f"nn={corpus['nn']}", "--every", "nn=4",
             "--vocab-size", "500", "--backend", "sentencepiece", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "training.json").read_text())
    assert meta["documents"]["nn"] == len(read_documents(corpus["nn"])[::4])
    assert meta["vocab_size"] == 500 and (out / "tokenizer.model").exists()
