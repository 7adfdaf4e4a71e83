"""Held-out evaluation per language: loss per token, loss per word (comparable across
tokenizers), and masked-token accuracy (the model used bidirectionally).

The text scored is chosen in words, never in tokens, so every tokenizer is charged for exactly
the same words: the first ``max_words`` whitespace-separated words of the file (paragraphs as
fertility counts them, the last one cut at a word; 0: the whole file). Each paragraph is packed
as training packs a document, ``<s> text </s>`` (BOS when the training corpora start with it),
into windows of ``seq_length + 1``; the last window is padded with EOD and the last micro-batch
with padding rows, all masked out, so no text is ever dropped. Loss per word = total negative
log-likelihood of the text's tokens / its words; special-token targets (``<s>``, ``</s>``) are not
counted, and every text token is a target exactly once (without BOS the stream starts with an
EOD, so the first token is predicted too). ``evaluate`` checks that the tokens it scored are
exactly the text's.

``max_tokens`` (optional) caps the packed stream, for a cost limit: it cuts the text per
tokenizer, so two tokenizers are then scored on different words (``words`` says how many).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator

import numpy as np
import torch

from megatron_normistral.data.objective import ObjectiveConfig, build_batch
from megatron_normistral.tokenizer.corpus import iter_documents, split_paragraphs
from megatron_normistral.runtime.collectives import sum_over, world
from megatron_normistral.training.batches import to_device
from megatron_normistral.training.ddp import sync_params
from megatron_normistral.training.step import attention_inputs


@dataclass(frozen=True)
class EvalPacking:
    """How held-out text becomes windows (one config for every language of a run)."""

    seq_length: int
    max_words: int = 32_768           # words per language; 0: the whole file
    max_tokens: int | None = None     # optional cap on the packed stream (cuts the text per tokenizer)
    bos_id: int | None = None         # before each paragraph, as the training corpora start documents
    num_special_tokens: int = 16      # ids below this are never scored (objective.num_special_tokens)


@dataclass
class EvalData:
    language: str
    windows: list[np.ndarray]  # seq_length + 1 tokens each; the last one padded with EOD
    targets: list[int]         # window w: its first targets[w] labels are text, the rest padding
    words: int                 # words of the text scored (the same for every tokenizer unless max_tokens cut it)
    tokens: int                # its tokens that are scored (non-special ids): what the causal loss counts
    cut_by_max_tokens: bool = False


def budgeted_paragraphs(path: str, max_words: int) -> Iterator[str]:
    """The file's paragraphs (fertility's rule) up to ``max_words`` words in all; the paragraph
    that reaches the budget is cut to its first words, joined by single spaces. 0: no budget.
    Depends only on the text, never on a tokenizer."""
    left = max_words
    for text in iter_documents(path):
        for paragraph in split_paragraphs(text):
            if not max_words:
                yield paragraph
                continue
            words = paragraph.split()
            if len(words) >= left:
                yield paragraph if len(words) == left else " ".join(words[:left])
                return
            left -= len(words)
            yield paragraph


def _fit_paragraph(tokenizer, paragraph: str, room: int) -> tuple[list[int], int]:
    """(ids, words) of the longest word prefix of ``paragraph`` whose encoding has at most
    ``room`` tokens (max_tokens only)."""
    kept = paragraph.split()
    ids = tokenizer.encode(paragraph)
    while kept and len(ids) > room:
        kept = kept[: max(0, min(len(kept) - 1, len(kept) * room // max(len(ids), 1)))]
        ids = tokenizer.encode(" ".join(kept))
    return (ids, len(kept)) if kept else ([], 0)


def prepare_eval_data(language: str, path: str, tokenizer, packing: EvalPacking) -> EvalData:
    """Pack the budgeted paragraphs (:func:`budgeted_paragraphs`) as ``<s> ids </s>`` (or, without
    BOS, ``</s>`` first and ``ids </s>`` each) into windows of ``seq_length + 1`` that overlap by
    one token, as training windows do: window w holds stream[w*s : w*s + s + 1]."""
    s, eod, bos = packing.seq_length, tokenizer.eod_id, packing.bos_id
    start = [bos] if bos is not None else []
    stream: list[int] = [] if bos is not None else [eod]
    words = tokens = 0
    cut = False
    for paragraph in budgeted_paragraphs(path, packing.max_words):
        ids = tokenizer.encode(paragraph)
        n_words = len(paragraph.split())
        if packing.max_tokens is not None and len(stream) + len(start) + len(ids) + 1 > packing.max_tokens:
            ids, n_words = _fit_paragraph(tokenizer, paragraph, packing.max_tokens - len(stream) - len(start) - 1)
            cut = True
        if n_words:
            stream += start + ids + [eod]
            words += n_words
            tokens += sum(1 for t in ids if t >= packing.num_special_tokens)
        if cut:
            break
    if words == 0:
        why = f" within evaluation.max_tokens {packing.max_tokens}" if cut else ""
        raise ValueError(f"{path}: held-out text for {language} has no words{why}")
    targets_total = len(stream) - 1  # every token but the first is a label once
    n = -(-targets_total // s)
    arr = np.full(n * s + 1, eod, dtype=np.int64)
    arr[: len(stream)] = stream
    windows = [arr[w * s : w * s + s + 1] for w in range(n)]
    targets = [min(s, targets_total - w * s) for w in range(n)]
    return EvalData(language, windows, targets, words=words, tokens=tokens, cut_by_max_tokens=cut)


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
    output = model(batch["tokens"], batch["position_ids"], labels=labels, **attention_inputs(batch))
    return output, partial(_eval_loss if with_labels else _accuracy_loss, batch)


def eval_batches(eval_data: EvalData, objective: ObjectiveConfig, ids, micro_batch_size: int) -> list[dict]:
    """Every window of ``eval_data`` in micro-batches of ``micro_batch_size`` (host tensors): the
    last micro-batch is filled with rows of EOD, and every label that is not text (padding of
    the last window, padding rows) is masked out, so each text token is counted exactly once
    whatever the micro-batch size. Window w keeps global index w (its masks in masked mode)."""
    windows, n = eval_data.windows, len(eval_data.windows)
    padding = np.full_like(windows[0], ids.eod_id)
    batches = []
    for first in range(0, n, micro_batch_size):
        idx = list(range(first, first + micro_batch_size))
        batch = build_batch([windows[i] if i < n else padding for i in idx], idx, objective, eod_id=ids.eod_id,
                            mask_id=ids.mask_id if ids.mask_id is not None else 0, vocab_size=ids.vocab_size,
                            bos_id=ids.bos_id)
        for row, i in enumerate(idx):
            batch["loss_mask"][row, eval_data.targets[i] if i < n else 0:] = 0
        batches.append(batch)
    return batches


def evaluate(chunks, data: list[EvalData], objective: ObjectiveConfig, ids, seq_length: int, micro_batch_size: int) -> dict:
    """Collective over the world; returns {language: metrics} (same on every rank). Raises
    RuntimeError if the causal loss did not count exactly the text's tokens (a bug)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    sync_params(chunks)  # with overlapped parameter gathers, the last update may not be everywhere yet
    for chunk in chunks:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    results = {}
    try:
        for eval_data in data:
            metrics = {}
            for mode, fraction in (("causal", 0.0), ("masked", 1.0)):
                if mode == "masked" and ids.mask_id is None:
                    continue  # no <mask> token: no masked-token accuracy
                cfg = replace(objective, masked_fraction=fraction)
                batches = [to_device(b) for b in eval_batches(eval_data, cfg, ids, micro_batch_size)]
                with torch.no_grad():
                    reports = forward_backward(
                        forward_step_func=partial(_forward, mode == "causal"),
                        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
                        model=chunks, num_microbatches=len(batches), seq_length=seq_length,
                        micro_batch_size=micro_batch_size, forward_only=True,
                    )
                key = "nll" if mode == "causal" else "correct"
                totals = torch.tensor([sum(float(r[key]) for r in reports or []), sum(float(r["count"]) for r in reports or [])],
                                      dtype=torch.float64)
                # Only last-stage ranks have reports; all DP replicas evaluated the same windows.
                from megatron.core import parallel_state

                if parallel_state.get_data_parallel_rank() != 0 or parallel_state.get_tensor_model_parallel_rank() != 0:
                    totals.zero_()
                totals = sum_over(totals, world())  # every rank gets the result; rank 0 logs it
                if mode == "causal":
                    if int(totals[1]) != eval_data.tokens:
                        raise RuntimeError(f"evaluation of {eval_data.language} scored {int(totals[1]):,} tokens, but its "
                                           f"text has {eval_data.tokens:,}: text was dropped or counted twice")
                    metrics["loss"] = float(totals[0] / totals[1])
                    metrics["loss_per_word"] = float(totals[0] / eval_data.words)
                    metrics["tokens_per_word"] = eval_data.tokens / eval_data.words
                    metrics["words"] = eval_data.words
                    metrics["tokens"] = eval_data.tokens
                else:
                    metrics["masked_accuracy"] = float(totals[0] / totals[1])
            results[eval_data.language] = metrics
    finally:
        for chunk in chunks:
            chunk.train()
    return results
