"""Hybrid causal / masked next-token objective (megatron_normistral.data.objective): the C++
path against the numpy reference, the invariants of span masking, and the batch (labels, loss
mask, attention mask) against a hand-written construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_normistral import _helpers
from megatron_normistral.data.objective import ObjectiveConfig, build_batch, corrupt, sample_modes

EOD, MASK = 2, 4
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "masked")


def _tokens(rng, n, vocab, num_special, special_frac, eod=EOD):
    x = rng.integers(num_special, vocab, n)
    sp = rng.random(n) < special_frac
    x[sp] = rng.integers(0, max(num_special, 1), int(sp.sum())) if num_special > 0 else x[sp]
    x[rng.random(n) < special_frac / 2] = eod if eod < vocab else x[0]
    return x.astype(np.int64)


def _check_corruption(x, out, chosen, cfg, vocab, mask_id):
    """Invariants of one corrupted sample; returns the number of maskable positions L."""
    ns = cfg.num_special_tokens
    maskable = x >= ns
    maskable[0] = False
    L = int(maskable.sum())
    num, den = cfg.rate_fraction()
    assert chosen.sum() == L * num // den            # exactly floor(L * rate) chosen
    assert not chosen[~maskable].any()               # specials and position 0 never chosen
    assert np.array_equal(out[~chosen], x[~chosen])  # nothing else touched
    assert ((out[chosen] == mask_id) | (out[chosen] >= ns)).all()
    assert out.dtype == np.int64 and chosen.dtype == bool and out.shape == x.shape == chosen.shape
    return L


# ----------------------------------------------------------------------------- C++ == numpy

@st.composite
def _case(draw):
    ns, vocab = draw(st.sampled_from([(0, 50), (1, 7), (16, 100), (16, 32768), (1000, 131072)]))
    mask_prob = draw(st.sampled_from([0.8, 0.0, 1.0, 0.5]))
    random_prob = min(draw(st.sampled_from([0.1, 0.0, 0.5])), 1 - mask_prob)
    cfg = ObjectiveConfig(
        masked_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        mask_rate=draw(st.sampled_from([1 / 6, 0.15, 0.5, 1.0, 0.0, 1 / 3])),
        max_span=draw(st.integers(1, 6)),
        mask_prob=mask_prob,
        random_prob=random_prob,
        num_special_tokens=ns,
        attention=draw(st.sampled_from(["document", "causal"])),
        seed=draw(st.integers(0, 2**64 - 1)),
    )
    n = draw(st.integers(2, 300))
    special_frac = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = draw(st.integers(1, 3))
    xs = [_tokens(rng, n, vocab, ns, special_frac) for _ in range(b)]
    idx = [draw(st.integers(0, 2**63 - 1)) for _ in range(b)]
    mask_id = draw(st.sampled_from([MASK % vocab, vocab - 1]))
    return cfg, xs, idx, vocab, mask_id


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_cpp_equals_numpy(case):
    cfg, xs, idx, vocab, mask_id = case
    for x, g in zip(xs, idx):
        a, ca = corrupt(x, g, cfg, mask_id, vocab, backend="cpp")
        b, cb = corrupt(x, g, cfg, mask_id, vocab, backend="reference")
        assert np.array_equal(a, b) and np.array_equal(ca, cb)
        _check_corruption(x, a, ca, cfg, vocab, mask_id)
    assert np.array_equal(sample_modes(cfg.seed, idx, cfg.masked_fraction, backend="cpp"),
                          sample_modes(cfg.seed, idx, cfg.masked_fraction, backend="reference"))
    eod = EOD if EOD < vocab else 0
    bc = build_batch(xs, idx, cfg, eod_id=eod, mask_id=mask_id, vocab_size=vocab, backend="cpp")
    bn = build_batch(xs, idx, cfg, eod_id=eod, mask_id=mask_id, vocab_size=vocab, backend="reference")
    for k in BATCH_KEYS:
        assert bc[k].dtype == bn[k].dtype and torch.equal(bc[k], bn[k]), k
    # never score a special target, in either mode
    assert (bc["loss_mask"][bc["labels"] < cfg.num_special_tokens] == 0).all()


def test_modes_cpp_equals_numpy_and_fraction():
    idx = np.arange(200_000, dtype=np.int64) * 7919 + 3
    for seed in (0, 1234, 2**64 - 1):
        c = sample_modes(seed, idx, 0.1)
        assert c.dtype == bool
        assert np.array_equal(c, sample_modes(seed, idx, 0.1, backend="reference"))
        assert abs(c.mean() - 0.1) < 0.004           # binomial sd ~0.0007
    assert not sample_modes(1, idx[:1000], 0.0).any() and sample_modes(1, idx[:1000], 1.0).all()
    a, b = sample_modes(1, idx[:5000], 0.1), sample_modes(2, idx[:5000], 0.1)
    assert not np.array_equal(a, b)                  # the seed matters
    # deterministic from (seed, index) only: any subset/order gives the same per-index mode
    perm = np.random.default_rng(0).permutation(5000)
    assert np.array_equal(sample_modes(1, idx[:5000][perm], 0.1), a[perm])


def test_cpp_entry_points_are_the_extension():
    x = _tokens(np.random.default_rng(1), 257, 1000, 16, 0.05)
    cfg = ObjectiveConfig()
    num, den = cfg.rate_fraction()
    tm, tr = cfg.thresholds()
    out, ch = _helpers.objective_corrupt(x, 11, cfg.seed, 16, 3, num, den, tm, tr, MASK, 1000)
    ref, rch = corrupt(x, 11, cfg, MASK, 1000, backend="reference")
    assert np.array_equal(out, ref) and np.array_equal(ch, rch)


# ----------------------------------------------------------------------------- span masking

def test_exact_count_specials_and_spans_long_sequence():
    rng = np.random.default_rng(7)
    cfg = ObjectiveConfig()
    for g in range(20):
        x = _tokens(rng, 4097, 32768, 16, 0.05)
        out, chosen = corrupt(x, g, cfg, MASK, 32768)
        L = _check_corruption(x, out, chosen, cfg, 32768, MASK)
        assert chosen.sum() == L // 6 and L > 3000
    # a Tekken-like vocabulary: 1000 specials, none chosen
    cfg = ObjectiveConfig(num_special_tokens=1000)
    x = _tokens(rng, 2049, 131072, 1000, 0.2)
    out, chosen = corrupt(x, 3, cfg, 10, 131072)
    L = _check_corruption(x, out, chosen, cfg, 131072, 10)
    assert chosen.sum() == L // 6 and not chosen[x < 1000].any()
    assert (out[(out != x)] == 10).sum() > 0 and (out[(out != x) & (out != 10)] >= 1000).all()


def test_too_few_maskable_tokens():
    cfg = ObjectiveConfig()
    x = np.array([20, 3, 3, 21, 22, 3, 23, 24, 25], dtype=np.int64)  # 5 maskable -> floor(5/6) = 0
    out, chosen = corrupt(x, 0, cfg, MASK, 100)
    assert not chosen.any() and np.array_equal(out, x)
    x = np.full(7, 3, dtype=np.int64)
    assert not corrupt(x, 0, ObjectiveConfig(mask_rate=1.0), MASK, 100)[1].any()
    # rate 1: every maskable position chosen
    x = np.array([20, 3, 21, 22, 3, 23], dtype=np.int64)
    assert np.array_equal(corrupt(x, 5, ObjectiveConfig(mask_rate=1.0), MASK, 100)[1], (x >= 16) & (np.arange(6) > 0))


def _runs(chosen):
    """Lengths of maximal runs of chosen positions."""
    d = np.diff(np.concatenate([[0], chosen.astype(np.int8), [0]]))
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def test_80_10_10_split_and_span_lengths():
    vocab, ns = 50_000, 16
    cfg = ObjectiveConfig()
    rng = np.random.default_rng(11)
    x = _tokens(rng, 1025, vocab, ns, 0.0)
    kinds = np.zeros(3)
    runs1, runs3 = [], []
    for g in range(400):
        out, chosen = corrupt(x, g, cfg, MASK, vocab)
        o, xo = out[chosen], x[chosen]
        n_mask = (o == MASK).sum()
        n_keep = (o == xo).sum()
        kinds += [n_mask, n_keep, len(o) - n_mask - n_keep]
        runs3.append(_runs(chosen))
        runs1.append(_runs(corrupt(x, g, ObjectiveConfig(max_span=1), MASK, vocab)[1]))
    frac = kinds / kinds.sum()                         # ~68k positions in ~34k spans
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.015 and abs(frac[2] - 0.1) < 0.015, frac
    r1, r3 = np.concatenate(runs1).mean(), np.concatenate(runs3).mean()
    assert r1 < 1.35 and 2.0 < r3 < 3.0, (r1, r3)       # spans uniform in {1,2,3}: mean 2 (+ merges)
    # random replacements are regular tokens, spread over the whole regular range
    cfg = ObjectiveConfig(mask_prob=0.0, random_prob=1.0)
    seen = np.concatenate([corrupt(np.full(601, 17), g, cfg, MASK, 24)[0] for g in range(30)])
    assert set(np.unique(seen)) == set(range(16, 24))


def test_same_index_same_result_whatever_the_batch():
    cfg = ObjectiveConfig(masked_fraction=0.5, seed=99)
    rng = np.random.default_rng(3)
    pool = {g: _tokens(rng, 65, 1000, 16, 0.1) for g in (5, 17, 99, 1_000_003, 2**40)}
    modes = dict(zip(pool, sample_modes(cfg.seed, list(pool), 0.5)))
    assert any(modes.values()) and not all(modes.values())
    kw = dict(eod_id=EOD, mask_id=MASK, vocab_size=1000)
    full = build_batch(list(pool.values()), list(pool), cfg, **kw)
    for order in ([2**40, 5], [17], [99, 1_000_003, 17, 5]):
        part = build_batch([pool[g] for g in order], order, cfg, **kw)
        for j, g in enumerate(order):
            i = list(pool).index(g)
            for k in BATCH_KEYS:
                assert torch.equal(part[k][j], full[k][i]), (g, k)
    again = build_batch(list(pool.values()), list(pool), cfg, **kw)
    assert all(torch.equal(again[k], full[k]) for k in BATCH_KEYS)
    other = build_batch(list(pool.values()), list(pool), ObjectiveConfig(masked_fraction=0.5, seed=100), **kw)
    assert not all(torch.equal(other[k], full[k]) for k in BATCH_KEYS)


# ----------------------------------------------------------------------------- hand-made batch

def _grid(rows):
    return torch.tensor([[c == "x" for c in r] for r in rows], dtype=torch.bool)


def test_hand_made_batch():
    # s = 8, two documents: [a b c EOD | d e f g h]; label positions: x[1..8].
    # sample 0 also holds a special (1) inside its second document, at x[6].
    a = np.array([20, 21, 22, EOD, 23, 24, 1, 25, 26], dtype=np.int64)
    b = np.array([30, 31, 32, EOD, 33, 34, 35, 36, 37], dtype=np.int64)
    cfg = ObjectiveConfig(masked_fraction=0.5, seed=5)
    idx = np.arange(1000)
    m = sample_modes(cfg.seed, idx, 0.5)
    gc, gm = int(idx[~m][0]), int(idx[m][0])          # one causal, one masked global index
    kw = dict(eod_id=EOD, mask_id=MASK, vocab_size=100)
    out = build_batch([a, b], [gc, gm], cfg, **kw, dense_mask=True)

    corrupted, chosen = corrupt(b, gm, cfg, MASK, 100)
    assert chosen.sum() == 1                           # L = 7 (x[1..8] minus the EOD) -> floor(7/6)
    assert out["masked"].tolist() == [False, True]
    assert out["tokens"].tolist() == [[20, 21, 22, EOD, 23, 24, 1, 25], corrupted[:8].tolist()]
    assert out["labels"].tolist() == [[21, 22, EOD, 23, 24, 1, 25, 26], [31, 32, EOD, 33, 34, 35, 36, 37]]
    assert out["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 1, 1], chosen[1:].astype(float).tolist()]
    assert out["loss_mask"].dtype == torch.float32 and out["tokens"].dtype == torch.int64
    assert out["position_ids"].tolist() == [list(range(8))] * 2
    assert out["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2 and out["document_ids"].dtype == torch.int32
    # The dense mask derived from that description. True = masked out. Inputs 0..3 are document 0 (the EOD at 3 ends it), 4..7 document 1.
    causal_doc = _grid([".xxxxxxx",
                        "..xxxxxx",
                        "...xxxxx",
                        "....xxxx",
                        "xxxx.xxx",
                        "xxxx..xx",
                        "xxxx...x",
                        "xxxx...."])
    bidir_doc = _grid(["....xxxx",
                       "....xxxx",
                       "....xxxx",
                       "....xxxx",
                       "xxxx....",
                       "xxxx....",
                       "xxxx....",
                       "xxxx...."])
    assert out["attention_mask"].shape == (2, 1, 8, 8) and out["attention_mask"].dtype == torch.bool
    assert torch.equal(out["attention_mask"][0, 0], causal_doc)
    assert torch.equal(out["attention_mask"][1, 0], bidir_doc)

    plain = build_batch([a, b], [gc, gm], ObjectiveConfig(masked_fraction=0.5, seed=5, attention="causal"), **kw,
                        dense_mask=True)
    assert not plain["document_ids"].any()             # one document per sample
    causal = _grid(["." * (i + 1) + "x" * (7 - i) for i in range(8)])
    assert torch.equal(plain["attention_mask"][0, 0], causal)
    assert not plain["attention_mask"][1].any()
    for k in ("tokens", "labels", "loss_mask", "masked"):
        assert torch.equal(plain[k], out[k])
    assert "attention_mask" not in build_batch([a, b], [gc, gm], cfg, **kw)  # training batches carry no [s, s] mask

    # the masked sample's chosen position: corrupted per the 80/10/10 rule, never the EOD
    (p,) = np.flatnonzero(chosen)
    assert p != 3 and 1 <= p <= 8


def test_attention_mask_against_document_ids():
    """The description (document ids) and the dense mask derived from it against the
    definition: mask out (i, j) iff the documents differ, or (causal mode) j > i; a document
    ends at its EOD. Edge cases: EOD first/last, EOD runs."""
    rng = np.random.default_rng(5)
    cfg = ObjectiveConfig(masked_fraction=0.5)
    for trial in range(20):
        s = int(rng.integers(1, 40))
        xs = [_tokens(rng, s + 1, 100, 16, 0.0) for _ in range(4)]
        for x in xs:
            x[rng.random(s + 1) < rng.choice([0.0, 0.1, 0.5, 1.0])] = EOD
        xs[0][0] = EOD
        xs[1][s - 1] = EOD
        idx = list(range(trial * 4, trial * 4 + 4))
        out = build_batch(xs, idx, cfg, eod_id=EOD, mask_id=MASK, vocab_size=100, dense_mask=True)
        for x, m, ids, got in zip(xs, out["masked"].tolist(), out["document_ids"], out["attention_mask"]):
            is_eod = (x[:s] == EOD).astype(np.int64)
            doc = np.cumsum(is_eod) - is_eod
            assert np.array_equal(ids.numpy(), doc)
            ref = doc[:, None] != doc[None, :]
            if not m:
                ref |= np.triu(np.ones((s, s), dtype=bool), 1)
            assert np.array_equal(got[0].numpy(), ref)


# ----------------------------------------------------------------------------- errors

def test_errors():
    x = np.array([20, 21, 22], dtype=np.int64)
    cfg = ObjectiveConfig()
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError):
            corrupt(np.array([20, 200, 21]), 0, cfg, MASK, 100, backend=backend)
        with pytest.raises(ValueError):
            corrupt(np.array([20, -1, 21]), 0, cfg, MASK, 100, backend=backend)
        with pytest.raises(ValueError):
            build_batch([np.array([20, 200, 21])], [0], cfg, eod_id=EOD, mask_id=MASK, vocab_size=100,
                        backend=backend)
    with pytest.raises(ValueError):
        corrupt(x, 0, cfg, MASK, 100, backend="python")
    with pytest.raises(ValueError):
        corrupt(x, -1, cfg, MASK, 100)
    with pytest.raises(ValueError):
        corrupt(x, 0, cfg, 100, 100)                   # mask id outside the vocabulary
    with pytest.raises(ValueError):
        build_batch([x, x[:2]], [0, 1], cfg, eod_id=EOD, mask_id=MASK, vocab_size=100)
    with pytest.raises(ValueError):
        build_batch([x], [0, 1], cfg, eod_id=EOD, mask_id=MASK, vocab_size=100)
    for bad in (dict(masked_fraction=1.5), dict(max_span=0), dict(mask_prob=0.9, random_prob=0.2),
                dict(attention="full"), dict(seed=-1), dict(num_special_tokens=-1)):
        with pytest.raises(ValueError):
            ObjectiveConfig(**bad)
