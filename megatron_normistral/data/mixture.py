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
  Python reference it must equal) gives every global sample a corpus (a deterministic smooth
  interleaving by weight) and a window (each corpus's windows shuffled afresh every epoch, from
  ``seed``; a bucketed Fisher-Yates so that shuffling tens of millions of windows stays in cache). Two compact arrays: uint8 corpus and uint32 window per sample.
- Resume: ``ds[g]`` is pure random access; starting at ``consumed_samples`` needs no replay.
- Cache: the arrays are saved under ``cache_dir`` keyed by a fingerprint of every input (config,
  phases, run length, and each corpus's files: size, mtime, hash of their first and last MiB). A changed corpus or
  config gives a different key, so a stale index is never reused; loading also re-checks it.
- Mixture change mid-run: ``MixtureDataset(cfg_a, N, changes=[(K, cfg_b)])`` uses cfg_a for
  global samples ``[0, K)`` and cfg_b from ``K`` on (same seq_length and seed). Samples below K
  are exactly those of a run with cfg_a alone, so what was consumed stays as it was; from K each
  corpus continues its own shuffled stream where it stopped (a per-corpus sample counter carries
  over), so nothing already consumed is repeated and nothing is skipped, except ordinary
  repetition after a full epoch. Epoch caps count the samples of earlier phases. Corpora are
  matched across phases by prefix; a new corpus may appear in a later phase. To switch in a
  running job: restart it with ``changes=[(consumed_samples, new_cfg)]``.
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

INDEX_VERSION = 1  # bump when the index algorithm changes: it is part of the fingerprint


@dataclass
class CorpusSpec:
    prefix: str                 # indexed dataset prefix (PREFIX.bin/.idx)
    language: str
    weight: float               # share of samples (normalised over the config)
    max_epochs: float = math.inf
    name: str = ""              # label in tables; defaults to the language

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

    @property
    def epochs(self) -> float:
        return self.samples / self.windows_per_epoch if self.windows_per_epoch else 0.0

    seq_length: int

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

    def table(self) -> str:
        L = self.seq_length
        head = (f"{'corpus':<10} {'lang':<5} {'weight':>7} {'share':>7} {'corpus tok':>15} {'smp/epoch':>11} "
                f"{'samples':>12} {'epochs':>7} {'max ep':>6} {'unique tok':>15} {'total tok':>15}")
        lines = [f"Mixture plan: global samples [{self.start_sample:,}, {self.start_sample + self.train_samples:,}), "
                 f"seq_length {L}, seed {self.seed}", head, "-" * len(head)]
        for c in self.corpora:
            lines.append(
                f"{c.label:<10} {c.language:<5} {c.weight:>7.2%} {c.share:>7.2%} {c.tokens:>15,} "
                f"{c.windows_per_epoch:>11,} {c.samples:>12,} {c.epochs:>7.2f} {c.max_epochs:>6g} "
                f"{c.unique_tokens:>15,} {c.total_tokens:>15,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<10} {'':<5} {'':>7} {'':>7} {sum(c.tokens for c in self.corpora):>15,} {'':>11} "
                     f"{self.train_samples:>12,} {'':>7} {'':>6} {sum(c.unique_tokens for c in self.corpora):>15,} "
                     f"{self.train_samples * L:>15,}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def print(self, stream=sys.stdout) -> None:
        print(self.table(), file=stream, flush=True)

    def to_dict(self) -> dict:
        return {
            "seq_length": self.seq_length, "seed": self.seed, "start_sample": self.start_sample,
            "train_samples": self.train_samples, "notes": self.notes,
            "corpora": [dict(label=c.label, prefix=c.prefix, language=c.language, weight=c.weight, share=c.share,
                             tokens=c.tokens, windows_per_epoch=c.windows_per_epoch, samples=c.samples,
                             start_counter=c.start_counter, epochs=c.epochs,
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


def compute_plan(config: MixtureConfig, train_samples: int, corpus_tokens: Sequence[int] | None = None,
                 consumed: Sequence[int] | None = None, start_sample: int = 0) -> MixturePlan:
    """Samples, epochs and tokens per corpus for ``train_samples`` samples (steps x global batch).

    ``corpus_tokens``: sizes in tokens (default: read from each corpus's .idx). ``consumed``:
    samples each corpus already gave in earlier phases (count toward ``max_epochs``)."""
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
    caps = []
    for c, n, used in zip(config.corpora, windows, consumed):
        cap = math.inf if math.isinf(c.max_epochs) else max(0, math.floor(c.max_epochs * n) - used)
        caps.append(cap)
    samples = _largest_remainder(wn, train_samples)
    notes: list[str] = []
    over = [i for i in range(K) if samples[i] > caps[i]]
    if over and not config.allow_redistribute:
        msgs = []
        for i in over:
            c = config.corpora[i]
            need = (samples[i] + consumed[i]) / windows[i] if windows[i] else math.inf
            msgs.append(f"corpus {c.label!r} ({c.prefix}): weight {wn[i]:.4f} -> {samples[i]:,} samples"
                        f"{f' (+{consumed[i]:,} earlier)' if consumed[i] else ''} = {need:.2f} epochs of its "
                        f"{windows[i]:,} samples/epoch ({tokens[i]:,} tokens), above max_epochs={c.max_epochs:g}")
        raise EpochCapError("; ".join(msgs) + ". Lower the weight, raise max_epochs, add data, or set "
                            "allow_redistribute=True to give the excess to the other corpora.")
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

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _epoch_key(seed: int, slot: int, epoch: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ slot) ^ epoch)


LEAF = 65536  # target bucket size of the per-epoch shuffle (cache-resident)
_BUCKET_SALT = 0xD1B54A32D192ED03


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 over uint64 arrays (numpy integer arrays wrap, as in C++)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _bucket_bits(n: int, leaf: int) -> int:
    b = 0
    while b < 16 and (n >> b) > leaf:
        b += 1
    return b


def reference_epoch_permutation(n: int, seed: int, slot: int, epoch: int, leaf: int = LEAF) -> np.ndarray:
    """Python reference of the per-epoch shuffle (C++ ``epoch_permutation``): windows go to
    2^b buckets by hash bits (stable, ascending within a bucket), then each bucket gets a
    forward Fisher-Yates (position t swaps with a uniform one in [t, end), multiply-shift of a
    splitmix64 counter)."""
    key = _epoch_key(seed, slot, epoch)
    b = _bucket_bits(n, leaf)
    if b == 0:
        p = np.arange(n, dtype=np.uint32)
        bounds = [0, n]
    else:
        bkey = _splitmix64(key ^ _BUCKET_SALT)
        with np.errstate(over="ignore"):
            h = _splitmix64_np(np.arange(n, dtype=np.uint64) + np.uint64(bkey))
        buckets = (h >> np.uint64(64 - b)).astype(np.int64)
        p = np.argsort(buckets, kind="stable").astype(np.uint32)
        bounds = [0] + np.cumsum(np.bincount(buckets, minlength=1 << b)).tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        for t in range(s, e - 1):
            j = t + ((_splitmix64((key + t) & _MASK) * (e - t)) >> 64)
            p[t], p[j] = p[j], p[t]
    return p


def reference_mixture_index(samples: Sequence[int], start_counter: Sequence[int], windows_per_epoch: Sequence[int],
                            slots: Sequence[int], seed: int, leaf: int = LEAF) -> tuple[np.ndarray, np.ndarray]:
    """numpy/Python reference of ``_helpers.build_mixture_index`` (slow; for tests)."""
    S = np.array(samples, dtype=np.int64)
    N = int(S.sum())
    count = np.zeros(len(S), dtype=np.int64)
    deficit = np.zeros(len(S), dtype=np.int64)
    corpus = np.zeros(N, dtype=np.uint8)
    window = np.zeros(N, dtype=np.uint32)
    perms: dict[tuple[int, int], np.ndarray] = {}
    for g in range(N):
        deficit += S
        open_ = count < S
        c = int(np.flatnonzero(open_)[np.argmax(deficit[open_])])  # first max among corpora left
        k = int(start_counter[c]) + int(count[c])
        e, r = divmod(k, int(windows_per_epoch[c]))
        if (c, e) not in perms:
            perms[(c, e)] = reference_epoch_permutation(int(windows_per_epoch[c]), seed, int(slots[c]), e, leaf)
        corpus[g] = slots[c]
        window[g] = perms[(c, e)][r]
        deficit[c] -= N
        count[c] += 1
    return corpus, window


def build_index_arrays(phase_plans: Sequence[tuple[MixturePlan, Sequence[int]]], seed: int,
                       backend: str = "cpp", leaf: int = LEAF) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated (corpus slot uint8, window uint32) for consecutive phases.
    ``phase_plans``: (plan, slot of each of the plan's corpora)."""
    from megatron_normistral import _helpers  # built at install time; no silent fallback

    total = sum(p.train_samples for p, _ in phase_plans)
    corpus = np.empty(total, dtype=np.uint8)
    window = np.empty(total, dtype=np.uint32)
    pos = 0
    for plan, slots in phase_plans:
        args = (np.array([c.samples for c in plan.corpora], dtype=np.int64),
                np.array([c.start_counter for c in plan.corpora], dtype=np.int64),
                np.array([c.windows_per_epoch for c in plan.corpora], dtype=np.int64),
                np.array(slots, dtype=np.int64), seed)
        n = plan.train_samples
        if backend == "cpp":
            _helpers.build_mixture_index(*args, corpus[pos:pos + n], window[pos:pos + n], leaf)
        elif backend == "reference":
            corpus[pos:pos + n], window[pos:pos + n] = reference_mixture_index(*args, leaf=leaf)
        else:
            raise ValueError(f"backend must be 'cpp' or 'reference', got {backend!r}")
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
        # Phase plans, each corpus's counter carried over from the phases before.
        consumed = {p: 0 for p in self.prefixes}
        self.phase_plans: list[tuple[MixturePlan, list[int]]] = []
        for i, (start, cfg) in enumerate(phases):
            end = phases[i + 1][0] if i + 1 < len(phases) else train_samples
            plan = compute_plan(cfg, end - start, [tokens_by_prefix[s.prefix] for s in cfg.corpora],
                                consumed=[consumed[s.prefix] for s in cfg.corpora], start_sample=start)
            for s, cp in zip(cfg.corpora, plan.corpora):
                consumed[s.prefix] += cp.samples
            self.phase_plans.append((plan, [self.prefixes.index(s.prefix) for s in cfg.corpora]))
        self.plan = self.phase_plans[0][0] if len(self.phase_plans) == 1 else None
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

    def _fingerprint(self, phases) -> str:
        from megatron_normistral.data.indexed import bin_path, idx_path

        desc = {
            "version": INDEX_VERSION, "train_samples": self.train_samples,
            "phases": [[s, dataclasses.asdict(c)] for s, c in phases],
            "corpora": [[_file_identity(idx_path(p)), _file_identity(bin_path(p))] for p in self.prefixes],
            "plans": [[p.to_dict(), slots] for p, slots in self.phase_plans],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()

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
    """``{"seq_length", "seed", "allow_redistribute", "corpora": [{"prefix", "language", "weight",
    "max_epochs", "name", "tokens"}]}``; ``tokens`` (optional, all or none) plans from sizes
    without reading files. Returns (config, tokens or None)."""
    specs, tokens = [], []
    for c in d["corpora"]:
        me = c.get("max_epochs")
        specs.append(CorpusSpec(prefix=c.get("prefix", ""), language=c["language"], weight=float(c["weight"]),
                                max_epochs=math.inf if me is None else float(me), name=c.get("name", "")))
        tokens.append(c.get("tokens"))
    if any(t is not None for t in tokens) and any(t is None for t in tokens):
        raise ValueError("give 'tokens' for every corpus or for none")
    cfg = MixtureConfig(specs, seq_length=int(d["seq_length"]), seed=int(d.get("seed", 1234)),
                        allow_redistribute=bool(d.get("allow_redistribute", False)))
    return cfg, ([int(t) for t in tokens] if tokens[0] is not None else None)


def load_mixture_config(path: str | os.PathLike) -> tuple[MixtureConfig, list[int] | None]:
    """Read a mixture config from JSON or YAML (see :func:`mixture_config_from_dict`)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return mixture_config_from_dict(yaml.safe_load(text))
    return mixture_config_from_dict(json.loads(text))
