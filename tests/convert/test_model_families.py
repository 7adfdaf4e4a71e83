"""Model families: names derived from the mapping, and a second (toy) family that joins the
registry and flows through conversion and stage-2 freezing (``testing/toy_family.py``)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from megatron_normistral.convert import ConversionError, arch_from_hf_config, families, hf_config_from_arch, hf_mcore
from megatron_normistral.convert import mcore_io
from megatron_normistral.convert.mistral import MISTRAL
from megatron_normistral.model.architectures import ArchConfig, get_architecture
from megatron_normistral.testing.toy_family import TOY, TOY_MODEL_TYPE, toy_family_registered, write_toy_hf_checkpoint
from megatron_normistral.training.stages import set_trainable

TOY_ARCH = ArchConfig(name="toy-2l", num_layers=2, hidden_size=8, num_attention_heads=1, num_query_groups=1,
                      head_dim=8, ffn_hidden_size=12, vocab_size=40, family="toy")


@pytest.fixture
def toy():
    with toy_family_registered() as family:
        yield family


def test_mistral_names_are_derived_from_its_mapping():
    """The names that five modules used to spell out, now read off Mistral's mapping."""
    assert [m.megatron for m in MISTRAL.vocab_mappings()] == ["embedding.word_embeddings.weight", "output_layer.weight"]
    assert [m.hf for m in MISTRAL.vocab_mappings()] == [("model.embed_tokens.weight",), ("lm_head.weight",)]
    assert MISTRAL.checkpoint_key("decoder.layers.7.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 7)
    assert MISTRAL.checkpoint_key("decoder.layers.0.pre_mlp_layernorm.weight") == (
        "decoder.layers.mlp.linear_fc1.layer_norm_weight", 0)
    assert MISTRAL.checkpoint_key("decoder.layers.3.mlp.linear_fc2.weight") == ("decoder.layers.mlp.linear_fc2.weight", 3)
    assert MISTRAL.checkpoint_key("decoder.final_layernorm.weight") == ("decoder.final_layernorm.weight", None)
    assert sorted(MISTRAL.extra_state_modules()) == ["mlp.linear_fc1", "mlp.linear_fc2", "self_attention.linear_proj",
                                                     "self_attention.linear_qkv"]
    assert MISTRAL.model_key_prefixes() == ("embedding.", "decoder.", "output_layer.")
    assert get_architecture("tiny").family == "mistral"


def test_unknown_family_is_one_line_listing_the_registered_ones(toy):
    with pytest.raises(ConversionError) as err:
        arch_from_hf_config({"model_type": "llama", "hidden_size": 64})
    message = str(err.value)
    assert "\n" not in message and "model_type 'llama' belongs to no registered model family" in message
    assert "mistral (model_type mistral), toy (model_type toy-lm)" in message and "register_family" in message
    with pytest.raises(ConversionError, match=r"unknown model family 'gpt2'; registered: mistral .*register_family"):
        families.get_family("gpt2")


def test_registry_refuses_a_second_owner_of_a_name_or_model_type(toy):
    assert families.register_family(TOY) is TOY  # the same object again: no-op
    with pytest.raises(ValueError, match="'toy' is already registered"):
        families.register_family(dataclasses.replace(TOY, hf_model_types=("other",)))
    with pytest.raises(ValueError, match=r"model_type \['mistral'\] already belongs to 'mistral'"):
        families.register_family(dataclasses.replace(TOY, name="toy2", hf_model_types=("mistral",)))


def test_a_family_must_declare_one_embedding_and_layer_placeholders():
    with pytest.raises(ValueError, match="one 'embedding' mapping"):
        dataclasses.replace(TOY, embedding_mappings=())
    with pytest.raises(ValueError, match=r"needs \{layer\} in every name"):
        dataclasses.replace(TOY, layer_mappings=TOY.head_mappings[:1])


def test_config_dispatch_by_model_type_and_by_arch_family(toy):
    config = hf_config_from_arch(TOY_ARCH)
    assert config["model_type"] == TOY_MODEL_TYPE and config["n_inner"] == 12
    assert arch_from_hf_config(config, name="toy-2l") == TOY_ARCH
    assert arch_from_hf_config({k: v for k, v in hf_config_from_arch(get_architecture("tiny")).items()
                                if k != "model_type"}, name="tiny") == get_architecture("tiny")  # none: Mistral


def test_second_family_converts_hf_mcore_hf_bit_exactly_under_its_own_names(toy, tmp_path):
    hf = write_toy_hf_checkpoint(tmp_path / "hf", TOY_ARCH, seed=1)
    hf_mcore.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", arch_name=None)
    meta = json.loads((tmp_path / "mcore" / "normistral_model.json").read_text())
    assert meta["arch"]["family"] == "toy"
    keys = set(FileSystemReader(str(tmp_path / "mcore")).read_metadata().state_dict_metadata)
    # Layer keys carry no index (layers are stacked); the norm is stored under its checkpoint
    # key; each linear of a layer brings an _extra_state object per layer.
    tensors = {"tok.weight", "blocks.mix.norm_weight", "blocks.mix.weight", "blocks.out.weight", "head_norm.weight",
               "head.weight"}
    objects = {f"blocks.{m}._extra_state/shard_{layer}_2" for m in ("mix", "out") for layer in (0, 1)}
    assert keys == tensors | objects

    hf_mcore.mcore_to_hf(tmp_path / "mcore", tmp_path / "back", dtype="fp32")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    back = {}
    for f in sorted(set(index["weight_map"].values())):
        back.update(load_file(tmp_path / "back" / f))
    assert set(back) == set(hf) and all(torch.equal(back[n], t) for n, t in hf.items())
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == TOY_MODEL_TYPE and arch_from_hf_config(config, name="toy-2l") == TOY_ARCH


def test_export_refuses_model_keys_the_family_does_not_map(toy, tmp_path, monkeypatch):
    """The model-key prefixes come from the family too: a stray ``blocks.*`` tensor is refused,
    a non-model key (optimizer state) is not."""
    write_toy_hf_checkpoint(tmp_path / "hf", TOY_ARCH)
    hf_mcore.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    real = mcore_io.checkpoint_tensor_metadata

    def with_extra_keys(directory):
        md = dict(real(directory))
        md["blocks.extra.weight"] = md["optimizer.state.exp_avg.tok.weight"] = md["blocks.out.weight"]
        return md

    monkeypatch.setattr(mcore_io, "checkpoint_tensor_metadata", with_extra_keys)
    with pytest.raises(ConversionError, match=r"does not map to HF: \['blocks\.extra\.weight'\]$"):
        hf_mcore.mcore_to_hf(tmp_path / "mcore", tmp_path / "out")


class _ToyModule(torch.nn.Module):
    """Parameters named as the toy family's megatron names."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(40, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"out": torch.nn.Linear(12, 8, bias=False)})])
        self.head = torch.nn.Linear(8, 40, bias=False)


def test_stage2_trains_the_vocabulary_tensors_of_the_models_family(toy):
    module = _ToyModule()
    count = set_trainable([module], "embeddings", family="toy")
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"tok.weight", "head.weight"}
    assert count == 2 * 40 * 8
    assert set_trainable([module], "embeddings") == 0  # Mistral's names: nothing of the toy model trains
    assert set_trainable([module], "full", family="toy") == sum(p.numel() for p in module.parameters())
