"""Hugging Face Mistral <-> megatron-core GPTModel: the Mistral family's declarative mapping.

The tables below are the only place Mistral's parameter names are written; the family
registered at the end (:data:`MISTRAL`, see :mod:`.families`) derives every other name from
them. Megatron names are those of a TP=1, PP=1 GPTModel built by ``model.provider`` (global layer
index), i.e. the names ``model.sharding`` uses for full state dicts. Every megatron tensor is
produced from a fixed tuple of HF tensors by a named transform, and the inverse transform gives
them back, bit-exactly (transforms only reshape, slice and concatenate; dtype casts are done by
the caller).

The two fusions:
- ``linear_qkv`` is laid out per KV group: for each of the NG groups, its NH/NG query heads,
  then its key head, then its value head (each head_dim rows). Plain TP chunks of this layout
  are per-group, which is why megatron-core can split it along dim 0 under GQA. head_dim is
  taken from the architecture, never derived from hidden/heads (NeMo: 5120 != 32 x 128).
- ``linear_fc1`` is ``[gate; up]`` (SwiGLU: silu(gate) * up).
"""
from __future__ import annotations

import torch

from megatron_normistral.convert.families import (
    IDENTITY,
    ConversionError,
    ModelFamily,
    TensorMapping,
    Transform,
    register_family,
)
from megatron_normistral.model.architectures import ArchConfig

MISTRAL_NAME = "mistral"  # the family's name and its HF model_type


# ---- transforms ------------------------------------------------------------------------
def _fuse_qkv(arch: ArchConfig, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    q, k, v = tensors
    ng, hd, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // ng
    fused = torch.cat([q.reshape(ng, per_group * hd, h), k.reshape(ng, hd, h), v.reshape(ng, hd, h)], dim=1)
    return fused.reshape(ng * (per_group + 2) * hd, h)


def _split_qkv(arch: ArchConfig, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ng, hd, h = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // ng
    q, k, v = fused.reshape(ng, (per_group + 2) * hd, h).split([per_group * hd, hd, hd], dim=1)
    # .contiguous(): safetensors refuses views, and each output must own its storage.
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


def _fuse_glu(arch: ArchConfig, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    gate, up = tensors
    return torch.cat([gate, up], dim=0)


def _split_glu(arch: ArchConfig, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gate, up = fused.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


FUSED_QKV = Transform("fused_qkv", _fuse_qkv, _split_qkv)
FUSED_GLU = Transform("fused_glu", _fuse_glu, _split_glu)


# ---- the mapping -----------------------------------------------------------------------
def _h(a):  # hidden vector
    return (a.hidden_size,)


def _vocab(a):  # one row per vocabulary entry
    return (a.vocab_size, a.hidden_size)


EMBEDDING_MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), IDENTITY, (_vocab,),
                  role="embedding"),
)

_L = "decoder.layers.{layer}."
_HL = "model.layers.{layer}."
LAYER_MAPPINGS: tuple[TensorMapping, ...] = (
    # Transformer Engine fuses each layer norm into the linear after it; the local spec stores
    # them under TE's names (checkpoint_key), so both implementations read one checkpoint.
    TensorMapping(_L + "input_layernorm.weight", (_HL + "input_layernorm.weight",), IDENTITY, (_h,),
                  role="norm", checkpoint_key=_L + "self_attention.linear_qkv.layer_norm_weight"),
    TensorMapping(
        _L + "self_attention.linear_qkv.weight",
        (_HL + "self_attn.q_proj.weight", _HL + "self_attn.k_proj.weight", _HL + "self_attn.v_proj.weight"),
        FUSED_QKV,
        (lambda a: (a.query_width, a.hidden_size), lambda a: (a.kv_width, a.hidden_size),
         lambda a: (a.kv_width, a.hidden_size)),
        role="linear",
    ),
    TensorMapping(_L + "self_attention.linear_proj.weight", (_HL + "self_attn.o_proj.weight",), IDENTITY,
                  (lambda a: (a.hidden_size, a.query_width),), role="linear"),
    TensorMapping(_L + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",), IDENTITY, (_h,),
                  role="norm", checkpoint_key=_L + "mlp.linear_fc1.layer_norm_weight"),
    TensorMapping(
        _L + "mlp.linear_fc1.weight",
        (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
        FUSED_GLU,
        (lambda a: (a.ffn_hidden_size, a.hidden_size), lambda a: (a.ffn_hidden_size, a.hidden_size)),
        role="linear",
    ),
    TensorMapping(_L + "mlp.linear_fc2.weight", (_HL + "mlp.down_proj.weight",), IDENTITY,
                  (lambda a: (a.hidden_size, a.ffn_hidden_size),), role="linear"),
)

HEAD_MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), IDENTITY, (_h,), role="norm"),
    # Untied head: Mistral-NeMo has a separate lm_head (tie_word_embeddings False).
    TensorMapping("output_layer.weight", ("lm_head.weight",), IDENTITY, (_vocab,), role="output"),
)

# HF tensors that carry no weights and are skipped on import (old checkpoints stored RoPE's
# inverse frequencies, which are recomputed from rope_theta).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- configs ---------------------------------------------------------------------------
def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        # Scaled RoPE (YaRN, linear...) is not what megatron's plain rotary embedding computes.
        raise ConversionError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is None:
        raise ConversionError("config has no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def _arch_from_hf_config(config: dict, name: str = "hf") -> ArchConfig:
    """ArchConfig of a Hugging Face Mistral ``config.json`` (as a dict); the registry has
    picked this family by ``model_type`` (``families.arch_from_hf_config``).

    Refuses what megatron's Mistral layout does not compute the same way: sliding-window
    attention, tied embeddings, activations other than SiLU, biases, scaled RoPE."""
    if config.get("sliding_window") not in (None, 0):
        raise ConversionError(f"sliding_window={config['sliding_window']} is not supported (full attention only)")
    if config.get("tie_word_embeddings", False):
        raise ConversionError("tie_word_embeddings=True is not supported: Mistral-NeMo has an untied lm_head")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConversionError(f"hidden_act {act!r} is not SiLU (SwiGLU)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return ArchConfig(
        name=name,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        rope_theta=_rope_theta(config),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=config.get("max_position_embeddings", 131_072),
        untie_embeddings=True,
        family=MISTRAL_NAME,
    )


def _hf_config_from_arch(
    arch: ArchConfig,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    pad_token_id: int | None = None,
    dtype: str = "bfloat16",
) -> dict:
    """``config.json`` for ``transformers.MistralForCausalLM`` computing the same function as
    the megatron model: explicit head_dim (NeMo's is not hidden/heads), no sliding window,
    untied head. ``dtype`` is recorded as the checkpoint's dtype."""
    if not arch.untie_embeddings:
        raise ConversionError(f"{arch.name}: tied embeddings are not supported")
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": MISTRAL_NAME,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.norm_eps,
        "vocab_size": arch.vocab_size,
        # transformers 5 reads rope_parameters; rope_theta is kept for older readers.
        "rope_parameters": {"rope_theta": arch.rope_theta, "rope_type": "default"},
        "rope_theta": arch.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
    }


MISTRAL = register_family(ModelFamily(
    name=MISTRAL_NAME,
    hf_model_types=(MISTRAL_NAME,),
    embedding_mappings=EMBEDDING_MAPPINGS,
    layer_mappings=LAYER_MAPPINGS,
    head_mappings=HEAD_MAPPINGS,
    arch_from_hf_config=_arch_from_hf_config,
    hf_config_from_arch=_hf_config_from_arch,
    ignored_hf_suffixes=IGNORED_HF_SUFFIXES,
))
