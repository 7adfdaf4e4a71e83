"""Mixture plan, C++ index == reference, determinism, the dataset (windows, resume, cache),
and mid-run mixture changes."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pytest

from megatron_normistral import _helpers
from megatron_normistral.data.indexed import IndexedDatasetWriter, IndexedReader
from megatron_normistral.data.mixture import (CorpusSpec, EpochCapError, MixtureConfig, MixtureDataset,
                                              build_index_arrays, compute_plan, plan_phases,
                                              reference_epoch_permutation, reference_mixture_index,
                                              reference_prefix_counts)

L = 8
BASE = 100_000  # corpus c's token at stream position t is c*BASE + t: windows are identifiable


def _make_corpus(prefix, c, n_tokens, rng):
    tokens = (c * BASE + np.arange(n_tokens)).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(1, n_tokens), size=n_tokens // 20, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [n_tokens]]))
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_packed(tokens, lengths)
    return str(prefix)


@pytest.fixture()
def corpora(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"nb": 4001, "se": 337, "en": 2500}
    return {lang: _make_corpus(tmp_path / lang, i, n, rng) for i, (lang, n) in enumerate(sizes.items())}


def _cfg(corpora, weights=(0.6, 0.1, 0.3), caps=(10, 20, 10), seed=5, **kw):
    specs = [CorpusSpec(corpora[lang], lang, w, e) for lang, w, e in zip(("nb", "se", "en"), weights, caps)]
    return MixtureConfig(specs, seq_length=L, seed=seed, **kw)


def test_plan_numbers_table_and_json(corpora, tmp_path):
    plan = compute_plan(_cfg(corpora), 1000)
    s = {c.language: c for c in plan.corpora}
    assert [c.samples for c in plan.corpora] == [600, 100, 300]
    assert s["nb"].tokens == 4001 and s["nb"].windows_per_epoch == 500
    assert s["se"].windows_per_epoch == (337 - 1) // L == 42
    assert s["se"].epochs == pytest.approx(100 / 42)
    assert s["se"].unique_tokens == 42 * L and s["se"].total_tokens == 100 * L
    assert s["en"].unique_tokens == 300 * L  # under one epoch: all distinct
    table = plan.table()
    assert "se" in table and "2.38" in table and "1,000" in table
    plan.save(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["train_samples"] == 1000 and [c["samples"] for c in d["corpora"]] == [600, 100, 300]


def test_rounding_sums_to_run_length(corpora):
    plan = compute_plan(_cfg(corpora, weights=(1, 1, 1)), 1001)
    assert sum(c.samples for c in plan.corpora) == 1001 and sorted(c.samples for c in plan.corpora) == [333, 334, 334]


def test_epoch_cap_error_names_corpus_and_numbers(corpora):
    with pytest.raises(EpochCapError, match=r"'se'.*100 samples.*2\.38 epochs.*42 samples/epoch.*max_epochs=2"):
        compute_plan(_cfg(corpora, caps=(10, 2, 10)), 1000)


def test_redistribution_is_opt_in_and_reported(corpora):
    plan = compute_plan(_cfg(corpora, caps=(10, 2, 10), allow_redistribute=True), 1000)
    s = {c.language: c for c in plan.corpora}
    assert s["se"].samples == 84  # 2 epochs x 42
    assert s["nb"].samples + s["en"].samples == 916 and s["nb"].samples > 600 and s["en"].samples > 300
    assert abs(s["nb"].samples / s["en"].samples - 2.0) < 0.01
    assert any("se" in n and "capped" in n for n in plan.notes) and "note:" in plan.table()
    with pytest.raises(EpochCapError, match="even with redistribution"):
        compute_plan(_cfg(corpora, caps=(0.1, 0.1, 0.1), allow_redistribute=True), 1000)


@pytest.mark.parametrize("n,leaf", [(1, 8), (2, 8), (1000, 65536), (5000, 64), (777, 1)])
def test_epoch_permutation_cpp_equals_reference(n, leaf):
    a = _helpers.epoch_permutation(n, 42, 3, 7, leaf)
    b = reference_epoch_permutation(n, 42, 3, 7, leaf)
    assert np.array_equal(a, b)
    assert np.array_equal(np.sort(a), np.arange(n))
    if n > 10:
        assert not np.array_equal(a, np.arange(n))
        assert not np.array_equal(a, _helpers.epoch_permutation(n, 42, 3, 8, leaf))  # next epoch differs


@pytest.mark.parametrize("case", range(4))
def test_index_cpp_equals_reference(case):
    rng = np.random.default_rng(case)
    K = int(rng.integers(1, 6))
    samples = rng.integers(0, 400, size=K)
    windows = rng.integers(1, 150, size=K)
    start = rng.integers(0, 300, size=K) if case % 2 else np.zeros(K, dtype=np.int64)  # mid-epoch starts
    slots = rng.permutation(10)[:K]
    leaf = [65536, 16, 4, 1][case]
    N = int(samples.sum())
    oc, ow = np.empty(N, np.uint8), np.empty(N, np.uint32)
    _helpers.build_mixture_index(samples, start, windows, slots, 99, oc, ow, leaf)
    rc, rw = reference_mixture_index(samples, start, windows, slots, 99, leaf=leaf)
    assert np.array_equal(oc, rc) and np.array_equal(ow, rw)
    for c in range(K):
        assert int((oc == slots[c]).sum()) == samples[c]
    # A phase cut short by a later change: the first n samples of the same interleaving, and
    # each corpus's count among them (where the next phase starts its counter).
    n = int(rng.integers(0, N + 1))
    cc, cw = np.empty(n, np.uint8), np.empty(n, np.uint32)
    _helpers.build_mixture_index(samples, start, windows, slots, 99, cc, cw, leaf)
    assert np.array_equal(cc, oc[:n]) and np.array_equal(cw, ow[:n])
    assert np.array_equal(reference_mixture_index(samples, start, windows, slots, 99, leaf=leaf, length=n)[1], cw)
    counts = _helpers.mixture_prefix_counts(samples, n)
    assert np.array_equal(counts, reference_prefix_counts(samples, n))
    assert counts.tolist() == [int((cc == slots[c]).sum()) for c in range(K)]
    with pytest.raises(ValueError, match="at most sum"):
        _helpers.build_mixture_index(samples, start, windows, slots, 99, np.empty(N + 1, np.uint8),
                                     np.empty(N + 1, np.uint32), leaf)


def test_index_deterministic_smooth_and_shuffled_per_epoch(corpora):
    plan = compute_plan(_cfg(corpora), 2000)
    a = build_index_arrays([(plan, [0, 1, 2])], 5)
    b = build_index_arrays([(plan, [0, 1, 2])], 5)
    c = build_index_arrays([(plan, [0, 1, 2])], 6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    corpus, window = a
    # Smooth interleaving: every prefix holds each corpus's share to within 1 sample.
    for k, cp in enumerate(plan.corpora):
        got = np.cumsum(corpus == k)
        want = cp.samples * np.arange(1, 2001) / 2000
        assert np.abs(got - want).max() <= 1.0
    # Per corpus, each epoch visits every window exactly once, in a fresh order.
    se = window[corpus == 1]
    n = plan.corpora[1].windows_per_epoch
    epochs = [se[i:i + n] for i in range(0, len(se) - n + 1, n)]
    assert len(epochs) >= 4
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(n))
    assert not np.array_equal(epochs[0], epochs[1])


def test_dataset_samples_are_token_windows(corpora, tmp_path):
    ds = MixtureDataset(_cfg(corpora), 500, cache_dir=tmp_path / "cache", log=io.StringIO())
    streams = [IndexedReader(corpora[lang]).tokens for lang in ("nb", "se", "en")]
    for g in [0, 1, 2, 77, 250, 499]:
        s = ds[g]
        c, w = ds.window(g)
        assert s["corpus"] == c and s["language"] == ["nb", "se", "en"][c]
        assert s["tokens"].dtype == np.int64 and s["tokens"].shape == (L + 1,)
        assert s["tokens"].tolist() == streams[c][w * L:w * L + L + 1].tolist()
        assert s["tokens"][0] == c * BASE + w * L  # packed across document boundaries
    with pytest.raises(IndexError):
        ds[500]


def test_resume_from_cache_without_rebuild(corpora, tmp_path):
    log = io.StringIO()
    ds = MixtureDataset(_cfg(corpora), 3000, cache_dir=tmp_path / "cache", log=log)
    assert "built and saved" in log.getvalue() and "Mixture plan" in log.getvalue()
    log2 = io.StringIO()
    ds2 = MixtureDataset(_cfg(corpora), 3000, cache_dir=tmp_path / "cache", log=log2)
    assert "loaded" in log2.getvalue() and ds2.cache_path == ds.cache_path
    assert isinstance(ds2.window_ids, np.memmap)  # memory-mapped, not rebuilt
    consumed = 1234  # resume: start at any consumed-sample count by random access
    for g in range(consumed, consumed + 50):
        assert ds2[g]["tokens"].tolist() == ds[g]["tokens"].tolist()
    ds3 = pickle.loads(pickle.dumps(ds2))  # DataLoader workers
    assert ds3[consumed]["tokens"].tolist() == ds[consumed]["tokens"].tolist()


def test_changed_corpus_or_config_is_never_reused(corpora, tmp_path):
    cache = tmp_path / "cache"
    ds = MixtureDataset(_cfg(corpora), 300, cache_dir=cache, log=io.StringIO())
    fp = ds.fingerprint
    assert MixtureDataset(_cfg(corpora, weights=(0.5, 0.2, 0.3)), 300, cache_dir=cache,
                          verbose=False).fingerprint != fp
    assert MixtureDataset(_cfg(corpora, seed=6), 300, cache_dir=cache, verbose=False).fingerprint != fp
    assert MixtureDataset(_cfg(corpora), 301, cache_dir=cache, verbose=False).fingerprint != fp
    # Rewrite one corpus with other content (same size, same mtime): detected via its files.
    st = os.stat(corpora["se"] + ".bin")
    _make_corpus(corpora["se"], 7, 337, np.random.default_rng(1))
    os.utime(corpora["se"] + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    log = io.StringIO()
    ds2 = MixtureDataset(_cfg(corpora), 300, cache_dir=cache, log=log)
    assert ds2.fingerprint != fp and "built and saved" in log.getvalue()
    g = int(np.flatnonzero(np.asarray(ds2.corpus_ids) == 1)[0])
    assert ds2[g]["tokens"][0] // BASE == 7  # reads the new content
    assert len(os.listdir(cache)) == 5


def _stream(n, seed, slot, length):
    """Corpus ``slot``'s shuffled window stream (epoch after epoch), its first ``length``."""
    return np.concatenate([reference_epoch_permutation(n, seed, slot, e) for e in range(length // n + 1)])[:length]


def _uneven(corpora):  # weights whose shares of a prefix never round as those of the whole run
    return (_cfg(corpora, weights=(0.55, 0.13, 0.32)),
            _cfg(corpora, weights=(0.21, 0.47, 0.32), caps=(10, 40, 10)))


@pytest.mark.parametrize("K", [1, 333, 701, 1234, 1999])
def test_mid_run_change_keeps_what_was_consumed(corpora, tmp_path, K):
    """The user's case: a run planned for N samples with mixture A stops after K samples; it is
    restarted with a change to B at K. What it already read must stay what it read, and each
    corpus must go on where it stopped."""
    N = 2000
    cfg_a, cfg_b = _uneven(corpora)
    original = MixtureDataset(cfg_a, N, cache_dir=tmp_path / "c", log=io.StringIO())
    changed = MixtureDataset(cfg_a, N, cache_dir=tmp_path / "c", changes=[(K, cfg_b)], log=io.StringIO())
    oc, ow = np.asarray(original.corpus_ids), np.asarray(original.window_ids)
    cc, cw = np.asarray(changed.corpus_ids), np.asarray(changed.window_ids)
    assert np.array_equal(cc[:K], oc[:K]) and np.array_equal(cw[:K], ow[:K])
    # What the two runs really read: the original's [0, K), then the changed run's [K, N).
    read_c, read_w = np.concatenate([oc[:K], cc[K:]]), np.concatenate([ow[:K], cw[K:]])
    plan_a, plan_b = changed.plans
    assert plan_b.start_sample == K and plan_b.train_samples == N - K
    for c in range(3):
        n = plan_a.corpora[c].windows_per_epoch
        reads = read_w[read_c == c]
        # Each window (corpus, position) at most once per epoch, every one in a whole epoch ...
        for e in range(0, len(reads), n):
            epoch = reads[e:e + n]
            assert len(np.unique(epoch)) == len(epoch)
            assert len(epoch) < n or np.array_equal(np.sort(epoch), np.arange(n))
        # ... and in the stream's order: nothing skipped, nothing repeated across the change.
        assert np.array_equal(reads, _stream(n, 5, c, len(reads)))
        # Epoch accounting: the plans count what the index holds.
        before, after = int((oc[:K] == c).sum()), int((cc[K:] == c).sum())
        assert plan_a.corpora[c].samples == before and plan_b.corpora[c].start_counter == before
        assert plan_b.corpora[c].samples == after
        assert plan_b.corpora[c].epochs_by_end == pytest.approx(len(reads) / n)
    assert [c.samples for c in plan_b.corpora] == [c.samples for c in compute_plan(cfg_b, N - K).corpora]
    # The resume check: the first K samples are recognisably unchanged, later ones are not.
    assert changed.consumed_fingerprint(K) == original.consumed_fingerprint(K)
    assert changed.fingerprint != original.fingerprint
    if K < N - 1:
        assert changed.consumed_fingerprint(K + 1) != original.consumed_fingerprint(K + 1)
    changed.save_plan(tmp_path / "plan.json")
    d = json.loads((tmp_path / "plan.json").read_text())
    assert [p["start_sample"] for p in d["phases"]] == [0, K]
    assert d["phases"][0]["planned_samples"] == N and d["phases"][0]["train_samples"] == K


def test_mid_run_change_plan_table_counts_earlier_phases(corpora):
    K, N = 701, 2000
    cfg_a, cfg_b = _uneven(corpora)
    plan_a, plan_b = MixtureDataset(cfg_a, N, changes=[(K, cfg_b)], verbose=False).plans
    se_b = plan_b.corpora[1]
    assert se_b.epochs_by_end == pytest.approx((plan_a.corpora[1].samples + se_b.samples) / 42)
    assert "run ep" in plan_b.table() and f"{se_b.epochs_by_end:.2f}" in plan_b.table()
    assert "run ep" not in plan_a.table() and "cut there" in plan_a.table()


def test_a_later_change_leaves_earlier_phases_alone(corpora):
    """Changes made one after the other: each restart keeps everything before its change."""
    N, K1, K2 = 2000, 500, 1333
    cfg_a, cfg_b = _uneven(corpora)
    cfg_c = _cfg(corpora, weights=(0.3, 0.3, 0.4), caps=(10, 40, 10))
    one = MixtureDataset(cfg_a, N, changes=[(K1, cfg_b)], verbose=False)
    two = MixtureDataset(cfg_a, N, changes=[(K1, cfg_b), (K2, cfg_c)], verbose=False)
    assert np.array_equal(np.asarray(two.corpus_ids)[:K2], np.asarray(one.corpus_ids)[:K2])
    assert np.array_equal(np.asarray(two.window_ids)[:K2], np.asarray(one.window_ids)[:K2])
    assert two.consumed_fingerprint(K2) == one.consumed_fingerprint(K2) != two.consumed_fingerprint(K2 + 1)
    # A change placed before what was consumed alters it, and the resume check says so.
    early = MixtureDataset(cfg_a, N, changes=[(K1 - 10, cfg_b)], verbose=False)
    assert early.consumed_fingerprint(K1) != one.consumed_fingerprint(K1)
    assert early.consumed_fingerprint(K1 - 10) == one.consumed_fingerprint(K1 - 10)
    # Another run length re-plans the first phase: also detected.
    assert MixtureDataset(cfg_a, N + 8, changes=[(K1, cfg_b)], verbose=False).consumed_fingerprint(K1) != \
        one.consumed_fingerprint(K1)
    # The multi-phase index equals its Python reference.
    ref = build_index_arrays(list(zip(plan_phases(two._phases, N, {p: t for p, t in zip(
        two.prefixes, [c.tokens for c in two.plans[0].corpora])}, backend="reference"), [[0, 1, 2]] * 3)), 5,
        backend="reference")
    assert np.array_equal(ref[0], np.asarray(two.corpus_ids)) and np.array_equal(ref[1], np.asarray(two.window_ids))


def test_resume_note_tells_a_change_after_the_consumed_samples_from_one_before(corpora):
    N, K, step = 2000, 800, 100  # resumed at step 100 of 8 samples: 800 consumed
    cfg_a, cfg_b = _uneven(corpora)
    original = MixtureDataset(cfg_a, N, verbose=False)
    saved = (original.fingerprint, original.consumed_fingerprint(K))
    assert original.resume_note(K, step, *saved) is None
    for at in (K, K + 80):  # the change at the resume point, or later: a note
        note = MixtureDataset(cfg_a, N, changes=[(at, cfg_b)], verbose=False).resume_note(K, step, *saved)
        assert note.startswith("mixture: ") and "only after the 800 samples consumed" in note
    early = MixtureDataset(cfg_a, N, changes=[(K - 8, cfg_b)], verbose=False)  # alters what was read
    note = early.resume_note(K, step, *saved)
    assert note.startswith("WARNING: the first 800 samples") and "at_step >= 100" in note
    assert "cannot tell" in early.resume_note(K, step, saved[0], None)  # a checkpoint from before the check


def test_cut_phase_epoch_caps(corpora):
    """A first phase cut short is checked for what it reads; its interleaving is the one a run
    without the change used (redistributed when that run redistributed)."""
    N, K = 2000, 300
    heavy_se = _cfg(corpora, weights=(0.4, 0.3, 0.3), caps=(10, 4, 10))  # se over the run: 14 epochs > 4
    _, cfg_b = _uneven(corpora)
    with pytest.raises(EpochCapError, match="'se'"):
        MixtureDataset(heavy_se, N, verbose=False)
    plan_a = MixtureDataset(heavy_se, N, changes=[(K, cfg_b)], verbose=False).plans[0]
    assert [c.samples for c in plan_a.corpora] == [120, 90, 90]  # configured weights: 90 = 2.1 epochs
    assert any("checked for the samples of this phase only" in n for n in plan_a.notes)
    with pytest.raises(EpochCapError, match=r"phase \[0, 1,000\).*'se'.*above max_epochs=4"):
        MixtureDataset(heavy_se, N, changes=[(1000, cfg_b)], verbose=False)  # 300 = 7.1 epochs
    redistributed = dataclasses.replace(heavy_se, allow_redistribute=True)
    original = MixtureDataset(redistributed, N, verbose=False)
    changed = MixtureDataset(redistributed, N, changes=[(K, cfg_b)], verbose=False)
    assert np.array_equal(np.asarray(changed.window_ids)[:K], np.asarray(original.window_ids)[:K])
    assert np.array_equal(np.asarray(changed.corpus_ids)[:K], np.asarray(original.corpus_ids)[:K])
    assert any("capped" in n for n in changed.plans[0].notes)


def test_mid_run_change_validation(corpora):
    with pytest.raises(ValueError, match="seq_length and seed"):
        MixtureDataset(_cfg(corpora), 100, changes=[(50, _cfg(corpora, seed=9))], verbose=False)
    with pytest.raises(ValueError, match="increasing"):
        MixtureDataset(_cfg(corpora), 100, changes=[(100, _cfg(corpora))], verbose=False)


def test_end_to_end_from_jsonl(tmp_path, spm_model, tokenizer, corpus_texts):
    from megatron_normistral.data.preprocess import PreprocessConfig, preprocess

    for lang in ("nb", "se"):
        src = tmp_path / f"{lang}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[lang][:15]))
        preprocess(PreprocessConfig([str(src)], str(tmp_path / lang), spm_model, workers=0, append_eod=True,
                                    progress_interval=0), log=io.StringIO())
    cfg = MixtureConfig([CorpusSpec(str(tmp_path / "nb"), "nb", 0.8, 5), CorpusSpec(str(tmp_path / "se"), "se", 0.2, 50)],
                        seq_length=64, seed=1)
    ds = MixtureDataset(cfg, 200, verbose=False)
    samples = [ds[g] for g in range(200)]
    assert {s["language"] for s in samples} == {"nb", "se"}
    assert all(len(s["tokens"]) == 65 and s["tokens"].max() < tokenizer.vocab_size for s in samples)
    assert any(tokenizer.eod_id in s["tokens"].tolist() for s in samples)  # documents packed with EOD between


def test_plan_mixture_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "tools" / "plan_mixture.py"), str(root / "examples" / "data" / "mixture_paper.json"),
           "--steps", "60000", "--global-batch", "1024", "--save", str(tmp_path / "plan.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "61,440,000" in p.stdout and "se" in p.stdout
    d = json.loads((tmp_path / "plan.json").read_text())
    assert sum(c["samples"] for c in d["corpora"]) == 61_440_000
    se = next(c for c in d["corpora"] if c["label"] == "se")
    assert 14 < se["epochs"] < 16
    # Ten times the run: Sámi would need ~150 epochs > its cap of 16 -> error naming it.
    p = subprocess.run(cmd[:4] + ["600000"] + cmd[5:7], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "'se'" in p.stderr and "max_epochs=16" in p.stderr
