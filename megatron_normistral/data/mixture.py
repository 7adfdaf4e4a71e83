"""Corpus mixture: plan (samples/epochs per corpus) and the upsampled, shuffled mixture dataset.

Usage (the training loop; corpora preprocessed with ``tools/preprocess_data.py --append-eod``)::

    from megatron_normistral.data.mixture import CorpusSpec, MixtureConfig, MixtureDataset

    cfg = MixtureConfig(
        corpora=[CorpusSpec("data/nb", "nb", weight=0.488, max_epochs=4),
                 CorpusSpec("data/se", "se", weight=0.006, max_epochs=16), ...],
        seq_length=4096, seed=1234)
    ds = MixtureDataset(cfg, train_samples=steps * global_batch, cache_dir="runs/x/data-cache")
    ds.plan.print()                           # the table (also printed on build; ds.plans with changes)
    ds.plan.save("runs/x/mixture_plan.json")  # keep the plan with the run
    s = ds[consumed_samples + i]              # random access by GLOBAL sample index
    s["tokens"]                               # np.int64 array of seq_length + 1 token ids
    s["corpus"], s["language"]                # which corpus it came from

Design:

- Each corpus is its token stream (the ``.bin``: documents back to back, EOD between them). Window
  ``w`` is tokens ``[w*L, w*L + L + 1)`` (``L = seq_length``; consecutive windows share one token,
  as in Megatron's GPT dataset), so a corpus of ``T`` tokens has ``(T - 1) // L`` windows per
  epoch and no per-document or per-window array is ever built. Document order is fixed; the
  tokens past the last whole window of an epoch are not used.
- :func:`compute_plan` turns weights into whole samples per corpus (largest remainder), epochs
  and unique/total tokens. A corpus above its ``max_epochs`` is an error naming it and the
  numbers, or, with ``allow_redistribute=True``, it is capped and the excess goes to the others in
  proportion to their weights (the plan says so).
- The index (C++ ``_helpers.build_mixture_index``; :func:`reference_mixture_index` is the numpy /
  Python reference it must equal, and its docstring the specification) gives every global sample
  a corpus (a deterministic smooth interleaving by weight) and a window (each corpus's windows
  shuffled afresh every epoch, from ``seed``; a bucketed Fisher-Yates so that shuffling tens of
  millions of windows stays in cache). Two compact arrays: uint8 corpus and uint32 window per
  sample.
- Resume: ``ds[g]`` is pure random access; starting at ``consumed_samples`` needs no replay.
- Cache: the arrays are saved under ``cache_dir`` keyed by a fingerprint of every input (config,
  phases, run length, and each corpus's files: size, mtime, hash of their first and last MiB). A changed corpus or
  config gives a different key, so a stale index is never reused; loading also re-checks it.
- Mixture change mid-run: ``MixtureDataset(cfg_a, N, changes=[(K, cfg_b)])`` uses cfg_a for
  global samples ``[0, K)`` and cfg_b from ``K`` on (same seq_length and seed). Samples below K
  are exactly those of a run with cfg_a alone: the cfg_a phase is planned over the whole run,
  ``[0, N)``, as that run planned it, and cut at K (:func:`plan_phases`; the C++ index writes
  only the first K samples of it). From K each corpus continues its own shuffled stream where
  it stopped (its count among the first K samples carries over), so nothing already consumed is
  repeated and nothing is skipped, except ordinary repetition after a full epoch. Epoch caps
  count the samples of earlier phases. Every phase is planned to the end of the run and cut at
  the next change, so adding a later change never alters an earlier one. Corpora are matched
  across phases by prefix; a new corpus may appear in a later phase. To switch in a running
  job: restart it with ``changes=[(consumed_samples, new_cfg)]`` and the same run length.
  :meth:`MixtureDataset.consumed_fingerprint` identifies the first ``n`` samples alone, so a
  resume can tell a deliberate change after the samples consumed from one that alters them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_normistral.data.reference import bounded64, check_backend, derive_key, draw, key_path

INDEX_VERSION = 2  # bump when the index algorithm changes: it is part of the fingerprint


@dataclass
class CorpusSpec:
    """One corpus of a mixture: the one schema of a training recipe's ``data.corpora`` entries,
    of ``tools/plan_mixture.py``'s configs and of :class:`MixtureConfig`."""

    prefix: str
    """Indexed dataset prefix (PREFIX.bin and PREFIX.idx, from tools/preprocess_data.py)."""

    language: str
    """Language of the corpus (reported with its samples)."""

    weight: float
    """Share of the samples (normalised over the mixture's corpora)."""

    max_epochs: float = math.inf
    """Most epochs of this corpus the run may read (a plan above it is an error, or is
    redistributed with allow_redistribute)."""

    name: str = ""
    """Label in the plan's table; default: the language."""

    def __post_init__(self):
        # Floats whatever the file wrote (16 and 16.0 give the same mixture fingerprint); None: no cap.
        self.weight = float(self.weight)
        self.max_epochs = math.inf if self.max_epochs is None else float(self.max_epochs)

    @property
    def label(self) -> str:
        return self.name or self.language


