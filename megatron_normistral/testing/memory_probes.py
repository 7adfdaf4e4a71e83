"""Measured memory of a built model, against the run planner's figures
(``reporting/run_plan.py``): ``benchmarks/plan_run_check.py`` prints the comparison,
``tests/tools/test_plan_run.py`` asserts it.

:func:`measure_memory` (a ``run_distributed`` worker) builds the tiny model as training does
(build, freeze for the stage, DDP wrap, megatron-core optimizer), takes one optimizer step and
counts, on rank 0, by unique storage:

- weights: the storages of the model's parameters (megatron-core's parameter buffer with the
  distributed optimizer, padding included);
- gradients: DDP's gradient buffers;
- optimizer state: every tensor the optimizer holds (its parameters, their gradients, Adam's
  state) that is neither a weight nor a gradient storage: fp32 master copies and moments;
- activations: the tensors one micro-batch's forward pass saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), storages deduplicated, parameters left out;
  for each recomputation mode, on a model built with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatron_normistral.config.recipe import Recipe
from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.model.provider import ModelConfig, PrecisionConfig
from megatron_normistral.reporting.run_plan import RECOMPUTE_MODES, PlanOptions, plan_run
from megatron_normistral.runtime.parallel import ParallelConfig
from megatron_normistral.training.loop import TrainConfig
from megatron_normistral.training.stages import StageConfig

ITEMS = ("weights", "gradients", "optimizer") + tuple(f"activations, {mode}" for mode in RECOMPUTE_MODES)


@dataclass
class MemoryCase:
    """One configuration to measure and plan."""

    name: str
    world_size: int = 1
    arch: str = "tiny"
    attention_backend: str = "sdpa"
    documents: bool = True  # batches describe packed documents (the training path); False: plain causal
    bf16: bool = True
    seq_length: int = 64
    micro_batch_size: int = 2
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(use_distributed_optimizer=True))
    trainable: str = "full"

    def recipe(self, recompute: str = "none") -> Recipe:
        recipe = Recipe(
            model=ModelConfig(arch=self.arch, transformer_impl="local", attention_backend=self.attention_backend,
                              recompute_granularity=None if recompute == "none" else recompute),
            parallel=replace(self.parallel),
            precision=PrecisionConfig(bf16=self.bf16),
            training=TrainConfig(micro_batch_size=self.micro_batch_size, seq_length=self.seq_length,
                                 global_batch_size=self.micro_batch_size * self.parallel.data_parallel_size(self.world_size),
                                 train_iters=1),
            stage=StageConfig(trainable=self.trainable),
            # Without a document description every sample is one document: what objective.attention
            # causal tells the planner.
            objective=ObjectiveConfig(attention="document" if self.documents else "causal"),
        )
        recipe.optimizer = replace(recipe.optimizer, lr=1e-3)
        return recipe


# Configurations the check measures: the CPU training path (bf16, per-document SDPA, the
# distributed optimizer), a plain causal batch at another length, the dense backend (mask and
# scores, fp32, no distributed optimizer), stage 2 (frozen transformer), TP=2 with sequence
# parallelism, and DP=2 (the optimizer state sharded).
CASES = (
    MemoryCase("bf16 sdpa documents s64 b2"),
    MemoryCase("bf16 sdpa causal s128 b1", documents=False, seq_length=128, micro_batch_size=1),
    MemoryCase("fp32 dense documents s128 b2", attention_backend="dense", bf16=False, seq_length=128,
               parallel=ParallelConfig()),
    MemoryCase("bf16 sdpa stage 2 (embeddings)", trainable="embeddings"),
    MemoryCase("bf16 sdpa TP=2 + SP", world_size=2,
               parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, use_distributed_optimizer=True)),
    MemoryCase("bf16 sdpa DP=2 distributed optimizer", world_size=2),
)


def _batch(case: MemoryCase, vocab_size: int, seed: int = 0) -> dict:
    from megatron_normistral.testing.layouts import attention_case_documents

    gen = torch.Generator().manual_seed(seed)
    b, s = case.micro_batch_size, case.seq_length
    tokens = torch.randint(0, vocab_size, (b, s + 1), generator=gen)
    batch = dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                 loss_mask=torch.ones(b, s), position_ids=torch.arange(s).expand(b, s).contiguous())
    if case.documents:
        batch["document_ids"], batch["masked"] = attention_case_documents("mixed", b, s, gen)
    return batch


def _storage(t: torch.Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _build(recipe: Recipe):
    from megatron_normistral.model.provider import build_model
    from megatron_normistral.runtime.parallel import init_model_parallel, set_seed
    from megatron_normistral.training.ddp import wrap_model
    from megatron_normistral.training.optimizer import build_optimizer
    from megatron_normistral.training.stages import set_trainable

    init_model_parallel(recipe.parallel)
    set_seed(1234)
    chunks = build_model(recipe.model, recipe.parallel, recipe.precision, recipe.training.seq_length)
    set_trainable(chunks, recipe.stage.trainable)
    chunks = wrap_model(chunks, recipe.parallel, recipe.precision, recipe.ddp)
    return chunks, build_optimizer(chunks, recipe.optimizer, recipe.parallel, recipe.precision)


def _state_bytes(chunks, optimizer) -> dict[str, int]:
    weights = dict(_storage(p) for c in chunks for p in c.parameters())
    grads = dict(_storage(b.grad_data) for c in chunks for b in list(c.buffers) + list(c.expert_parallel_buffers))
    held = {}
    for inner in (o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        tensors = [p for group in inner.param_groups for p in group["params"]]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
        held.update(_storage(t) for t in tensors)
    optimizer_only = {ptr: n for ptr, n in held.items() if ptr not in weights and ptr not in grads}
    return {"weights": sum(weights.values()), "gradients": sum(grads.values()), "optimizer": sum(optimizer_only.values())}


def saved_activation_bytes(model, batch: dict, exclude: set[int]) -> int:
    """Bytes of the distinct storages that one forward pass of ``model`` saves for backward,
    storages in ``exclude`` (the parameters) left out."""
    from megatron_normistral.training.step import attention_inputs

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if nbytes and ptr not in exclude:
            saved[ptr] = nbytes
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], **attention_inputs(batch))
    del loss
    return sum(saved.values())


def measure_memory(rank: int, world_size: int, case: MemoryCase) -> dict[str, int]:
    """Worker for ``run_distributed``: rank 0's measured bytes per item of :data:`ITEMS`."""
    import logging
    import warnings

    from megatron_normistral.training.step import train_step

    # The model build's log lines and megatron-core's CPU warnings are noise in the check's table.
    logging.getLogger("megatron_normistral").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if case.parallel.pipeline_model_parallel_size != 1:
        raise ValueError("measure_memory measures one pipeline stage: PP must be 1")
    measured = {}
    for mode in RECOMPUTE_MODES:
        recipe = case.recipe(mode)
        chunks, optimizer = _build(recipe)
        vocab = recipe.model.architecture().vocab_size
        if mode == "none":
            from megatron.core import parallel_state

            dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
            batches = [_batch(case, vocab, seed=r) for r in range(dp)]
            train_step(chunks, optimizer, [iter([batches[dp_rank]])], 1, case.seq_length, case.micro_batch_size)
            measured.update(_state_bytes(chunks, optimizer))
        params = {_storage(p)[0] for c in chunks for p in c.parameters()}
        measured[f"activations, {mode}"] = saved_activation_bytes(chunks[0], _batch(case, vocab), params)
    return measured


def planned_memory(case: MemoryCase) -> dict[str, int]:
    """The planner's figures for ``case`` (device cpu: what the measured CPU run saves), for the
    one pipeline stage of rank 0."""
    planned = {}
    plan = plan_run(case.recipe(), PlanOptions(gpus=case.world_size, gpu_memory_gib=1.0, device="cpu"), name=case.name)
    stage = plan.stages[0]
    planned.update(weights=stage.weights, gradients=stage.gradients, optimizer=stage.optimizer)
    for mode in RECOMPUTE_MODES:
        planned[f"activations, {mode}"] = stage.activations[mode].per_micro_batch
    return planned


def compare(case: MemoryCase) -> list[tuple[str, int, int, float]]:
    """(item, planned bytes, measured bytes, relative error of the plan) per item of :data:`ITEMS`."""
    from megatron_normistral.testing.distributed import run_distributed

    measured = run_distributed(measure_memory, case.world_size, args=(case,), timeout_s=600)
    planned = planned_memory(case)
    return [(item, planned[item], measured[item], (planned[item] - measured[item]) / measured[item] if measured[item] else 0.0)
            for item in ITEMS]
