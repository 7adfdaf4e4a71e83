"""Hybrid training objective of NorMistral-11b-warm (arXiv 2412.06484): 90% causal language
modelling, 10% masked next-token prediction (MNTP), and the batch the training loop feeds to the
model.

Usage (the training loop; ``s = ds[g]`` from :class:`~megatron_normistral.data.mixture.MixtureDataset`)::

    from megatron_normistral.data.objective import ObjectiveConfig, build_batch

    cfg = ObjectiveConfig(seed=1234)                       # masked_fraction=0.1, mask_rate=1/6, ...
    idx = [consumed_samples + i for i in range(micro_batch)]   # GLOBAL sample indices
    batch = build_batch([ds[g]["tokens"] for g in idx], idx, cfg,
                        eod_id=tok.eod, mask_id=tok.mask, vocab_size=tok.vocab_size)
    batch["tokens"], batch["labels"]          # int64 [b, s]
    batch["loss_mask"]                        # float32 [b, s]
    batch["position_ids"]                     # int64 [b, s], 0..s-1
    batch["document_ids"]                     # int32 [b, s], document of each token in its sample
    batch["masked"]                           # bool [b], the mode of each sample
    # dense_mask=True adds batch["attention_mask"]: bool [b, 1, s, s], True = masked out

Definitions, the one specification of the objective (``x``: one sample, ``s + 1`` token ids;
the C++ ``_helpers.objective_*`` functions in ``csrc/objective.cpp`` (``backend="cpp"``, the
default) and the numpy reference here (``backend="reference"``; ``"numpy"``, its old name, is
still accepted) implement exactly this and agree bit for bit; the tests compare them):

- Random numbers: counter based, from the shared core (:mod:`~megatron_normistral.data.reference`,
  mirrored by ``csrc/helpers.h``). Each purpose (MODE, SPAN, ORDER, ACTION, RANDOM) has a stream
  key ``key_path(seed, global_index, SALT)`` (``_SALT_*`` below) and
  ``draw_SALT(i) = draw(stream_key, i)``. A Bernoulli(p) test is ``(draw >> 11) < thr(p)`` with
  ``thr(p) = round(p * 2**53)``; a bounded integer in ``[0, n)`` is
  ``bounded(draw, n) = bounded32(draw, n) = ((draw >> 32) * n) >> 32``. Integer arithmetic only.
  *Why by global index:* the authors seeded the masking of a sample by the sum of its token ids.
  We key by (seed, global sample index) instead: the index of a sample in the run's sample stream
  does not depend on the parallel layout (data-parallel size, micro-batch size, gradient
  accumulation), so a run gives the same modes and masks under any layout and after a resume,
  any sample can be computed alone without replaying earlier ones, and two samples with equal
  content (or equal token sums) still get independent draws.
- Mode: masked iff ``(draw_MODE(0) >> 11) < thr(masked_fraction)``.
- Maskable positions: ``j`` in ``[1, s]`` (the positions that are labels; position 0 is never
  predicted) whose token is not special (``x[j] >= num_special_tokens``). ``L`` is their number;
  exactly ``target = floor(L * mask_rate)`` of them are chosen (``mask_rate`` is taken as the
  fraction ``Fraction(mask_rate).limit_denominator(10**6)``, so 1/6 is exactly 1/6 and the count
  is an exact integer ``L * num // den``).
- Spans: every run of consecutive maskable positions is cut left to right into spans of length
  ``1 + bounded(draw_SPAN(k), max_span)`` (k counts the spans of the whole sample); the
  last span of a run is cut at the run's end, so a span never covers a special token and never
  crosses a document boundary (EOD is special).
- Selection: a partial Fisher-Yates shuffle of the span list (step t swaps spans t and
  ``t + bounded(draw_ORDER(t), n_spans - t)``); spans are taken in that order until exactly
  ``target`` positions are chosen, the last span taken cut to the positions that still fit.
- Corruption, per chosen span (k: its index in the span list before the shuffle):
  ``u = draw_ACTION(k) >> 11``; if ``u < thr(mask_prob)`` every chosen position of the span
  becomes ``mask_id``, else if ``u < thr(mask_prob + random_prob)`` each becomes a random regular
  token ``num_special + bounded(draw_RANDOM(j), vocab_size - num_special)`` (j: the position),
  otherwise the span is kept.
- Labels: ``tokens = x'[:-1]`` (``x'``: corrupted in masked mode, ``x`` in causal mode),
  ``labels = x[1:]``; position i predicts token i + 1. ``loss_mask`` is 1 where the label is not
  special in causal mode, and 1 only where position i + 1 was chosen in masked mode (chosen
  positions are never special).
- Attention, described by ``document_ids`` and ``masked`` (``model.attention`` applies it, no
  ``[s, s]`` mask is built): ``"document"``: block diagonal over the packed documents (a
  document ends with its EOD token, and, when ``bos_id`` is given, starts with its BOS token,
  so ``<s> A </s> <s> B </s>`` and ``<s> A <s> B`` both give ``<s> A`` its own block and the
  ``<s>`` of B the start of B's; documents are read from the original ``x[:-1]``), causal
  within a document in causal mode and bidirectional within a document in masked mode;
  ``"causal"``: one document per sample, so causal over the whole sequence in causal mode and
  fully bidirectional in masked mode.
- ``position_ids``: ``0..s-1`` for every sample (RoPE positions run across packed documents, as
  the authors did).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Sequence

import numpy as np
import torch

from megatron_normistral import _helpers
from megatron_normistral.data.reference import U64, bounded32, check_backend, derive_key, draw, key_path

__all__ = ["ObjectiveConfig", "sample_modes", "corrupt", "build_batch"]

_ONE53 = 1 << 53
# Stream salts: keep in sync with csrc/objective.cpp.
_SALT_MODE = 0x6D6F64655F736C74
_SALT_SPAN = 0x7370616E5F6C656E
_SALT_ORDER = 0x6F726465725F6679
_SALT_ACTION = 0x616374696F6E5F75
_SALT_RANDOM = 0x72616E645F746F6B


@dataclass
class ObjectiveConfig:
    """Hybrid causal / masked next-token objective (the recipe's ``objective`` section). See the
    module docstring for definitions."""

    masked_fraction: float = 0.1
    """Probability that a sample is in masked (MNTP) mode; the others are causal."""

    mask_rate: float = 1 / 6
    """Fraction of a masked sample's maskable positions that are chosen."""

    max_span: int = 3
    """Chosen spans have lengths 1..max_span."""

    mask_prob: float = 0.8
    """A chosen span becomes <mask> with this probability."""

    random_prob: float = 0.1
    """A chosen span becomes random regular tokens with this probability (else it is kept)."""

    num_special_tokens: int = 16
    """Ids below this are special: never chosen, never scored."""

    attention: Literal["document", "causal"] = "document"
    """document: block-diagonal over the packed documents; causal: over the whole sequence."""

    seed: int = 1234
    """Seed of the objective (modes, spans): they depend on it and the global sample index only."""

    def __post_init__(self):
        if not 0.0 <= self.masked_fraction <= 1.0:
            raise ValueError(f"masked_fraction must be in [0, 1], got {self.masked_fraction}")
        if not 0.0 <= float(self.mask_rate) <= 1.0:
            raise ValueError(f"mask_rate must be in [0, 1], got {self.mask_rate}")
        if int(self.max_span) != self.max_span or self.max_span < 1:
            raise ValueError(f"max_span must be an integer >= 1, got {self.max_span}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1 + 1e-12:
            raise ValueError(f"need mask_prob, random_prob >= 0 and their sum <= 1, got "
                             f"{self.mask_prob}, {self.random_prob}")
        if int(self.num_special_tokens) != self.num_special_tokens or self.num_special_tokens < 0:
            raise ValueError(f"num_special_tokens must be an integer >= 0, got {self.num_special_tokens}")
        if self.attention not in ("document", "causal"):
            raise ValueError(f"attention must be 'document' or 'causal', got {self.attention!r}")
        if int(self.seed) != self.seed or not 0 <= self.seed <= U64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed}")

    # Integer parameters shared by both backends (computed once, here, for both).
    def rate_fraction(self) -> tuple[int, int]:
        """mask_rate as an exact fraction (num, den): target = L * num // den."""
        return _rate_fraction(self.mask_rate)

    def thresholds(self) -> tuple[int, int]:
        """(thr_mask, thr_random): a span is masked if u < thr_mask, random if u < thr_random."""
        return _threshold(self.mask_prob), _threshold(self.mask_prob + self.random_prob)


@functools.lru_cache(maxsize=64)
def _rate_fraction(rate: float) -> tuple[int, int]:
    f = Fraction(rate).limit_denominator(10**6)
    return f.numerator, f.denominator


@functools.lru_cache(maxsize=256)
def _threshold(p: float) -> int:
    """Integer threshold t with P(u < t) = p for u uniform on 53-bit integers."""
    return max(0, min(_ONE53, round(p * _ONE53)))


def _check_backend(backend: str) -> str:
    """'cpp' or 'reference' ('numpy', this module's old name for the reference, still works)."""
    return check_backend(backend, old_name="numpy")


# ----------------------------------------------------------------------------- numpy reference

def _draws(key: int, salt: int, n: int) -> np.ndarray:
    """Draws 0..n-1 of the stream ``salt`` of one sample key."""
    return draw(derive_key(key, salt), np.arange(n, dtype=np.uint64))


def _modes_reference(seed: int, indices: np.ndarray, threshold: int) -> np.ndarray:
    return (draw(key_path(seed, indices, _SALT_MODE), 0) >> np.uint64(11)) < np.uint64(threshold)


def _corrupt_reference(x: np.ndarray, global_index: int, config: ObjectiveConfig, mask_id: int,
                       vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    ns = config.num_special_tokens
    key = key_path(config.seed, global_index)
    out = x.copy()
    chosen = np.zeros(n, dtype=bool)

    # Spans over runs of maskable label positions 1..n-1, cut left to right.
    maskable = x >= ns
    maskable[0] = False
    L = int(maskable.sum())
    span_len = 1 + bounded32(_draws(key, _SALT_SPAN, n), config.max_span).astype(np.int64)
    spans: list[tuple[int, int]] = []
    j = 1
    while j < n:
        if not maskable[j]:
            j += 1
            continue
        run_end = j
        while run_end < n and maskable[run_end]:
            run_end += 1
        while j < run_end:
            length = min(int(span_len[len(spans)]), run_end - j)
            spans.append((j, length))
            j += length

    num, den = config.rate_fraction()
    target = L * num // den
    if target == 0:
        return out, chosen

    thr_mask, thr_random = config.thresholds()
    n_spans = len(spans)
    order_draws = _draws(key, _SALT_ORDER, n_spans)
    action_u = _draws(key, _SALT_ACTION, n_spans) >> np.uint64(11)
    random_tok = ns + bounded32(_draws(key, _SALT_RANDOM, n), vocab_size - ns).astype(np.int64)
    order = list(range(n_spans))
    got = 0
    t = 0
    while got < target:  # partial Fisher-Yates; target <= L guarantees termination
        r = t + bounded32(int(order_draws[t]), n_spans - t)
        order[t], order[r] = order[r], order[t]
        k = order[t]
        start, length = spans[k]
        take = min(length, target - got)
        got += take
        sl = slice(start, start + take)
        chosen[sl] = True
        u = int(action_u[k])
        if u < thr_mask:
            out[sl] = mask_id
        elif u < thr_random:
            out[sl] = random_tok[sl]
        t += 1
    return out, chosen


# ----------------------------------------------------------------------------- public API

def sample_modes(seed: int, global_indices, masked_fraction: float, backend: str = "cpp") -> np.ndarray:
    """Mode of each global sample index: True = masked (MNTP), False = causal."""
    backend = _check_backend(backend)
    idx = np.ascontiguousarray(global_indices, dtype=np.int64).reshape(-1)
    if (idx < 0).any():
        raise ValueError("global indices must be >= 0")
    if not 0.0 <= masked_fraction <= 1.0:
        raise ValueError(f"masked_fraction must be in [0, 1], got {masked_fraction}")
    thr = _threshold(masked_fraction)
    if backend == "cpp":
        return _helpers.objective_sample_modes(int(seed), idx, thr)
    return _modes_reference(int(seed), idx, thr)


def _check_vocab(x: np.ndarray, config: ObjectiveConfig, mask_id: int, vocab_size: int) -> None:
    if not config.num_special_tokens < vocab_size < (1 << 32) + config.num_special_tokens:
        raise ValueError(f"need num_special_tokens ({config.num_special_tokens}) < vocab_size ({vocab_size})")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} outside [0, vocab_size={vocab_size})")
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a sample must be a 1-D array of seq_length + 1 >= 2 token ids, got shape {x.shape}")


def corrupt(sample, global_index: int, config: ObjectiveConfig, mask_id: int, vocab_size: int,
            backend: str = "cpp") -> tuple[np.ndarray, np.ndarray]:
    """Span masking of one sample (``s + 1`` token ids) as if it were in masked mode.

    Returns ``(corrupted, chosen)``: an int64 copy with the chosen spans corrupted, and a bool
    array marking the chosen positions (exactly ``floor(L * mask_rate)`` of them).
    """
    backend = _check_backend(backend)
    x = np.ascontiguousarray(sample, dtype=np.int64)
    _check_vocab(x, config, mask_id, vocab_size)
    if global_index < 0:
        raise ValueError(f"global index must be >= 0, got {global_index}")
    if backend == "cpp":
        num, den = config.rate_fraction()
        thr_mask, thr_random = config.thresholds()
        return _helpers.objective_corrupt(x, int(global_index), int(config.seed), int(config.num_special_tokens),
                                          int(config.max_span), num, den, thr_mask, thr_random, int(mask_id),
                                          int(vocab_size))
    if x.min() < 0 or x.max() >= vocab_size:
        raise ValueError(f"token ids outside [0, vocab_size={vocab_size})")
    return _corrupt_reference(x, int(global_index), config, int(mask_id), int(vocab_size))


def build_batch(samples: Sequence[np.ndarray], global_indices: Sequence[int], config: ObjectiveConfig, *,
                eod_id: int, mask_id: int, vocab_size: int, backend: str = "cpp",
                dense_mask: bool = False, bos_id: int | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch of the hybrid objective from ``b`` samples of ``s + 1`` tokens each.

    Returns torch tensors: tokens/labels int64 [b, s], loss_mask float32 [b, s], position_ids
    int64 [b, s], and the attention as a description: document_ids int32 [b, s] and masked
    bool [b] (the mode of each sample). ``dense_mask``: also the same attention as megatron-core's
    dense mask, attention_mask bool [b, 1, s, s] (True = masked out), for tests and references;
    training never needs it (every attention backend reads the description). ``bos_id``: a
    BOS token also starts a document (corpora written with BOS but without EOD).
    """
    backend = _check_backend(backend)
    if len(samples) != len(global_indices) or len(samples) == 0:
        raise ValueError(f"need one global index per sample and b >= 1, got {len(samples)} samples "
                         f"and {len(global_indices)} indices")
    xs = [np.ascontiguousarray(x, dtype=np.int64) for x in samples]
    n = len(xs[0])
    if any(x.shape != (n,) for x in xs):
        raise ValueError("all samples must be 1-D and of the same length seq_length + 1")
    b, s = len(xs), n - 1
    modes = sample_modes(config.seed, global_indices, config.masked_fraction, backend=backend)

    orig = np.stack(xs)                                       # [b, s+1]
    if orig.min() < 0 or orig.max() >= vocab_size:
        raise ValueError(f"token ids outside [0, vocab_size={vocab_size})")
    inp = orig.copy()
    loss_mask = np.empty((b, s), dtype=np.float32)
    for i, (x, g) in enumerate(zip(xs, global_indices)):
        if modes[i]:
            corrupted, chosen = corrupt(x, g, config, mask_id, vocab_size, backend=backend)
            inp[i] = corrupted
            loss_mask[i] = chosen[1:]
        else:
            _check_vocab(x, config, mask_id, vocab_size)
            loss_mask[i] = x[1:] >= config.num_special_tokens

    masked = torch.from_numpy(modes.astype(bool))
    batch = {
        "tokens": torch.from_numpy(inp[:, :-1].copy()),
        "labels": torch.from_numpy(orig[:, 1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.arange(s, dtype=torch.int64).unsqueeze(0).repeat(b, 1),
        "document_ids": torch.from_numpy(document_ids(orig[:, :-1], eod_id, config.attention, bos_id)),
        "masked": masked,
    }
    if dense_mask:
        from megatron_normistral.model.attention import dense_attention_mask

        batch["attention_mask"] = dense_attention_mask(batch["document_ids"], masked)
    return batch


def document_ids(tokens: np.ndarray, eod_id: int, attention: Literal["document", "causal"],
                 bos_id: int | None = None) -> np.ndarray:
    """int32 ``[b, s]``: the document of each input token within its sample. A document ends
    with its EOD (the token after an EOD starts the next one) and, with ``bos_id``, a BOS
    starts one (``</s> <s>`` is one boundary, not two); documents are read from the original,
    uncorrupted tokens. ``attention='causal'``: one document per sample."""
    ids = np.zeros(tokens.shape, dtype=np.int32)
    if attention == "document":
        starts = tokens[:, :-1] == eod_id  # position j + 1 starts a document
        if bos_id is not None:
            starts |= tokens[:, 1:] == bos_id
        np.cumsum(starts, axis=1, dtype=np.int32, out=ids[:, 1:])
    return ids
