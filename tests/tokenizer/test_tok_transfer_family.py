"""Embedding transfer finds the embeddings and LM head through the checkpoint's model family:
a second (toy) family's checkpoint is transferred under its own names, exactly as the same
tensors under Mistral's names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_normistral.testing.toy_family import TOY_MODEL_TYPE, toy_family_registered
from megatron_normistral.tokenizer.transfer import TransferConfig, TransferError, transfer_embeddings

TEKKEN_VOCAB = 131072
HIDDEN = 8


def _checkpoint(path: Path, model_type: str, names: dict[str, str]) -> Path:
    """Embeddings, head and one other tensor (same values whatever the names)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(TEKKEN_VOCAB, HIDDEN, generator=gen),
               "head": torch.randn(TEKKEN_VOCAB, HIDDEN, generator=gen), "norm": torch.rand(HIDDEN, generator=gen)}
    path.mkdir()
    save_file({names[k]: t for k, t in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": TEKKEN_VOCAB}))
    return path


def _transfer(src: Path, target_tokenizer: Path, out: Path) -> dict[str, torch.Tensor]:
    transfer_embeddings(TransferConfig(str(src), "tekken", str(target_tokenizer), str(out), verbose=False))
    return load_file(out / "model.safetensors")


def test_toy_family_checkpoint_is_transferred_under_its_own_names(tmp_path, small_tokenizers):
    target = small_tokenizers["bytelevel"]
    mistral = _transfer(_checkpoint(tmp_path / "mistral", "mistral", {
        "embed": "model.embed_tokens.weight", "head": "lm_head.weight", "norm": "model.norm.weight"}),
        target, tmp_path / "mistral_out")
    with toy_family_registered():
        toy = _transfer(_checkpoint(tmp_path / "toy", TOY_MODEL_TYPE, {
            "embed": "toy.wte.weight", "head": "toy.lm_head.weight", "norm": "toy.ln_f.weight"}),
            target, tmp_path / "toy_out")
    assert set(toy) == {"toy.wte.weight", "toy.lm_head.weight", "toy.ln_f.weight"}
    assert toy["toy.wte.weight"].shape[0] == mistral["model.embed_tokens.weight"].shape[0] != TEKKEN_VOCAB
    assert torch.equal(toy["toy.wte.weight"], mistral["model.embed_tokens.weight"])
    assert torch.equal(toy["toy.lm_head.weight"], mistral["lm_head.weight"])
    assert torch.equal(toy["toy.ln_f.weight"], mistral["model.norm.weight"])


def test_checkpoint_of_an_unregistered_family_is_refused_naming_the_registered_ones(tmp_path, small_tokenizers):
    src = _checkpoint(tmp_path / "toy", TOY_MODEL_TYPE, {
        "embed": "toy.wte.weight", "head": "toy.lm_head.weight", "norm": "toy.ln_f.weight"})
    with pytest.raises(TransferError, match=r"config\.json: model_type 'toy-lm' belongs to no registered model "
                                            r"family; registered: mistral \(model_type mistral\)"):
        _transfer(src, small_tokenizers["bytelevel"], tmp_path / "out")
