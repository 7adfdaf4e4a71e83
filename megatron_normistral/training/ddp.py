"""Model chunks made ready for data-parallel training: Float16Module for bf16, megatron-core's
DistributedDataParallel (gradient buckets, reduction overlap), and the hooks megatron-core's
schedules call."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from megatron_normistral.training.mcore_configs import quiet_mcore_import, with_owned_fields

with quiet_mcore_import():
    from megatron.core.distributed import DistributedDataParallelConfig

if TYPE_CHECKING:
    from megatron_normistral.model.provider import PrecisionConfig
    from megatron_normistral.runtime.parallel import ParallelConfig


@dataclass
class DDPConfig(DistributedDataParallelConfig):
    """The recipe's ``ddp`` section: megatron-core's ``DistributedDataParallelConfig`` (gradient
    buckets and their data-parallel reduction), handed to ``DistributedDataParallel`` as it is.
    The fields declared here are the recipe's settings; a field without a docstring here is
    documented by megatron-core's. Its other fields keep megatron-core's defaults, except
    ``use_distributed_optimizer``, which is ``parallel``'s (:meth:`resolved`)."""

    OWNED_ELSEWHERE: ClassVar[dict[str, str]] = {"use_distributed_optimizer": "parallel.use_distributed_optimizer"}

    overlap_grad_reduce: bool = False
    """Start each bucket's gradient all-reduce / reduce-scatter during the backward pass of the
    last micro-batch, as soon as the bucket's gradients are complete."""

    overlap_param_gather: bool = False
    """Distributed optimizer only: gather the updated parameters during the next step's forward
    pass (per bucket, just before a module needs them) instead of after the update."""

    grad_reduce_in_fp32: bool = True
    """Reduce gradients in fp32 even when training in bf16 (more exact, more bandwidth)."""

    bucket_size: int | None = None

    def validate(self, parallel: ParallelConfig) -> None:
        if self.bucket_size is not None and self.bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size {self.bucket_size}: must be >= 1")
        if self.overlap_param_gather and not parallel.use_distributed_optimizer:
            raise ValueError("ddp.overlap_param_gather (--overlap-param-gather) needs the distributed optimizer "
                             "(--use-distributed-optimizer)")
        self.resolved(parallel)  # a conflicting use_distributed_optimizer is refused here

    def resolved(self, parallel: ParallelConfig) -> "DDPConfig":
        """This config with ``parallel``'s fields set: what megatron-core receives."""
        return with_owned_fields(self, {"use_distributed_optimizer": parallel.use_distributed_optimizer})


def wrap_model(chunks, parallel: ParallelConfig, precision: PrecisionConfig, ddp: DDPConfig | None = None):
    """Float16Module (bf16) and megatron-core DDP around each chunk; also hands megatron-core
    the hooks it needs from the config (finalize_model_grads: without it there is no DP grad
    all-reduce, no SP norm-grad all-reduce and no embedding sync across pipeline stages)."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    ddp = ddp or DDPConfig()
    ddp.validate(parallel)
    config = chunks[0].config
    if precision.bf16:
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = ddp.resolved(parallel)
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
    if ddp.overlap_param_gather:
        config.param_sync_func = [c.start_param_sync for c in wrapped]
        if len(wrapped) == 1:
            config.param_sync_func = config.param_sync_func[0]
    return wrapped


def sync_params(chunks) -> None:
    """Finish every pending parameter all-gather (``ddp.overlap_param_gather``). With that
    overlap, an optimizer step updates each rank's own shard and the other ranks' shards
    arrive only during the next forward; anything that reads the weights between steps
    (evaluation, checkpoint saving, re-wrapping the model) must call this first. A no-op
    otherwise."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)
