"""Document-masked core attention for megatron-core's layer spec: the hybrid objective
without a ``[b, 1, s, s]`` mask.

A batch describes its documents instead of carrying a mask: ``document_ids`` (int32
``[b, s]``, the index of each token's document within its sample, non-decreasing) and
``masked`` (bool ``[b]``, the sample's mode). Token ``i`` attends to token ``j`` iff both are
in the same document and the sample is masked (bidirectional) or ``j <= i`` (causal).
:func:`dense_attention_mask` writes the same rule out as megatron-core's dense mask.

The description reaches the core attention as megatron-core's ``packed_seq_params``
(:class:`DocumentLayout` is a ``PackedSeqParams``): megatron-core hands that object, unchanged,
from ``GPTModel.forward`` through every layer to ``core_attention.forward``, including inside
full and selective activation recomputation (there it is captured by the recomputed closure,
not saved as a tensor), on every pipeline stage (each stage's forward step builds it from the
batch) and under SP (the core attention sees the whole sequence: SP gathers it in
``linear_qkv``). The ``attention_mask`` argument could not carry it: recomputation saves that
argument with ``save_for_backward``, which takes tensors only.

Backends (``model.attention_backend``):

- ``flex``: torch FlexAttention, compiled once per shape. Its ``BlockMask`` is built from the
  document boundaries at block granularity (:func:`document_block_mask`): blocks with no
  allowed pair are skipped, blocks inside one document need no mask evaluation. A new
  layout has the same tensor shapes, so it does not recompile. CUDA / ROCm only: torch 2.13
  has no FlexAttention backward on CPU.
- ``sdpa``: one ``F.scaled_dot_product_attention`` per document, ``is_causal`` by the
  sample's mode. torch's flash kernels (CPU and CUDA) keep memory O(s) and have a backward.
  The training fast path on CPU.
- ``dense``: megatron-core's own attention (local, or Transformer Engine's) with the dense
  mask derived from the description: the authors' path and the reference of the tests.
- ``auto``: ``flex`` where CUDA is available, ``sdpa`` elsewhere (``specs.resolve_attention_backend``).

Not chosen: one SDPA call with a boolean ``[b, 1, s, s]`` mask (only the math and
memory-efficient kernels take a mask, and the mask itself is O(s^2)); Transformer Engine's
THD format with ``cu_seqlens`` (one mask type per call, so a micro-batch mixing causal and
masked samples needs two calls; megatron-core's THD path restarts RoPE positions per
document, which is not the model the authors trained; TE is not on every machine, on none of
the CPU ones the tests run on, and this core attention already serves the TE spec).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

# FlexAttention's default tile: the block mask is kept at this granularity.
FLEX_BLOCK_SIZE = 128


class AttentionConfigError(ValueError):
    pass


# ------------------------------------------------------------------------------ the description

def check_documents(document_ids: torch.Tensor, masked: torch.Tensor) -> None:
    if document_ids.dim() != 2 or masked.shape != document_ids.shape[:1]:
        raise AttentionConfigError(
            f"document_ids must be [b, s] and masked [b], got {tuple(document_ids.shape)} and {tuple(masked.shape)}"
        )
    if document_ids.dtype.is_floating_point or masked.dtype != torch.bool:
        raise AttentionConfigError(f"document_ids must be integers and masked bool, got {document_ids.dtype}, {masked.dtype}")


def dense_attention_mask(document_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """megatron-core's dense mask (bool ``[b, 1, s, s]``, True = masked out) for a description:
    other documents are masked out, and in causal samples the future too."""
    check_documents(document_ids, masked)
    s = document_ids.shape[1]
    other_document = document_ids[:, :, None] != document_ids[:, None, :]
    future = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).triu_(1)
    return (other_document | (future & ~masked[:, None, None])).unsqueeze(1)


def document_spans(document_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, the ``[start, end)`` token range of each document (host-side ints)."""
    ids = document_ids.detach().cpu()
    b, s = ids.shape
    starts = (ids[:, 1:] != ids[:, :-1]).nonzero().tolist()  # (sample, position before a new document)
    cuts: list[list[int]] = [[0] for _ in range(b)]
    for sample, pos in starts:
        cuts[sample].append(pos + 1)
    return [list(zip(c, c[1:] + [s])) for c in cuts]


