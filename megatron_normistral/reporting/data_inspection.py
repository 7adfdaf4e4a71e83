"""What the model is fed: the documents of a corpus (``PREFIX.bin/.idx``), and the samples of the
training mixture at a step and data-parallel rank exactly as the training loop builds them.

Mixture samples come from the loop's own code path: the recipe's mixture phases
(``DataConfig.mixture_phases``) and index cache folder, the special ids the loop uses
(``documents_start_with_bos``), :class:`~megatron_normistral.training.batches.BatchSource` and its
``micro_batches`` (which calls :func:`~megatron_normistral.data.objective.build_batch`). Only the
two lines that ``training.data_setup.build_data`` runs inside a process group (the dataset and
the special ids) are repeated here, without one; ``tests/tools/test_inspect_data.py`` checks that
the result equals ``build_data``'s batches on a DP=2 process group.

Step numbers are those of the step log: step N (1-based) trains on global samples
``(N - 1) x global_batch ... N x global_batch - 1``, DP rank r on its ``global_batch / DP`` of them.

    from megatron_normistral.reporting.data_inspection import step_samples

    view = step_samples(recipe, step=10, dp_rank=0, dp_size=8)
    view.samples[0]   # {"global_index", "corpus", "mode", "tokens", "labels", "loss_mask", "document_ids", ...}
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_normistral.data.indexed import IndexedReader, check_corpus_files, read_stats_sidecar
from megatron_normistral.reporting.files import save_png

DOCUMENT_MARK = "\u27e6doc {}\u27e7"  # ⟦doc k⟧ before the first token of each document of a sample
MASKED_MARK = "\u27e8{}\u2192{}\u27e9"  # ⟨what the model sees→the token it must predict⟩


# ----------------------------------------------------------------------------- corpora

@dataclass
class CorpusSummary:
    prefix: str
    label: str
    dtype: str
    documents: int
    sequences: int
    tokens: int
    document_lengths: np.ndarray  # tokens of each document
    min_token_id: int | None = None  # from the PREFIX.stats.json sidecar, when it has one
    max_token_id: int | None = None

    def to_dict(self) -> dict:
        lengths = self.document_lengths
        return {"prefix": self.prefix, "label": self.label, "dtype": self.dtype, "documents": self.documents,
                "sequences": self.sequences, "tokens": self.tokens, "min_token_id": self.min_token_id,
                "max_token_id": self.max_token_id,
                "document_tokens": {"mean": float(lengths.mean()) if len(lengths) else None,
                                    "median": float(np.median(lengths)) if len(lengths) else None,
                                    "max": int(lengths.max()) if len(lengths) else None}}


def corpus_summary(prefix: str | os.PathLike, label: str | None = None) -> CorpusSummary:
    """Sizes of a corpus from its ``.idx`` (checked against the ``.bin`` first: one-line
    :class:`~megatron_normistral.data.indexed.CorpusError` for a missing or damaged pair)."""
    prefix = os.fspath(prefix)
    info = check_corpus_files(prefix, allow_empty=True)
    reader = IndexedReader(prefix)
    per_sequence = reader.sequence_lengths.astype(np.int64)
    bounds = np.asarray(reader.document_indices, dtype=np.int64)
    cumulative = np.concatenate([[0], np.cumsum(per_sequence)])
    stats, _ = read_stats_sidecar(prefix)
    return CorpusSummary(prefix=prefix, label=label or Path(prefix).name, dtype=info.dtype.name,
                         documents=info.documents, sequences=info.sequences, tokens=info.tokens,
                         document_lengths=cumulative[bounds[1:]] - cumulative[bounds[:-1]],
                         min_token_id=stats.min_token_id if stats else None,
                         max_token_id=stats.max_token_id if stats else None)


def corpus_documents(prefix: str | os.PathLike, documents: Sequence[int], tokenizer=None) -> list[dict]:
    """Documents ``documents`` of a corpus: their token ids and, with a tokenizer, their text
    (specials such as ``<s>`` and ``</s>`` spelled out)."""
    reader = IndexedReader(prefix)
    out = []
    for d in documents:
        if not 0 <= d < reader.num_documents:
            raise ValueError(f"{prefix}: no document {d}; it has {reader.num_documents:,} (0..{reader.num_documents - 1})")
        parts = reader.document(d)
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        record = {"prefix": os.fspath(prefix), "document": int(d), "tokens": len(ids), "ids": ids.tolist()}
        if tokenizer is not None:
            record["text"] = spell(tokenizer, ids.tolist())
        out.append(record)
    return out


def plot_document_lengths(summaries: Sequence[CorpusSummary], path: str | os.PathLike, dpi: int = 100):
    """Histogram of tokens per document, one step line per corpus, logarithmic bins; returns the
    Figure (its patches with a gid are the series, one per corpus)."""
    from matplotlib.figure import Figure

    lengths = [s.document_lengths for s in summaries if len(s.document_lengths)]
    shortest = max(1, min([int(x.min()) for x in lengths], default=1))
    longest = max([int(x.max()) for x in lengths], default=1)
    edges = np.unique(np.round(np.logspace(np.log10(shortest), np.log10(max(longest, shortest + 1)) + 1e-9, 40)))
    edges = edges.astype(np.int64)
    edges = np.append(edges, edges[-1] + 1)
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for i, s in enumerate(summaries):
        counts, _ = np.histogram(s.document_lengths, bins=edges)
        patch = ax.stairs(counts, edges, label=f"{s.label} ({s.documents:,} documents)", color=f"C{i % 10}")
        patch.set_gid(s.label)
    ax.set_xscale("log")
    ax.set_xlabel("tokens per document")
    ax.set_ylabel("documents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi)
    return fig


# ----------------------------------------------------------------------------- text

def spell(tokenizer, ids: Sequence[int]) -> str:
    """Token ids as text, exactly: regular tokens by the bytes they stand for, special tokens by
    their names (``<s>``, ``</s>``, ``<mask>``)."""
    out: list[str] = []
    pending = bytearray()
    for token in ids:
        surface = tokenizer.token_surface(int(token))
        if surface is None:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(tokenizer.piece(int(token)))
        else:
            pending += surface
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def render_sample(tokenizer, sample: dict) -> str:
    """The input of one sample as text, with ``⟦doc k⟧`` where each of its documents starts and,
    at each position chosen in masked mode, ``⟨seen→target⟩``: what the model sees there (``<mask>``,
    a random token or the token kept) and the token it must predict."""
    tokens, labels = sample["tokens"], sample["labels"]
    chosen = set(sample["masked_positions"])
    starts = {start: k for k, (start, _) in enumerate(sample["documents"])}
    parts: list[str] = []
    run: list[int] = []
    for p, token in enumerate(tokens):
        if p in starts or p in chosen:
            parts.append(spell(tokenizer, run))
            run = []
        if p in starts:
            parts.append(DOCUMENT_MARK.format(starts[p]))
        if p in chosen:
            parts.append(MASKED_MARK.format(spell(tokenizer, [token]), spell(tokenizer, [labels[p - 1]])))
        else:
            run.append(token)
    parts.append(spell(tokenizer, run))
    if len(tokens) in chosen:  # the window's last token: a target only, never an input
        parts.append(MASKED_MARK.format("", spell(tokenizer, [labels[-1]])))
    return "".join(parts)


# ----------------------------------------------------------------------------- the mixture at a step

def mixture_dataset(recipe, verbose: bool = True, log=sys.stdout):
    """The run's mixture dataset, as ``build_data`` makes it (same phases, run length and index
    cache folder: an index the run cached is read, one not yet built is built and cached there,
    as the run would)."""
    from megatron_normistral.data.mixture import MixtureDataset

    t, d = recipe.training, recipe.data
    cache = d.cache_dir or (str(Path(recipe.checkpoint.save) / "data-cache") if recipe.checkpoint.save else None)
    (_, first), *changes = d.mixture_phases(t.seq_length, t.seed, t.global_batch_size, t.train_iters)
    return MixtureDataset(first, t.train_iters * t.global_batch_size, cache_dir=cache, changes=changes,
                          verbose=verbose, log=log)


def special_ids(recipe, tokenizer):
    """The ids ``build_data`` gives the batches (BOS as the corpora's sidecars say)."""
    from megatron_normistral.training.batches import SpecialIds
    from megatron_normistral.training.data_setup import documents_start_with_bos

    bos_id = tokenizer.bos_id if documents_start_with_bos(recipe, tokenizer) else None
    return SpecialIds(eod_id=tokenizer.eod_id, mask_id=tokenizer.mask_id,
                      vocab_size=recipe.model.architecture().vocab_size, bos_id=bos_id)


@dataclass
class StepSamples:
    step: int
    dp_rank: int
    dp_size: int
    consumed_samples: int          # before this step
    micro_batches: list[dict]      # BatchSource.micro_batches: what the loop feeds the model
    samples: list[dict]            # one per row of every micro-batch, in order (see sample_record)
    corpora: list[dict] = field(default_factory=list)  # per corpus: samples and tokens of this rank's step
    plans: list = field(default_factory=list)          # the mixture plan(s): tokens, samples, epochs per corpus


def check_step(recipe, step: int, dp_rank: int, dp_size: int) -> None:
    t = recipe.training
    if not 1 <= step <= t.train_iters:
        raise ValueError(f"--step {step}: the run has steps 1..{t.train_iters} (training.train_iters)")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"--dp-rank {dp_rank}: data-parallel ranks are 0..{dp_size - 1} (DP size {dp_size})")
    if t.global_batch_size % (t.micro_batch_size * dp_size):
        raise ValueError(f"global batch {t.global_batch_size} is not divisible by micro-batch x data-parallel = "
                         f"{t.micro_batch_size} x {dp_size}: not a layout the run can have")


