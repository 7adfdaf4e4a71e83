"""Wrap model chunks for training (Float16Module for bf16, megatron-core DDP) and build the
optimizer. Everything a training step needs, and nothing of the loop itself."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_normistral.model.provider import PrecisionConfig
from megatron_normistral.runtime.parallel import ParallelConfig


@dataclass
class OptimizerConfig:
    """AdamW. Defaults are the NorMistral authors' (betas 0.9/0.95, eps 1e-8, wd 0.1)."""

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # False (the usual choice): norm weights and biases get no weight decay.
    decay_norms_and_biases: bool = False


@dataclass
class DDPConfig:
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Reduce gradients in fp32 even when training in bf16 (more exact, more bandwidth).
    grad_reduce_in_fp32: bool = True


def wrap_model(chunks, parallel: ParallelConfig, precision: PrecisionConfig, ddp: DDPConfig | None = None):
    """Float16Module (bf16) and megatron-core DDP around each chunk; also hands megatron-core
    the hooks it needs from the config (finalize_model_grads: without it there is no DP grad
    all-reduce, no SP norm-grad all-reduce and no embedding sync across pipeline stages)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    ddp = ddp or DDPConfig()
    config = chunks[0].config
    if precision.bf16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=ddp.grad_reduce_in_fp32,
        overlap_grad_reduce=ddp.overlap_grad_reduce,
        overlap_param_gather=ddp.overlap_param_gather and parallel.use_distributed_optimizer,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk buckets with overlap, as Megatron-LM does (bucketing the
            # others gains nothing once their grads arrive during the last chunk's backward).
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # identical replicas across DP, whatever each rank initialised
    config.finalize_model_grads_func = finalize_model_grads
    if ddp.overlap_grad_reduce:
        config.no_sync_func = [c.no_sync for c in wrapped]
        if len(wrapped) == 1:
            config.no_sync_func = config.no_sync_func[0]
        config.grad_sync_func = [c.start_grad_sync for c in wrapped]
        if len(wrapped) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    if ddp.overlap_param_gather and parallel.use_distributed_optimizer:
        config.param_sync_func = [c.start_param_sync for c in wrapped]
        if len(wrapped) == 1:
            config.param_sync_func = config.param_sync_func[0]
    return wrapped


def build_optimizer(chunks, opt: OptimizerConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """megatron-core's optimizer (with the distributed optimizer when configured)."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    config = McoreOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=precision.bf16,
        params_dtype=precision.params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    overrides = {} if opt.decay_norms_and_biases else None  # None = megatron's standard: no decay on 1-D params
    return get_megatron_optimizer(config, chunks, config_overrides=overrides)


def trainable_parameters(chunks) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad]
