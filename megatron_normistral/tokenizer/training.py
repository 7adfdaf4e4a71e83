"""Training NorMistral-style tokenizers.

Two backends, both writing a folder that ``transformers.AutoTokenizer.from_pretrained`` loads
and that encodes exactly like the native model:

``bytelevel`` (the authors' setting)
    Hugging Face ``tokenizers`` byte-level BPE: NFKC normalisation, digits split into single
    digits, pieces of at most 24 characters, BOS added by the post-processor.
    Round trip: ``decode(encode(text)) == NFKC(text)`` with the ``tokenizers`` library's NFKC
    (:func:`hf_roundtrip_normalise`).
``sentencepiece``
    SentencePiece BPE with byte fallback (characters outside the vocabulary become
    ``<0xNN>`` byte pieces, so nothing is ever unknown), no Unicode normalisation, a dummy
    prefix space, single digits, pieces of at most 24 characters. The native model is saved
    as ``tokenizer.model``; ``tokenizer.json`` is an exact Hugging Face equivalent.
    Round trip: ``decode(encode(text)) == text.replace("\\u2581", " ")`` (U+2581 is
    SentencePiece's space symbol).

In both, literal special-token strings in the text (``<s>`` etc.) are matched as specials by
Hugging Face tokenizers; keep them out of raw text.

Special tokens sit at fixed ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<mask>``=4,
``<reserved_5>`` .. ``<reserved_15>``; regular tokens start at 16 (the 256 byte tokens first).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from megatron_normistral.tokenizer.corpus import CorpusError, read_documents

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<mask>") + tuple(
    f"<reserved_{i}>" for i in range(5, 16)
)
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
FIRST_REGULAR_ID = len(SPECIAL_TOKENS)  # 16
MAX_PIECE_CHARS = 24
SP_SPACE = "\u2581"
BACKENDS = ("sentencepiece", "bytelevel")

# The authors' every-N-th-document sampling (NorMistral-11b-warm, arXiv 2412.06484).
AUTHORS_EVERY = {"nb": 20, "nn": 2, "sv": 72, "da": 40, "se": 1, "en": 60}


@dataclass
class SamplingConfig:
    """How documents are drawn from each language's corpus.

    ``every``: keep documents 0, N, 2N, ... of a language (the authors' rule); languages
    absent from ``every`` and ``share`` keep every document.
    ``share``: target fraction of the sample's characters per language (normalised to sum to
    one); the total is as large as possible without any language running out, capped by
    ``max_chars``. Documents are taken in a seeded random order. Give one of the two."""

    every: dict[str, int] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)
    max_chars: int | None = None
    seed: int = 0


@dataclass
class TokenizerTrainingConfig:
    inputs: dict[str, str]  # lang -> JSONL(.gz) path
    output: str
    vocab_size: int = 51200
    backend: str = "bytelevel"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    min_frequency: int = 2
    threads: int = 0  # 0: all cores
    verbose: bool = True


@dataclass
class TrainingResult:
    output: Path
    backend: str
    vocab_size: int
    documents: dict[str, int]
    characters: dict[str, int]
    seconds: float


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def sample_documents(docs_by_lang: dict[str, list[str]], cfg: SamplingConfig) -> dict[str, list[str]]:
    """Apply the sampling rule; returns the chosen documents per language (original order for
    ``every``, seeded random order for ``share``)."""
    if cfg.every and cfg.share:
        raise CorpusError("give --every or --share, not both")
    for lang in list(cfg.every) + list(cfg.share):
        if lang not in docs_by_lang:
            raise CorpusError(f"sampling given for {lang!r}, which has no --input")
    out: dict[str, list[str]] = {}
    if not cfg.share:
        for lang, docs in docs_by_lang.items():
            n = cfg.every.get(lang, 1)
            if n < 1:
                raise CorpusError(f"--every {lang}={n}: must be at least 1")
            out[lang] = docs[::n]
        return out
    shares = {lang: cfg.share.get(lang, 0.0) for lang in docs_by_lang}
    if any(s < 0 or math.isnan(s) for s in shares.values()) or sum(shares.values()) <= 0:
        raise CorpusError(f"--share: fractions must be non-negative with a positive sum, got {shares}")
    total_share = sum(shares.values())
    shares = {k: v / total_share for k, v in shares.items()}
    chars = {lang: sum(len(d) for d in docs) for lang, docs in docs_by_lang.items()}
    budget = min(chars[lang] / s for lang, s in shares.items() if s > 0)
    if cfg.max_chars is not None:
        budget = min(budget, cfg.max_chars)
    rng = random.Random(cfg.seed)
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


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def _tokenizer_config(backend: str) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "normistral_backend": backend,
    }


def _write_hf_files(tok, out: Path, backend: str) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(backend), indent=2) + "\n")
    specials = {k: v for k, v in _tokenizer_config(backend).items() if k.endswith("_token")}
    specials["additional_special_tokens"] = list(SPECIAL_TOKENS[5:])
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def _bos_post_processor():
    from tokenizers import processors

    return processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])


def _train_bytelevel(lines: list[str], cfg: TokenizerTrainingConfig, out: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_PIECE_CHARS,
        show_progress=cfg.verbose,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.post_processor = _bos_post_processor()
    _write_hf_files(tok, out, "bytelevel")
    return tok


def sentencepiece_to_hf(model_file: str | os.PathLike):
    """An exact Hugging Face ``tokenizers`` equivalent of a SentencePiece BPE model trained by
    :func:`train_tokenizer` (identity normalisation, dummy prefix, byte fallback).

    Merges: every split of every piece into two vocabulary pieces, ranked by the piece's
    SentencePiece score (SentencePiece merges the adjacent pair whose result scores highest)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {i for i in range(n) if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i))}
    merges = []
    for i in sorted(normal):
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li not in normal or ri not in normal:
                continue
            merges.append((-sp.get_score(i), i, li, ri, left, right))
    merges.sort()
    model = models.BPE(
        vocab=vocab,
        merges=[(m[4], m[5]) for m in merges],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP_SPACE), normalizers.Replace(" ", SP_SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SP_SPACE), behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = _bos_post_processor()
    return tok


