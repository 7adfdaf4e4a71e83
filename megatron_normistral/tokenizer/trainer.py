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

import array
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from megatron_normistral.tokenizer.corpus import CorpusError, iter_language, language_files
from megatron_normistral.runtime.logs import get_logger, progress

log = get_logger(__name__)

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
    ``max_chars``. Documents are taken in a seeded random order. Give one of the two.

    Both are applied streaming (:func:`stream_sample`): ``every`` in one pass, holding nothing;
    ``share`` in two passes, holding 16 bytes per document of the corpus (each one's length and
    its place in the shuffled order) and one language's sample at a time."""

    every: dict[str, int] = field(default_factory=dict)
    share: dict[str, float] = field(default_factory=dict)
    max_chars: int | None = None
    seed: int = 0


@dataclass
class TokenizerTrainingConfig:
    inputs: dict[str, str | list[str]]  # lang -> input path or glob, or a list of them (JSONL(.gz), parquet, datasets)
    output: str
    vocab_size: int = 51200
    backend: str = "bytelevel"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    min_frequency: int = 2
    threads: int = 0  # 0: all cores
    verbose: bool = True
    text_key: str = "text"  # JSON key / column holding the text


@dataclass
class TrainingResult:
    output: Path
    backend: str
    vocab_size: int
    documents: dict[str, int]
    characters: dict[str, int]
    seconds: float


# A fresh pass over one language's documents, in corpus order (called once per pass).
DocumentSource = Callable[[], Iterable[str]]


def check_sampling(languages: Sequence[str], cfg: SamplingConfig) -> None:
    """The sampling rule fits the languages given (before anything is read)."""
    if cfg.every and cfg.share:
        raise CorpusError("give --every or --share, not both")
    for lang in list(cfg.every) + list(cfg.share):
        if lang not in languages:
            raise CorpusError(f"sampling given for {lang!r}, which has no --input")
    for lang, n in cfg.every.items():
        if n < 1:
            raise CorpusError(f"--every {lang}={n}: must be at least 1")
    if cfg.share:
        shares = {lang: cfg.share.get(lang, 0.0) for lang in languages}
        if any(s < 0 or math.isnan(s) for s in shares.values()) or sum(shares.values()) <= 0:
            raise CorpusError(f"--share: fractions must be non-negative with a positive sum, got {shares}")


def stream_sample(sources: dict[str, DocumentSource], cfg: SamplingConfig,
                  read: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """``(language, document)`` of the sample, languages in the order of ``sources``, each
    language's documents in corpus order (``every``) or in the seeded random order they were
    drawn in (``share``). ``read`` (optional) receives the documents read per language.

    The same sample, in the same order, as choosing from every document held in memory
    (:func:`sample_documents` on lists): ``share`` shuffles each language's document numbers
    with one ``random.Random(seed)`` in language order, exactly as a list of them would be."""
    check_sampling(list(sources), cfg)
    read = read if read is not None else {}
    if not cfg.share:
        for lang, source in sources.items():
            n = cfg.every.get(lang, 1)
            read[lang] = 0
            for i, doc in enumerate(source()):
                read[lang] = i + 1
                if i % n == 0:
                    yield lang, doc
        return
    # Pass 1: every document's length (8 bytes each), no text kept.
    lengths: dict[str, array.array] = {}
    for lang, source in sources.items():
        lengths[lang] = array.array("q", (len(doc) for doc in source()))
        read[lang] = len(lengths[lang])
    shares = {lang: cfg.share.get(lang, 0.0) for lang in sources}
    total_share = sum(shares.values())
    shares = {k: v / total_share for k, v in shares.items()}
    chars = {lang: sum(lengths[lang]) for lang in sources}
    budget = min(chars[lang] / s for lang, s in shares.items() if s > 0)
    if cfg.max_chars is not None:
        budget = min(budget, cfg.max_chars)
    rng = random.Random(cfg.seed)
    for lang, source in sources.items():
        target = shares[lang] * budget
        order = array.array("q", range(len(lengths[lang])))
        rng.shuffle(order)  # the same swaps, from the same generator, as on a list
        place: dict[int, int] = {}  # document number -> its place in the sample
        got = 0
        for i in order:
            if got >= target:
                break
            place[i] = len(place)
            got += lengths[lang][i]
        del order
        if not place:
            continue
        # Pass 2: keep the chosen documents (this language's sample only), then give them in drawn order.
        picked: list[str | None] = [None] * len(place)
        seen = 0
        for i, doc in enumerate(source()):
            seen = i + 1
            where = place.get(i)
            if where is not None:
                picked[where] = doc
        if seen != len(lengths[lang]):
            raise CorpusError(f"the inputs of {lang!r} changed while being read ({len(lengths[lang])} documents, "
                              f"then {seen}); sample a corpus that is not being written to")
        for doc in picked:
            yield lang, doc


def sample_documents(docs_by_lang: dict[str, list[str]], cfg: SamplingConfig) -> dict[str, list[str]]:
    """Apply the sampling rule to documents in memory; returns the chosen documents per language
    (original order for ``every``, seeded random order for ``share``). :func:`stream_sample` on lists."""
    out: dict[str, list[str]] = {lang: [] for lang in docs_by_lang}
    for lang, doc in stream_sample({lang: (lambda docs=docs: docs) for lang, docs in docs_by_lang.items()}, cfg):
        out[lang].append(doc)
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


def _train_bytelevel(lines: Iterable[str], cfg: TokenizerTrainingConfig, out: Path):
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
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines) if isinstance(lines, list) else None)
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


