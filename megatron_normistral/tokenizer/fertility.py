"""Tokenizer fertility: subword tokens per word.

Rule (stated in every output): each document is split into paragraphs at blank lines; a
paragraph's words are its whitespace-separated tokens (``len(paragraph.split())``); its tokens
are the tokenizer's encoding of the paragraph without BOS/EOS. Fertility of a tokenizer on a
language = total tokens / total words over all paragraphs.

Relative sequence length vs the first (reference) tokenizer = fertility / reference fertility
(the same text needs that many times as many positions). Inference cost ratio: per-token
compute (weights, MLP) scales linearly with that ratio; attention over a document scales with
its square; both are reported.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from megatron_normistral.tokenizer.corpus import CorpusError, iter_language, language_files, split_paragraphs
from megatron_normistral.tokenizer.wrappers import Tokenizer, load_tokenizer
from megatron_normistral.runtime.logs import get_logger, progress

log = get_logger(__name__)

FERTILITY_RULE = (
    "fertility = total tokens / total words; words = whitespace-separated tokens of each paragraph "
    "(paragraphs = document text split at blank lines); tokens = the tokenizer's encoding of each "
    "paragraph without BOS/EOS"
)


@dataclass
class FertilityConfig:
    tokenizers: list[str]  # load_tokenizer specs; the first is the reference
    inputs: dict[str, str | list[str]]  # lang -> input path or glob, or a list of them (JSONL(.gz), parquet, datasets)
    max_documents: int | None = None  # per language, first N documents
    labels: list[str] | None = None
    verbose: bool = True
    text_key: str = "text"  # JSON key / column holding the text


@dataclass
class FertilityCell:
    tokens: int
    words: int

    @property
    def fertility(self) -> float:
        return self.tokens / self.words if self.words else float("nan")


@dataclass
class FertilityResult:
    tokenizers: list[str]  # labels
    languages: list[str]
    cells: dict[tuple[str, str], FertilityCell] = field(default_factory=dict)  # (tokenizer, lang)

    def fertility(self, tokenizer: str, lang: str) -> float:
        return self.cells[(tokenizer, lang)].fertility

    def relative_length(self, tokenizer: str, lang: str) -> float:
        """Sequence length relative to the first tokenizer for the same text."""
        return self.fertility(tokenizer, lang) / self.fertility(self.tokenizers[0], lang)

    def to_markdown(self) -> str:
        ref = self.tokenizers[0]
        lines = [
            f"Fertility (subword tokens per word). Rule: {FERTILITY_RULE}.",
            "",
            "| tokenizer | " + " | ".join(self.languages) + " |",
            "|---|" + "---:|" * len(self.languages),
        ]
        for t in self.tokenizers:
            lines.append(f"| {t} | " + " | ".join(f"{self.fertility(t, l):.3f}" for l in self.languages) + " |")
        lines += [
            "",
            f"Relative sequence length vs `{ref}` (= fertility ratio; per-token inference cost scales the same; "
            "attention cost with its square in brackets):",
            "",
            "| tokenizer | " + " | ".join(self.languages) + " |",
            "|---|" + "---:|" * len(self.languages),
        ]
        for t in self.tokenizers:
            cells = []
            for l in self.languages:
                r = self.relative_length(t, l)
                cells.append(f"{r:.3f} ({r * r:.3f})")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines += ["", "| language | words | " + " | ".join(f"tokens ({t})" for t in self.tokenizers) + " |",
                  "|---|---:|" + "---:|" * len(self.tokenizers)]
        for l in self.languages:
            words = self.cells[(ref, l)].words
            lines.append(f"| {l} | {words} | " + " | ".join(str(self.cells[(t, l)].tokens) for t in self.tokenizers) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        x = np.arange(len(self.languages))
        width = 0.8 / len(self.tokenizers)
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(self.languages), 4))
        for k, t in enumerate(self.tokenizers):
            vals = [self.fertility(t, l) for l in self.languages]
            bars = ax.bar(x + (k - (len(self.tokenizers) - 1) / 2) * width, vals, width, label=t)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, self.languages)
        ax.set_ylabel("tokens per word")
        ax.set_title("Tokenizer fertility (lower is better)")
        ax.legend(fontsize=8)
        fig.text(0.01, 0.01, "tokens (no BOS/EOS) / whitespace words, per paragraph", fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def count_fertility(tok: Tokenizer, paragraphs: Sequence[str], batch: int = 512) -> FertilityCell:
    return count_fertilities([tok], paragraphs, batch)[0]


def count_fertilities(tokenizers: Sequence[Tokenizer], paragraphs: Iterable[str], batch: int = 512) -> list[FertilityCell]:
    """One :class:`FertilityCell` per tokenizer, reading ``paragraphs`` once, ``batch`` at a time."""
    cells = [FertilityCell(0, 0) for _ in tokenizers]
    it = iter(paragraphs)
    while chunk := list(itertools.islice(it, batch)):
        words = sum(len(p.split()) for p in chunk)
        for tok, cell in zip(tokenizers, cells):
            cell.tokens += sum(len(ids) for ids in tok.encode_batch(chunk))
            cell.words += words
    return cells


class _Counted:
    """Iterates ``items`` once, counting them."""

    def __init__(self, items: Iterable):
        self.items, self.count = items, 0

    def __iter__(self):
        for item in self.items:
            self.count += 1
            yield item


def _label(spec: str) -> str:
    if spec == "tekken" or spec.startswith("tekken:"):
        return "tekken"
    p = Path(spec)
    return p.name if p.name not in ("tokenizer.json", "tokenizer.model") else p.parent.name


def measure_fertility(cfg: FertilityConfig) -> FertilityResult:
    """Fertility of every tokenizer on every language (see :data:`FERTILITY_RULE`)."""
    if not cfg.tokenizers:
        raise ValueError("no tokenizer given")
    if not cfg.inputs:
        raise ValueError("no input given")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ValueError(f"--max-documents {cfg.max_documents}: must be >= 1")
    labels = list(cfg.labels) if cfg.labels else [_label(s) for s in cfg.tokenizers]
    if len(labels) != len(cfg.tokenizers):
        raise ValueError(f"{len(labels)} labels for {len(cfg.tokenizers)} tokenizers")
    seen: dict[str, int] = {}
    for i, l in enumerate(labels):  # make labels unique
        if l in seen:
            seen[l] += 1
            labels[i] = f"{l}#{seen[l]}"
        else:
            seen[l] = 1
    files = language_files(cfg.inputs)  # globs expanded, files checked: before any tokenizer loads
    tokenizers = [load_tokenizer(spec) for spec in cfg.tokenizers]
    result = FertilityResult(labels, list(files))
    for lang, paths in files.items():
        # Streaming: the documents are read once for all tokenizers, nothing is kept.
        documents = itertools.islice(iter_language(paths, cfg.text_key), cfg.max_documents)
        counted = _Counted(documents)
        cells = count_fertilities(tokenizers, (p for d in counted for p in split_paragraphs(d)))
        if cells[0].words == 0:  # fertility would be 0 / 0
            where = paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"
            first = "first " if cfg.max_documents is not None else ""
            n = counted.count
            what = f"its {first}{n:,} documents are empty or whitespace only" if n else "it holds no documents"
            raise CorpusError(f"{where} (--input {lang}): no words to measure: {what}; give a corpus with text")
        for label, cell in zip(labels, cells):
            result.cells[(label, lang)] = cell
            progress(log, cfg.verbose, f"{label} {lang}: {cell.tokens} tokens / {cell.words} words = {cell.fertility:.3f}")
    return result
