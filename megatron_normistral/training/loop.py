"""The training loop. Everything it calls is a named piece elsewhere in training/."""
from __future__ import annotations

import math
import os
import signal
import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_normistral.config.recipe import Recipe, validate_recipe
from megatron_normistral.runtime import parallel as rt
from megatron_normistral.training import checkpointing as ckpt
from megatron_normistral.training.metrics import LossTotals, MetricsLogger, memory_gb, print_rank0, reduce_losses
from megatron_normistral.training.schedule import apply_learning_rate, learning_rate
from megatron_normistral.training.stages import set_trainable
from megatron_normistral.training.step import lm_forward_step, train_step


class TrainingStopped(RuntimeError):
    pass


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (a device tensor: NCCL needs one)."""
    t = torch.tensor([1.0 if flag else 0.0], device=rt.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopRequest:
    """Signals (SIGTERM, SIGUSR1 from SLURM) and the wall-time limit, agreed on by all ranks."""

    def __init__(self, signals: list[str], exit_minutes: float | None):
        self.received: str | None = None
        self.deadline = time.monotonic() + exit_minutes * 60 if exit_minutes else None
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def should_stop(self) -> str | None:
        local = self.received or ("wall-time limit" if self.deadline and time.monotonic() > self.deadline else None)
        return (local or "signal on another rank") if any_rank(bool(local)) else None


def build_model_and_optimizer(recipe: Recipe, trainable: str):
    from megatron_normistral.model.provider import build_model
    from megatron_normistral.training.setup import build_optimizer, wrap_model

    chunks = build_model(recipe.model, recipe.parallel, recipe.precision, recipe.training.seq_length)
    if recipe.checkpoint.pretrained_checkpoint:
        from megatron_normistral.convert.mcore_io import load_model_checkpoint

        load_model_checkpoint(chunks, recipe.checkpoint.pretrained_checkpoint)
    set_trainable(chunks, trainable)
    chunks = wrap_model(chunks, recipe.parallel, recipe.precision)
    chunks[0].config.calculate_per_token_loss = recipe.training.loss_weighting == "token"
    return chunks, build_optimizer(chunks, recipe.optimizer, recipe.parallel, recipe.precision)


def switch_to_full(recipe: Recipe, chunks):
    """Stage 2 -> 3 in one run: unfreeze, re-wrap, new optimizer (transformer weights get
    fresh Adam moments; the embeddings' moments start over too, as in a new stage)."""
    from megatron_normistral.model.sharding import unwrap_model
    from megatron_normistral.training.setup import build_optimizer, wrap_model

    bare = [unwrap_model(c) for c in chunks]
    set_trainable(bare, "full")
    chunks = wrap_model(bare, recipe.parallel, recipe.precision)
    chunks[0].config.calculate_per_token_loss = recipe.training.loss_weighting == "token"
    return chunks, build_optimizer(chunks, recipe.optimizer, recipe.parallel, recipe.precision)


def nonfinite_anywhere(chunks, reports: list[dict]) -> bool:
    """Any NaN/inf in this step's loss or gradients on any rank (checked before the update)."""
    local = not all(math.isfinite(float(r["causal_sum"]) + float(r["masked_sum"])) for r in reports)
    for chunk in chunks:
        for buffer in chunk.buffers:
            local = local or not bool(torch.isfinite(buffer.grad_data).all())
    return any_rank(local)


def pretrain(recipe: Recipe) -> ckpt.TrainState:
    from megatron_normistral.training.data_setup import build_data

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_recipe(recipe, world)  # before any process group work
    rt.init_distributed()
    rt.init_model_parallel(recipe.parallel)
    rt.set_seed(recipe.training.seed)
    t = recipe.training
    data = build_data(recipe)  # prints the mixture plan; saves it with the run

    state = ckpt.TrainState(trainable=recipe.stage.trainable)
    resume = ckpt.latest_checkpoint(recipe.checkpoint.load) if recipe.checkpoint.load else None
    if resume:
        state = ckpt.read_train_state(resume)  # the stage decides what the model trains
    chunks, optimizer = build_model_and_optimizer(recipe, state.trainable)
    if resume:
        state = ckpt.load_checkpoint(resume, chunks, optimizer)
        print_rank0(f"resumed from {resume} at step {state.step} ({state.consumed_samples} samples consumed)")
        saved = state.extra.get("mixture_fingerprint")
        if saved and data.mixture_fingerprint and saved != data.mixture_fingerprint:
            # Legitimate after a deliberate change (new data.mixture_changes, new corpus
            # files); otherwise the resumed run reads other data than the one it continues.
            print_rank0(f"WARNING: the data mixture differs from the checkpoint's (index fingerprint {saved} -> "
                        f"{data.mixture_fingerprint}): samples from step {state.step} on come from the new mixture")
    state.extra["mixture_fingerprint"] = data.mixture_fingerprint
    arch = recipe.model.architecture()
    logger = MetricsLogger(recipe.logging.log_interval, recipe.logging.log_json, recipe.logging.tensorboard_dir, is_logger=dist.get_rank() == dist.get_world_size() - 1)
    stop = StopRequest(recipe.checkpoint.exit_signals, recipe.checkpoint.exit_duration_in_mins)
    tokens_per_step = t.global_batch_size * t.seq_length
    flops_per_step = arch.training_flops_per_token(t.seq_length) * tokens_per_step

    def save():
        if recipe.checkpoint.save:
            path = ckpt.save_checkpoint(recipe.checkpoint.save, chunks, optimizer, state, arch, recipe.checkpoint.keep_last)
            print_rank0(f"saved checkpoint {path}")

    while state.step < t.train_iters:
        if state.trainable == "embeddings" and recipe.stage.switch_to_full_at is not None and state.step >= recipe.stage.switch_to_full_at:
            chunks, optimizer = switch_to_full(recipe, chunks)
            state.trainable = "full"
            print_rank0(f"step {state.step}: switched from embeddings-only to full training")
        started = time.perf_counter()
        lr = learning_rate(state.step, recipe.optimizer.lr, recipe.optimizer.min_lr, recipe.schedule, t.train_iters)
        apply_learning_rate(optimizer, lr, recipe.optimizer.weight_decay)
        micro_batches = data.train.micro_batches(state.consumed_samples)
        result = train_step(
            chunks, optimizer, [iter(micro_batches) for _ in chunks], len(micro_batches), t.seq_length, t.micro_batch_size,
            forward_step_func=partial(lm_forward_step, inject_nonfinite=state.step in t.inject_nonfinite_steps),
            skip_update=partial(nonfinite_anywhere, chunks),
        )
        grad_norm = result.grad_norm
        if result.updated:
            state.nonfinite_in_row = 0
        else:
            state.skipped_steps, state.nonfinite_in_row = state.skipped_steps + 1, state.nonfinite_in_row + 1
            print_rank0(f"step {state.step}: non-finite loss or gradients, update skipped ({state.nonfinite_in_row} in a row)")
        totals = LossTotals()
        for report in result.reports:
            totals.add(report)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        elapsed = time.perf_counter() - started
        losses = reduce_losses(totals)
        tflops = flops_per_step / elapsed / dist.get_world_size() / 1e12
        peak = recipe.logging.peak_flops_per_device
        logger.step({
            "step": state.step, **losses, "lr": lr, "grad_norm": grad_norm, "skipped": state.skipped_steps,
            "tokens_per_s": tokens_per_step / elapsed, "tflops_per_device": tflops,
            "mfu": tflops * 1e12 / peak if peak else None, "memory_gb": memory_gb(),
            "consumed_samples": state.consumed_samples, "step_time_s": elapsed, "trainable": state.trainable,
        })
        if state.nonfinite_in_row >= t.max_nonfinite_steps_in_row:
            logger.close()
            raise TrainingStopped(
                f"stopped: {state.nonfinite_in_row} non-finite steps in a row at step {state.step}; "
                f"the last good checkpoint is still 'latest' in {recipe.checkpoint.save}"
            )
        if data.eval and recipe.evaluation.eval_interval and state.step % recipe.evaluation.eval_interval == 0:
            logger.eval(state.step, data.evaluate(chunks))
        reason = stop.should_stop()
        if not reason and recipe.checkpoint.exit_interval and state.step % recipe.checkpoint.exit_interval == 0:
            reason = f"exit interval {recipe.checkpoint.exit_interval}"
        if reason or (recipe.checkpoint.save_interval and state.step % recipe.checkpoint.save_interval == 0):
            save()
        if reason:
            print_rank0(f"stopping at step {state.step}: {reason}")
            break
    else:
        if recipe.checkpoint.save and not (recipe.checkpoint.save_interval and state.step % recipe.checkpoint.save_interval == 0):
            save()
        if data.eval and not (recipe.evaluation.eval_interval and state.step % recipe.evaluation.eval_interval == 0):
            logger.eval(state.step, data.evaluate(chunks))
    logger.close()
    return state
