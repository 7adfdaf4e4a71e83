"""Training stages: what trains. Stage 2 of the method trains only the input embeddings and
the LM head (the transformer and final norm frozen); stage 3 trains everything."""
from __future__ import annotations

from typing import Literal

from megatron_normistral.model.sharding import unwrap_model

# Parameter names (as megatron-core's GPTModel names them) that train in stage 2.
EMBEDDING_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")


def set_trainable(chunks, trainable: Literal["embeddings", "full"]) -> int:
    """Set requires_grad on every parameter; returns how many train on this rank. Call before
    wrapping in DDP and building the optimizer: both leave out frozen parameters, so frozen
    weights get no gradient buffer, no optimizer state and no update."""
    count = 0
    for chunk in chunks:
        for name, param in unwrap_model(chunk).named_parameters():
            param.requires_grad = trainable == "full" or name in EMBEDDING_PARAMETERS
            count += param.numel() if param.requires_grad else 0
    return count
