"""Train the tiny model for a few steps in one parallel layout; the parallel-equivalence tests
run this at world size 1 (the reference) and in each layout, and compare.

Every layout starts from the same weights (generated per tensor name from a seed, so they do
not depend on how a layout's RNG streams are laid out) and sees the same global batches, so
loss, grad norm and updated weights must agree up to fp32 reduction-order rounding.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from megatron_normistral.model.provider import ModelConfig, PrecisionConfig, build_model
from megatron_normistral.model.sharding import gather_full_state_dict, global_name, load_full_state_dict
from megatron_normistral.runtime.parallel import ParallelConfig, init_model_parallel, set_seed
from megatron_normistral.training.ddp import DDPConfig, sync_params, wrap_model
from megatron_normistral.training.optimizer import OptimizerConfig, build_optimizer
from megatron_normistral.training.step import attention_inputs, train_step

# What the batches of a step look like (``LayoutRun.cases``, one per step; see attention_case_documents):
# every sample causal, every sample masked, both modes in each micro-batch, documents of one
# token, one document filling the window.
ATTENTION_CASES = ("causal", "masked", "mixed", "one_token_documents", "whole_window")


@dataclass
class LayoutRun:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="tiny", transformer_impl="local"))
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    # adam_eps well above fp32 rounding of the gradients: with eps ~ 0, Adam's update is
    # ~lr * sign(g), so a gradient element that is ~1e-9 in one layout and ~-1e-9 in another
    # (reduction order) moves its weight by 2 x lr; weights could not then be compared.
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-4))
    steps: int = 3
    # The batches of step i follow cases[i % len(cases)] (ATTENTION_CASES).
    cases: tuple[str, ...] = ("mixed",)
    # Also return the full gradients of every step (before the update; needs full
    # main_grads on DP rank 0: no distributed optimizer).
    return_gradients: bool = False
    ddp: DDPConfig = field(default_factory=DDPConfig)
    seq_length: int = 32
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seed: int = 1234
    # Settings forced onto megatron-core's TransformerConfig after the model is built. Only
    # for tests that show a guard in ``transformer_config`` is needed; never for training.
    unsafe_config_overrides: dict = field(default_factory=dict)


def full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def reference_weights(chunks, seed: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Full-size initial weights for the tensors these chunks hold, each drawn from a
    generator seeded by (seed, tensor name): identical in every layout."""
    full = {}
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(full_shape(param, tp_size), generator=gen)
            # Norm weights near 1 but not 1, so that their gradients are exercised.
            full[name] = 1.0 + 0.1 * noise if param.dim() == 1 else 0.05 * noise
    return full


