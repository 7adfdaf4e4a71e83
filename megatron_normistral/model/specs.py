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


def decoder_block_spec(
    transformer_config,
    impl: Literal["local", "transformer_engine"],
    vp_stage: int | None = None,
    attention_mask: Literal["causal", "arbitrary"] = "causal",
):
    """Block spec (layers of this pipeline stage + final norm) for one model chunk.

    ``attention_mask``: with 'causal' and no mask tensor, attention is causal; with a mask
    tensor given (``[b, 1, s, s]`` bool, True = masked), the local attention uses it verbatim
    either way. Transformer Engine only honours a given mask with 'arbitrary'.
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
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    # A block spec (not a layer spec) so that the final norm is ours too: with a layer spec
    # TransformerBlock falls back to the module-global norm, which refuses SP.
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
