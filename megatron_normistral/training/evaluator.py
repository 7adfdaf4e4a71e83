"""When the held-out sets are evaluated: every ``evaluation.interval`` steps and after the last
step (once per step at most), and how much text they hold. What is computed is
:mod:`megatron_normistral.training.evaluation`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class EvalConfig:
    """The recipe's ``evaluation`` section (the held-out files are ``data.eval_sets``)."""

    OLD_NAMES: ClassVar[dict[str, str]] = {"eval_interval": "interval", "eval_max_words": "max_words",
                                           "eval_max_tokens": "max_tokens"}

    interval: int | None = None
    """Evaluate on the held-out sets every N steps; they are also evaluated after the last step."""

    max_words: int = 32_768
    """Held-out words per language per evaluation: the first N words of each file, so every
    tokenizer is scored on the same text; 0: the whole file."""

    max_tokens: int | None = None
    """Optional cap on the packed held-out tokens per language (a cost limit). It cuts the text
    per tokenizer, so loss per word then covers different words for different tokenizers
    (logged); prefer max_words."""


class Evaluator:
    def __init__(self, interval: int | None, evaluate):
        """``evaluate(chunks) -> {language: {metric: value}}``; None when there is nothing to
        evaluate (no eval sets)."""
        self.interval = interval
        self.evaluate = evaluate
        self.last_evaluated_step: int | None = None

    def should_evaluate(self, step: int, last_step: bool) -> bool:
        if self.evaluate is None or self.last_evaluated_step == step:
            return False
        return last_step or bool(self.interval and step % self.interval == 0)

    def run(self, step: int, chunks) -> dict:
        self.last_evaluated_step = step
        return self.evaluate(chunks)
