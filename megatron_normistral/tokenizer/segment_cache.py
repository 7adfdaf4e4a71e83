"""Exact encoding of a corpus with a cache of repeated segments (the preprocessing speed-up).

Natural-language text repeats its words: a cache from segment to token ids skips the
tokenizer for most of them, the way Hugging Face's BPE and tiktoken cache words internally.
SentencePiece has no such cache, and the per-call cost of SentencePiece and of a Hugging Face
byte-level BPE dominated preprocessing here.

Text is cut at every single ASCII space whose two neighbours are word characters or ASCII
punctuation; each segment is encoded alone (cached) and the encodings are concatenated. Where
the space goes depends on the tokenizer, and :func:`segmenter_for` accepts only tokenizers
for which the concatenation provably equals encoding the whole text:

**SentencePiece BPE** (the space is dropped and comes back as the next segment's dummy
prefix): the normaliser is a built-in rule set (``nmt_nfkc``, ``nfkc``, their ``_cf`` forms or
``identity``), which map characters one by one or compose a letter with its combining marks,
so no rule reads across a space between two word characters; whitespace is escaped to U+2581
and the dummy prefix is on, so the dropped space returns as the segment's dummy prefix, and
whitespace removal at the segment ends matches the collapse of a whitespace run in the whole
text; whitespace is a prefix (``treat_whitespace_as_suffix`` off) and no piece holds U+2581 or
a space after its first character, so no piece crosses a segment start, and BPE's merges (discrete, ties broken by
position) split into the segments' own; the piece U+2581 exists, so unknown runs are never
merged across a boundary. Unigram models are refused: their Viterbi search breaks ties
between equal-score segmentations (``p`` + ``pp`` or ``pp`` + ``p``) by floating-point
rounding of scores summed from the start of the text, so a word's pieces can depend on what
precedes it (the test shows such a word in the bundled corpus).

**Hugging Face byte-level BPE** (the space starts the next segment): the normaliser is
Unicode normalisation (NFC/NFD/NFKC/NFKD) or none, split-safe at a space (a space composes
with nothing); the pre-tokeniser is ``ByteLevel`` with its GPT-2 regex and no added prefix
space, optionally after ``Digits``; the regex never puts a space after a non-space inside a
pre-token, so a pre-token ends before the cut space and the next one is matched from the same
position in the same remaining text; the model is BPE without dropout, merging within
pre-tokens; added tokens hold no whitespace and strip nothing around them.

Tekken (tiktoken) is not cached: it caches internally and measured no faster with it.
The tests compare cached and plain encodings on the whole bundled corpus and on random text
built from awkward characters (several spaces, tabs, newlines, no-break and ideographic
spaces, combining marks, zero-width and control characters, characters whose NFKC form holds
a space) for each accepted kind, and show a refused setting giving different tokens.
"""
from __future__ import annotations

import json
import re

_NEIGHBOUR = r"[\w!-~]"  # a word character or ASCII punctuation
# SentencePiece: cut on the space, dropping it. Byte-level: cut before the space, keeping it.
DROP_SPACE = re.compile(f"(?<={_NEIGHBOUR}) (?={_NEIGHBOUR})")
KEEP_SPACE = re.compile(f"(?<={_NEIGHBOUR})(?= {_NEIGHBOUR})")

_SP_NORMALIZERS = {"nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"}
_HF_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_SPACE_SYMBOL = "\u2581"


def segmenter_for(tokenizer) -> tuple[re.Pattern | None, str]:
    """(cut pattern, what it relies on) when segment-wise encoding is exact for this
    tokenizer, else (None, why not)."""
    from megatron_normistral.tokenizer.wrappers import HFTokenizer, SentencePieceTokenizer

    if isinstance(tokenizer, SentencePieceTokenizer):
        why_not = _sentencepiece_why_not(tokenizer.model_proto())
        return (None, why_not) if why_not else (DROP_SPACE, "SentencePiece: space dropped, restored as dummy prefix")
    if isinstance(tokenizer, HFTokenizer):
        why_not = _hf_why_not(json.loads(tokenizer.path.read_text(encoding="utf-8")))
        return (None, why_not) if why_not else (KEEP_SPACE, "byte-level BPE: space starts the next segment")
    return None, f"{type(tokenizer).__name__} is not cached (only SentencePiece and byte-level BPE are)"


