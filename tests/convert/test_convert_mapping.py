"""The HF <-> megatron mapping, config translation and safetensors I/O (single process, fast)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_normistral.convert import ConversionError, arch_from_hf_config, hf_config_from_arch
from megatron_normistral.convert import families, mistral
from megatron_normistral.convert.safetensors_io import (
    CheckpointIOError,
    HFCheckpointReader,
    PlannedTensor,
    ShardedSafetensorsWriter,
)
from megatron_normistral.model.architectures import get_architecture

TINY = get_architecture("tiny")


def test_config_round_trip_keeps_decoupled_head_dim():
    config = hf_config_from_arch(TINY)
    assert config["head_dim"] == 32 != TINY.hidden_size // TINY.num_attention_heads
    assert config["tie_word_embeddings"] is False and config["sliding_window"] is None
    assert config["rope_parameters"] == {"rope_theta": TINY.rope_theta, "rope_type": "default"}
    back = arch_from_hf_config(config, name="tiny")
    assert back == TINY


def test_config_loads_in_transformers():
    from transformers import MistralConfig

    hf = MistralConfig(**hf_config_from_arch(TINY))
    assert (hf.head_dim, hf.num_key_value_heads, hf.sliding_window, hf.tie_word_embeddings) == (32, 2, None, False)
    assert hf.rope_parameters["rope_theta"] == TINY.rope_theta


@pytest.mark.parametrize("change, message", [
    ({"sliding_window": 4096}, "sliding_window"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}, "rope type"),
])
def test_config_refuses_what_megatron_would_compute_differently(change, message):
    config = {**hf_config_from_arch(TINY), **change}
    with pytest.raises(ConversionError, match=message):
        arch_from_hf_config(config)


def test_qkv_fusion_groups_heads_by_kv_group():
    a = TINY  # 4 heads, 2 KV groups, head_dim 32, hidden 64
    hd, h = a.head_dim, a.hidden_size
    # Row r of head j holds value 1000*tag + 100*j + r % hd so every row is identifiable.
    q = torch.stack([torch.full((hd, h), 1000 + 100 * j, dtype=torch.float32) for j in range(4)]).reshape(-1, h)
    k = torch.stack([torch.full((hd, h), 2000 + 100 * j, dtype=torch.float32) for j in range(2)]).reshape(-1, h)
    v = torch.stack([torch.full((hd, h), 3000 + 100 * j, dtype=torch.float32) for j in range(2)]).reshape(-1, h)
    fused = mistral.FUSED_QKV.to_megatron(a, (q, k, v))
    order = fused[::hd, 0].tolist()
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert order == [1000, 1100, 2000, 3000, 1200, 1300, 2100, 3100]
    back = mistral.FUSED_QKV.to_hf(a, fused)
    assert all(torch.equal(x, y) for x, y in zip(back, (q, k, v)))


def test_glu_fusion_is_gate_then_up():
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = mistral.FUSED_GLU.to_megatron(TINY, (gate, up))
    assert torch.equal(fused[:128], gate) and torch.equal(fused[128:], up)
    g, u = mistral.FUSED_GLU.to_hf(TINY, fused)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_mapping_covers_every_hf_and_megatron_tensor_once():
    hf = mistral.MISTRAL.hf_names(TINY)
    meg = mistral.MISTRAL.megatron_names(TINY)
    assert len(hf) == len(set(hf)) == 2 + 1 + 9 * TINY.num_layers
    assert len(meg) == len(set(meg)) == 3 + 6 * TINY.num_layers


def test_wrong_shape_is_refused_by_name():
    mapping = mistral.LAYER_MAPPINGS[1]  # qkv
    q = torch.zeros(128, 64)
    k_bad = torch.zeros(48, 64)  # head_dim 24 instead of 32
    with pytest.raises(ConversionError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight.*\(48, 64\).*\(64, 64\)"):
        families.hf_to_megatron(TINY, mapping, 3, (q, k_bad, torch.zeros(64, 64)))
    with pytest.raises(ConversionError, match=r"decoder\.layers\.2\.self_attention\.linear_qkv\.weight"):
        families.megatron_to_hf(TINY, mapping, 2, torch.zeros(255, 64))


def _plan(tensors):
    return [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def test_writer_streams_shards_by_size_with_index(tmp_path):
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    tensors["big"] = torch.arange(300, dtype=torch.bfloat16).reshape(3, 100)  # 600 bytes
    tensors["empty"] = torch.zeros(0, 4)
    writer = ShardedSafetensorsWriter(tmp_path, _plan(tensors), max_shard_bytes=900)
    for name, t in tensors.items():
        writer.add(name, t)
    index = writer.close()
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert [index["weight_map"][n] for n in ("t0", "t1", "t2", "t3", "t4", "big")] == [files[0]] * 2 + [files[1]] * 2 + [files[2], files[3]]
    assert index["metadata"]["total_size"] == 2600
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    assert not list(tmp_path.glob("*.partial"))
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = HFCheckpointReader(tmp_path)
    assert reader.shape("big") == (3, 100)
    assert torch.equal(reader.read("t3"), tensors["t3"])
    with pytest.raises(CheckpointIOError, match="t3.*read twice"):
        reader.read("t3")
    assert reader.unconsumed() == ["big", "empty", "t0", "t1", "t2", "t4"]


def test_writer_refuses_duplicates_disorder_wrong_shapes_and_missing(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.ones(3), "c": torch.ones(1)}
    writer = ShardedSafetensorsWriter(tmp_path, _plan(tensors))
    writer.add("a", tensors["a"])
    with pytest.raises(CheckpointIOError, match="'a' was written twice"):
        writer.add("a", tensors["a"])
    with pytest.raises(CheckpointIOError, match="'c' comes out of order"):
        writer.add("c", tensors["c"])
    with pytest.raises(CheckpointIOError, match=r"'b' is \(4,\)"):
        writer.add("b", torch.ones(4))
    writer.add("b", tensors["b"])
    with pytest.raises(CheckpointIOError, match=r"missing \['c'\]"):
        writer.close()
