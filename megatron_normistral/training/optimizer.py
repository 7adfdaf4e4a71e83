"""The optimizer: AdamW with the authors' defaults, as megatron-core's optimizer (its
distributed optimizer, ZeRO-1, when the layout asks for it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from megatron_normistral.training.mcore_configs import quiet_mcore_import, with_owned_fields

with quiet_mcore_import():
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig

if TYPE_CHECKING:
    from megatron_normistral.model.provider import PrecisionConfig
    from megatron_normistral.runtime.parallel import ParallelConfig


@dataclass
class OptimizerConfig(McoreOptimizerConfig):
    """The recipe's ``optimizer`` section: megatron-core's ``OptimizerConfig``, handed to
    ``get_megatron_optimizer`` as it is. The fields declared here are the recipe's settings, with
    the NorMistral authors' defaults (AdamW, betas 0.9/0.95, eps 1e-8, weight decay 0.1, clip
    1.0); a field without a docstring here is documented by megatron-core's. Its other fields
    keep megatron-core's defaults, except those another section owns (``OWNED_ELSEWHERE``),
    which :meth:`resolved` sets from it."""

    OWNED_ELSEWHERE: ClassVar[dict[str, str]] = {
        "bf16": "precision.bf16",
        "params_dtype": "precision.bf16",
        "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    }

    lr: float = 1e-4
    """Peak learning rate (reached at the end of warmup)."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay (schedule.style cosine or wsd)."""

    weight_decay: float = 0.1
    """AdamW weight decay (norm weights and biases get none unless decay_norms_and_biases)."""

    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8

    clip_grad: float = 1.0
    """Clip the global gradient norm (L2, over all model-parallel ranks) to this; 0: no clipping."""

    decay_norms_and_biases: bool = False
    """Also apply weight decay to norm weights and biases (off, the usual choice: megatron-core's
    standard parameter groups give 1-D parameters no decay)."""

    def resolved(self, parallel: ParallelConfig, precision: PrecisionConfig) -> "OptimizerConfig":
        """This config with the fields of ``precision`` and ``parallel`` set: what
        megatron-core receives."""
        return with_owned_fields(self, {"bf16": precision.bf16, "params_dtype": precision.params_dtype,
                                        "use_distributed_optimizer": parallel.use_distributed_optimizer})


def build_optimizer(chunks, opt: OptimizerConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """megatron-core's optimizer (with the distributed optimizer when configured)."""
    from megatron.core.optimizer import get_megatron_optimizer

    overrides = {} if opt.decay_norms_and_biases else None  # None = megatron's standard: no decay on 1-D params
    return get_megatron_optimizer(opt.resolved(parallel, precision), chunks, config_overrides=overrides)


def trainable_parameters(chunks) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad]
