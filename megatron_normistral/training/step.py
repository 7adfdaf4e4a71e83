"""One optimizer step over a global batch: forward/backward over the pipeline schedule,
gradient reduction, clip, optimizer update. Knows nothing of data sources or logging."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch


@dataclass
class StepResult:
    updated: bool  # False when the optimizer skipped the step (non-finite grads)
    grad_norm: float | None
    # Per-micro-batch reports from the loss function (last pipeline stage only; empty elsewhere).
    reports: list[dict]


def lm_loss(batch: dict, per_token_loss: torch.Tensor):
    """Loss-function contract of megatron-core schedules (3-tuple form): the sum of counted
    token losses, the count, and what to report. megatron-core divides by the count per
    micro-batch (the authors' weighting) or, with ``calculate_per_token_loss``, over the
    whole global batch (token weighting).

    The report splits the sum by objective: rows with ``batch["masked"]`` set are masked
    next-token prediction, the rest causal (a batch without the key is all causal)."""
    mask = batch["loss_mask"].float()
    weighted = per_token_loss.float() * mask
    masked_rows = batch["masked"].bool() if "masked" in batch else torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    loss_sum = weighted.sum()
    count = mask.sum().to(torch.int)
    report = {
        # clones: megatron-core divides the returned loss in place
        "loss_sum": loss_sum.detach().clone(),
        "tokens": count.detach().clone(),
        "causal_sum": weighted[~masked_rows].sum().detach(),
        "causal_tokens": mask[~masked_rows].sum().detach(),
        "masked_sum": weighted[masked_rows].sum().detach(),
        "masked_tokens": mask[masked_rows].sum().detach(),
    }
    return loss_sum, count, report


def attention_inputs(batch: dict) -> dict:
    """How a batch's attention reaches the model (keyword arguments of ``GPTModel.forward``).

    A batch that describes its documents (``document_ids`` [b, s] and ``masked`` [b], as
    data.objective.build_batch makes) passes them as a ``DocumentLayout`` in
    ``packed_seq_params``, which every attention backend reads (the dense one derives its
    mask from it); a batch with an explicit ``attention_mask`` [b, 1, s, s] (True = masked)
    passes that (dense backend only); a batch with neither is causal."""
    if "document_ids" in batch:
        from megatron_normistral.model.attention import DocumentLayout

        return {"attention_mask": None, "packed_seq_params": DocumentLayout.of(batch["document_ids"], batch["masked"])}
    return {"attention_mask": batch.get("attention_mask")}


def lm_forward_step(data_iterator: Iterator[dict], model):
    """forward_step_func for a batch dict: tokens, labels, loss_mask, position_ids, the
    attention (see :func:`attention_inputs`) and optional per-row ``masked`` flags (the
    hybrid objective's batches, data.objective.build_batch)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], **attention_inputs(batch))
    return output, partial(lm_loss, batch)


def train_step(
    chunks,
    optimizer,
    data_iterators: list[Iterator[dict]],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func: Callable = lm_forward_step,
    skip_update: Callable[[list[dict]], bool] | None = None,
) -> StepResult:
    """``skip_update(reports)``, if given, runs after the backward pass and before the
    update; when it returns True the optimizer is not stepped (grads are discarded)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    reports = list(reports or [])
    if skip_update is not None and skip_update(reports):
        return StepResult(updated=False, grad_norm=None, reports=reports)
    updated, grad_norm, _ = optimizer.step()
    return StepResult(updated=bool(updated), grad_norm=None if grad_norm is None else float(grad_norm), reports=reports)
