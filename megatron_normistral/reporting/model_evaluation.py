"""Score any local Hugging Face causal LM on held-out text with the training loop's own metrics, so
an exported model, the source model and other models compare on the same words.

What is measured, per language, is what :func:`megatron_normistral.training.evaluation.evaluate`
reports during training, computed the same way from the same pieces:

- the text: :func:`~megatron_normistral.training.evaluation.prepare_eval_data` picks the first
  ``max_words`` words of the file (never a token count, so every tokenizer gets the same words)
  and packs each paragraph as ``<s> text </s>`` (``<s>`` when the model's tokenizer adds one
  itself) into windows of ``seq_length + 1``;
- the batches: :func:`~megatron_normistral.training.evaluation.eval_batches` (causal mode, and
  masked mode with the objective's spans, seeded by the window index);
- the attention: the loop's description (document ids and mode) as a dense mask
  (:func:`~megatron_normistral.model.attention.dense_attention_mask`): causal within each packed
  document, bidirectional within it in masked mode; positions 0..s-1 in every window.

Loss per word = the summed negative log-likelihood of the text's tokens / its words; tokens per
word = scored tokens / words; masked-token accuracy = argmax right at the positions masked mode
scores (only where the tokenizer has ``<mask>``). Generation cost: seconds per generated token
(greedy, KV cache, batch 1, a fixed number of new tokens after a held-out prompt) x the text's
tokens per word x 1000 = seconds per 1,000 words, so a tokenizer that needs fewer tokens for the
same words is charged for it.

Special tokens: ids below ``num_special_tokens`` are never scored or masked (the objective's
rule); by default that is the run of special tokens at the start of the vocabulary (16 for this
project's tokenizers). Special tokens elsewhere (GPT-2 style ``<|endoftext|>``) are not scored
either; masked accuracy then needs them below the limit and is left out otherwise.

    from megatron_normistral.reporting.model_evaluation import EvalSettings, evaluate_models

    results = evaluate_models(["normistral-11b-hf", "mistral-nemo-hf"],
                              EvalSettings(sets={"nb": "heldout/nb.jsonl.gz"}, seq_length=4096))
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from megatron_normistral.data.objective import ObjectiveConfig

Log = Callable[[str], None]


@dataclass
class EvalSettings:
    """What text is scored and how (the training recipe's evaluation settings by default:
    :func:`settings_from_recipe`)."""

    sets: dict[str, str]                 # language -> held-out JSONL(.gz) with a "text" field
    seq_length: int = 4096               # window length (training.seq_length of the run to compare with)
    max_words: int = 32_768              # words per language (evaluation.max_words); 0: the whole file
    micro_batch_size: int = 1            # windows per forward pass (does not change the result)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # masked mode's spans and seed
    num_special_tokens: int | None = None  # None: the tokenizer's leading special ids
    generation_tokens: int = 128         # new tokens timed per model (0: no generation timing)
    prompt_words: int = 64               # held-out words before the generated tokens
    device: str | None = None            # None: cuda if available, else cpu
    dtype: str = "auto"                  # auto (the checkpoint's), fp32, bf16 or fp16


def settings_from_recipe(recipe, **overrides) -> EvalSettings:
    """The evaluation a training run does, from its recipe: held-out sets, words, windows,
    micro-batch, objective and special-token limit."""
    return replace(EvalSettings(sets={e.language: e.path for e in recipe.data.eval_sets},
                                seq_length=recipe.training.seq_length, max_words=recipe.evaluation.max_words,
                                micro_batch_size=recipe.training.micro_batch_size, objective=recipe.objective,
                                num_special_tokens=recipe.objective.num_special_tokens), **overrides)


class ModelTokenizer:
    """The interface evaluation packing uses (``encode`` without specials, ``bos_id``,
    ``eod_id``, ``mask_id``) over a model folder's own ``AutoTokenizer`` (:meth:`of_folder`) or
    one of this project's tokenizers (:meth:`of_spec`: ``tekken``, a SentencePiece ``.model``,
    a tokenizer folder), for model folders exported without a tokenizer."""

    def __init__(self, name: str, encode: Callable[[str], list[int]], bos_id, eos_id, mask_id, pad_id,
                 vocab_size: int, special_ids: set[int], adds_bos: bool):
        self.name, self.encode = name, encode
        self.bos_id, self.eos_id, self.mask_id, self.pad_id = bos_id, eos_id, mask_id, pad_id
        self.vocab_size, self.special_ids, self.adds_bos = vocab_size, special_ids, adds_bos

    @classmethod
    def of_folder(cls, folder: str | os.PathLike) -> "ModelTokenizer":
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        mask = getattr(hf, "mask_token_id", None)
        if mask is None and "<mask>" in hf.get_vocab():
            mask = hf.convert_tokens_to_ids("<mask>")
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        specials = set(hf.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        probe = hf("a").input_ids  # <s> before each paragraph when the tokenizer puts it there itself
        return cls(str(folder), lambda text: hf.encode(text, add_special_tokens=False), hf.bos_token_id,
                   hf.eos_token_id, mask, hf.pad_token_id, len(hf), specials,
                   adds_bos=hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id])

    @classmethod
    def of_spec(cls, spec: str) -> "ModelTokenizer":
        from megatron_normistral.tokenizer import load_tokenizer

        tok = load_tokenizer(spec)
        specials = {i for i in range(tok.vocab_size) if tok.is_special(i)}
        # This project's documents start with <s> whenever the tokenizer has one (preprocessing's default).
        return cls(tok.name, tok.encode, tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id, tok.vocab_size, specials,
                   adds_bos=tok.bos_id is not None)

    @property
    def eod_id(self) -> int:
        if self.eos_id is None:
            raise ValueError(f"{self.name}: the tokenizer has no end-of-sequence token, which packing needs")
        return self.eos_id

    def leading_specials(self) -> int:
        """How many ids from 0 on are all special tokens."""
        n = 0
        while n in self.special_ids:
            n += 1
        return n


@dataclass
class LanguageResult:
    language: str
    words: int
    tokens: int                       # scored text tokens
    tokens_per_word: float
    loss: float                       # per token
    loss_per_word: float
    masked_accuracy: float | None     # None: no <mask> (or specials not below the limit)
    masked_positions: int
    generation_s_per_1000_words: float | None = None


@dataclass
class ModelResult:
    model: str
    label: str
    parameters: int
    vocab_size: int
    dtype: str
    device: str
    num_special_tokens: int
    bos: bool
    languages: dict[str, LanguageResult]
    generation: dict | None = None    # {"new_tokens", "prompt_tokens", "seconds", "s_per_token"}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _device(settings: EvalSettings):
    import torch

    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(folder: str | os.PathLike, settings: EvalSettings):
    """The folder's causal LM in eval mode on the settings' device (local files only)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtypes[settings.dtype], local_files_only=True)
    return model.to(_device(settings)).eval()


