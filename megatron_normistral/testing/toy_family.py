"""A second model family for tests, shown to flow through every code path that looks names up.

``toy`` is no real architecture: its HF names (``toy.*``, ``model_type`` ``toy-lm``), its
megatron names (``tok``, ``blocks.{layer}.*``, ``head``) and its checkpoint keys differ from
Mistral's everywhere, so a code path that reads a Mistral name instead of asking the family
fails on it. It uses one fused transform (``[gate; up]``), one norm stored under another key
and two linears with ``_extra_state``, like Mistral's mapping.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from megatron_normistral.convert import families
from megatron_normistral.convert.families import IDENTITY, ModelFamily, TensorMapping
from megatron_normistral.convert.mistral import FUSED_GLU
from megatron_normistral.model.architectures import ArchConfig

TOY_MODEL_TYPE = "toy-lm"


def _arch_from_hf_config(config: dict, name: str = "hf") -> ArchConfig:
    hidden = config["n_embd"]
    return ArchConfig(name=name, num_layers=config["n_layer"], hidden_size=hidden, num_attention_heads=1,
                      num_query_groups=1, head_dim=hidden, ffn_hidden_size=config["n_inner"],
                      vocab_size=config["vocab_size"], family="toy")


def _hf_config_from_arch(arch: ArchConfig, bos_token_id=1, eos_token_id=2, pad_token_id=None, dtype="float32") -> dict:
    return {"model_type": TOY_MODEL_TYPE, "n_layer": arch.num_layers, "n_embd": arch.hidden_size,
            "n_inner": arch.ffn_hidden_size, "vocab_size": arch.vocab_size, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "dtype": dtype}


def _vocab(a):
    return (a.vocab_size, a.hidden_size)


def _ffn_in(a):
    return (a.ffn_hidden_size, a.hidden_size)


TOY = ModelFamily(
    name="toy",
    hf_model_types=(TOY_MODEL_TYPE,),
    embedding_mappings=(TensorMapping("tok.weight", ("toy.wte.weight",), IDENTITY, (_vocab,), role="embedding"),),
    layer_mappings=(
        TensorMapping("blocks.{layer}.norm.weight", ("toy.h.{layer}.ln.weight",), IDENTITY,
                      (lambda a: (a.hidden_size,),), role="norm", checkpoint_key="blocks.{layer}.mix.norm_weight"),
        TensorMapping("blocks.{layer}.mix.weight", ("toy.h.{layer}.gate.weight", "toy.h.{layer}.up.weight"), FUSED_GLU,
                      (_ffn_in, _ffn_in), role="linear"),
        TensorMapping("blocks.{layer}.out.weight", ("toy.h.{layer}.down.weight",), IDENTITY,
                      (lambda a: (a.hidden_size, a.ffn_hidden_size),), role="linear"),
    ),
    head_mappings=(
        TensorMapping("head_norm.weight", ("toy.ln_f.weight",), IDENTITY, (lambda a: (a.hidden_size,),), role="norm"),
        TensorMapping("head.weight", ("toy.lm_head.weight",), IDENTITY, (_vocab,), role="output"),
    ),
    arch_from_hf_config=_arch_from_hf_config,
    hf_config_from_arch=_hf_config_from_arch,
)


@contextlib.contextmanager
def toy_family_registered():
    """``TOY`` registered for the duration of the block; the registry is restored after."""
    saved = dict(families._REGISTRY)
    try:
        yield families.register_family(TOY)
    finally:
        families._REGISTRY.clear()
        families._REGISTRY.update(saved)


def write_toy_hf_checkpoint(directory: str | Path, arch: ArchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A toy HF folder (``config.json`` + ``model.safetensors``, random fp32 tensors of every
    HF name of the family); returns the tensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape_fn(arch), generator=gen)
               for group in TOY.groups(arch) for m in group.mappings
               for name, shape_fn in zip(m.hf_names(group.layer), m.hf_shapes)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_hf_config_from_arch(arch), indent=2) + "\n")
    return tensors