def document_block_mask(document_ids: torch.Tensor, masked: torch.Tensor, block_size: int = FLEX_BLOCK_SIZE):
    """FlexAttention ``BlockMask`` for a description, built at block granularity
    (``O(b * (s / block)^2)`` work, no ``[s, s]`` tensor) from the first and last document id of
    each block: a pair of blocks is empty when their document ranges do not meet (or, causal,
    the key block lies after the query block), full when both lie inside one document (and,
    causal, the key block lies before the query block), partial otherwise; only partial blocks
    evaluate the mask function."""
    from torch.nn.attention.flex_attention import BlockMask

    check_documents(document_ids, masked)
    b, s = document_ids.shape
    n = -(-s // block_size)
    ids = document_ids.to(torch.int32)
    if n * block_size != s:
        # The padding is a document of its own: nothing attends to it, it attends to nothing real.
        pad = (ids[:, -1:] + 1).expand(b, n * block_size - s)
        ids = torch.cat([ids, pad], dim=1)
    blocks = ids.view(b, n, block_size)
    first, last = blocks[:, :, 0], blocks[:, :, -1]  # ids are non-decreasing within a sample
    q_first, q_last = first[:, :, None], last[:, :, None]
    k_first, k_last = first[:, None, :], last[:, None, :]
    index = torch.arange(n, device=ids.device)
    key_not_after = index[None, :, None] >= index[None, None, :]
    key_before = index[None, :, None] > index[None, None, :]
    bidirectional = masked[:, None, None]
    meet = (q_first <= k_last) & (k_first <= q_last) & (bidirectional | key_not_after)
    one_document = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
    full = one_document & (bidirectional | key_before)
    partial = meet & ~full

    def counts_and_indices(selected: torch.Tensor):
        # Selected blocks first, in increasing order (a stable sort of the flags).
        order = torch.sort(selected.to(torch.int8), dim=-1, descending=True, stable=True).indices
        return selected.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document(batch, head, q_idx, kv_idx):
        return (ids[batch, q_idx] == ids[batch, kv_idx]) & (masked[batch] | (q_idx >= kv_idx))

    kv_num, kv_idx = counts_and_indices(partial)
    full_num, full_idx = counts_and_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=same_document, seq_lengths=(s, s))


@dataclass(eq=False)
class DocumentLayout(PackedSeqParams):
    """The document description of one micro-batch, as megatron-core's ``packed_seq_params``.

    ``qkv_format`` is 'sbhd' (megatron-core keeps its normal layout; 'thd' would repack the
    batch) and ``max_seqlen_q/kv`` are the whole sequence: megatron-core reads the RoPE length
    from them, and RoPE positions run across packed documents (as the authors trained).
    What each backend derives from the description is computed once per micro-batch and
    shared by all layers."""

    document_ids: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    _derived: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, document_ids: torch.Tensor, masked: torch.Tensor) -> "DocumentLayout":
        check_documents(document_ids, masked)
        s = document_ids.shape[1]
        return cls(qkv_format="sbhd", max_seqlen_q=s, max_seqlen_kv=s, document_ids=document_ids, masked=masked.bool())

    def _cached(self, key, make):
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def dense_mask(self) -> torch.Tensor:
        return self._cached("dense", lambda: dense_attention_mask(self.document_ids, self.masked))

    def spans(self) -> list[list[tuple[int, int]]]:
        return self._cached("spans", lambda: document_spans(self.document_ids))

    def modes(self) -> list[bool]:
        return self._cached("modes", lambda: self.masked.tolist())

    def block_mask(self):
        return self._cached("block", lambda: document_block_mask(self.document_ids, self.masked))


# ------------------------------------------------------------------------------ kernels
# Layouts: megatron-core hands the core attention query [s, b, heads, d] and key/value
# [s, b, groups, d] (this TP rank's heads) and expects [s, b, heads * d] back.