def attention_case_documents(case: str, b: int, s: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(document_ids int32 [b, s], masked bool [b]) of one micro-batch for an attention case."""
    if case not in ATTENTION_CASES:
        raise ValueError(f"unknown attention case {case!r}; known: {ATTENTION_CASES}")
    starts = torch.rand(b, s, generator=gen) < 0.15  # a new document starts here
    if case == "one_token_documents":
        starts[0] = True  # sample 0: every token its own document; the others: short and long ones
        starts[1:] |= torch.rand(b - 1, s, generator=gen) < 0.3
    if case == "whole_window":
        starts[:] = False
    starts[:, 0] = False
    ids = starts.to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    alternate = torch.arange(b) % 2 == 1
    masked = {"causal": torch.zeros(b, dtype=torch.bool), "masked": torch.ones(b, dtype=torch.bool)}.get(case, alternate)
    return ids, masked


def synthetic_batches(run: LayoutRun, vocab_size: int, step: int) -> list[dict]:
    """All micro-batches of one global batch, in global order: random tokens, a loss mask
    with holes, and the attention of the step's case described as the hybrid objective's
    batches describe it (document ids, per-sample mode)."""
    gen = torch.Generator().manual_seed(run.seed + 7919 * step)
    case = run.cases[step % len(run.cases)]
    b, s = run.micro_batch_size, run.seq_length
    batches = []
    for _ in range(run.global_batch_size // b):
        tokens = torch.randint(0, vocab_size, (b, s + 1), generator=gen)
        loss_mask = (torch.rand(b, s, generator=gen) > 0.2).float()
        document_ids, masked = attention_case_documents(case, b, s, gen)
        batches.append(
            dict(
                tokens=tokens[:, :-1].contiguous(),
                labels=tokens[:, 1:].contiguous(),
                loss_mask=loss_mask,
                position_ids=torch.arange(s).expand(b, s).contiguous(),
                document_ids=document_ids,
                masked=masked,
            )
        )
    return batches


def train_layout(rank: int, world_size: int, run: LayoutRun) -> dict:
    """Worker for run_distributed: returns losses, grad norms and final full weights."""
    from megatron.core import parallel_state

    init_model_parallel(run.parallel)
    set_seed(run.seed)
    dp_size = run.parallel.data_parallel_size(world_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    tp_size = run.parallel.tensor_model_parallel_size
    chunks = build_model(run.model, run.parallel, run.precision, max_sequence_length=run.seq_length)
    load_full_state_dict(chunks, reference_weights(chunks, run.seed, tp_size))
    for key, value in run.unsafe_config_overrides.items():
        setattr(chunks[0].config, key, value)
    chunks = wrap_model(chunks, run.parallel, run.precision, run.ddp)
    optimizer = build_optimizer(chunks, run.optimizer, run.parallel, run.precision)
    vocab = run.model.architecture().vocab_size
    gradients = []

    def keep_gradients(reports) -> bool:
        if run.return_gradients:
            gradients.append(gather_full_state_dict(chunks, tensor_of=lambda p: p.main_grad))
        return False  # go on with the update

    per_rank = run.global_batch_size // run.micro_batch_size // dp_size
    losses, grad_norms = [], []
    for step in range(run.steps):
        mine = synthetic_batches(run, vocab, step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        iterators = [iter(mine) for _ in chunks]
        result = train_step(chunks, optimizer, iterators, per_rank, run.seq_length, run.micro_batch_size,
                            skip_update=keep_gradients)
        # Mean over micro-batches of each one's mean loss, averaged over DP; known on the
        # last pipeline stage, then shared with everyone.
        local = torch.tensor([sum(float(r["loss_sum"] / r["tokens"]) for r in result.reports), float(len(result.reports))], dtype=torch.float64)
        torch.distributed.all_reduce(local)
        losses.append(float(local[0] / local[1]))
        grad_norms.append(result.grad_norm)
    sync_params(chunks)  # the last update's parameter gather may still be pending (overlap_param_gather)
    weights = gather_full_state_dict(chunks)
    buckets = sum(len(c.bucket_groups) for c in chunks)
    result = {"losses": losses, "grad_norms": grad_norms, "weights": weights if rank == 0 else None,
              "gradient_buckets": buckets}
    if run.return_gradients:
        result["gradients"] = gradients if rank == 0 else None
    return result


def assert_same_training(result: dict, reference: dict, rtol: float = 1e-5) -> None:
    """Losses, grad norms and final weights of two train_layout runs agree to ``rtol``."""
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=rtol, atol=0)
    assert result["weights"].keys() == reference["weights"].keys()
    for name, expected in reference["weights"].items():
        # atol: fp32 rounding of weights near zero, far below one Adam update (lr 1e-3).
        torch.testing.assert_close(result["weights"][name], expected, rtol=rtol, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _per_token_losses(model, batch: dict) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], labels=batch["labels"], **attention_inputs(batch)).float()


def step_gradients(rank: int, world_size: int, run: LayoutRun, loss_weighting: str) -> dict:
    """Worker: the gradients megatron-core leaves for one global batch (schedule, DDP
    reduction, per-token scaling; no update), under ``loss_weighting`` 'micro_batch' (each
    micro-batch's mean, averaged) or 'token' (one mean over every counted token), next to
    plain-autograd gradients of that loss over the whole batch (rank 0; data parallel only)."""
    from megatron.core import parallel_state

    if run.parallel.tensor_model_parallel_size > 1 or run.parallel.pipeline_model_parallel_size > 1:
        raise ValueError("step_gradients compares full gradients: data parallelism only")
    init_model_parallel(run.parallel)
    set_seed(run.seed)
    vocab = run.model.architecture().vocab_size
    batches = synthetic_batches(run, vocab, step=0)

    reference = None
    if rank == 0:
        bare = build_model(run.model, run.parallel, run.precision, max_sequence_length=run.seq_length)[0]
        load_full_state_dict([bare], reference_weights([bare], run.seed, 1))
        sums = [(_per_token_losses(bare, b) * b["loss_mask"]).sum() for b in batches]
        counts = [b["loss_mask"].sum() for b in batches]
        if loss_weighting == "token":
            loss = torch.stack(sums).sum() / torch.stack(counts).sum()
        else:
            loss = torch.stack([s / c for s, c in zip(sums, counts)]).mean()
        loss.backward()
        reference = {name: p.grad.clone() for name, p in bare.named_parameters()}

    chunks = build_model(run.model, run.parallel, run.precision, max_sequence_length=run.seq_length)
    load_full_state_dict(chunks, reference_weights(chunks, run.seed, 1))
    chunks[0].config.calculate_per_token_loss = loss_weighting == "token"
    chunks = wrap_model(chunks, run.parallel, run.precision)
    optimizer = build_optimizer(chunks, run.optimizer, run.parallel, run.precision)
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp_size
    mine = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    train_step(chunks, optimizer, [iter(mine)], per_rank, run.seq_length, run.micro_batch_size,
               skip_update=lambda reports: True)
    megatron = {name: p.main_grad.clone() for name, p in chunks[0].module.named_parameters()}
    return {"megatron": megatron, "reference": reference}
