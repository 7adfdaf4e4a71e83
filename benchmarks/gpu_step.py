#!/usr/bin/env python
"""Issues 8 and 13: training-step speed of the NeMo-shaped model on one GPU.

One process, one world of size 1 (process group and megatron-core parallel state set up once
and reused), then, config after config (each model freed before the next):

* ``ours_dense`` - our stack (``build_model`` + ``wrap_model`` + ``build_optimizer`` +
  ``train_step``) on megatron-core's own unfused attention (``model.attention_backend: dense``);
* ``plain`` - megatron-core alone, written out below: ``GPTModel`` with megatron's own
  ``get_gpt_layer_local_spec(normalization='RMSNorm')``, ``Float16Module``, megatron DDP,
  ``get_megatron_optimizer``, ``get_forward_backward_func``; same shapes, TransformerConfig
  fields, batches and optimizer settings. ``ours_dense / plain`` is the cost of our stack;
* ``ours`` - our stack on the fast attention module (``auto``), plain causal batches (no
  document description: one causal flash SDPA call);
* vocabulary 131,072 vs 51,200 (ours, causal);
* hybrid objective (10 % of samples masked, ``data.objective.build_batch``: packed documents,
  an EOD every ``--doc-len`` tokens) vs causal-only from the same builder, on the fast path
  (FlexAttention with the document block mask on CUDA)
  at ``--seq`` and ``--long-seq``, and on the dense path (the authors' [b, 1, s, s] mask).

Each config: ``--warmup`` untimed steps, then ``--steps`` timed steps of ``--micro-batches``
micro-batches of one sample, each step between two ``torch.cuda.synchronize()``. Reported:
median step time, tokens/s, model TFLOP/s and MFU against the bf16 matmul rate measured at
the start of the same run and against the nominal peak (``--nominal-peak-tflops``, 989 for
H100/H200 SXM dense bf16). Model FLOPs, forward + backward, no recomputation, two ways:
``full`` (``ArchConfig.training_flops_per_token``: every attention score of the s x s matrix
counted, the Megatron-LM / PaLM convention, comparable with published MFU) and ``needed``
(attention counts only the pairs the mask allows: s(s+1)/2 per causal sample, sum over
documents of L(L+1)/2 causal or L^2 masked with document masks). Batches are built (and
copied to the device) before timing; the host-side cost of the hybrid batch builder is
reported on its own. Transformer Engine is not used (local spec).

    PYTHONPATH=. python benchmarks/gpu_step.py --json runs/gpu_step.json      # GPU, full size
    python benchmarks/gpu_step.py --tiny --json /tmp/gpu_step.json            # CPU, seconds

The JSON holds everything; a short table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GIB = 1024**3
NEMO = "mistral-nemo-12b"
# Synthetic token ids: ids below NUM_SPECIAL are special (as ObjectiveConfig's default),
# ordinary tokens are drawn above them.
NUM_SPECIAL = 16
EOD_ID = 2
MASK_ID = 3


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_matmul_peak(sizes: list[int], warmup: int, reps: int) -> dict:
    """bf16 n x n x n products on random data; median over ``reps``. The max over sizes is the
    peak used for MFU."""
    dev = torch.device("cuda") if cuda() else torch.device("cpu")
    out = {"sizes": {}, "warmup": warmup, "reps": reps}
    gen = torch.Generator(device=dev).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=gen)
        for _ in range(warmup):
            c = a @ b
        times = []
        for _ in range(reps):
            if cuda():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                c = a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                c = a @ b
                times.append(time.perf_counter() - t0)
        assert torch.isfinite(c).all()
        med = statistics.median(times)
        out["sizes"][str(n)] = {"median_s": med, "tflops": 2 * n**3 / med / 1e12}
        del a, b, c
    free_memory()
    out["peak_tflops"] = max(v["tflops"] for v in out["sizes"].values())
    return out


def estimate_bytes(arch, seq: int, micro_batch: int) -> float:
    """Rough peak: 18 B/param (bf16 param, fp32 grad, fp32 master, Adam m and v), saved
    activations of the local spec (fp32 softmax output + bf16 probs per [head, s, s], plus
    ~20 hidden-sized tensors), logits/cross-entropy and transients."""
    params = arch.num_parameters()
    attn = micro_batch * arch.num_attention_heads * seq * seq * 6
    linear = micro_batch * seq * (20 * arch.hidden_size + 4 * arch.ffn_hidden_size) * 2
    logits = micro_batch * seq * arch.vocab_size * 4 * 5
    transient = 3 * micro_batch * arch.num_attention_heads * seq * seq * 4
    return 18 * params + arch.num_layers * (attn + linear) + logits + transient + 2 * GIB


def pick_layers(arch_name: str, vocab: int, seq: int, micro_batch: int, candidates: list[int], budget: float) -> int:
    from megatron_normistral.model.architectures import get_architecture

    for layers in sorted(candidates, reverse=True):
        if estimate_bytes(get_architecture(arch_name, num_layers=layers, vocab_size=vocab), seq, micro_batch) <= budget:
            return layers
    return min(candidates)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
def synthetic_samples(n: int, seq: int, vocab: int, seed: int, doc_len: int) -> list[np.ndarray]:
    """``n`` samples of seq+1 ids in [NUM_SPECIAL, vocab) with an EOD every ``doc_len`` tokens
    (packed documents, which the objective's document masks follow)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = rng.integers(NUM_SPECIAL, vocab, size=seq + 1, dtype=np.int64)
        s[doc_len - 1 :: doc_len] = EOD_ID
        out.append(s)
    return out


def _to_device(batch: dict, dev: torch.device) -> dict:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "document_ids", "masked"):
        value = batch.get(key)
        if value is None:
            if key in ("tokens", "labels", "loss_mask", "position_ids", "attention_mask"):
                out[key] = None
            continue
        t = torch.as_tensor(value)
        if key == "loss_mask":
            t = t.float()
        elif key in ("attention_mask", "masked"):
            t = t.bool()
        elif key == "document_ids":
            t = t.int()
        else:
            t = t.long()
        out[key] = t.to(dev)
    return out


def allowed_pair_fraction(batches: list[dict], seq: int) -> float:
    """Mean share of the s x s attention pairs that the mask allows (1 = full matrix)."""
    shares = []
    for batch in batches:
        ids, masked = batch.get("document_ids"), batch.get("masked")
        if ids is None:  # plain causal batch
            shares.extend([(seq + 1) / (2 * seq)] * batch["tokens"].shape[0])
            continue
        for sample_ids, bidirectional in zip(ids.cpu().numpy(), masked.cpu().tolist()):
            lengths = np.bincount(sample_ids.astype(np.int64)).astype(np.float64)
            pairs = (lengths**2).sum() if bidirectional else (lengths * (lengths + 1) / 2).sum()
            shares.append(pairs / seq**2)
    return float(np.mean(shares))


def causal_batches(samples: list[np.ndarray], dev: torch.device) -> list[dict]:
    """Plain next-token batches: no mask tensor (megatron builds the causal mask itself)."""
    batches = []
    for s in samples:
        seq = len(s) - 1
        batches.append(
            _to_device(
                {
                    "tokens": s[None, :-1],
                    "labels": s[None, 1:],
                    "loss_mask": np.ones((1, seq), np.float32),
                    "position_ids": np.arange(seq)[None],
                    "attention_mask": None,
                },
                dev,
            )
        )
    return batches


def import_objective(backend: str):
    """``megatron_normistral.data.objective``. It imports the C++ extension at module level;
    where that extension is not built for this Python (the GPU machine: the .so here is
    cp311, that machine runs 3.12) and ``backend`` is "reference", a placeholder module stands in
    for it, which raises on any use, so the Python reference runs and a C++ call fails loudly."""
    import importlib
    import types

    try:
        importlib.import_module("megatron_normistral._helpers")
    except ImportError as exc:
        if backend != "reference":
            raise
        reason = f"megatron_normistral._helpers is not built for this Python ({exc}); only backend='reference' works"

        class _Missing(types.ModuleType):
            def __getattr__(self, name):
                raise ImportError(reason)

        sys.modules["megatron_normistral._helpers"] = _Missing("megatron_normistral._helpers")
    return importlib.import_module("megatron_normistral.data.objective")


def _spread(start: int, length: int, k: int) -> list[int]:
    """k positions spread evenly over [start, start + length)."""
    return [start + int((j + 0.5) * length / k) for j in range(k)] if k else []


def objective_batches(samples: list[np.ndarray], vocab: int, masked_fraction: float, backend: str, dev: torch.device,
                      timed_from: int):
    """One sample per micro-batch from ``data.objective.build_batch``.

    round(masked_fraction * count) of the warm-up micro-batches (``[0, timed_from)``) and of the
    timed ones are masked (MNTP) samples (at least one timed one if ``masked_fraction`` > 0, for
    tiny runs), spread evenly; the global indices that ``objective.sample_modes`` gives the wanted
    mode are taken in increasing order. Returns (batches on ``dev``, info)."""
    objective = import_objective(backend)

    config = objective.ObjectiveConfig(masked_fraction=masked_fraction, num_special_tokens=NUM_SPECIAL)
    n = len(samples)
    k_warm = int(round(masked_fraction * timed_from))
    k_timed = int(round(masked_fraction * (n - timed_from)))
    if masked_fraction > 0:
        k_timed = max(1, k_timed)
    masked_positions = set(_spread(0, timed_from, k_warm) + _spread(timed_from, n - timed_from, k_timed))
    modes = objective.sample_modes(config.seed, np.arange(100 * n + 1000), masked_fraction, backend=backend)
    masked_idx = list(np.flatnonzero(modes)[: len(masked_positions)])
    causal_idx = list(np.flatnonzero(~modes)[: n - len(masked_positions)])
    if len(masked_idx) < len(masked_positions) or len(causal_idx) < n - len(masked_positions):
        raise RuntimeError(f"could not find {len(masked_positions)} masked and {n - len(masked_positions)} causal "
                           f"samples in {len(modes)} indices")
    indices = [int(masked_idx.pop(0) if pos in masked_positions else causal_idx.pop(0)) for pos in range(n)]
    batches, times = [], {True: [], False: []}
    for pos, (sample, index) in enumerate(zip(samples, indices)):
        t0 = time.perf_counter()
        batch = objective.build_batch(
            [sample], [index], config, eod_id=EOD_ID, mask_id=MASK_ID, vocab_size=vocab, backend=backend
        )
        masked = bool(np.asarray(batch["masked"]).reshape(-1)[0])
        assert masked == (pos in masked_positions), (pos, index, masked)
        times[masked].append(time.perf_counter() - t0)
        batches.append(_to_device(batch, dev))
    info = {
        "masked_fraction": masked_fraction,
        "micro_batches": n,
        "masked_micro_batches": len(times[True]),
        "timed_micro_batches": n - timed_from,
        "timed_masked_micro_batches": sum(1 for p in masked_positions if p >= timed_from),
        "masked_positions": sorted(masked_positions),
        "global_indices": indices,
        "builder_backend": backend,
        "build_batch_median_s": statistics.median(times[True] + times[False]),
        "build_batch_median_s_masked": statistics.median(times[True]) if times[True] else None,
        "build_batch_median_s_causal": statistics.median(times[False]) if times[False] else None,
    }
    return batches, info


# --------------------------------------------------------------------------------------------
# fast vs dense attention on this device
# --------------------------------------------------------------------------------------------
def attention_equivalence(arch_name: str, seq: int, doc_len: int, dev: torch.device) -> dict:
    """One layer's core attention, the fast backend (``auto``) against the dense one on the
    same q, k, v and documents (an EOD every ``doc_len`` tokens, one causal and one masked
    sample): relative error (norm) of the output and of dq, dk, dv, in fp32 and bf16."""
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_normistral.model.architectures import get_architecture
    from megatron_normistral.model.attention import DocumentLayout
    from megatron_normistral.model.specs import core_attention_class, resolve_attention_backend
    from megatron_normistral.runtime.parallel import set_seed

    set_seed(1234)  # megatron-core's attention forks the model-parallel RNG stream (dropout)
    arch = get_architecture(arch_name)
    fast = resolve_attention_backend("auto")
    ids = (torch.arange(seq, device=dev) // doc_len).to(torch.int32).expand(2, seq).contiguous()
    layout_args = (ids, torch.tensor([False, True], device=dev))
    out = {"backend": fast, "seq": seq, "doc_len": doc_len}
    for dtype in (torch.float32, torch.bfloat16):
        config = TransformerConfig(num_layers=1, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
                                   num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim,
                                   ffn_hidden_size=arch.ffn_hidden_size, activation_func=F.silu, hidden_dropout=0.0,
                                   attention_dropout=0.0, masked_softmax_fusion=False, bf16=dtype == torch.bfloat16,
                                   params_dtype=dtype, use_cpu_initialization=not cuda())
        gen = torch.Generator(device=dev).manual_seed(0)
        shapes = [(seq, 2, arch.num_attention_heads, arch.head_dim)] + [(seq, 2, arch.num_query_groups, arch.head_dim)] * 2
        inputs = [torch.randn(sh, device=dev, generator=gen).to(dtype) for sh in shapes]
        grad_out = torch.randn(seq, 2, arch.num_attention_heads * arch.head_dim, device=dev, generator=gen).to(dtype)
        results = {}
        for backend in (fast, "dense"):
            module = core_attention_class(backend, "local")(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                                             attention_type="self")
            q, k, v = (x.clone().requires_grad_(True) for x in inputs)
            o = module(q, k, v, None, packed_seq_params=DocumentLayout.of(*layout_args))
            o.backward(grad_out)
            results[backend] = [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
            del module, o
        errors = {name: float((a - b).norm() / b.norm()) for name, a, b in zip(("out", "dq", "dk", "dv"), results[fast], results["dense"])}
        out[str(dtype).replace("torch.", "")] = errors
        del results, inputs
    from megatron.core import parallel_state

    parallel_state.get_global_memory_buffer().buffer.clear()  # the dense scores buffer: not for the configs
    free_memory()
    return out


# --------------------------------------------------------------------------------------------
# the two stacks
# --------------------------------------------------------------------------------------------
def build_ours(arch_name: str, layers: int, vocab: int, seq: int, attention: str):
    """Our stack: provider + setup + step. Returns (step_fn, modules to free)."""
    from megatron_normistral.model.provider import ModelConfig, PrecisionConfig, build_model
    from megatron_normistral.runtime.parallel import ParallelConfig, set_seed
    from megatron_normistral.training.ddp import wrap_model
    from megatron_normistral.training.optimizer import OptimizerConfig, build_optimizer
    from megatron_normistral.training.step import train_step

    set_seed(1234)
    parallel, precision = ParallelConfig(), PrecisionConfig(bf16=True)
    model_config = ModelConfig(
        arch=arch_name, vocab_size=vocab, num_layers=layers, transformer_impl="local", attention_backend=attention
    )
    chunks = build_model(model_config, parallel, precision, max_sequence_length=seq)
    chunks = wrap_model(chunks, parallel, precision)
    optimizer = build_optimizer(chunks, OptimizerConfig(), parallel, precision)

    def step(batches: list[dict], micro_batch_size: int) -> dict:
        result = train_step(chunks, optimizer, [iter(batches)], len(batches), seq, micro_batch_size)
        loss = sum(float(r["loss_sum"]) for r in result.reports) / max(1, sum(int(r["tokens"]) for r in result.reports))
        return {"loss": loss, "grad_norm": result.grad_norm, "updated": result.updated}

    return step, [chunks, optimizer]


def build_plain(arch, seq: int):
    """megatron-core only, nothing of ours: what a Megatron-LM-style script would write.
    ``arch`` is only read for its numbers."""
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    np.random.seed(1234)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        bf16=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Same fusion switches as our provider (neither TE nor apex is there to fuse with).
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=arch.vocab_size,
        max_sequence_length=seq,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # as Megatron-LM's get_model: norms are built on the CPU
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=Float16Module(config, model),
    )
    model.broadcast_params()
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            min_lr=0.0,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
            bf16=True,
            params_dtype=torch.bfloat16,
        ),
        [model],
    )

    def forward_step(data_iterator, module):
        batch = next(data_iterator)
        output = module(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])

        def loss_func(output_tensor):
            mask = batch["loss_mask"].reshape(-1).float()
            loss_sum = torch.sum(output_tensor.reshape(-1).float() * mask)
            count = mask.sum().to(torch.int)
            return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.detach().float()])}

        return output, loss_func

    def step(batches: list[dict], micro_batch_size: int) -> dict:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        updated, grad_norm, _ = optimizer.step()
        total = torch.stack([r["lm loss"] for r in reports]).sum(0)
        return {"loss": float(total[0] / total[1]), "grad_norm": None if grad_norm is None else float(grad_norm), "updated": bool(updated)}

    return step, [model, optimizer]


# --------------------------------------------------------------------------------------------
# one config
# --------------------------------------------------------------------------------------------
def run_config(spec: dict, args, layers: int, batches: list[dict]) -> dict:
    from megatron_normistral.model.architectures import get_architecture

    arch = get_architecture(args.arch, num_layers=layers, vocab_size=spec["vocab"])
    steps_total = args.warmup + args.steps
    m = args.micro_batches
    seq = spec["seq"]
    assert len(batches) == steps_total * m
    full = arch.training_flops_per_token(seq) * seq * m
    # The attention-score part of `full`: 3 (fwd + bwd) x layers x 4 x s x query width per token.
    attention_full = 3.0 * arch.num_layers * 4 * seq * arch.query_width * seq * m
    allowed = allowed_pair_fraction(batches[args.warmup * m:], seq)
    result = {
        "name": spec["name"],
        "stack": spec["stack"],
        "vocab": spec["vocab"],
        "objective": spec["objective"],
        "attention": spec["attention"],
        "seq": seq,
        "layers": layers,
        "parameters": arch.num_parameters(),
        "tokens_per_step": seq * m,
        "model_flops_per_step": full,
        "needed_flops_per_step": full - attention_full * (1.0 - allowed),
        "allowed_attention_pairs": allowed,
    }
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step, holders = None, []
    try:
        if spec["stack"] == "ours":
            step, holders = build_ours(args.arch, layers, spec["vocab"], seq, spec["attention"])
        else:
            step, holders = build_plain(arch, seq)
        sync()
        result["build_s"] = time.perf_counter() - t0
        times, last = [], None
        for i in range(steps_total):
            sync()
            t = time.perf_counter()
            last = step(batches[i * m : (i + 1) * m], 1)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        result.update(step_times_s=times, last_step=last)
        med = statistics.median(times)
        result["step_s"] = med
        result["tokens_per_s"] = result["tokens_per_step"] / med
        result["model_tflops"] = result["model_flops_per_step"] / med / 1e12
        result["needed_tflops"] = result["needed_flops_per_step"] / med / 1e12
        if not (last and np.isfinite(last["loss"])):
            result["warning"] = f"non-finite loss {last}"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        result["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        result["oom"] = is_oom(exc)
        if not result["oom"]:
            import traceback

            result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if cuda():
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
        del step, holders  # the step closure holds the model and optimizer too
        free_memory()
        if cuda():
            result["memory_after_free_gib"] = torch.cuda.memory_allocated() / GIB
    return result


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run (overrides sizes)")
    p.add_argument("--arch", default=NEMO)
    p.add_argument("--layers", type=int, default=None, help="default: the most of --layer-candidates that fits")
    p.add_argument("--layer-candidates", type=int, nargs="+", default=[8, 6, 4, 2])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--long-seq", type=int, default=8192, help="the hybrid/causal pair is also timed at this length")
    p.add_argument("--nominal-peak-tflops", type=float, default=989.0,
                   help="the device's nominal dense bf16 peak (H100/H200 SXM: 989), for the second MFU")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches (of one sample) per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--vocab-large", type=int, default=131_072)
    p.add_argument("--vocab-small", type=int, default=51_200)
    p.add_argument("--masked-fraction", type=float, default=0.1)
    p.add_argument("--doc-len", type=int, default=1024, help="synthetic documents: an EOD every this many tokens")
    p.add_argument("--objective-backend", default="reference", help="build_batch backend: reference (Python) or cpp (needs the built extension)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--matmul-reps", type=int, default=10)
    p.add_argument("--no-repeat", action="store_true", help="skip timing the base config a second time")
    p.add_argument("--time-budget-s", type=float, default=450.0, help="configs not started by then are skipped")
    p.add_argument("--json", default="runs/gpu_step.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.seq, args.long_seq, args.micro_batches, args.doc_len = "tiny", 32, 64, 2, 8
        args.layers = args.layers or 2
        args.warmup, args.steps = 1, 1
        args.vocab_large, args.vocab_small = 256, 128
        args.matmul_sizes, args.matmul_reps = [128], 2
    return args


def configs(args) -> list[dict]:
    big, small, seq, long = args.vocab_large, args.vocab_small, args.seq, args.long_seq

    def c(name, stack, vocab, objective, attention, length=seq):
        return {"name": name, "stack": stack, "vocab": vocab, "objective": objective, "attention": attention, "seq": length}

    # The first config sets the layer count (it retries with fewer on OOM): the dense one,
    # which needs the most memory.
    out = [
        c("ours_dense", "ours", big, "causal", "dense"),
        c("plain", "plain", big, "causal", "dense"),
        c("ours", "ours", big, "causal", "auto"),
        c("ours_small_vocab", "ours", small, "causal", "auto"),
        c("ours_small_vocab_objective_causal", "ours", small, "objective_causal", "auto"),
        c("ours_small_vocab_hybrid", "ours", small, "hybrid", "auto"),
        c("ours_small_vocab_hybrid_dense", "ours", small, "hybrid", "dense"),
        c("ours_small_vocab_objective_causal_long", "ours", small, "objective_causal", "auto", long),
        c("ours_small_vocab_hybrid_long", "ours", small, "hybrid", "auto", long),
        c("ours_small_vocab_hybrid_dense_long", "ours", small, "hybrid", "dense", long),
    ]
    if not args.no_repeat:
        out.append(c("ours_dense_repeat", "ours", big, "causal", "dense"))
    return out


def ratio(results: dict, num: str, den: str):
    a, b = results.get(num, {}).get("step_s"), results.get(den, {}).get("step_s")
    return a / b if a and b else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    # A world of one, set up once and reused by every config. Fewer fragmentation OOMs when
    # models of different sizes follow each other (read when CUDA is first initialised).
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517"), ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")):
        os.environ.setdefault(key, value)
    if args.tiny and not cuda():
        torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    from importlib.metadata import version

    from megatron_normistral.runtime.parallel import ParallelConfig, init_distributed, init_model_parallel, shutdown

    init_distributed()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda() else torch.device("cpu")
    probe = torch.ones(1, device=dev)
    torch.distributed.all_reduce(probe)  # fail here, not inside a config, if the backend is broken
    sync()
    init_model_parallel(ParallelConfig())
    report = {
        "issue": 13,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "args": vars(args),
        "device": torch.cuda.get_device_name(dev) if cuda() else f"cpu ({platform.processor() or platform.machine()})",
        "device_memory_gib": torch.cuda.get_device_properties(dev).total_memory / GIB if cuda() else None,
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "python": platform.python_version(),
        "transformer_impl": "local",
        "backend": torch.distributed.get_backend(),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["matmul"] = measure_matmul_peak(args.matmul_sizes, warmup=3, reps=args.matmul_reps)
    peak = report["matmul"]["peak_tflops"]
    try:
        report["attention_equivalence"] = attention_equivalence(args.arch, args.seq, args.doc_len, dev)
    except Exception as exc:  # noqa: BLE001 - recorded, the timings go on
        report["attention_equivalence"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    print(f"[gpu_step] attention fast vs dense: {json.dumps(report['attention_equivalence'])}", flush=True)

    if args.layers is None:
        budget = 0.9 * report["device_memory_gib"] * GIB if cuda() else float("inf")
        args.layers = pick_layers(args.arch, args.vocab_large, args.seq, 1, args.layer_candidates, budget)
        report["layers_chosen_by"] = "memory estimate"
    layers = args.layers

    n = (args.warmup + args.steps) * args.micro_batches
    samples: dict[tuple[int, int], list] = {}
    results: dict[str, dict] = {}
    specs = configs(args)
    i = 0
    while i < len(specs):
        spec = specs[i]
        vocab = spec["vocab"]
        elapsed = time.perf_counter() - t_start
        if elapsed > args.time_budget_s:
            results[spec["name"]] = {**spec, "skipped": f"time budget: {elapsed:.0f} s > --time-budget-s {args.time_budget_s}"}
            i += 1
            continue
        key = (vocab, spec["seq"])
        if key not in samples:
            samples[key] = synthetic_samples(n, spec["seq"], vocab, seed=vocab + spec["seq"], doc_len=args.doc_len)
        if spec["objective"] != "causal":
            fraction = args.masked_fraction if spec["objective"] == "hybrid" else 0.0
            try:
                batches, info = objective_batches(
                    samples[key], vocab, fraction, args.objective_backend, dev, timed_from=args.warmup * args.micro_batches
                )
            except Exception as exc:  # noqa: BLE001 - e.g. data/objective.py missing or broken
                results[spec["name"]] = {**spec, "skipped": f"objective batches unavailable: {type(exc).__name__}: {exc}"}
                i += 1
                continue
        else:
            batches, info = causal_batches(samples[key], dev), None
        print(f"[gpu_step] {spec['name']}: vocab {vocab}, seq {spec['seq']}, {spec['objective']}, attention {spec['attention']}, "
              f"{layers} layers ...", flush=True)
        res = run_config(spec, args, layers, batches)
        if info:
            res["objective_batches"] = info
        if "step_s" in res:
            res["mfu"] = res["model_tflops"] / peak
            res["mfu_nominal"] = res["model_tflops"] / args.nominal_peak_tflops
            res["mfu_needed_nominal"] = res["needed_tflops"] / args.nominal_peak_tflops
        print(f"[gpu_step]   -> {json.dumps({k: res.get(k) for k in ('build_s', 'step_times_s', 'model_tflops', 'mfu', 'mfu_nominal', 'needed_tflops', 'peak_memory_gib', 'memory_after_free_gib', 'error')})}", flush=True)
        if res.get("traceback"):
            print(res["traceback"], flush=True)
        del batches
        free_memory()
        if res.get("oom") and i == 0 and layers > min(args.layer_candidates) and report.get("layers_chosen_by"):
            smaller = [c for c in args.layer_candidates if c < layers]
            report.setdefault("oom_retries", []).append({"layers": layers, "error": res["error"]})
            layers = max(smaller)
            print(f"[gpu_step] OOM at the first config; retrying everything with {layers} layers", flush=True)
            continue
        results[spec["name"]] = res
        i += 1
        report.update(layers=layers, configs=results)
        out.write_text(json.dumps(report, indent=2, default=str))  # partial results survive a kill

    report["layers"] = layers
    report["configs"] = results
    report["nominal_peak_tflops"] = args.nominal_peak_tflops
    report["ratios"] = {
        # The cost of our stack, same (dense, unfused) attention as plain megatron-core:
        "ours_dense_over_plain": ratio(results, "ours_dense", "plain"),
        "ours_dense_repeat_over_plain": ratio(results, "ours_dense_repeat", "plain"),
        "ours_dense_repeat_over_ours_dense": ratio(results, "ours_dense_repeat", "ours_dense"),
        # What the fast attention gives (causal, vocabulary 131,072):
        "fast_over_dense": ratio(results, "ours", "ours_dense"),
        "fast_over_plain": ratio(results, "ours", "plain"),
        "vocab_small_over_large": ratio(results, "ours_small_vocab", "ours"),
        # Same builder, same documents, only the objective differs (fast path):
        "hybrid_over_objective_causal": ratio(results, "ours_small_vocab_hybrid", "ours_small_vocab_objective_causal"),
        "hybrid_over_objective_causal_long": ratio(results, "ours_small_vocab_hybrid_long", "ours_small_vocab_objective_causal_long"),
        # The hybrid objective, fast vs the authors' dense mask:
        "hybrid_fast_over_dense": ratio(results, "ours_small_vocab_hybrid", "ours_small_vocab_hybrid_dense"),
        "hybrid_fast_over_dense_long": ratio(results, "ours_small_vocab_hybrid_long", "ours_small_vocab_hybrid_dense_long"),
    }
    report["goal_ours_over_plain_max"] = 1.02
    report["wall_s"] = time.perf_counter() - t_start
    out.write_text(json.dumps(report, indent=2, default=str))
    print(table(report), flush=True)
    shutdown()
    return report


def table(report: dict) -> str:
    peak, nominal = report["matmul"]["peak_tflops"], report["nominal_peak_tflops"]
    lines = [
        f"## gpu_step: {report['device']}, torch {report['torch']}, megatron-core {report['megatron_core']}, "
        f"{report['layers']} layers, {report['args']['micro_batches']} x 1 sample/step, {report['date_utc']}",
        f"bf16 matmul peak (measured): {peak:.1f} TFLOP/s "
        + ", ".join(f"{n}^3 {v['tflops']:.1f}" for n, v in report["matmul"]["sizes"].items())
        + f"; nominal {nominal:.0f} TFLOP/s",
        "TFLOP/s full: every attention score counted (Megatron-LM convention); needed: only the pairs the mask allows",
        "",
        "| config | attention | seq | vocab | objective | params | step s (median) | tokens/s | TFLOP/s full | "
        "MFU measured peak | MFU nominal | TFLOP/s needed | MFU needed, nominal | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["configs"].items():
        head = f"| {name} | {r.get('attention')} | {r.get('seq')} | {r.get('vocab')} | {r.get('objective')} |"
        if "step_s" in r:
            mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
            lines.append(
                f"{head} {r['parameters'] / 1e9:.2f}B | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                f"{r['model_tflops']:.1f} | {r['mfu']:.3f} | {r['mfu_nominal']:.3f} | {r['needed_tflops']:.1f} | "
                f"{r['mfu_needed_nominal']:.3f} | {mem} |"
            )
        else:
            why = r.get("error") or r.get("skipped") or "?"
            lines.append(f"{head} - | {why[:80]} | | | | | | | |")
    h = report["configs"].get("ours_small_vocab_hybrid", {}).get("objective_batches")
    lines.append("")
    eq = report.get("attention_equivalence", {})
    if "error" in eq or not eq:
        lines.append(f"attention {eq.get('backend', '?')} vs dense: {eq.get('error', 'not run')}")
    else:
        lines.append(f"attention {eq['backend']} vs dense, one layer, seq {eq['seq']}, documents of {eq['doc_len']}, "
                     f"relative error (out, dq, dk, dv): "
                     + "; ".join(f"{d} " + ", ".join(f"{v:.1e}" for v in eq[d].values()) for d in ("float32", "bfloat16")))
    rt = report["ratios"]

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    lines.append(f"ours_dense / plain step time: {f(rt['ours_dense_over_plain'])} (goal <= 1.02; repeat: "
                 f"{f(rt['ours_dense_repeat_over_plain'])}, repeat/first {f(rt['ours_dense_repeat_over_ours_dense'])})")
    lines.append(f"fast / dense attention step time (causal): {f(rt['fast_over_dense'])}; fast / plain megatron-core: "
                 f"{f(rt['fast_over_plain'])}")
    lines.append(f"vocab {report['args']['vocab_small']} / {report['args']['vocab_large']} step time: {f(rt['vocab_small_over_large'])}")
    lines.append(f"hybrid fast / hybrid dense step time: {f(rt['hybrid_fast_over_dense'])} (seq {report['args']['seq']}), "
                 f"{f(rt['hybrid_fast_over_dense_long'])} (seq {report['args']['long_seq']})")
    hy = (
        f"hybrid ({report['args']['masked_fraction']:.0%} masked) / causal-only step time, fast path: "
        f"{f(rt['hybrid_over_objective_causal'])} (seq {report['args']['seq']}), "
        f"{f(rt['hybrid_over_objective_causal_long'])} (seq {report['args']['long_seq']}) (goal <= 1.02)"
    )
    if h:
        hy += f" ({h['timed_masked_micro_batches']}/{h['timed_micro_batches']} timed micro-batches masked; build_batch[{h['builder_backend']}] {h['build_batch_median_s'] * 1e3:.1f} ms/sample on the host, not in the step time)"
    lines.append(hy)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