def sample_record(batch: dict, row: int, global_index: int, corpus: str, language: str) -> dict:
    """One row of a micro-batch as plain lists: the model's input ``tokens``, ``labels``,
    ``loss_mask`` (1 = scored), ``document_ids``, its mode, the window positions chosen in masked
    mode (position j: the input token j was corrupted or kept, and is predicted at j - 1), and
    its documents' ``[start, end)`` input ranges."""
    from megatron_normistral.model.attention import document_spans

    masked = bool(batch["masked"][row])
    loss_mask = batch["loss_mask"][row].to(dtype=batch["tokens"].dtype).tolist()
    return {
        "global_index": global_index, "corpus": corpus, "language": language,
        "mode": "masked" if masked else "causal",
        "tokens": batch["tokens"][row].tolist(), "labels": batch["labels"][row].tolist(), "loss_mask": loss_mask,
        "document_ids": batch["document_ids"][row].tolist(),
        "documents": [list(span) for span in document_spans(batch["document_ids"][row:row + 1])[0]],
        "masked_positions": [i + 1 for i, scored in enumerate(loss_mask) if scored] if masked else [],
    }


def step_samples(recipe, step: int, dp_rank: int, dp_size: int, tokenizer=None, log=sys.stdout) -> StepSamples:
    """The micro-batches DP rank ``dp_rank`` of ``dp_size`` trains on at step ``step`` (1-based),
    built by the loop's BatchSource, and one record per sample."""
    from megatron_normistral.tokenizer import load_tokenizer
    from megatron_normistral.training.batches import BatchSource

    check_step(recipe, step, dp_rank, dp_size)
    t = recipe.training
    tokenizer = tokenizer or load_tokenizer(recipe.data.tokenizer)
    dataset = mixture_dataset(recipe, verbose=log is not None, log=log)
    source = BatchSource(dataset, recipe.objective, special_ids(recipe, tokenizer), t.micro_batch_size,
                         t.global_batch_size, dp_rank, dp_size)
    consumed = (step - 1) * t.global_batch_size
    batches = [{k: v.cpu() if hasattr(v, "cpu") else v for k, v in b.items()} for b in source.micro_batches(consumed)]
    first = consumed + dp_rank * source.per_rank
    samples, per_corpus = [], {}
    for m, batch in enumerate(batches):
        for row in range(batch["tokens"].shape[0]):
            g = first + m * t.micro_batch_size + row
            slot, _ = dataset.window(g)
            record = sample_record(batch, row, g, Path(dataset.prefixes[slot]).name, dataset.languages[slot])
            samples.append({"micro_batch": m, "row": row, **record})
            counts = per_corpus.setdefault(slot, {"corpus": dataset.prefixes[slot], "language": dataset.languages[slot],
                                                  "samples": 0, "masked_samples": 0, "tokens": 0, "scored_tokens": 0})
            counts["samples"] += 1
            counts["masked_samples"] += record["mode"] == "masked"
            counts["tokens"] += len(record["tokens"])
            counts["scored_tokens"] += int(sum(record["loss_mask"]))
    return StepSamples(step=step, dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed, micro_batches=batches,
                       samples=samples, corpora=[per_corpus[s] for s in sorted(per_corpus)], plans=dataset.plans)