def _check_windows(model, settings: EvalSettings) -> None:
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is not None and window < settings.seq_length:
        raise ValueError(f"{config.name_or_path}: sliding window {window} < --seq-length {settings.seq_length}: the "
                         f"windows would attend further than the model does; give --seq-length {window} or less")
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and longest < settings.seq_length:
        raise ValueError(f"{config.name_or_path}: max_position_embeddings {longest} < --seq-length "
                         f"{settings.seq_length}; give --seq-length {longest} or less")


def _attention_bias(batch: dict, dtype):
    """The loop's attention (document ids + mode) as an additive [b, 1, s, s] mask, which Hugging
    Face models use as given."""
    import torch

    from megatron_normistral.model.attention import dense_attention_mask

    blocked = dense_attention_mask(batch["document_ids"], batch["masked"])
    return torch.zeros(blocked.shape, dtype=dtype).masked_fill_(blocked, torch.finfo(dtype).min)


def _score(model, batches: list[dict], specials: list[int], causal: bool) -> tuple[float, int]:
    """(summed NLL, counted tokens) in causal mode; (right predictions, counted positions) in
    masked mode; over the positions the batches' loss masks select."""
    import torch

    device = next(model.parameters()).device
    specials_t = torch.tensor(sorted(specials), dtype=torch.int64)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            scored = batch["loss_mask"].bool()
            if causal:  # special targets never count, also those above num_special_tokens
                scored &= ~torch.isin(batch["labels"], specials_t)
            logits = model(input_ids=batch["tokens"].to(device), position_ids=batch["position_ids"].to(device),
                           attention_mask=_attention_bias(batch, model.dtype).to(device), use_cache=False).logits
            logits, labels, scored = logits.float(), batch["labels"].to(device), scored.to(device)
            if causal:
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
                total += float((nll * scored.flatten()).sum(dtype=torch.float64))
            else:
                total += int(((logits.argmax(-1) == labels) & scored).sum())
            count += int(scored.sum())
    return total, count


