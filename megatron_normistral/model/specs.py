"""megatron-core layer specs: Transformer Engine (with FP8) when it imports, a local spec else.

The local spec is megatron-core's own, with one change: its norms (both per-layer norms and
the final norm) are :class:`RMSNorm` below, because the stock local norm refuses sequence
parallelism, and a norm whose weight is not tagged ``sequence_parallel`` silently gets
wrong gradients under SP (each TP rank sees only its slice of the sequence, so the weight
gradient must be all-reduced over TP; ``finalize_model_grads`` does that for tagged params).
"""
from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TransformerImpl = Literal["auto", "local", "transformer_engine"]
# The core attention (model/attention.py explains each).
AttentionBackend = Literal["auto", "flex", "sdpa", "dense"]


def transformer_engine_available() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (fails without a CUDA runtime)
    except Exception:
        return False
    return True


def resolve_transformer_impl(impl: TransformerImpl) -> Literal["local", "transformer_engine"]:
    if impl == "auto":
        return "transformer_engine" if transformer_engine_available() and torch.cuda.is_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "transformer_impl='transformer_engine' was asked for, but transformer_engine.pytorch "
            "does not import here (it needs CUDA and `pip install transformer-engine[pytorch]`). "
            "Use transformer_impl='local' or 'auto'."
        )
    return impl


def resolve_attention_backend(backend: AttentionBackend) -> Literal["flex", "sdpa", "dense"]:
    """The backend that runs here for the configured one: 'auto' is the fast one for the device."""
    if backend not in ("auto", "flex", "sdpa", "dense"):
        raise ValueError(f"attention_backend must be auto, flex, sdpa or dense, got {backend!r}")
    if backend == "auto":
        return "flex" if torch.cuda.is_available() else "sdpa"
    if backend == "flex" and not torch.cuda.is_available():
        raise ValueError(
            "attention_backend 'flex' needs CUDA or ROCm: torch has no FlexAttention backward on CPU; "
            "use 'auto' or 'sdpa' (the per-document flash path)"
        )
    return backend


def describe_attention_backend(backend: str) -> str:
    return {
        "flex": "FlexAttention with a block-sparse document mask, compiled once",
        "sdpa": "scaled_dot_product_attention per document, flash kernels",
        "dense": "megatron-core attention with a dense [b, 1, s, s] mask from the document description",
    }[backend]


class RMSNorm(nn.Module):
    """RMSNorm with the constructor megatron-core's ``build_module`` calls, safe under SP.

    Computes in fp32 whatever the activation dtype (as Mistral's reference does) and casts
    back, so bf16 training matches Hugging Face's MistralRMSNorm.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # finalize_model_grads all-reduces the grads of params tagged this way over TP.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def _attn_mask_type(mask: Literal["causal", "arbitrary"]):
    from megatron.core.transformer.enums import AttnMaskType

    return {"causal": AttnMaskType.causal, "arbitrary": AttnMaskType.arbitrary}[mask]


def core_attention_class(backend: Literal["flex", "sdpa", "dense"], impl: Literal["local", "transformer_engine"]):
    """The core attention of the layer spec: ours for the fast backends (with either layer
    implementation: TE linears and norms, this core attention), megatron-core's own for dense."""
    from megatron_normistral.model import attention

    if backend == "flex":
        return attention.FlexDocumentAttention
    if backend == "sdpa":
        return attention.SdpaDocumentAttention
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return attention.dense_attention(TEDotProductAttention)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return attention.dense_attention(DotProductAttention)


def decoder_block_spec(
    transformer_config,
    impl: Literal["local", "transformer_engine"],
    vp_stage: int | None = None,
    attention_mask: Literal["causal", "arbitrary"] = "causal",
    attention_backend: Literal["flex", "sdpa", "dense"] = "dense",
):
    """Block spec (layers of this pipeline stage + final norm) for one model chunk.

    ``attention_backend`` (resolved: see ``model.attention``) picks the core attention; every
    backend reads the batch's document description. ``attention_mask`` matters only for the
    dense path: with 'causal' and no mask, attention is causal; a given mask is used verbatim
    by the local attention either way, but Transformer Engine honours it only with 'arbitrary'
    (``provider.validate_attention`` refuses the silent combination).
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer = get_gpt_layer_with_transformer_engine_spec()
        final_norm = TENorm
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        final_norm = RMSNorm
    layer.submodules.self_attention.params["attn_mask_type"] = _attn_mask_type(attention_mask)
    layer.submodules.self_attention.submodules.core_attention = core_attention_class(attention_backend, impl)
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    # A block spec (not a layer spec) so that the final norm is ours too: with a layer spec
    # TransformerBlock falls back to the module-global norm, which refuses SP.
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