def _sentencepiece_why_not(proto) -> str | None:
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return "not a BPE model (unigram ties depend on the text before a word)"
    norm = proto.normalizer_spec
    if norm.name not in _SP_NORMALIZERS:
        return f"normaliser {norm.name!r} is not a built-in rule set"
    if not norm.add_dummy_prefix:
        return "no dummy prefix"
    if not norm.escape_whitespaces:
        return "whitespace is not escaped to U+2581"
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return "whitespace is a suffix"
    pieces = [p.piece for p in proto.pieces]
    if _SPACE_SYMBOL not in pieces:
        return "no U+2581 piece"
    crossing = next((p for p in pieces if _SPACE_SYMBOL in p[1:] or " " in p), None)
    if crossing is not None:
        return f"piece {crossing!r} holds a space after its start"
    return None


def _hf_why_not(spec: dict) -> str | None:
    norm = spec.get("normalizer")
    norms = (norm.get("normalizers", []) if norm and norm["type"] == "Sequence" else [norm]) if norm else []
    for n in norms:
        if n["type"] not in _HF_NORMALIZERS:
            return f"normaliser {n['type']} is not Unicode normalisation"
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in pres):
        return "no ByteLevel pre-tokeniser"
    for p in pres:
        if p.get("type") == "ByteLevel":
            if not p.get("use_regex", True) or p.get("add_prefix_space", False):
                return "ByteLevel without its regex or with an added prefix space"
        elif p.get("type") != "Digits":
            return f"pre-tokeniser {p.get('type')} besides ByteLevel/Digits"
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return "model is not BPE without dropout"
    for t in spec.get("added_tokens", []):
        if any(ch.isspace() for ch in t["content"]) or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t['content']!r} holds whitespace or strips around it"
    return None


class SegmentCacheNotExact(ValueError):
    """The tokenizer fails a check of :func:`segmenter_for`; ``reason`` says which."""

    def __init__(self, tokenizer_name: str, reason: str):
        super().__init__(f"segment cache is not exact for {tokenizer_name}: {reason}")
        self.reason = reason


class SegmentCachedEncoder:
    """``encode(text) == tokenizer.encode(text)``, with encodings of repeated segments reused.

    Two generations keep memory bounded whatever the corpus size: new segments go into the
    current one; when it holds ``max_entries`` it becomes the previous one and the older is
    dropped. A segment found in the previous generation moves back to the current one, so
    frequent words survive every turnover and one-off segments (most of the distinct ones)
    fall out. At most ``2 * max_entries`` segments are held (about 55 MB at the default), none
    longer than ``max_chars`` (a long run without spaces, such as a base64 blob, is encoded
    but not kept: it would rarely come again and could be large).
    """

    def __init__(self, tokenizer, max_entries: int = 1 << 17, max_chars: int = 64):
        pattern, why = segmenter_for(tokenizer)
        if pattern is None:
            raise SegmentCacheNotExact(tokenizer.name, why)
        self.basis = why  # what exactness relies on, for the log
        self.tokenizer = tokenizer
        self._split = pattern.split
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._current: dict[str, tuple[int, ...]] = {}
        self._previous: dict[str, tuple[int, ...]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def encode(self, text: str) -> list[int]:
        current = self._current
        segments = self._split(text)
        out: list[int] = []
        extend = out.extend
        misses = 0
        for seg in segments:
            ids = current.get(seg)
            if ids is None:
                ids = self._previous.pop(seg, None)
                if ids is None:
                    misses += 1
                    encoded = self.tokenizer.encode(seg)
                    if len(seg) > self.max_chars:
                        extend(encoded)
                        continue
                    ids = tuple(encoded)
                if len(current) >= self.max_entries:
                    self._previous, self._current = current, {}
                    current = self._current
                current[seg] = ids
            extend(ids)
        self.misses += misses
        self.hits += len(segments) - misses
        return out
