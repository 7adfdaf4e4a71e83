"""Hugging Face Mistral <-> megatron-core GPTModel: the one declarative weight mapping.

Megatron names are those of a TP=1, PP=1 GPTModel built by ``model.provider`` (global layer
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

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_normistral.model.architectures import ArchConfig


class ConversionError(ValueError):
    """A checkpoint does not match the architecture; the message names the tensor."""


# ---- transforms ------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """HF tensors (in ``TensorMapping.hf`` order) <-> one megatron tensor."""

    name: str
    to_megatron: Callable[[ArchConfig, tuple[torch.Tensor, ...]], torch.Tensor]
    to_hf: Callable[[ArchConfig, torch.Tensor], tuple[torch.Tensor, ...]]


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


IDENTITY = Transform("identity", lambda arch, t: t[0], lambda arch, t: (t,))
FUSED_QKV = Transform("fused_qkv", _fuse_qkv, _split_qkv)
FUSED_GLU = Transform("fused_glu", _fuse_glu, _split_glu)


# ---- the mapping -----------------------------------------------------------------------
Shape = Callable[[ArchConfig], tuple[int, ...]]


@dataclass(frozen=True)
class TensorMapping:
    """One megatron tensor and the HF tensors it is made of. ``{layer}`` is the layer index."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    hf_shapes: tuple[Shape, ...]  # expected shape of each HF tensor, for the checks

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf)

    def megatron_name(self, layer: int | None = None) -> str:
        return self.megatron.format(layer=layer)


def _h(a):  # hidden vector
    return (a.hidden_size,)


GLOBAL_MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), IDENTITY,
                  (lambda a: (a.vocab_size, a.hidden_size),)),
    TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",), IDENTITY, (_h,)),
    # Untied head: Mistral-NeMo has a separate lm_head (tie_word_embeddings False).
    TensorMapping("output_layer.weight", ("lm_head.weight",), IDENTITY,
                  (lambda a: (a.vocab_size, a.hidden_size),)),
)

_L = "decoder.layers.{layer}."
_HL = "model.layers.{layer}."
LAYER_MAPPINGS: tuple[TensorMapping, ...] = (
    TensorMapping(_L + "input_layernorm.weight", (_HL + "input_layernorm.weight",), IDENTITY, (_h,)),
    TensorMapping(
        _L + "self_attention.linear_qkv.weight",
        (_HL + "self_attn.q_proj.weight", _HL + "self_attn.k_proj.weight", _HL + "self_attn.v_proj.weight"),
        FUSED_QKV,
        (lambda a: (a.query_width, a.hidden_size), lambda a: (a.kv_width, a.hidden_size),
         lambda a: (a.kv_width, a.hidden_size)),
    ),
    TensorMapping(_L + "self_attention.linear_proj.weight", (_HL + "self_attn.o_proj.weight",), IDENTITY,
                  (lambda a: (a.hidden_size, a.query_width),)),
    TensorMapping(_L + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",), IDENTITY, (_h,)),
    TensorMapping(
        _L + "mlp.linear_fc1.weight",
        (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"),
        FUSED_GLU,
        (lambda a: (a.ffn_hidden_size, a.hidden_size), lambda a: (a.ffn_hidden_size, a.hidden_size)),
    ),
    TensorMapping(_L + "mlp.linear_fc2.weight", (_HL + "mlp.down_proj.weight",), IDENTITY,
                  (lambda a: (a.hidden_size, a.ffn_hidden_size),)),
)

# HF tensors that carry no weights and are skipped on import (old checkpoints stored RoPE's
# inverse frequencies, which are recomputed from rope_theta).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def megatron_shape(arch: ArchConfig, mapping: TensorMapping) -> tuple[int, ...]:
    shapes = [s(arch) for s in mapping.hf_shapes]
    if mapping.transform is IDENTITY:
        return shapes[0]
    return (sum(s[0] for s in shapes), shapes[0][1])  # both fusions concatenate along dim 0


@dataclass(frozen=True)
class Group:
    """Mappings converted together: the embeddings, one layer, or the head. Conversion streams
    one group at a time, which bounds memory to the largest group."""

    name: str
    layer: int | None
    mappings: tuple[TensorMapping, ...]


def groups(arch: ArchConfig) -> Iterator[Group]:
    """Groups in checkpoint order: embeddings, layers 0..L-1, final norm + head."""
    yield Group("embedding", None, GLOBAL_MAPPINGS[:1])
    for layer in range(arch.num_layers):
        yield Group(f"layer {layer}", layer, LAYER_MAPPINGS)
    yield Group("head", None, GLOBAL_MAPPINGS[1:])


def all_hf_names(arch: ArchConfig) -> list[str]:
    return [n for g in groups(arch) for m in g.mappings for n in m.hf_names(g.layer)]


def all_megatron_names(arch: ArchConfig) -> list[str]:
    return [m.megatron_name(g.layer) for g in groups(arch) for m in g.mappings]


def check_shape(name: str, tensor_shape, expected: tuple[int, ...], arch: ArchConfig, where: str) -> None:
    if tuple(tensor_shape) != tuple(expected):
        raise ConversionError(
            f"tensor {name!r} in {where} has shape {tuple(tensor_shape)}, but architecture "
            f"{arch.name!r} needs {tuple(expected)}"
        )


def hf_to_megatron(arch: ArchConfig, mapping: TensorMapping, layer: int | None, tensors: tuple[torch.Tensor, ...],
                   where: str = "the HF checkpoint") -> torch.Tensor:
    for name, shape_fn, t in zip(mapping.hf_names(layer), mapping.hf_shapes, tensors):
        check_shape(name, t.shape, shape_fn(arch), arch, where)
    return mapping.transform.to_megatron(arch, tensors)


def megatron_to_hf(arch: ArchConfig, mapping: TensorMapping, layer: int | None, tensor: torch.Tensor,
                   where: str = "the megatron checkpoint") -> dict[str, torch.Tensor]:
    check_shape(mapping.megatron_name(layer), tensor.shape, megatron_shape(arch, mapping), arch, where)
    return dict(zip(mapping.hf_names(layer), mapping.transform.to_hf(arch, tensor)))


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


def arch_from_hf_config(config: dict, name: str = "hf") -> ArchConfig:
    """ArchConfig of a Hugging Face Mistral ``config.json`` (as a dict).

    Refuses what megatron's Mistral layout does not compute the same way: sliding-window
    attention, tied embeddings, activations other than SiLU, biases, scaled RoPE."""
    model_type = config.get("model_type", "mistral")
    if model_type != "mistral":
        raise ConversionError(f"model_type {model_type!r} is not 'mistral'")
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
    )


def hf_config_from_arch(
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
        "model_type": "mistral",
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


def check_arch_matches(expected: ArchConfig, actual: ArchConfig, what: str) -> None:
    """Refuse when two architectures differ in anything that changes weights or math."""
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
              "ffn_hidden_size", "vocab_size", "rope_theta", "norm_eps", "untie_embeddings")
    diffs = [f"{f}: {getattr(expected, f)} vs {getattr(actual, f)}" for f in fields
             if getattr(expected, f) != getattr(actual, f)]
    if diffs:
        raise ConversionError(f"architecture {expected.name!r} does not match {what}: " + "; ".join(diffs))