def _train_sentencepiece(lines: Iterable[str], cfg: TokenizerTrainingConfig, out: Path):
    import sentencepiece as spm

    # SentencePiece holds every sentence it trains on anyway, so the sample is gathered first.
    # Fed the streaming reader directly, its peak memory grew with the documents read and
    # skipped (measured: 97 -> 143 MiB for the same sample from 4x the input; from a list, 100
    # and 100). Reading errors then also surface here, as themselves: SentencePiece would report
    # one as a RuntimeError holding the whole traceback.
    lines = list(lines)
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
    files = language_files(cfg.inputs)
    check_sampling(list(files), cfg.sampling)
    # The sample streams from the files into the trainer; only its counts are kept here.
    documents = {lang: 0 for lang in files}
    characters = {lang: 0 for lang in files}
    read: dict[str, int] = {}

    def sampled() -> Iterator[str]:
        sources = {lang: (lambda paths=paths: iter_language(paths, cfg.text_key)) for lang, paths in files.items()}
        for lang, doc in stream_sample(sources, cfg.sampling, read):
            documents[lang] += 1
            characters[lang] += len(doc)
            yield doc

    lines = _training_lines(sampled())
    first = next(lines, None)
    if first is None:
        raise CorpusError("the sample holds no text")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    progress(log, cfg.verbose, f"training {cfg.backend} BPE, vocabulary {cfg.vocab_size}, on the sample as it is read ...")
    trainer = _train_bytelevel if cfg.backend == "bytelevel" else _train_sentencepiece
    tok = trainer(itertools.chain([first], lines), cfg, out)
    for lang in files:
        progress(log, cfg.verbose, f"sample {lang}: {documents[lang]} of {read.get(lang, 0)} documents, "
                          f"{characters[lang]} characters, from {len(files[lang])} file(s)")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    for t, i in SPECIAL_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    result = TrainingResult(out, cfg.backend, vocab_size, documents, characters, time.time() - t0)
    meta = {
        "backend": cfg.backend,
        "requested_vocab_size": cfg.vocab_size,
        "vocab_size": vocab_size,
        "inputs": files,
        "text_key": cfg.text_key,
        "sampling": asdict(cfg.sampling),
        "documents": documents,
        "characters": characters,
        "special_tokens": list(SPECIAL_TOKENS),
        "max_piece_chars": MAX_PIECE_CHARS,
        "normalisation": "NFKC" if cfg.backend == "bytelevel" else "none (U+2581 reads as a space)",
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    progress(log, cfg.verbose, f"wrote {out} (vocabulary {vocab_size}) in {result.seconds:.1f} s")
    if vocab_size < cfg.vocab_size:
        progress(log, cfg.verbose, f"note: the corpus supported only {vocab_size} of the {cfg.vocab_size} requested entries")
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