def _train_sentencepiece(lines: list[str], cfg: TokenizerTrainingConfig, out: Path):
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sp")
        kwargs = dict(
            sentence_iterator=iter(lines),
            model_prefix=prefix,
            vocab_size=cfg.vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.9999,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            max_sentencepiece_length=MAX_PIECE_CHARS,
            max_sentence_length=1 << 20,
            input_sentence_size=0,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            control_symbols=list(SPECIAL_TOKENS[4:]),
            hard_vocab_limit=False,
            num_threads=cfg.threads or os.cpu_count() or 1,
            minloglevel=0 if cfg.verbose else 2,
        )
        try:
            spm.SentencePieceTrainer.train(**kwargs)
        except RuntimeError as e:
            raise CorpusError(f"SentencePiece training failed: {e}") from None
        shutil.copy(prefix + ".model", out / "tokenizer.model")
    tok = sentencepiece_to_hf(out / "tokenizer.model")
    _write_hf_files(tok, out, "sentencepiece")
    return tok


def train_tokenizer(cfg: TokenizerTrainingConfig) -> TrainingResult:
    """Read ``cfg.inputs``, sample, train, and write ``cfg.output`` (created if needed):
    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``tokenizer.model`` (sentencepiece backend) and ``training.json`` (what was done)."""
    t0 = time.time()
    if cfg.backend not in BACKENDS:
        raise CorpusError(f"--backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if not cfg.inputs:
        raise CorpusError("no --input given")
    min_vocab = FIRST_REGULAR_ID + 256 + 1
    if cfg.vocab_size < min_vocab:
        raise CorpusError(f"--vocab-size {cfg.vocab_size} is too small (at least {min_vocab}: 16 specials + 256 bytes + 1)")
    docs_by_lang = {}
    for lang, path in cfg.inputs.items():
        docs_by_lang[lang] = read_documents(path)
        _log(cfg.verbose, f"read {lang}: {len(docs_by_lang[lang])} documents from {path}")
    sampled = sample_documents(docs_by_lang, cfg.sampling)
    documents = {k: len(v) for k, v in sampled.items()}
    characters = {k: sum(len(d) for d in v) for k, v in sampled.items()}
    for lang in sampled:
        _log(cfg.verbose, f"sample {lang}: {documents[lang]} documents, {characters[lang]} characters")
    lines = list(_training_lines(d for docs in sampled.values() for d in docs))
    if not lines:
        raise CorpusError("the sample holds no text")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _log(cfg.verbose, f"training {cfg.backend} BPE, vocabulary {cfg.vocab_size}, on {len(lines)} lines ...")
    trainer = _train_bytelevel if cfg.backend == "bytelevel" else _train_sentencepiece
    tok = trainer(lines, cfg, out)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    for t, i in SPECIAL_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    result = TrainingResult(out, cfg.backend, vocab_size, documents, characters, time.time() - t0)
    meta = {
        "backend": cfg.backend,
        "requested_vocab_size": cfg.vocab_size,
        "vocab_size": vocab_size,
        "inputs": cfg.inputs,
        "sampling": asdict(cfg.sampling),
        "documents": documents,
        "characters": characters,
        "special_tokens": list(SPECIAL_TOKENS),
        "max_piece_chars": MAX_PIECE_CHARS,
        "normalisation": "NFKC" if cfg.backend == "bytelevel" else "none (U+2581 reads as a space)",
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    _log(cfg.verbose, f"wrote {out} (vocabulary {vocab_size}) in {result.seconds:.1f} s")
    if vocab_size < cfg.vocab_size:
        _log(cfg.verbose, f"note: the corpus supported only {vocab_size} of the {cfg.vocab_size} requested entries")
    return result


def hf_roundtrip_normalise(text: str, backend: str) -> str:
    """What ``decode(encode(text))`` returns for a tokenizer of this backend. NFKC is the
    ``tokenizers`` library's (its Unicode tables can differ from Python's ``unicodedata`` for
    recently added characters, e.g. U+10781), so use this function, not ``unicodedata``."""
    if backend == "bytelevel":
        from tokenizers import normalizers

        return normalizers.NFKC().normalize_str(text)
    return text.replace(SP_SPACE, " ")


def encode_native(out_dir: str | os.PathLike, texts: Sequence[str]) -> list[list[int]]:
    """Encode with the native model of a trained folder (SentencePiece ``tokenizer.model`` if
    there is one, else ``tokenizer.json``), without BOS/EOS."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
        return sp.encode(list(texts))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
