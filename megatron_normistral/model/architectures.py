"""Named architectures and their analytic size and cost.

Pure arithmetic: nothing here imports megatron-core or allocates a tensor, so parameter
counts and FLOPs of the 12B model are available on a laptop (and to the MFU logger).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


class UnknownArchitectureError(KeyError):
    pass


# The model family of an architecture that names none: every named architecture, and every
# checkpoint written before architectures named their family (normistral_model.json).
DEFAULT_FAMILY = "mistral"


@dataclass(frozen=True)
class ArchConfig:
    """A decoder with GQA attention and RoPE, SwiGLU FFN, RMSNorm, no biases.

    ``family`` names the model family (``convert.families``) whose mapping names its
    parameters and translates its Hugging Face checkpoints."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads
    head_dim: int  # decoupled from hidden/heads (NeMo: 5120 hidden, 32 x 128 heads)
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 131_072
    untie_embeddings: bool = True
    family: str = DEFAULT_FAMILY

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{self.name}: {self.num_attention_heads} attention heads are not divisible "
                f"into {self.num_query_groups} query groups"
            )

    def with_vocab(self, vocab_size: int, name: str | None = None) -> "ArchConfig":
        return replace(self, vocab_size=vocab_size, name=name or f"{self.name}-v{vocab_size}")

    # ---- sizes -----------------------------------------------------------------------
    @property
    def query_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_query_groups * self.head_dim

    def layer_parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = h * (self.query_width + 2 * self.kv_width)
        out = self.query_width * h
        mlp = h * 2 * f + f * h  # gate and up (fused fc1), down (fc2)
        norms = 2 * h
        return qkv + out + mlp + norms

    def embedding_parameters(self) -> int:
        """Input embeddings plus LM head (one matrix if tied)."""
        return self.vocab_size * self.hidden_size * (2 if self.untie_embeddings else 1)

    def num_parameters(self) -> int:
        return self.num_layers * self.layer_parameters() + self.embedding_parameters() + self.hidden_size

    # ---- cost --------------------------------------------------------------------------
    def training_flops_per_token(self, seq_length: int) -> float:
        """Model FLOPs of one training token (forward + backward = 3 x forward).

        Forward, per token: 2 FLOPs per weight of every matmul (attention projections, MLP,
        LM head; the embedding lookup is free) plus attention scores and values,
        2 x 2 x seq x query_width per layer. Attention is counted over the full sequence
        (no saving for the causal half), as Megatron-LM and the PaLM MFU convention do, so
        MFU figures are comparable with theirs. Activation recomputation is not counted.
        """
        h, f = self.hidden_size, self.ffn_hidden_size
        matmul_weights = h * (self.query_width + 2 * self.kv_width) + self.query_width * h + 3 * h * f
        per_layer = 2 * matmul_weights + 4 * seq_length * self.query_width
        forward = self.num_layers * per_layer + 2 * h * self.vocab_size
        return 3.0 * forward


_NEMO = ArchConfig(
    name="mistral-nemo-12b",
    num_layers=40,
    hidden_size=5120,
    num_attention_heads=32,
    num_query_groups=8,
    head_dim=128,
    ffn_hidden_size=14336,
    vocab_size=131_072,
)

# Tiny shapes for tests and the CPU demo. head_dim is deliberately != hidden/heads, as in
# NeMo, so that decoupling is exercised everywhere.
_TINY = ArchConfig(
    name="tiny",
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=32,
    ffn_hidden_size=128,
    vocab_size=256,
    max_position_embeddings=4096,
)

ARCHITECTURES: dict[str, ArchConfig] = {
    a.name: a
    for a in (
        _NEMO,
        _NEMO.with_vocab(51_200, name="normistral-11b"),
        _TINY,
        # Tied embeddings exercise the PP embedding-sync path (NeMo itself is untied).
        replace(_TINY, name="tiny-tied", untie_embeddings=False),
        # Tekken's real vocabulary: the demo's English-centric source model.
        replace(_TINY, name="tiny-tekken", hidden_size=128, head_dim=48, ffn_hidden_size=384, vocab_size=131_072),
    )
}


def get_architecture(name: str, **overrides) -> ArchConfig:
    """A named architecture, optionally with fields replaced (e.g. ``vocab_size=51200``)."""
    try:
        arch = ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return replace(arch, **overrides) if overrides else arch