def _to_bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def _from_bhsd(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(s, b, h * d)


def causal_attention(query, key, value, scale: float) -> torch.Tensor:
    """Causal over the whole sequence (a batch without a document description)."""
    out = F.scaled_dot_product_attention(_to_bhsd(query), _to_bhsd(key), _to_bhsd(value), is_causal=True,
                                         scale=scale, enable_gqa=query.shape[2] != key.shape[2])
    return _from_bhsd(out)


def sdpa_document_attention(query, key, value, layout: DocumentLayout, scale: float) -> torch.Tensor:
    """One SDPA call per document: the work is sum(length^2), nothing crosses documents, and
    the flash kernels never hold a score matrix. Inputs are cut with ``split`` (its backward
    is one concatenation; slicing would write a zero-filled full-size gradient per document)."""
    q, k, v = _to_bhsd(query), _to_bhsd(key), _to_bhsd(value)
    gqa = q.shape[1] != k.shape[1]
    samples = []
    for qi, ki, vi, spans, bidirectional in zip(q.split(1), k.split(1), v.split(1), layout.spans(), layout.modes()):
        lengths = [e - a for a, e in spans]
        pieces = [
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=not bidirectional, scale=scale, enable_gqa=gqa)
            for qd, kd, vd in zip(qi.split(lengths, dim=2), ki.split(lengths, dim=2), vi.split(lengths, dim=2))
        ]
        samples.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return _from_bhsd(samples[0] if len(samples) == 1 else torch.cat(samples, dim=0))


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Without compilation FlexAttention runs a reference path that materialises the scores.
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(query, key, value, layout: DocumentLayout, scale: float) -> torch.Tensor:
    out = _compiled_flex_attention()(_to_bhsd(query), _to_bhsd(key), _to_bhsd(value), block_mask=layout.block_mask(),
                                     scale=scale, enable_gqa=query.shape[2] != key.shape[2])
    return _from_bhsd(out)


# ------------------------------------------------------------------------------ core attention modules

class DocumentAttention(MegatronModule):
    """Core attention (megatron-core's ``CoreAttention`` protocol) that reads a
    :class:`DocumentLayout`. Subclasses choose the kernel. Without a description (plain
    causal batches, e.g. checkpoint conversion checks) it is causal over the whole sequence."""

    backend = ""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if dropout:
            problems.append(f"attention dropout {dropout} (the document attention has none; Mistral uses 0)")
        if config.context_parallel_size != 1:
            problems.append(f"context parallelism ({config.context_parallel_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            problems.append(f"softmax_type {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            problems.append(f"sliding-window attention ({config.window_size})")
        if problems:
            raise AttentionConfigError(f"attention backend {self.backend!r} does not support: " + "; ".join(problems)
                                       + " (use model.attention_backend: dense)")
        self.attn_mask_type = attn_mask_type
        # apply_query_key_layer_scaling only rescales inside megatron-core's softmax (net
        # scale unchanged), so the plain 1/sqrt(head_dim) is the same math.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise AttentionConfigError("the document attention takes no attention bias")
        if attention_mask is not None:
            raise AttentionConfigError(
                f"attention backend {self.backend!r} got a dense attention_mask; batches describe documents "
                "(document_ids, masked: data.objective.build_batch) and the model reads them as packed_seq_params; "
                "for mask tensors use model.attention_backend: dense"
            )
        if packed_seq_params is None:
            if (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal:
                raise AttentionConfigError(
                    f"no document description and attention-mask type {attn_mask_type or self.attn_mask_type}: "
                    "give the batch's documents (packed_seq_params=DocumentLayout) or use a causal mask type"
                )
            return causal_attention(query, key, value, self.softmax_scale)
        if not isinstance(packed_seq_params, DocumentLayout):
            raise AttentionConfigError("packed sequences in THD format are not supported; pass a DocumentLayout")
        if tuple(packed_seq_params.document_ids.shape) != (query.shape[1], query.shape[0]):
            raise AttentionConfigError(
                f"document description is [b, s] = {tuple(packed_seq_params.document_ids.shape)} but the attention "
                f"sees [b, s] = ({query.shape[1]}, {query.shape[0]})"
            )
        return self.attend(query, key, value, packed_seq_params)

    def attend(self, query, key, value, layout: DocumentLayout) -> torch.Tensor:
        raise NotImplementedError


class SdpaDocumentAttention(DocumentAttention):
    backend = "sdpa"

    def attend(self, query, key, value, layout):
        return sdpa_document_attention(query, key, value, layout, self.softmax_scale)


class FlexDocumentAttention(DocumentAttention):
    backend = "flex"

    def attend(self, query, key, value, layout):
        return flex_document_attention(query, key, value, layout, self.softmax_scale)


class _MaskFromDocuments:
    """For megatron-core's own attention classes: turns a :class:`DocumentLayout` into the
    dense mask they take, so the dense path reads the same batches as the fast ones."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if isinstance(packed_seq_params, DocumentLayout):
            attention_mask, packed_seq_params = packed_seq_params.dense_mask(), None
        return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                               attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)


@functools.cache
def dense_attention(base: type) -> type:
    """``base`` (megatron-core's ``DotProductAttention`` or ``TEDotProductAttention``) reading
    document descriptions; one class per base, so specs compare equal across chunks."""
    return type(f"Dense{base.__name__}", (_MaskFromDocuments, base), {"backend": "dense", "__module__": __name__})

