"""Recipe settings of the attention backend and of megatron-core's DDP overlap: what each
resolves to here, the refused combinations (one line each), and the 11B recipes."""
from pathlib import Path

import pytest
import torch

from megatron_normistral.config.recipe import RecipeError, build_parser, load_recipe, parse_recipe, validate_recipe
from megatron_normistral.model import provider
from megatron_normistral.model.provider import ModelConfig, ModelConfigError, validate_attention
from megatron_normistral.model.specs import resolve_attention_backend

REPO = Path(__file__).resolve().parents[2]
AUTHORS = [REPO / "examples" / "normistral_11b" / f"{name}.yaml" for name in ("stage2_embeddings", "stage3_full")]
TINY = sorted((REPO / "examples" / "tiny").glob("*.yaml"))


def test_auto_is_the_fast_path_everywhere(monkeypatch):
    assert resolve_attention_backend("auto") == "sdpa"  # this machine: CPU
    assert resolve_attention_backend("dense") == "dense" and resolve_attention_backend("sdpa") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attention_backend("auto") == "flex"


def test_flex_is_refused_without_cuda():
    with pytest.raises(ValueError, match="needs CUDA or ROCm"):
        resolve_attention_backend("flex")
    recipe = load_recipe(TINY[0])
    recipe.model.attention_backend = "flex"
    with pytest.raises(RecipeError, match="torch has no FlexAttention backward on CPU"):
        validate_recipe(recipe, world_size=2)


def test_dense_transformer_engine_needs_an_arbitrary_mask(monkeypatch):
    """With Transformer Engine and mask type 'causal', TE ignores a given mask tensor: the
    document mask would be silently dropped. Refused; the fast backends do not care."""
    monkeypatch.setattr(provider, "resolve_transformer_impl", lambda impl: "transformer_engine")
    with pytest.raises(ModelConfigError, match="silently ignore the document mask") as err:
        validate_attention(ModelConfig(attention_backend="dense", attention_mask="causal"))
    assert "\n" not in str(err.value)
    assert validate_attention(ModelConfig(attention_backend="dense", attention_mask="arbitrary")) == ("dense", "transformer_engine")
    assert validate_attention(ModelConfig(attention_backend="auto", attention_mask="causal")) == ("sdpa", "transformer_engine")


@pytest.mark.parametrize("path", AUTHORS + TINY, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_recipes_use_the_fast_path(path):
    assert load_recipe(path).model.attention_backend == "auto"


def test_authors_recipes_overlap_communication():
    for path in AUTHORS:
        recipe = load_recipe(path)
        assert recipe.ddp.overlap_grad_reduce and recipe.ddp.overlap_param_gather
        assert recipe.parallel.use_distributed_optimizer


def test_overlap_flags(tmp_path):
    recipe, _ = parse_recipe(["--config", str(TINY[0]), "--overlap-grad-reduce", "--overlap-param-gather",
                              "--use-distributed-optimizer", "--ddp-bucket-size", "1000000",
                              "--model.attention_backend", "dense"])
    assert recipe.ddp.overlap_grad_reduce and recipe.ddp.overlap_param_gather and recipe.ddp.bucket_size == 1_000_000
    assert recipe.model.attention_backend == "dense"
    validate_recipe(recipe, world_size=2)
    recipe.parallel.use_distributed_optimizer = False
    with pytest.raises(RecipeError, match=r"--overlap-param-gather\) needs the distributed optimizer"):
        validate_recipe(recipe, world_size=2)
    with pytest.raises(RecipeError, match="expected one of"):
        parse_recipe(["--config", str(TINY[0]), "--model.attention_backend", "fused"])


def test_help_names_the_new_flags():
    text = build_parser().format_help()
    for flag in ("--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "--model.attention_backend"):
        assert flag in text