@dataclass
class MixtureConfig:
    corpora: list[CorpusSpec]
    seq_length: int
    seed: int = 1234
    allow_redistribute: bool = False


class EpochCapError(ValueError):
    pass


@dataclass
class CorpusPlan:
    label: str
    prefix: str
    language: str
    weight: float               # as configured (normalised)
    share: float                # samples / run samples after rounding (and redistribution)
    tokens: int                 # tokens in the corpus
    windows_per_epoch: int
    samples: int                # samples this phase takes
    start_counter: int          # samples of this corpus consumed by earlier phases
    max_epochs: float
    seq_length: int
    # Samples the interleaving was planned with: this phase's share of the rest of the run when
    # a later change cuts the phase short (see plan_phases), else ``samples``.
    planned_samples: int = -1

    def __post_init__(self):
        if self.planned_samples < 0:
            self.planned_samples = self.samples

    @property
    def epochs(self) -> float:
        """Epochs of this phase alone."""
        return self.samples / self.windows_per_epoch if self.windows_per_epoch else 0.0

    @property
    def epochs_by_end(self) -> float:
        """Epochs of this corpus read by the end of this phase, earlier phases included (what
        ``max_epochs`` limits)."""
        return (self.start_counter + self.samples) / self.windows_per_epoch if self.windows_per_epoch else 0.0

    @property
    def unique_tokens(self) -> int:
        """Distinct tokens seen by the end of this phase (earlier phases included): whole
        epochs repeat the same windows."""
        return min(self.start_counter + self.samples, self.windows_per_epoch) * self.seq_length

    @property
    def total_tokens(self) -> int:
        return self.samples * self.seq_length


