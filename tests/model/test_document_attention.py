"""What a token's logits may depend on, on the fast attention path of the whole model: changing
document A's tokens never changes document B's logits (either mode); in causal mode later
tokens never change earlier logits; in masked mode they do, within the document. (The dense
path equals this one to 1e-5 in tests/parallel/test_attention_equivalence.py.)"""
import pytest
import torch

from megatron_normistral.testing.attention_probes import DOCUMENTS, logits_under_edits
from megatron_normistral.testing.distributed import run_distributed

CAUSAL, MASKED = 0, 1
(A_START, A_END), (B_START, B_END), (C_START, C_END) = DOCUMENTS
EDITS = {
    "document_b": list(range(B_START, B_END)),       # every token of the middle document
    "late_in_c": [C_START + 6],                        # one token inside the last document
}


@pytest.fixture(scope="module")
def logits():
    return run_distributed(logits_under_edits, 1, args=("auto", EDITS))


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def test_other_documents_never_change(logits):
    base, edited = logits["base"], logits["document_b"]
    for sample in (CAUSAL, MASKED):
        for start, end in ((A_START, A_END), (C_START, C_END)):
            assert torch.equal(edited[sample, start:end], base[sample, start:end]), (sample, start)
        assert _changed(edited[sample, B_START:B_END], base[sample, B_START:B_END])  # the edit is real


def test_causal_sees_no_future_masked_sees_its_document(logits):
    base, edited = logits["base"], logits["late_in_c"]
    position = EDITS["late_in_c"][0]
    # causal: nothing before the edit moves, the edited position onwards does
    assert torch.equal(edited[CAUSAL, :position], base[CAUSAL, :position])
    assert _changed(edited[CAUSAL, position:C_END], base[CAUSAL, position:C_END])
    # masked: the whole document sees the edit (bidirectional), the other documents do not
    assert torch.equal(edited[MASKED, :C_START], base[MASKED, :C_START])
    for p in range(C_START, position):
        assert _changed(edited[MASKED, p], base[MASKED, p]), p
