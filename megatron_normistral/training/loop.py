"""The training loop.

:meth:`Trainer.fit` is the loop (``megatron_normistral.pretrain`` checks the recipe, starts
the process groups and builds the Trainer). The loop decides nothing itself: when to save and
when a run exits by itself (:class:`~.checkpointer.Checkpointer`), when to evaluate
(:class:`~.evaluator.Evaluator`), stop requests from signals and the wall-time limit
(:class:`~megatron_normistral.runtime.stop.StopRequest`), non-finite steps
(:class:`~.monitors.NonFiniteGuard`), what is logged (:class:`~.metrics.StepReporter`) and the
stage switch (:class:`~.model_setup.StageSwitch`) are components it calls.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Literal

import torch.distributed as dist

from megatron_normistral.runtime.logs import get_logger
from megatron_normistral.runtime.stop import StopRequest
from megatron_normistral.checkpoint import resume as ckpt
from megatron_normistral.training.checkpointer import Checkpointer
from megatron_normistral.training.evaluator import Evaluator
from megatron_normistral.training.metrics import MetricsLogger, StepReporter
from megatron_normistral.training.model_setup import StageSwitch, TrainModel
from megatron_normistral.training.monitors import NonFiniteGuard, Throughput, TrainingStopped
from megatron_normistral.training.schedule import apply_learning_rate, learning_rate
from megatron_normistral.training.step import lm_forward_step, train_step
from megatron_normistral.training.trackers import WandbWriter  # imports wandb only when a run starts

log = get_logger(__name__)

if TYPE_CHECKING:
    from megatron_normistral.config.recipe import Recipe

__all__ = ["Trainer", "TrainConfig", "TrainingStopped"]

# forward_steps(step) -> the forward_step_func of that step (tests swap in faulty ones).
ForwardSteps = Callable[[int], Callable]


@dataclass
class TrainConfig:
    """The recipe's ``training`` section: batches, sequences, the run's length, its seed, and
    what ends it early."""

    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""

    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks; a multiple of micro-batch x data-parallel size."""

    seq_length: int = 128
    """Tokens per sequence (windows of seq_length + 1 tokens are read for the shift)."""

    train_iters: int = 10
    """Optimizer steps in the run."""

    seed: int = 1234
    """Seed of the model's initialisation and of the data order (the mixture's shuffling); the
    objective has its own, objective.seed."""

    max_nonfinite_steps_in_row: int = 5
    """Stop (with a message; the last good checkpoint stays 'latest') after this many non-finite
    steps in a row. Each one is skipped and counted."""

    loss_weighting: Literal["micro_batch", "token"] = "micro_batch"
    """micro_batch: the mean over the counted tokens of each micro-batch, micro-batches weighted
    equally (the authors'); token: every counted token of the global batch weighs the same."""


class Trainer:
    def __init__(self, recipe, data, model, state, checkpointer, evaluator, stop, guard, stage_switch, reporter, forward_steps):
        self.recipe, self.data, self.model, self.state = recipe, data, model, state
        self.checkpointer, self.evaluator, self.stop, self.guard = checkpointer, evaluator, stop, guard
        self.stage_switch, self.reporter, self.forward_steps = stage_switch, reporter, forward_steps

    @classmethod
    def build(cls, recipe: Recipe, stop: StopRequest, forward_steps: ForwardSteps | None = None) -> "Trainer":
        from megatron_normistral.training import data_state
        from megatron_normistral.training.data_setup import build_data

        t, arch = recipe.training, recipe.model.architecture()
        data = build_data(recipe)  # prints the mixture plan; saves it with the run
        checkpointer = Checkpointer(recipe.checkpoint, arch, log.info, partial(data_state.checkpoint_extras, data))
        state = checkpointer.initial_state(recipe.stage.trainable)
        model = TrainModel.build(recipe, state.trainable)
        resumed = checkpointer.restore(model)
        if resumed is not None:
            state = resumed
            note = data_state.resume_note(data, state)
            if note:
                log.info(note)
        logging, is_logger = recipe.logging, dist.get_rank() == 0
        wandb_run = None  # rank 0 only, after the restore: a resumed run continues its W&B run
        if is_logger and logging.wandb_project:
            wandb_run = WandbWriter.start(logging, recipe.to_dict(), recipe.checkpoint.save, recipe.checkpoint.load,
                                          resumed=resumed is not None)
        logger = MetricsLogger(logging.interval, logging.json, logging.tensorboard_dir, is_logger=is_logger,
                                total_steps=t.train_iters, wandb=wandb_run)
        throughput = Throughput(arch, t.seq_length, t.global_batch_size, dist.get_world_size(), logging.peak_flops_per_device)
        return cls(
            recipe, data, model, state, checkpointer,
            Evaluator(recipe.evaluation.interval, data.evaluate if data.eval else None), stop,
            NonFiniteGuard(t.max_nonfinite_steps_in_row, recipe.checkpoint.save, log.info),
            StageSwitch(recipe.stage.switch_to_full_at, log.info), StepReporter(logger, throughput),
            forward_steps or (lambda step: lm_forward_step),
        )

    def fit(self) -> ckpt.TrainState:
        state, train_iters = self.state, self.recipe.training.train_iters
        try:
            if state.step >= train_iters:  # nothing to train (--train-iters 0, a resume at the end)
                self.end_of_step(state, last_step=True)
            while state.step < train_iters:
                self.model = self.stage_switch.before_step(state, self.model, self.recipe)
                self.train_one_step(state)
                self.guard.check(state)
                if self.end_of_step(state, last_step=state.step == train_iters):
                    break
        finally:
            self.reporter.close()
        return state

    def train_one_step(self, state: ckpt.TrainState) -> None:
        t = self.recipe.training
        started = time.perf_counter()
        lr = learning_rate(state.step, self.recipe.optimizer.lr, self.recipe.optimizer.min_lr, self.recipe.schedule, t.train_iters)
        apply_learning_rate(self.model.optimizer, lr, self.recipe.optimizer.weight_decay)
        micro_batches = self.data.train.micro_batches(state.consumed_samples)
        chunks = self.model.chunks
        result = train_step(
            chunks, self.model.optimizer, [iter(micro_batches) for _ in chunks], len(micro_batches), t.seq_length,
            t.micro_batch_size, forward_step_func=self.forward_steps(state.step),
            skip_update=partial(NonFiniteGuard.skip_update, chunks),
        )
        self.guard.record(state, result.updated)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        self.reporter.report(state, result, lr, time.perf_counter() - started)

    def end_of_step(self, state: ckpt.TrainState, last_step: bool) -> bool:
        """Evaluate and save as the components decide; True when the run stops here."""
        if self.evaluator.should_evaluate(state.step, last_step):
            self.reporter.evaluation(state.step, self.evaluator.run(state.step, self.model.chunks))
        reason = self.stop.should_stop() or self.checkpointer.exit_reason(state.step)
        if self.checkpointer.should_save(state.step, last_step, stopping=reason is not None):
            self.checkpointer.save(state, self.model)
        if reason:
            log.info(f"stopping at step {state.step}: {reason}")
        return reason is not None