@dataclass
class MixturePlan:
    seq_length: int
    seed: int
    train_samples: int
    corpora: list[CorpusPlan]
    start_sample: int = 0
    notes: list[str] = field(default_factory=list)
    planned_samples: int = -1   # length the interleaving was planned over (see CorpusPlan)

    def __post_init__(self):
        if self.planned_samples < 0:
            self.planned_samples = self.train_samples

    def table(self) -> str:
        L = self.seq_length
        so_far = self.start_sample > 0  # a later phase: also the epochs read since the run's start
        run_ep = f"{'run ep':>7} " if so_far else ""
        head = (f"{'corpus':<10} {'lang':<5} {'weight':>7} {'share':>7} {'corpus tok':>15} {'smp/epoch':>11} "
                f"{'samples':>12} {'epochs':>7} {run_ep}{'max ep':>6} {'unique tok':>15} {'total tok':>15}")
        lines = [f"Mixture plan: global samples [{self.start_sample:,}, {self.start_sample + self.train_samples:,}), "
                 f"seq_length {L}, seed {self.seed}", head, "-" * len(head)]
        for c in self.corpora:
            lines.append(
                f"{c.label:<10} {c.language:<5} {c.weight:>7.2%} {c.share:>7.2%} {c.tokens:>15,} "
                f"{c.windows_per_epoch:>11,} {c.samples:>12,} {c.epochs:>7.2f} "
                f"{f'{c.epochs_by_end:>7.2f} ' if so_far else ''}{c.max_epochs:>6g} "
                f"{c.unique_tokens:>15,} {c.total_tokens:>15,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<10} {'':<5} {'':>7} {'':>7} {sum(c.tokens for c in self.corpora):>15,} {'':>11} "
                     f"{self.train_samples:>12,} {'':>7} {' ' * len(run_ep)}{'':>6} "
                     f"{sum(c.unique_tokens for c in self.corpora):>15,} "
                     f"{self.train_samples * L:>15,}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def print(self, stream=sys.stdout) -> None:
        print(self.table(), file=stream, flush=True)

    def to_dict(self) -> dict:
        return {
            "seq_length": self.seq_length, "seed": self.seed, "start_sample": self.start_sample,
            "train_samples": self.train_samples, "planned_samples": self.planned_samples, "notes": self.notes,
            "corpora": [dict(label=c.label, prefix=c.prefix, language=c.language, weight=c.weight, share=c.share,
                             tokens=c.tokens, windows_per_epoch=c.windows_per_epoch, samples=c.samples,
                             planned_samples=c.planned_samples, start_counter=c.start_counter, epochs=c.epochs,
                             epochs_by_end=c.epochs_by_end,
                             max_epochs=None if math.isinf(c.max_epochs) else c.max_epochs,
                             unique_tokens=c.unique_tokens, total_tokens=c.total_tokens) for c in self.corpora],
        }

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def corpus_num_tokens(prefix: str) -> int:
    from megatron_normistral.data.indexed import IndexedReader

    return IndexedReader(prefix).num_tokens


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to weights summing to total (ties: lowest index)."""
    if total == 0 or weights.sum() == 0:
        return np.zeros(len(weights), dtype=np.int64)
    q = weights / weights.sum() * total
    base = np.floor(q).astype(np.int64)
    rest = total - int(base.sum())
    order = sorted(range(len(q)), key=lambda i: (-(q[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def _epoch_caps(config: MixtureConfig, windows: Sequence[int], consumed: Sequence[int]) -> list[float]:
    """Samples each corpus may still give under its ``max_epochs`` after ``consumed``."""
    return [math.inf if math.isinf(c.max_epochs) else max(0, math.floor(c.max_epochs * n) - used)
            for c, n, used in zip(config.corpora, windows, consumed)]


def _over_cap_message(config: MixtureConfig, over: Sequence[int], wn, samples, consumed, windows, tokens) -> str:
    msgs = []
    for i in over:
        c = config.corpora[i]
        need = (samples[i] + consumed[i]) / windows[i] if windows[i] else math.inf
        msgs.append(f"corpus {c.label!r} ({c.prefix}): weight {wn[i]:.4f} -> {samples[i]:,} samples"
                    f"{f' (+{consumed[i]:,} earlier)' if consumed[i] else ''} = {need:.2f} epochs of its "
                    f"{windows[i]:,} samples/epoch ({tokens[i]:,} tokens), above max_epochs={c.max_epochs:g}")
    return "; ".join(msgs) + (". Lower the weight, raise max_epochs, add data, or set allow_redistribute=True "
                              "to give the excess to the other corpora.")


def compute_plan(config: MixtureConfig, train_samples: int, corpus_tokens: Sequence[int] | None = None,
                 consumed: Sequence[int] | None = None, start_sample: int = 0,
                 check_caps: bool = True) -> MixturePlan:
    """Samples, epochs and tokens per corpus for ``train_samples`` samples (steps x global batch).

    ``corpus_tokens``: sizes in tokens (default: read from each corpus's .idx). ``consumed``:
    samples each corpus already gave in earlier phases (count toward ``max_epochs``).
    ``check_caps=False``: plain shares by weight, ``max_epochs`` neither checked nor applied (the
    caller checks what is really read: :func:`plan_phases` for a phase cut short)."""
    L = config.seq_length
    K = len(config.corpora)
    if K == 0:
        raise ValueError("mixture has no corpora")
    if L < 1 or train_samples < 0:
        raise ValueError("seq_length must be >= 1 and train_samples >= 0")
    tokens = [int(t) for t in corpus_tokens] if corpus_tokens is not None else [
        corpus_num_tokens(c.prefix) for c in config.corpora]
    consumed = [int(x) for x in consumed] if consumed is not None else [0] * K
    weights = np.array([c.weight for c in config.corpora], dtype=np.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    wn = weights / weights.sum()
    windows = [max(0, (t - 1) // L) for t in tokens]
    caps = _epoch_caps(config, windows, consumed) if check_caps else [math.inf] * K
    samples = _largest_remainder(wn, train_samples)
    notes: list[str] = []
    over = [i for i in range(K) if samples[i] > caps[i]]
    if over and not config.allow_redistribute:
        raise EpochCapError(_over_cap_message(config, over, wn, samples, consumed, windows, tokens))
    if over:
        # Water-filling: cap the corpora over their limit, share the rest by weight, repeat.
        fixed: dict[int, int] = {}
        while True:
            free = [i for i in range(K) if i not in fixed]
            remaining = train_samples - sum(fixed.values())
            alloc = _largest_remainder(np.array([wn[i] for i in free]), remaining) if free else np.zeros(0, np.int64)
            newly = [i for i, a in zip(free, alloc) if a > caps[i]]
            if not newly:
                samples = np.zeros(K, dtype=np.int64)
                for i, v in fixed.items():
                    samples[i] = v
                for i, a in zip(free, alloc):
                    samples[i] = a
                break
            for i in newly:
                fixed[i] = int(caps[i])
            if len(fixed) == K or all(wn[i] == 0 for i in range(K) if i not in fixed):
                if sum(fixed.values()) < train_samples:
                    raise EpochCapError(
                        f"even with redistribution the corpora cannot give {train_samples:,} samples within "
                        f"their max_epochs (at most {sum(fixed.values()):,})")
        for i in range(K):
            if i in fixed:
                notes.append(f"{config.corpora[i].label}: capped at max_epochs={config.corpora[i].max_epochs:g} "
                             f"({samples[i]:,} samples instead of {int(round(wn[i] * train_samples)):,}); "
                             f"excess redistributed to the others by weight")
    for i in range(K):
        if samples[i] > 0 and windows[i] == 0:
            raise ValueError(f"corpus {config.corpora[i].label!r}: {tokens[i]} tokens, fewer than one window of "
                             f"{L + 1}")
    plans = []
    for i, c in enumerate(config.corpora):
        p = CorpusPlan(label=c.label, prefix=c.prefix, language=c.language, weight=float(wn[i]),
                       share=float(samples[i]) / train_samples if train_samples else 0.0, tokens=tokens[i],
                       windows_per_epoch=windows[i], samples=int(samples[i]), start_counter=consumed[i],
                       max_epochs=c.max_epochs, seq_length=L)
        plans.append(p)
    return MixturePlan(L, config.seed, train_samples, plans, start_sample=start_sample, notes=notes)


# --- the index ---------------------------------------------------------------------------------

LEAF = 65536  # target bucket size of the per-epoch shuffle (cache-resident)
_BUCKET_SALT = 0xD1B54A32D192ED03  # keep in sync with csrc/mixture_index.cpp (BUCKET_SALT)


def _bucket_bits(n: int, leaf: int) -> int:
    b = 0
    while b < 16 and (n >> b) > leaf:
        b += 1
    return b


def reference_epoch_permutation(n: int, seed: int, slot: int, epoch: int, leaf: int = LEAF) -> np.ndarray:
    """The order in which corpus ``slot`` reads its ``n`` windows in ``epoch`` (the reference,
    and the specification, of ``_helpers.epoch_permutation``; primitives from
    :mod:`~megatron_normistral.data.reference`).

    A one-level Rao-Sandelius shuffle under ``key = key_path(seed, slot, epoch)``: with ``b`` the
    smallest integer (at most 16) such that ``n >> b <= leaf``, window ``i`` goes to bucket
    ``draw(derive_key(key, BUCKET_SALT), i) >> (64 - b)`` (no buckets when ``b = 0``); the
    buckets are laid out in order, windows ascending within each; then each bucket ``[s, e)``
    gets a forward Fisher-Yates: for ``t = s .. e - 2``, position ``t`` swaps with
    ``t + bounded64(draw(key, t), e - t)``. A uniform random split into buckets followed by
    uniform shuffles within them is a uniform random permutation, and buckets of about ``leaf``
    windows stay in cache where a plain Fisher-Yates over tens of millions of windows misses it
    once per element (about 5x slower, measured at 61M samples)."""
    key = key_path(seed, slot, epoch)
    b = _bucket_bits(n, leaf)
    if b == 0:
        p = np.arange(n, dtype=np.uint32)
        bounds = [0, n]
    else:
        h = draw(derive_key(key, _BUCKET_SALT), np.arange(n, dtype=np.uint64))
        buckets = (h >> np.uint64(64 - b)).astype(np.int64)
        p = np.argsort(buckets, kind="stable").astype(np.uint32)
        bounds = [0] + np.cumsum(np.bincount(buckets, minlength=1 << b)).tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        for t in range(s, e - 1):
            j = t + bounded64(draw(key, t), e - t)
            p[t], p[j] = p[j], p[t]
    return p


def _reference_interleave(samples: Sequence[int], n: int):
    """The corpus (position in ``samples``) of each of the first ``n`` samples of a phase of
    ``N = sum(samples)`` samples, with the samples it already got (see
    :func:`reference_mixture_index`, "which corpus")."""
    S = np.array(samples, dtype=np.int64)
    N = int(S.sum())
    count = np.zeros(len(S), dtype=np.int64)
    deficit = np.zeros(len(S), dtype=np.int64)
    for _ in range(n):
        deficit += S
        open_ = count < S
        c = int(np.flatnonzero(open_)[np.argmax(deficit[open_])])  # first max among corpora left
        yield c, int(count[c])
        deficit[c] -= N
        count[c] += 1


def reference_prefix_counts(samples: Sequence[int], n: int) -> np.ndarray:
    """numpy/Python reference of ``_helpers.mixture_prefix_counts``: each corpus's samples among
    the first ``n`` of the phase."""
    count = np.zeros(len(samples), dtype=np.int64)
    for c, _ in _reference_interleave(samples, n):
        count[c] += 1
    return count


def reference_mixture_index(samples: Sequence[int], start_counter: Sequence[int], windows_per_epoch: Sequence[int],
                            slots: Sequence[int], seed: int, leaf: int = LEAF,
                            length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(corpus slot uint8, window uint32) of each of the first ``length`` (default all
    ``N = sum(samples)``) global samples of a mixture phase: the reference, and the
    specification, of ``_helpers.build_mixture_index`` (which must equal it bit for bit; slow,
    for tests). Per corpus ``c``: ``samples[c]`` it gives in the phase, ``start_counter[c]``
    samples it gave in earlier phases, ``windows_per_epoch[c]`` (``n_c``), ``slots[c]``.

    - Which corpus (deterministic smooth interleaving): corpus ``c``'s deficit after ``g + 1``
      samples is ``samples[c] * (g + 1) - count[c] * N`` (exact integers); sample ``g`` goes to
      the corpus with the largest deficit among those with samples left (ties: lowest index).
    - Which window: corpus ``c``'s ``k``-th sample overall (``k = start_counter[c]`` + the samples
      it already got in this phase) is window ``P[k mod n_c]`` of
      ``P = reference_epoch_permutation(n_c, seed, slots[c], k div n_c, leaf)``: each epoch is a
      fresh shuffle, and a phase that starts each counter where the previous phase stopped
      continues the same streams, so nothing consumed is repeated or skipped.
    - A phase cut short by a later mixture change is planned as if it ran to the end of the run
      (``samples`` over the rest of the run, what a run without that change used) and only its
      first ``length`` samples are taken, exactly those that run consumed;
      :func:`reference_prefix_counts` gives each corpus's count among them, where the next
      phase's counters start."""
    n = int(np.sum(samples)) if length is None else int(length)
    corpus = np.zeros(n, dtype=np.uint8)
    window = np.zeros(n, dtype=np.uint32)
    perms: dict[tuple[int, int], np.ndarray] = {}
    for g, (c, got) in enumerate(_reference_interleave(samples, n)):
        e, r = divmod(int(start_counter[c]) + got, int(windows_per_epoch[c]))
        if (c, e) not in perms:
            perms[(c, e)] = reference_epoch_permutation(int(windows_per_epoch[c]), seed, int(slots[c]), e, leaf)
        corpus[g] = slots[c]
        window[g] = perms[(c, e)][r]
    return corpus, window


def plan_phases(phases: Sequence[tuple[int, MixtureConfig]], train_samples: int, tokens_by_prefix: dict[str, int],
                backend: str = "cpp") -> list[MixturePlan]:
    """Plans of consecutive mixture phases ``[(start sample, config), ...]`` (first start 0)
    of a run of ``train_samples``, each corpus's counter carried over from the phases before.

    Each phase is planned over the rest of the run, ``[start, train_samples)``, exactly as a
    run without the later changes planned it, and cut where the next phase starts: its samples
    per corpus are then the counts among the first ``next start - start`` samples of that
    interleaving (``_helpers.mixture_prefix_counts``), so the cut phase gives the very samples
    that run consumed and the next phase starts each corpus where it stopped. A cut phase is
    checked against ``max_epochs`` for what it reads; its interleaving applies the caps over the
    rest of the run when that plan is valid (what the run without the change used, with
    redistribution if allowed) and ignores them when it is not (no such run could exist)."""
    backend = check_backend(backend)
    consumed: dict[str, int] = {}
    plans = []
    for i, (start, cfg) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else train_samples
        tokens = [tokens_by_prefix[c.prefix] for c in cfg.corpora]
        used = [consumed.get(c.prefix, 0) for c in cfg.corpora]
        if end == train_samples:
            plan = compute_plan(cfg, end - start, tokens, consumed=used, start_sample=start)
        else:
            plan = _cut_phase(cfg, start, end, train_samples, tokens, used, backend)
        for c, cp in zip(cfg.corpora, plan.corpora):
            consumed[c.prefix] = consumed.get(c.prefix, 0) + cp.samples
        plans.append(plan)
    return plans


def _cut_phase(cfg: MixtureConfig, start: int, end: int, train_samples: int, tokens: list[int], used: list[int],
               backend: str) -> MixturePlan:
    """The plan of ``cfg`` over ``[start, train_samples)`` cut to ``[start, end)`` (see plan_phases)."""
    horizon = train_samples - start
    try:
        full = compute_plan(cfg, horizon, tokens, consumed=used, start_sample=start)
    except EpochCapError as e:
        full = compute_plan(cfg, horizon, tokens, consumed=used, start_sample=start, check_caps=False)
        full.notes.append(f"to the end of the run this mixture would exceed max_epochs ({str(e).split('. ')[0]}); "
                          f"it is checked for the samples of this phase only")
    planned = np.array([c.samples for c in full.corpora], dtype=np.int64)
    if backend == "cpp":
        from megatron_normistral import _helpers

        counts = _helpers.mixture_prefix_counts(planned, end - start)
    else:
        counts = reference_prefix_counts(planned, end - start)
    windows = [c.windows_per_epoch for c in full.corpora]
    over = [i for i, cap in enumerate(_epoch_caps(cfg, windows, used)) if counts[i] > cap]
    if over:
        wn = [c.weight for c in full.corpora]
        raise EpochCapError(f"mixture phase [{start:,}, {end:,}): "
                            + _over_cap_message(cfg, over, wn, [int(x) for x in counts], used, windows, tokens))
    n = end - start
    corpora = [dataclasses.replace(c, samples=int(k), share=int(k) / n, planned_samples=int(p))
               for c, k, p in zip(full.corpora, counts, planned)]
    note = (f"planned over the rest of the run, global samples [{start:,}, {train_samples:,}), as a run without "
            f"the change at {end:,} had it, and cut there: these are the samples that run read")
    return MixturePlan(full.seq_length, full.seed, n, corpora, start_sample=start, notes=[note] + full.notes,
                       planned_samples=horizon)


def build_index_arrays(phase_plans: Sequence[tuple[MixturePlan, Sequence[int]]], seed: int,
                       backend: str = "cpp", leaf: int = LEAF) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (corpus slot uint8, window uint32) for consecutive phases.
    ``phase_plans``: (plan, slot of each of the plan's corpora). A phase cut short by a later
    change (``planned_samples > train_samples``) gives the first ``train_samples`` samples of
    the interleaving it was planned with."""
    from megatron_normistral import _helpers  # built at install time; no silent fallback

    backend = check_backend(backend)
    total = sum(p.train_samples for p, _ in phase_plans)
    corpus = np.empty(total, dtype=np.uint8)
    window = np.empty(total, dtype=np.uint32)
    pos = 0
    for plan, slots in phase_plans:
        args = (np.array([c.planned_samples for c in plan.corpora], dtype=np.int64),
                np.array([c.start_counter for c in plan.corpora], dtype=np.int64),
                np.array([c.windows_per_epoch for c in plan.corpora], dtype=np.int64),
                np.array(slots, dtype=np.int64), seed)
        n = plan.train_samples
        if backend == "cpp":
            _helpers.build_mixture_index(*args, corpus[pos:pos + n], window[pos:pos + n], leaf)
        else:
            corpus[pos:pos + n], window[pos:pos + n] = reference_mixture_index(*args, leaf=leaf, length=n)
        pos += n
    return corpus, window


def _file_identity(path: str, hash_bytes: int = 1 << 20) -> list:
    """Path, size, mtime and a hash of the first and last ``hash_bytes`` (all of a small file):
    catches a rewritten corpus even where mtime granularity or a copy preserves the mtime."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(hash_bytes))
        if st.st_size > hash_bytes:
            f.seek(max(hash_bytes, st.st_size - hash_bytes))
            h.update(f.read(hash_bytes))
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns, h.hexdigest()]


class MixtureDataset:
    """Global sample index -> {"tokens": int64[seq_length+1], "corpus": slot, "language": str}.

    See the module docstring. ``changes``: [(start global sample, MixtureConfig), ...] for
    mixture changes mid-run. ``cache_dir=None`` builds in memory without caching."""

    def __init__(self, config: MixtureConfig, train_samples: int, cache_dir: str | os.PathLike | None = None,
                 changes: Sequence[tuple[int, MixtureConfig]] = (), verbose: bool = True, log=sys.stdout):
        phases = [(0, config)] + sorted(changes, key=lambda x: x[0])
        starts = [s for s, _ in phases]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= train_samples and len(phases) > 1:
            raise ValueError(f"mixture change points must be increasing and inside (0, {train_samples}): {starts[1:]}")
        for _, c in phases[1:]:
            if c.seq_length != config.seq_length or c.seed != config.seed:
                raise ValueError("a mixture change must keep seq_length and seed")
        self.seq_length = config.seq_length
        self.seed = config.seed
        self.train_samples = train_samples
        # Corpus slots: union by prefix, in order of first appearance (stable across changes).
        self.prefixes: list[str] = []
        self.languages: list[str] = []
        for _, c in phases:
            for s in c.corpora:
                if s.prefix not in self.prefixes:
                    self.prefixes.append(s.prefix)
                    self.languages.append(s.language)
        if len(self.prefixes) > 255:
            raise ValueError("at most 255 corpora")
        tokens_by_prefix = {p: corpus_num_tokens(p) for p in self.prefixes}
        self.phase_plans: list[tuple[MixturePlan, list[int]]] = [
            (plan, [self.prefixes.index(s.prefix) for s in cfg.corpora])
            for plan, (_, cfg) in zip(plan_phases(phases, train_samples, tokens_by_prefix), phases)]
        self.plan = self.phase_plans[0][0] if len(self.phase_plans) == 1 else None
        self._phases = phases
        self._identities: dict[str, list] = {}
        self.fingerprint = self._fingerprint(phases)
        if verbose:
            for plan, _ in self.phase_plans:
                plan.print(log)
        self.corpus_ids, self.window_ids, self.cache_path = self._load_or_build(cache_dir, verbose, log)
        self._readers: list | None = None

    @property
    def plans(self) -> list[MixturePlan]:
        return [p for p, _ in self.phase_plans]

    def save_plan(self, path: str | os.PathLike) -> None:
        """All phases' plans plus the fingerprint, as JSON (keep it with the run)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"fingerprint": self.fingerprint,
                                          "phases": [p.to_dict() for p in self.plans]}, indent=2) + "\n")

    def _corpus_identity(self, prefix: str) -> list:
        from megatron_normistral.data.indexed import bin_path, idx_path

        if prefix not in self._identities:
            self._identities[prefix] = [_file_identity(idx_path(prefix)), _file_identity(bin_path(prefix))]
        return self._identities[prefix]

    def _fingerprint(self, phases) -> str:
        desc = {
            "version": INDEX_VERSION, "train_samples": self.train_samples,
            "phases": [[s, dataclasses.asdict(c)] for s, c in phases],
            "corpora": [self._corpus_identity(p) for p in self.prefixes],
            "plans": [[p.to_dict(), slots] for p, slots in self.phase_plans],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()

    def consumed_fingerprint(self, n: int) -> str:
        """Fingerprint of what decides global samples ``[0, n)`` alone: the run length, the
        phases that start below ``n`` (configs, start points) and their corpora's files. Equal
        for two runs exactly when their first ``n`` samples are built from the same inputs, so a
        resume at ``n`` consumed samples can tell a change that starts at ``n`` or later (the
        data already read stays as it was) from one that alters what was read. A later phase's
        corpora never change a slot of an earlier one (slots go by first appearance)."""
        n = max(0, min(int(n), self.train_samples))
        used = [(s, c) for s, c in self._phases if s < n] or self._phases[:1]
        prefixes = list(dict.fromkeys(spec.prefix for _, c in used for spec in c.corpora))
        desc = {
            "version": INDEX_VERSION, "train_samples": self.train_samples,
            "phases": [[s, dataclasses.asdict(c)] for s, c in used],
            "corpora": [self._corpus_identity(p) for p in prefixes],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()

    def resume_note(self, consumed_samples: int, step: int, saved_fingerprint: str | None,
                    saved_consumed_fingerprint: str | None) -> str | None:
        """What a resume at ``consumed_samples`` (``step``) should say about the data, given the
        checkpoint's :attr:`fingerprint` and :meth:`consumed_fingerprint` of its consumed
        samples (None for a checkpoint that has none); None when the index is unchanged. A
        change after the samples consumed (a deliberate ``data.mixture_changes`` entry) is a
        note; one that alters them (data read twice or never) is a warning that says what to do."""
        if not saved_fingerprint or saved_fingerprint == self.fingerprint:
            return None
        C = int(consumed_samples)
        if saved_consumed_fingerprint is None:
            return (f"WARNING: the data mixture differs from the checkpoint's (index fingerprint {saved_fingerprint[:16]} "
                    f"-> {self.fingerprint[:16]}) and the checkpoint cannot tell whether its {C:,} samples consumed "
                    f"are kept: unless the only change is a data.mixture_changes entry at step >= {step} with the "
                    f"same corpus files, seed, seq_length and run length, the resumed run reads some data again and "
                    f"skips some")
        if saved_consumed_fingerprint == self.consumed_fingerprint(C):
            return (f"mixture: the index differs from the checkpoint's only after the {C:,} samples consumed "
                    f"(the first {step} steps), e.g. by a mixture change at step >= {step}: those samples stay as they were "
                    f"read and each corpus continues its stream where it stopped")
        return (f"WARNING: the first {C:,} samples (the first {step} steps) of this run's mixture index are not those the "
                f"checkpoint consumed: the corpus files, weights, seed, seq_length, run length (train_iters x "
                f"global_batch_size) or a data.mixture_changes entry before step {step} differ, so the resumed run "
                f"reads some data again and skips some. To change the mixture from here, keep those as they were "
                f"and give the change at_step >= {step}")

    def _load_or_build(self, cache_dir, verbose, log):
        if cache_dir is not None:
            d = Path(cache_dir) / f"mixture-{self.fingerprint[:24]}"
            meta = d / "index.json"
            if meta.exists():
                info = json.loads(meta.read_text())
                if info.get("fingerprint") != self.fingerprint:  # prefix collision: never reuse
                    raise RuntimeError(f"{d}: cache fingerprint mismatch; remove it")
                corpus = np.load(d / "corpus.npy", mmap_mode="r")
                window = np.load(d / "window.npy", mmap_mode="r")
                if len(corpus) != self.train_samples or len(window) != self.train_samples:
                    raise RuntimeError(f"{d}: cached index has the wrong length; remove it")
                if verbose:
                    print(f"mixture index: loaded {d}", file=log)
                return corpus, window, d
        corpus, window = build_index_arrays(self.phase_plans, self.seed)
        if cache_dir is None:
            return corpus, window, None
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.parent / f".{d.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.save(tmp / "corpus.npy", corpus)
        np.save(tmp / "window.npy", window)
        (tmp / "plans.json").write_text(json.dumps([p.to_dict() for p in self.plans], indent=2))
        (tmp / "index.json").write_text(json.dumps({"fingerprint": self.fingerprint}))  # written last
        try:
            os.rename(tmp, d)  # atomic; a concurrent builder may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"mixture index: built and saved {d}", file=log)
        return corpus, window, d

    def _open(self):
        from megatron_normistral.data.indexed import IndexedReader

        readers = []
        for p in self.prefixes:
            r = IndexedReader(p)
            if not r.is_contiguous():
                raise ValueError(f"{p}: sequences are not stored back to back (not a token stream)")
            readers.append(r)
        return readers

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = None  # memmaps are reopened in each DataLoader worker
        if self.cache_path is not None:  # send the cache's path, not 300 MB of index
            state["corpus_ids"] = state["window_ids"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.corpus_ids is None:
            self.corpus_ids = np.load(Path(self.cache_path) / "corpus.npy", mmap_mode="r")
            self.window_ids = np.load(Path(self.cache_path) / "window.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.train_samples

    def window(self, g: int) -> tuple[int, int]:
        """(corpus slot, window) of global sample g."""
        if not 0 <= g < self.train_samples:
            raise IndexError(f"global sample {g} outside [0, {self.train_samples})")
        return int(self.corpus_ids[g]), int(self.window_ids[g])

    def __getitem__(self, g: int) -> dict:
        c, w = self.window(int(g))
        if self._readers is None:
            self._readers = self._open()
        start = w * self.seq_length
        tokens = np.array(self._readers[c].tokens[start:start + self.seq_length + 1], dtype=np.int64)
        return {"tokens": tokens, "corpus": c, "language": self.languages[c]}


def mixture_config_from_dict(d: dict) -> tuple[MixtureConfig, list[int] | None]:
    """MixtureConfig's fields, each corpus :class:`CorpusSpec`'s plus an optional ``tokens``
    (all corpora or none): plans from sizes without reading files. Returns (config, tokens or
    None). A missing key is a KeyError naming it, an unknown one a ValueError."""
    specs, tokens = [], []
    for c in d["corpora"]:
        c = dict(c)
        tokens.append(c.pop("tokens", None))
        specs.append(_from_mapping(CorpusSpec, c))
    if any(t is not None for t in tokens) and any(t is None for t in tokens):
        raise ValueError("give 'tokens' for every corpus or for none")
    cfg = _from_mapping(MixtureConfig, {**d, "corpora": specs})
    return cfg, ([int(t) for t in tokens] if tokens[0] is not None else None)


def _from_mapping(cls, d: dict):
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} of {cls.__name__}; known: {names}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in d]
    if missing:
        raise KeyError(missing[0])
    return cls(**d)


def load_mixture_config(path: str | os.PathLike) -> tuple[MixtureConfig, list[int] | None]:
    """Read a mixture config from JSON or YAML (see :func:`mixture_config_from_dict`)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return mixture_config_from_dict(yaml.safe_load(text))
    return mixture_config_from_dict(json.loads(text))