def _time_generation(model, tokenizer: ModelTokenizer, prompt: list[int], new_tokens: int) -> dict:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eod_id

    def generate(n: int):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    generate(2)  # warm-up: kernels, caches, allocator
    start = time.perf_counter()
    out = generate(new_tokens)
    seconds = time.perf_counter() - start
    made = out.shape[1] - len(prompt)
    return {"new_tokens": made, "prompt_tokens": len(prompt), "seconds": seconds, "s_per_token": seconds / made}


def evaluate_model(folder: str | os.PathLike, settings: EvalSettings, label: str | None = None,
                   log: Log | None = print, tokenizer: str | None = None) -> ModelResult:
    """Held-out loss per word, tokens per word, masked-token accuracy and generation cost of one
    model folder (see the module docstring). ``tokenizer``: a tokenizer spec for a folder without
    one of its own (None: the folder's)."""
    from megatron_normistral.training.batches import SpecialIds
    from megatron_normistral.training.evaluation import EvalPacking, budgeted_paragraphs, eval_batches, prepare_eval_data

    log = log or (lambda _: None)
    started = time.perf_counter()
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{folder}: not a Hugging Face model folder (no config.json); give a local folder "
                         f"(tools/convert_checkpoint.py mcore-to-hf writes one)")
    tokenizer = ModelTokenizer.of_spec(tokenizer) if tokenizer else ModelTokenizer.of_folder(folder)
    model = load_model(folder, settings)
    _check_windows(model, settings)
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} entries, the model {vocab}")
    limit = settings.num_special_tokens if settings.num_special_tokens is not None else tokenizer.leading_specials()
    bos = tokenizer.bos_id if tokenizer.adds_bos else None
    notes = []
    mask_id = tokenizer.mask_id
    below = [i for i in (tokenizer.eod_id, bos, mask_id) if i is not None]
    if mask_id is not None and any(i >= limit for i in below):
        notes.append(f"no masked accuracy: <s>/</s>/<mask> ({below}) are not all below the special-token limit {limit}, "
                     f"so masked spans could cover them")
        mask_id = None
    ids = SpecialIds(eod_id=tokenizer.eod_id, mask_id=mask_id, vocab_size=vocab, bos_id=bos)
    objective = replace(settings.objective, num_special_tokens=limit)
    packing = EvalPacking(settings.seq_length, max_words=settings.max_words, bos_id=bos, num_special_tokens=limit)
    log(f"[{label or folder}] {sum(p.numel() for p in model.parameters()):,} parameters, {model.dtype}, "
        f"{next(model.parameters()).device}; vocabulary {vocab:,}, special ids below {limit}, "
        f"{'<s> before each paragraph' if bos is not None else 'no <s>'}, <mask> {mask_id}")
    languages = {}
    for language, path in settings.sets.items():
        data = prepare_eval_data(language, path, tokenizer, packing)
        nll, tokens = _score(model, eval_batches(data, replace(objective, masked_fraction=0.0), ids, settings.micro_batch_size),
                             tokenizer.special_ids, causal=True)
        if tokens != data.tokens:
            raise RuntimeError(f"{language}: scored {tokens:,} tokens but the text has {data.tokens:,} (a bug)")
        accuracy, positions = None, 0
        if mask_id is not None:
            right, positions = _score(model, eval_batches(data, replace(objective, masked_fraction=1.0), ids,
                                                          settings.micro_batch_size), tokenizer.special_ids, causal=False)
            accuracy = right / positions if positions else None
        languages[language] = LanguageResult(language, words=data.words, tokens=data.tokens,
                                             tokens_per_word=data.tokens / data.words, loss=nll / data.tokens,
                                             loss_per_word=nll / data.words, masked_accuracy=accuracy,
                                             masked_positions=positions)
        log(f"[{label or folder}] {language}: {data.words:,} words, {data.tokens:,} tokens, loss per word "
            f"{nll / data.words:.4f}" + (f", masked accuracy {accuracy:.4f}" if accuracy is not None else ""))
    generation = None
    if settings.generation_tokens > 0 and settings.sets:
        first = next(iter(settings.sets.values()))
        prompt_text = " ".join(budgeted_paragraphs(first, settings.prompt_words))
        prompt = ([bos] if bos is not None else []) + tokenizer.encode(prompt_text)
        generation = _time_generation(model, tokenizer, prompt, settings.generation_tokens)
        for result in languages.values():
            result.generation_s_per_1000_words = generation["s_per_token"] * result.tokens_per_word * 1000
        log(f"[{label or folder}] generation: {generation['new_tokens']} tokens in {generation['seconds']:.2f} s "
            f"after a {generation['prompt_tokens']}-token prompt")
    result = ModelResult(model=str(folder), label=label or Path(folder).name, parameters=sum(p.numel() for p in model.parameters()),
                         vocab_size=vocab, dtype=str(model.dtype).replace("torch.", ""),
                         device=str(next(model.parameters()).device), num_special_tokens=limit, bos=bos is not None,
                         languages=languages, generation=generation, notes=notes)
    log(f"[{result.label}] done in {time.perf_counter() - started:.1f} s")
    del model
    gc.collect()
    return result


