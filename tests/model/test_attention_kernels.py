"""The document-attention kernels (model/attention.py) against the dense mask, one process,
no model: per-document SDPA forward and backward, FlexAttention forward (torch has no
FlexAttention backward on CPU; on CUDA the training path runs it), the block classification
that lets FlexAttention skip work, and no recompilation when the document layout changes."""
import pytest
import torch
import torch.nn.functional as F

from megatron_normistral.model.attention import (
    DocumentLayout,
    document_block_mask,
    flex_document_attention,
    sdpa_document_attention,
)
from megatron_normistral.testing.layouts import ATTENTION_CASES, attention_case_documents

HEADS, GROUPS, HEAD_DIM, SCALE = 4, 2, 32, 0.17


def _qkv(s: int, b: int, seed: int, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((s, b, HEADS, HEAD_DIM), (s, b, GROUPS, HEAD_DIM), (s, b, GROUPS, HEAD_DIM))
    return [torch.randn(shape, generator=gen).requires_grad_(requires_grad) for shape in shapes]


def _dense(query, key, value, layout):
    """Reference: one SDPA call with the dense mask (True in dense_mask = masked out)."""
    repeat = HEADS // GROUPS
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key.repeat_interleave(repeat, 2), value.repeat_interleave(repeat, 2)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~layout.dense_mask(), scale=SCALE)
    return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def _layout(case: str, b: int, s: int, seed: int) -> DocumentLayout:
    return DocumentLayout.of(*attention_case_documents(case, b, s, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_sdpa_per_document_forward_and_backward(case):
    layout = _layout(case, 3, 48, seed=1)
    fast, ref = _qkv(48, 3, 2, requires_grad=True), _qkv(48, 3, 2, requires_grad=True)
    out, expected = sdpa_document_attention(*fast, layout, SCALE), _dense(*ref, layout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for name, a, b in zip("qkv", fast, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=5e-6, msg=lambda m: f"d{name}: {m}")


def _blocks(layout):
    mask = document_block_mask(layout.document_ids, layout.masked)
    return mask.kv_num_blocks[:, 0].sum(-1).tolist(), mask.full_kv_num_blocks[:, 0].sum(-1).tolist()


def test_block_classification():
    """Three 128-token blocks. Whole window: causal = 3 diagonal partial + 3 full below it,
    masked = 9 full. Three documents on the block boundaries: causal = 3 partial (diagonal),
    masked = 3 full. Documents cut inside blocks are partial where they meet."""
    whole = torch.zeros(2, 384, dtype=torch.int32)
    aligned = (torch.arange(384) // 128).to(torch.int32).expand(2, 384).contiguous()
    modes = torch.tensor([False, True])
    assert _blocks(DocumentLayout.of(whole, modes)) == ([3, 0], [3, 9])
    assert _blocks(DocumentLayout.of(aligned, modes)) == ([3, 0], [0, 3])
    shifted = ((torch.arange(384) + 64) // 128).to(torch.int32).expand(2, 384).contiguous()  # cuts at 64, 192, 320
    # every block holds two documents: causal meets its own and the previous block (partial);
    # masked also the next one; none is full
    assert _blocks(DocumentLayout.of(shifted, modes)) == ([5, 7], [0, 0])


def test_flex_forward_matches_dense_and_never_recompiles():
    from torch._dynamo.utils import counters

    s, b = 200, 2  # not a multiple of the 128 block: the padding path
    graphs = None
    for seed, case in enumerate(ATTENTION_CASES):
        layout = _layout(case, b, s, seed)
        query, key, value = _qkv(s, b, seed)
        torch.testing.assert_close(flex_document_attention(query, key, value, layout, SCALE),
                                   _dense(query, key, value, layout), rtol=1e-5, atol=2e-6, msg=lambda m: f"{case}: {m}")
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]  # compiled once, on the first layout
    assert counters["stats"]["unique_graphs"] == graphs, "a new document layout recompiled FlexAttention"
