"""Learning-rate schedules as a pure function of the step (so resume needs no state)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class ScheduleConfig:
    """The recipe's ``schedule`` section (the peak and final rates are ``optimizer.lr`` and
    ``optimizer.min_lr``)."""

    style: Literal["constant", "cosine", "wsd"] = "constant"
    """Learning-rate schedule after warmup: constant, cosine (down to min_lr), or wsd
    (warmup-stable-decay: constant, then a linear decay to min_lr at the end)."""

    warmup_iters: int = 0
    """Steps of linear warmup up to lr."""

    decay_iters: int | None = None
    """cosine: the step where the decay ends (default: train_iters); wsd: the length of the final
    decay, in steps (default: a tenth of train_iters)."""


def learning_rate(step: int, lr: float, min_lr: float, schedule: ScheduleConfig, train_iters: int) -> float:
    """LR used for optimizer step ``step`` (0-based).

    - warmup: linear from lr/warmup to lr over ``warmup_iters`` steps (step 0 is not 0, so
      the first update already moves the weights);
    - constant: lr afterwards;
    - cosine: from lr at the end of warmup to min_lr at ``decay_iters`` (default train_iters);
    - wsd: lr until the last ``decay_iters`` steps of the run, then linearly down to min_lr
      at the final step.
    """
    warmup = schedule.warmup_iters
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule.style == "constant":
        return lr
    if schedule.style == "cosine":
        end = schedule.decay_iters or train_iters
        span = max(1, end - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    if schedule.style == "wsd":
        decay = schedule.decay_iters if schedule.decay_iters is not None else max(1, train_iters // 10)
        decay_start = train_iters - decay
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / decay)
        return lr + (min_lr - lr) * progress
    raise ValueError(f"unknown schedule style {schedule.style!r}")


def apply_learning_rate(optimizer, lr: float, weight_decay: float) -> None:
    """Set lr and weight decay on every param group (megatron-core groups carry wd_mult:
    0 for norms/biases unless they are decayed too)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