def evaluate_models(folders: Sequence[str | os.PathLike], settings: EvalSettings, labels: Sequence[str] | None = None,
                    log: Log | None = print, tokenizers: Sequence[str | None] | None = None) -> list[ModelResult]:
    """:func:`evaluate_model` for each folder, one after the other (one model in memory at a time);
    ``labels`` and ``tokenizers`` (None: the folder's own) by position."""
    labels, tokenizers = list(labels or []), list(tokenizers or [])
    return [evaluate_model(f, settings, labels[i] if i < len(labels) else None, log,
                           tokenizers[i] if i < len(tokenizers) else None) for i, f in enumerate(folders)]


def results_table(results: Sequence[ModelResult]) -> str:
    """One Markdown table: a row per model and language."""
    rows = ["| model | language | words | tokens/word | loss/token | loss/word | masked accuracy | generation s / 1,000 words |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for lang in r.languages.values():
            accuracy = f"{lang.masked_accuracy:.4f}" if lang.masked_accuracy is not None else "–"
            gen = f"{lang.generation_s_per_1000_words:.2f}" if lang.generation_s_per_1000_words is not None else "–"
            rows.append(f"| {r.label} | {lang.language} | {lang.words:,} | {lang.tokens_per_word:.3f} | {lang.loss:.4f} | "
                        f"{lang.loss_per_word:.4f} | {accuracy} | {gen} |")
    return "\n".join(rows)
