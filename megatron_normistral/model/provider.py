"""Model provider: architecture + parallel layout + precision -> megatron-core GPTModel chunks.

``build_model`` returns the chunks this process owns (one per virtual pipeline stage; one
without interleaving). Model math comes from :mod:`.architectures`, layer implementations from
:mod:`.specs`, the layout from :class:`~megatron_normistral.runtime.parallel.ParallelConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_normistral.model.architectures import ArchConfig, get_architecture
from megatron_normistral.model.specs import (
    AttentionBackend,
    TransformerImpl,
    decoder_block_spec,
    describe_attention_backend,
    resolve_attention_backend,
    resolve_transformer_impl,
)
from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.runtime.logs import get_logger

log = get_logger(__name__)


class ModelConfigError(ValueError):
    pass


@dataclass
class PrecisionConfig:
    """The recipe's ``precision`` section: numerics. FP8 needs Transformer Engine layers."""

    bf16: bool = False
    """bf16 parameters and activations (the optimizer keeps fp32 master weights). It also sets
    the optimizer's bf16 and params_dtype (not settable there)."""

    fp8_format: Literal["hybrid", "e4m3"] | None = None
    """FP8 through Transformer Engine: hybrid or e4m3; None: no FP8."""

    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"
    """FP8 scaling recipe: delayed or tensorwise."""

    fp8_amax_history_len: int = 1024
    """FP8 delayed scaling: length of the amax history."""

    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    """FP8 delayed scaling: the scale comes from the max of the amax history, or its most recent value."""

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass
class ModelConfig:
    """The recipe's ``model`` section: which architecture to build and how."""

    arch: str = "tiny"
    """Architecture name (mistral-nemo-12b, normistral-11b, tiny, tiny-tekken, ...: model/architectures.py)."""

    vocab_size: int | None = None
    """Override the architecture's vocabulary size (e.g. a new tokenizer)."""

    num_layers: int | None = None
    """Override the number of layers (benchmarks build slices of the 40 layers)."""

    transformer_impl: TransformerImpl = "auto"
    """Layer implementation: auto (Transformer Engine if importable with CUDA, else local),
    local, or transformer_engine."""

    attention_backend: AttentionBackend = "auto"
    """Core attention (model/attention.py): auto (flex on CUDA/ROCm, sdpa elsewhere), flex
    (FlexAttention, block-sparse document mask), sdpa (per-document flash attention), or dense
    (megatron-core's attention with a [b, 1, s, s] mask)."""

    attention_mask: Literal["causal", "arbitrary"] = "causal"
    """Dense backend only: the layer spec's mask type, causal or arbitrary (Transformer Engine
    honours a mask only with arbitrary)."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (for weights not loaded from a checkpoint)."""

    recompute_granularity: Literal["full", "selective"] | None = None
    """Activation recomputation: full or selective; None: none."""

    recompute_num_layers: int = 1
    """Layers per recomputation block (full recomputation)."""

    def architecture(self) -> ArchConfig:
        overrides = {}
        if self.vocab_size is not None:
            overrides["vocab_size"] = self.vocab_size
        if self.num_layers is not None:
            overrides["num_layers"] = self.num_layers
        return get_architecture(self.arch, **overrides)


def validate_layout(arch: ArchConfig, parallel: ParallelConfig) -> None:
    """Checks that megatron-core would otherwise make later, with less helpful messages."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    problems = []
    if arch.num_attention_heads % tp:
        problems.append(f"attention heads ({arch.num_attention_heads}) not divisible by tensor parallel size ({tp})")
    if arch.num_query_groups % tp:
        problems.append(f"KV heads ({arch.num_query_groups}) not divisible by tensor parallel size ({tp})")
    if arch.ffn_hidden_size % tp:
        problems.append(f"FFN size ({arch.ffn_hidden_size}) not divisible by tensor parallel size ({tp})")
    if arch.vocab_size % tp:
        problems.append(f"vocabulary ({arch.vocab_size}) not divisible by tensor parallel size ({tp})")
    if arch.num_layers % (pp * vpp):
        problems.append(
            f"layers ({arch.num_layers}) not divisible by pipeline size x virtual stages ({pp} x {vpp} = {pp * vpp})"
        )
    if problems:
        raise ModelConfigError(f"{arch.name}: " + "; ".join(problems))


def validate_attention(model: ModelConfig) -> tuple[str, str]:
    """(attention backend, layer implementation) that will run, or a one-line error."""
    try:
        impl = resolve_transformer_impl(model.transformer_impl)
        backend = resolve_attention_backend(model.attention_backend)
    except (RuntimeError, ValueError) as exc:
        raise ModelConfigError(str(exc)) from None
    if backend == "dense" and impl == "transformer_engine" and model.attention_mask == "causal":
        raise ModelConfigError(
            "model.attention_backend: dense with Transformer Engine layers and attention_mask: causal would "
            "silently ignore the document mask; set model.attention_mask: arbitrary, or attention_backend: auto"
        )
    return backend, impl


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """megatron-core TransformerConfig for this architecture, layout and precision."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch = model.architecture()
    validate_layout(arch, parallel)
    _, impl = validate_attention(model)
    if precision.fp8_format is not None and impl != "transformer_engine":
        raise ModelConfigError(
            f"fp8_format={precision.fp8_format!r} needs Transformer Engine layers; "
            f"this run uses the {impl} implementation"
        )
    interleaved = parallel.virtual_pipeline_model_parallel_size is not None
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Interleaved schedules overlap p2p with compute, which needs unbatched p2p. This is
        # also a correctness fix: with batched p2p and exactly two stages, "previous" and
        # "next" are the same peer, and the activation and gradient messages (same shape)
        # are matched in posting order and swap, silently (seen over gloo: loss off by 7e-2).
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        bf16=precision.bf16,
        fp8=precision.fp8_format,
        fp8_recipe=precision.fp8_recipe,
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=model.recompute_num_layers if model.recompute_granularity == "full" else None,
        # Initialise on the CPU without CUDA; on GPU initialise in place (faster, and the
        # tracker gives each TP rank its own stream).
        use_cpu_initialization=not torch.cuda.is_available(),
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def build_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, max_sequence_length: int):
    """GPTModel chunks of this process (parallel state must be initialised). Not yet wrapped
    for training (no DDP / Float16Module): see ``training.ddp``."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model, parallel, precision)
    arch = model.architecture()
    backend, impl = validate_attention(model)
    log.info(f"attention: {backend} ({describe_attention_backend(backend)}; model.attention_backend: "
             f"{model.attention_backend}), {impl} layers")
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(config, impl, vp_stage, model.attention_mask, backend),
                vocab_size=arch.vocab_size,
                max_sequence_length=max_sequence_length,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=not arch.untie_embeddings,
                position_embedding_type="rope",
                rotary_base=int(arch.rope_theta),
                vp_stage=vp_stage,
            )
        )
    if torch.cuda.is_available():
        # megatron-core allocates its own weights on the GPU, but modules from our spec (the
        # RMSNorm) start on the CPU; DDP's broadcast then fails on the mixed devices.
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks
