"""Workers for the conversion tests (run by ``testing.distributed.run_distributed``).

A worker runs a list of steps, each at its own parallel layout, in the same processes (the
model-parallel groups are rebuilt per step), so that one spawn covers several layouts.
Each step builds the model with a *different* random init, loads a checkpoint, and reports
what the tests compare: full logits, greedy continuations, the gathered full weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Step:
    """One layout: load ``load_dir``, report, optionally save to ``save_dir``."""

    name: str
    load_dir: str
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    tokens: list[list[int]] | None = None  # prompts for logits / generation
    generate: int = 0  # greedy tokens to generate from ``tokens``
    want_weights: bool = False  # return the gathered full (TP=1 named) state dict
    save_dir: str | None = None
    save_extra_keys: bool = False  # save like a training checkpoint: extra non-model keys
    check_template: bool = False  # compare mcore_io.sharded_entries with the model's own
    bf16: bool = False  # build the model in bf16 (the checkpoint may be fp32)
    outputs: dict = field(default_factory=dict)


def make_hf_checkpoint(directory, arch, dtype: torch.dtype = torch.float32, seed: int = 0,
                       max_shard_size: str | None = None, init_std: float = 0.25) -> dict[str, torch.Tensor]:
    """A randomly initialised ``MistralForCausalLM`` of ``arch`` saved to ``directory``;
    returns its state dict. Norm weights are randomised too (HF initialises them to ones,
    which would hide a norm mix-up), and ``init_std`` is large so that logits span several
    units (at HF's 0.02 they stay below 1 and any tolerance is easy to meet)."""
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_normistral.convert import hf_config_from_arch

    torch.manual_seed(seed)
    config = MistralConfig(**{**hf_config_from_arch(arch, dtype="float32"), "initializer_range": init_std})
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_tokenizer(directory, vocab_size: int) -> None:
    """A small word-level fast tokenizer with <s>=1, </s>=2, <pad>=0 (Mistral's ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)


def _pipeline_forward(chunks, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] of ``tokens`` on every rank, through all pipeline
    (and virtual) stages: stage v*P + p runs on pipeline rank p, chunk v."""
    from megatron.core import parallel_state as ps

    pp_size, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    hidden = None
    logits = None
    n_stages = len(chunks) * pp_size
    for stage in range(n_stages):
        v, p = divmod(stage, pp_size)
        if p != pp_rank:
            continue
        chunk = chunks[v]
        if stage > 0 and pp_size > 1:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], chunk.config.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        if stage > 0:
            chunk.set_input_tensor(hidden)
        with torch.no_grad():
            out = chunk(tokens if stage == 0 else None, positions, None, runtime_gather_output=True)
        if stage == n_stages - 1:
            logits = out
        else:
            hidden = out
            if pp_size > 1:
                dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    # Hand the logits of the last stage (TP rank 0 holds the same gathered logits) to everyone.
    mine = logits if (logits is not None and ps.get_tensor_model_parallel_rank() == 0) else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return next(x for x in everyone if x is not None)


def _greedy(chunks, prompt: torch.Tensor, steps: int) -> list[list[int]]:
    tokens = prompt
    for _ in range(steps):
        nxt = _pipeline_forward(chunks, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompt.shape[1]:].tolist()


def _template_mismatches(chunks, num_layers: int) -> list[str]:
    """Differences between the ShardedTensors conversion writes without a model and those of
    a TP=1, PP=1 model (keys, global shapes and offsets, layer axis)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megatron_normistral.convert import mcore_io

    model_sd = chunks[0].sharded_state_dict()
    params = {n: p.detach() for n, p in chunks[0].named_parameters()}
    ours = mcore_io.sharded_entries(params, num_layers)
    problems = []
    if set(model_sd) != set(ours):
        problems.append(f"entry names differ: model only {sorted(set(model_sd) - set(ours))}, "
                        f"ours only {sorted(set(ours) - set(model_sd))}")
    for name in set(model_sd) & set(ours):
        m, o = model_sd[name], ours[name]
        if isinstance(m, ShardedTensorFactory):  # fused GLU fc1: [gate; up] halves of one global tensor
            m = m.build()[0]
        if type(m) is not type(o) or m.key != o.key or m.global_shape != o.global_shape or m.global_offset != o.global_offset:
            problems.append(f"{name}: model {type(m).__name__} {m.key} {m.global_shape} {m.global_offset} vs "
                            f"ours {type(o).__name__} {o.key} {o.global_shape} {o.global_offset}")
        elif isinstance(m, ShardedTensor) and m.prepend_axis_num != o.prepend_axis_num:
            problems.append(f"{name}: prepend_axis_num {m.prepend_axis_num} vs {o.prepend_axis_num}")
        elif isinstance(m, ShardedObject) and m.unique_key != o.unique_key:
            problems.append(f"{name}: unique key {m.unique_key} vs {o.unique_key}")
    return problems


def run_steps(rank: int, world_size: int, steps: list[Step]) -> list[Step]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_normistral.checkpoint import weights
    from megatron_normistral.model.provider import PrecisionConfig, build_model
    from megatron_normistral.model.sharding import gather_full_state_dict
    from megatron_normistral.runtime import parallel

    for i, step in enumerate(steps):
        pc = parallel.ParallelConfig(tensor_model_parallel_size=step.tp, pipeline_model_parallel_size=step.pp,
                                     virtual_pipeline_model_parallel_size=step.vpp)
        parallel.init_model_parallel(pc)
        parallel.set_seed(1000 + i)  # a fresh random init that the load must overwrite
        model_config = weights.model_config_from_checkpoint(step.load_dir, transformer_impl="local")
        arch = model_config.architecture()
        chunks = build_model(model_config, pc, PrecisionConfig(bf16=step.bf16), max_sequence_length=128)
        for c in chunks:
            c.eval()
        if step.check_template:
            step.outputs["template_mismatches"] = _template_mismatches(chunks, arch.num_layers)
        weights.load_model_weights(chunks, step.load_dir)
        if step.tokens is not None:
            prompt = torch.tensor(step.tokens)
            step.outputs["logits"] = _pipeline_forward(chunks, prompt)
            if step.generate:
                step.outputs["generated"] = _greedy(chunks, prompt, step.generate)
        if step.want_weights:
            step.outputs["weights"] = gather_full_state_dict(chunks)
        if step.save_dir is not None:
            if step.save_extra_keys:
                # As a training checkpoint: model keys plus others (here an optimizer-like tensor).
                sd = weights.model_sharded_state_dict(chunks)
                sd["optimizer"] = {"fake": ShardedTensor.from_rank_offsets(
                    "optimizer.state.exp_avg.fake", torch.full((8,), 3.0), replica_id=rank)}
                if rank == 0:
                    Path(step.save_dir).mkdir(parents=True, exist_ok=True)
                dist.barrier()
                dist_checkpointing.save(sd, step.save_dir)
                if rank == 0:
                    weights.write_model_metadata(step.save_dir, arch)
                dist.barrier()
            else:
                weights.save_model_checkpoint(chunks, step.save_dir, model_config)
        del chunks
    return steps
