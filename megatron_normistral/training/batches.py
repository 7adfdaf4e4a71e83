"""From the mixture dataset to this rank's micro-batches.

Sample ``g`` of the run is global: DP rank r of a step takes samples
``consumed + r * per_rank ... consumed + (r + 1) * per_rank - 1`` (per_rank = global batch /
DP), so the data a run sees depends only on the seed, the mixture and the consumed-sample
count — never on the parallel layout — and resuming at any step replays nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_normistral.data.objective import ObjectiveConfig, build_batch
from megatron_normistral.runtime.parallel import device


def to_device(batch: dict) -> dict:
    """Batches are built on the host; the model runs on this rank's device."""
    target = device()
    return {k: v.to(target, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class SpecialIds:
    eod_id: int
    mask_id: int | None
    vocab_size: int
    bos_id: int | None = None  # set when documents start with BOS: it also starts a document block


class BatchSource:
    def __init__(self, dataset, objective: ObjectiveConfig, ids: SpecialIds, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int):
        if objective.masked_fraction > 0 and ids.mask_id is None:
            raise ValueError("the masked objective needs a <mask> token, and this tokenizer has none (set objective.masked_fraction: 0)")
        self.dataset = dataset
        self.objective = objective
        self.ids = ids
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.num_microbatches = self.per_rank // micro_batch_size

    def micro_batches(self, consumed_samples: int) -> list[dict]:
        start = consumed_samples + self.dp_rank * self.per_rank
        batches = []
        for m in range(self.num_microbatches):
            indices = list(range(start + m * self.micro_batch_size, start + (m + 1) * self.micro_batch_size))
            samples = [np.asarray(self.dataset[g]["tokens"]) for g in indices]
            batch = build_batch(
                samples, indices, self.objective,
                eod_id=self.ids.eod_id, mask_id=self.ids.mask_id if self.ids.mask_id is not None else 0,
                vocab_size=self.ids.vocab_size, bos_id=self.ids.bos_id,
            )
            batches.append(to_device(batch))
        return batches
