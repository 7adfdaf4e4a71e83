"""Training stages: what trains. Stage 2 of the method trains only the input embeddings and
the LM head (the transformer and final norm frozen); stage 3 trains everything."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_normistral.convert.families import get_family
from megatron_normistral.model.architectures import DEFAULT_FAMILY
from megatron_normistral.model.sharding import unwrap_model


Trainable = Literal["embeddings", "full"]


@dataclass
class StageConfig:
    """The recipe's ``stage`` section: what trains, and the switch from stage 2 to 3 in one run
    (:class:`~.model_setup.StageSwitch`)."""

    trainable: Trainable = "full"
    """'embeddings' (stage 2: only the input embeddings and the LM head train) or 'full' (stage 3)."""

    switch_to_full_at: int | None = None
    """Switch from 'embeddings' to 'full' training at this step within the run (a new optimizer,
    as at the start of a stage); None: never."""


def embedding_parameters(family: str = DEFAULT_FAMILY) -> tuple[str, ...]:
    """Parameter names (as megatron-core's GPTModel names them) that train in stage 2: the
    family's tensors with one row per vocabulary entry (input embeddings, LM head)."""
    return tuple(m.megatron for m in get_family(family).vocab_mappings())


# Those of the default family (every named architecture's).
EMBEDDING_PARAMETERS = embedding_parameters()


def set_trainable(chunks, trainable: Trainable, family: str = DEFAULT_FAMILY) -> int:
    """Set requires_grad on every parameter; returns how many train on this rank. Call before
    wrapping in DDP and building the optimizer: both leave out frozen parameters, so frozen
    weights get no gradient buffer, no optimizer state and no update. ``family``: the model's
    (``ArchConfig.family``), whose mapping names the embeddings."""
    embeddings = set(embedding_parameters(family))
    count = 0
    for chunk in chunks:
        for name, param in unwrap_model(chunk).named_parameters():
            param.requires_grad = trainable == "full" or name in embeddings
            count += param.numel() if param.requires_grad else 0
    return count
