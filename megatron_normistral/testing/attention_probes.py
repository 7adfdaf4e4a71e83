"""Workers that run the tiny model's forward pass in a process group (tests of the attention
backends: what a token's logits may depend on)."""
from __future__ import annotations

import torch

from megatron_normistral.model.provider import ModelConfig, PrecisionConfig, build_model
from megatron_normistral.runtime.parallel import ParallelConfig, init_model_parallel, set_seed
from megatron_normistral.training.step import attention_inputs

SEQ = 32
# Three documents per sample: tokens 0-9, 10-19, 20-31.
DOCUMENTS = ((0, 10), (10, 20), (20, 32))


def _batch(tokens: torch.Tensor) -> dict:
    b = tokens.shape[0]
    ids = torch.zeros(b, SEQ, dtype=torch.int32)
    for index, (start, end) in enumerate(DOCUMENTS):
        ids[:, start:end] = index
    return {"tokens": tokens, "position_ids": torch.arange(SEQ).expand(b, SEQ), "document_ids": ids,
            "masked": torch.tensor([False, True])}


def logits_under_edits(rank: int, world_size: int, backend: str, edits: dict[str, list[int]]) -> dict:
    """Logits [2, SEQ, vocab] of one batch (sample 0 causal, sample 1 masked, the same three
    documents in both) and of copies whose tokens at the positions ``edits[name]`` were
    replaced; on the ``backend`` attention."""
    init_model_parallel(ParallelConfig())
    set_seed(5)
    model = build_model(ModelConfig(arch="tiny", transformer_impl="local", attention_backend=backend),
                        ParallelConfig(), PrecisionConfig(), max_sequence_length=SEQ)[0]
    model.eval()
    vocab = model.vocab_size
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for name, positions in {"base": [], **edits}.items():
            edited = tokens.clone()
            edited[:, positions] = (edited[:, positions] + 1 + torch.arange(len(positions))) % vocab
            batch = _batch(edited)
            out[name] = model(batch["tokens"], batch["position_ids"], **attention_inputs(batch)).float()
    return out
