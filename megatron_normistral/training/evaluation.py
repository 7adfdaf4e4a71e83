"""Held-out evaluation per language: loss per token, loss per word (comparable across
tokenizers), and masked-token accuracy (the model used bidirectionally).

Words are whitespace-separated (``len(text.split())``). Loss per word = total negative
log-likelihood of the text's tokens / words; special-token targets (EOD) are not counted, so
both tokenizers are charged for the same text.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from megatron_normistral.data.objective import ObjectiveConfig, build_batch
from megatron_normistral.tokenizer.corpus import iter_documents, split_paragraphs
from megatron_normistral.runtime.parallel import device
from megatron_normistral.training.batches import to_device


@dataclass
class EvalData:
    language: str
    windows: list[np.ndarray]  # seq_length + 1 tokens each
    words: int
    tokens: int


def prepare_eval_data(language: str, path: str, tokenizer, seq_length: int, max_tokens: int) -> EvalData:
    """Pack paragraphs (tokens + EOD) into non-overlapping windows of seq_length + 1 and count
    the words of exactly the text that was packed. Paragraphs (not whole documents) are the
    unit so that a token budget smaller than one long document still yields whole units."""
    stream: list[int] = []
    words = 0
    # Paragraphs as fertility counts them (tools/fertility.py), with file:line errors.
    paragraphs = (p for text in iter_documents(path) for p in split_paragraphs(text))
    for paragraph in paragraphs:
        ids = tokenizer.encode(paragraph)
        room = max_tokens - len(stream) - 1
        if len(ids) > room:
            # The budget ends inside this paragraph: keep as many of its words as fit.
            kept = paragraph.split()
            while kept and len(ids) > room:
                kept = kept[: max(0, min(len(kept) - 1, len(kept) * room // max(len(ids), 1)))]
                ids = tokenizer.encode(" ".join(kept))
            if kept:
                stream.extend(ids)
                stream.append(tokenizer.eod_id)
                words += len(kept)
            break
        stream.extend(ids)
        stream.append(tokenizer.eod_id)
        words += len(paragraph.split())
    n = (len(stream) - 1) // seq_length if stream else 0
    if n == 0:
        raise ValueError(f"{path}: held-out text for {language} is shorter than one sequence ({seq_length} tokens)")
    arr = np.asarray(stream, dtype=np.int64)
    windows = [arr[w * seq_length : w * seq_length + seq_length + 1] for w in range(n)]
    # Words of the text whose tokens were scored: scale by the share of tokens in whole windows.
    scored = n * seq_length + 1
    return EvalData(language, windows, words=int(round(words * scored / len(stream))), tokens=scored)


def _eval_loss(batch, output):
    """output: per-token loss (labels given)."""
    mask = batch["loss_mask"].float()
    total = (output.float() * mask).sum()
    # clone: megatron-core divides the returned loss in place.
    return total, mask.sum().to(torch.int), {"nll": total.detach().clone(), "count": mask.sum().detach()}


def _accuracy_loss(batch, logits):
    """logits [b, s, vocab / TP] (vocab-parallel): masked-token accuracy over the TP group."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local_max, local_idx = logits.float().max(dim=-1)
    local_idx = local_idx + tp_rank * logits.shape[-1]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        maxes = [torch.empty_like(local_max) for _ in range(tp)]
        idxs = [torch.empty_like(local_idx) for _ in range(tp)]
        torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
        torch.distributed.all_gather(idxs, local_idx.contiguous(), group=group)
        best = torch.stack(maxes).argmax(dim=0)
        prediction = torch.stack(idxs).gather(0, best.unsqueeze(0)).squeeze(0)
    else:
        prediction = local_idx
    mask = batch["loss_mask"].float()
    correct = ((prediction == batch["labels"]).float() * mask).sum()
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    return zero, mask.sum().to(torch.int), {"correct": correct.detach(), "count": mask.sum().detach()}


def _forward(with_labels: bool, data_iterator, model):
    batch = next(data_iterator)
    labels = batch["labels"] if with_labels else None
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=labels)
    return output, partial(_eval_loss if with_labels else _accuracy_loss, batch)


def evaluate(chunks, data: list[EvalData], objective: ObjectiveConfig, ids, seq_length: int, micro_batch_size: int) -> dict:
    """Collective over the world; returns {language: metrics} (same on every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    results = {}
    try:
        for eval_data in data:
            windows = eval_data.windows
            usable = len(windows) - len(windows) % micro_batch_size or len(windows)
            mbs = micro_batch_size if usable >= micro_batch_size else 1
            metrics = {}
            for mode, fraction in (("causal", 0.0), ("masked", 1.0)):
                if mode == "masked" and ids.mask_id is None:
                    continue  # no <mask> token: no masked-token accuracy
                cfg = replace(objective, masked_fraction=fraction)
                batches = []
                for start in range(0, usable - usable % mbs, mbs):
                    idx = list(range(start, start + mbs))
                    batches.append(to_device(build_batch([windows[i] for i in idx], idx, cfg, eod_id=ids.eod_id,
                                                         mask_id=ids.mask_id if ids.mask_id is not None else 0, vocab_size=ids.vocab_size)))
                with torch.no_grad():
                    reports = forward_backward(
                        forward_step_func=partial(_forward, mode == "causal"),
                        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
                        model=chunks, num_microbatches=len(batches), seq_length=seq_length,
                        micro_batch_size=mbs, forward_only=True,
                    )
                key = "nll" if mode == "causal" else "correct"
                totals = torch.tensor([sum(float(r[key]) for r in reports or []), sum(float(r["count"]) for r in reports or [])],
                                      dtype=torch.float64, device=device())
                # Only last-stage ranks have reports; all DP replicas evaluated the same windows.
                from megatron.core import parallel_state

                if parallel_state.get_data_parallel_rank() != 0 or parallel_state.get_tensor_model_parallel_rank() != 0:
                    totals.zero_()
                torch.distributed.all_reduce(totals)
                if mode == "causal":
                    metrics["loss"] = float(totals[0] / totals[1])
                    metrics["loss_per_word"] = float(totals[0] / max(eval_data.words, 1))
                    metrics["tokens_per_word"] = eval_data.tokens / max(eval_data.words, 1)
                else:
                    metrics["masked_accuracy"] = float(totals[0] / totals[1])
            results[eval_data.language] = metrics
    finally:
        for chunk in chunks:
            chunk.train()
    return results
