"""Write the demo's report.md and its PNGs from what the steps left in the run folder.

Beside the tables of the steps' own logs, the report measures what the method claims, from the
run's checkpoints, data and evaluation logs (every figure computed here, none typed): the
initialisations of the new tokens' rows compared before any training, a checksum of the
transformer weights before and after stage 2, English before and after the whole pipeline, and
masked-token accuracy against predictors that learned nothing. They also go to claims.json."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

from megatron_normistral.reporting.run_plots import read_run_log

LANGS = ["nb", "nn", "se", "sv", "da", "en"]
TRAININGS = ("source", "stage2", "stage3")  # their step logs: logs/<name>.jsonl
PHASES = [
    ("source", "source model (Tekken, English-centric)"),
    ("mean_of_pieces", "transferred, before stage 2"),
    ("stage2", "after stage 2 (embeddings)"),
    ("stage3", "after stage 3 (full, hybrid)"),
]
# Initialisations of the new tokens' rows, each scored before any training by
# tools/evaluate_model.py (logs/eval_init.json, a model per label); the first is the method's
# (run_demo.INIT_VARIANTS says how the others were made).
INITIALISATIONS = [
    ("mean_of_pieces", "mean of pieces, input embeddings and LM head (the method)"),
    ("head_random", "mean of pieces, input embeddings only; LM head random (the authors' variant, method.md)"),
    ("random", "random rows for every new token"),
]


def evaluate_model_results(path: Path) -> dict[str, dict[str, dict]]:
    """tools/evaluate_model.py's --json: label -> language -> its figures (the keys the step
    logs' evaluation records use: loss_per_word, masked_accuracy, words, tokens)."""
    return {m["label"]: m["languages"] for m in json.loads(path.read_text())["models"]}


def last_eval(evals: list[dict]) -> dict[str, dict]:
    """Language -> its record at the run's last evaluated step (``RunLog.evals``)."""
    if not evals:
        return {}
    last = max(r["step"] for r in evals)
    return {r["eval"]: r for r in evals if r["step"] == last}


def mixture_plan_text(run: Path) -> str:
    log = run / "logs" / "stage3.log"
    if not log.exists():
        return "(not found)"
    lines = log.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Mixture plan")), None)
    if start is None:
        return "(not found)"
    block = [lines[start]]
    for line in lines[start + 1 :]:
        block.append(line)
        if line.startswith("total"):
            break
    return "\n".join(block)


def source_mixture(recipe: Path) -> str:
    """The source model's training text as the recipe it ran gives it, e.g. 'en 70%, da 30%'
    (each corpus's share of the weights)."""
    import yaml

    corpora = yaml.safe_load(recipe.read_text())["data"]["corpora"]
    total = sum(c["weight"] for c in corpora)
    return ", ".join(f"{c['language']} {c['weight'] / total:.0%}" for c in corpora)


def latest_checkpoint(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def transformer_checksum(ckpt: Path) -> dict:
    """sha256 of every transformer weight of a megatron-core checkpoint: all model tensors but
    the input embedding and the LM head (the decoder layers and the final norm, i.e. the keys
    under ``decoder.``), each read whole, in global (TP=1, PP=1) coordinates so that checkpoints
    of different layouts compare, in key order, with its key, dtype and shape."""
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_normistral.convert.mcore_io import checkpoint_tensor_metadata

    metadata = checkpoint_tensor_metadata(ckpt)
    keys = sorted(k for k in metadata if k.startswith("decoder."))
    if not keys:
        raise ValueError(f"{ckpt}: no transformer weights (keys under 'decoder.')")
    tensors = {k: torch.empty(tuple(metadata[k].size), dtype=metadata[k].properties.dtype) for k in keys}
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    digest = hashlib.sha256()
    for k in keys:
        t = tensors[k].contiguous()
        digest.update(f"{k} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return {"checkpoint": str(ckpt), "sha256": digest.hexdigest(), "tensors": len(keys),
            "values": sum(t.numel() for t in tensors.values())}


def masked_baselines(run: Path) -> dict:
    """How often predictors that learned nothing are right on the very positions that stage 3's
    evaluation scores in masked mode (its recipe: the same held-out words, packing, masks and
    labels, from evaluation's own ``eval_batches``). Constant predictions: the most frequent
    regular token of the training data (the stage 3 corpora, each counted once), and the best
    single token for these positions, chosen with hindsight (no constant prediction does
    better). For reference, copying the input token at the label's position, which needs no
    knowledge of the language (a kept span shows its own token; the window's last label has none)."""
    from dataclasses import replace

    import numpy as np
    import torch

    from megatron_normistral.config.recipe import load_recipe
    from megatron_normistral.data.indexed import IndexedReader
    from megatron_normistral.tokenizer import load_tokenizer
    from megatron_normistral.training.batches import SpecialIds
    from megatron_normistral.training.data_setup import documents_start_with_bos, prepare_eval_sets
    from megatron_normistral.training.evaluation import eval_batches

    recipe = load_recipe(run / "recipes" / "stage3_full.yaml")
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    bos_id = tokenizer.bos_id if documents_start_with_bos(recipe, tokenizer) else None
    ids = SpecialIds(eod_id=tokenizer.eod_id, mask_id=tokenizer.mask_id, vocab_size=recipe.model.architecture().vocab_size,
                     bos_id=bos_id)
    counts = sum(np.bincount(IndexedReader(c.prefix).tokens, minlength=ids.vocab_size) for c in recipe.data.corpora)
    counts[: recipe.objective.num_special_tokens] = 0
    frequent = int(counts.argmax())
    masked = replace(recipe.objective, masked_fraction=1.0)
    languages = {}
    for data in prepare_eval_sets(recipe, tokenizer, bos_id):
        label_counts = np.zeros(ids.vocab_size, dtype=np.int64)
        copy_right = 0
        for batch in eval_batches(data, masked, ids, recipe.training.micro_batch_size):
            scored = batch["loss_mask"].bool()
            labels = batch["labels"]
            visible = torch.cat([batch["tokens"][:, 1:], torch.full_like(labels[:, :1], -1)], dim=1)
            label_counts += np.bincount(labels[scored].numpy(), minlength=ids.vocab_size)
            copy_right += int((scored & (labels == visible)).sum())
        positions = int(label_counts.sum())
        if positions:
            best = int(label_counts.argmax())
            languages[data.language] = {"positions": positions, "most_frequent": int(label_counts[frequent]) / positions,
                                        "best_constant": int(label_counts[best]) / positions,
                                        "best_constant_token": _surface(tokenizer, best), "copy_visible": copy_right / positions}
    return {"most_frequent_id": frequent, "most_frequent_token": _surface(tokenizer, frequent),
            "training_tokens": int(counts.sum()), "languages": languages}


def _surface(tokenizer, token_id: int) -> str:
    return (tokenizer.token_surface(token_id) or b"").decode("utf-8", "replace")


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _compare(ours: dict[str, float], other: dict[str, float], lower_is_better: bool) -> dict:
    """Where ``ours`` beats ``other``, language by language, and on the mean over the languages
    both have; ``holds``: yes (the mean and every language), partly (the mean), no."""
    common = [lang for lang in LANGS if ours.get(lang) is not None and other.get(lang) is not None]
    better = [lang for lang in common if (ours[lang] < other[lang] if lower_is_better else ours[lang] > other[lang])]
    a, b = _mean(ours[lang] for lang in common), _mean(other[lang] for lang in common)
    mean_better = a < b if lower_is_better else a > b
    holds = "yes" if common and mean_better and len(better) == len(common) else "partly" if mean_better else "no"
    return {"ours": a, "other": b, "better_in": len(better), "better_languages": better, "languages": len(common),
            "holds": holds}


def measure_claims(run: Path, evals: dict[str, dict[str, dict]]) -> dict:
    """What the method claims, measured on this run (see the module docstring). ``evals``: model
    -> language -> its held-out figures (the trainings' last evaluation, the initialisations')."""
    loss = {name: {lang: r["loss_per_word"] for lang, r in e.items()} for name, e in evals.items()}
    claims: dict = {"initialisations": {name: loss.get(name, {}) for name, _ in INITIALISATIONS}}
    claims["transferred_vs_random"] = _compare(loss["mean_of_pieces"], loss["random"], lower_is_better=True)
    claims["head_mean_vs_input_only"] = _compare(loss["mean_of_pieces"], loss["head_random"], lower_is_better=True)
    # What the source model knows, per language: its loss per token against a uniform guess over
    # its vocabulary (the transfer can only carry over what the source model has learnt).
    source_vocab = json.loads((run / "source" / "hf" / "config.json").read_text())["vocab_size"]
    claims["source_vs_uniform"] = {"vocab_size": source_vocab, "uniform_loss": math.log(source_vocab),
                                   "loss": {lang: r["loss"] for lang, r in evals["source"].items()},
                                   "better_languages": [lang for lang in LANGS if evals["source"][lang]["loss"] < math.log(source_vocab)]}

    checksums = {"source": transformer_checksum(latest_checkpoint(run / "source" / "ckpt")),
                 "before_stage2": transformer_checksum(run / "transferred" / "mcore"),
                 "after_stage2": transformer_checksum(latest_checkpoint(run / "stage2" / "ckpt")),
                 "after_stage3": transformer_checksum(latest_checkpoint(run / "stage3" / "ckpt"))}
    claims["checksums"] = checksums

    source_en, final_en = evals["source"]["en"], evals["stage3"]["en"]
    claims["english"] = {"source": source_en["loss_per_word"], "final": final_en["loss_per_word"],
                         "source_words": source_en["words"], "final_words": final_en["words"],
                         "difference": final_en["loss_per_word"] - source_en["loss_per_word"]}

    baselines = masked_baselines(run)
    final_accuracy = {lang: r.get("masked_accuracy") for lang, r in evals["stage3"].items()}
    best_constant = {lang: b["best_constant"] for lang, b in baselines["languages"].items()}
    claims["masked"] = {"baselines": baselines, "final": final_accuracy,
                        **_compare(final_accuracy, best_constant, lower_is_better=False),
                        "vs_copy_visible": _compare(final_accuracy, {lang: b["copy_visible"] for lang, b in baselines["languages"].items()},
                                                    lower_is_better=False)}
    return claims


def _short(checksum: dict) -> str:
    return f"`{checksum['sha256'][:16]}`"


def claims_section(claims: dict) -> str:
    def row(name, value):
        return f"| {name} | " + " | ".join("–" if value.get(lang) is None else f"{value[lang]:.3f}" for lang in LANGS) \
            + f" | {_mean(value.get(lang) for lang in LANGS):.3f} |"

    header = f"| {{}} | {' | '.join(LANGS)} | mean |\n|---|{'---|' * (len(LANGS) + 1)}"
    init_rows = "\n".join(row(label, claims["initialisations"][key]) for key, label in INITIALISATIONS)
    m = claims["masked"]
    b = m["baselines"]
    base_rows = "\n".join([
        row("final model", m["final"]),
        row(f"always the most frequent training token ({b['most_frequent_token']!r}, id {b['most_frequent_id']})",
            {lang: v["most_frequent"] for lang, v in b["languages"].items()}),
        row("always the best single token for these positions, chosen with hindsight",
            {lang: v["best_constant"] for lang, v in b["languages"].items()}),
        row("copy the input token at the label's position", {lang: v["copy_visible"] for lang, v in b["languages"].items()}),
    ])
    positions = ", ".join(f"{lang} {v['positions']:,}" for lang, v in b["languages"].items())
    best_tokens = ", ".join(f"{lang} {v['best_constant_token']!r}" for lang, v in b["languages"].items())
    su = claims["source_vs_uniform"]

    def versus(c: dict, what: str, ours: str, other: str) -> str:
        where = f" ({', '.join(c['better_languages'])})" if 0 < c["better_in"] < c["languages"] else ""
        return (f"{what}, mean of {c['languages']} languages: {c['ours']:.3f} ({ours}) vs {c['other']:.3f} ({other}); "
                f"{'lower' if 'loss' in what else 'higher'} in {c['better_in']} of {c['languages']} languages{where}")

    def same(a: dict, b: dict) -> str:
        return "identical" if a["sha256"] == b["sha256"] else "differ"

    cs = claims["checksums"]
    tensors = f"sha256 of the {cs['before_stage2']['tensors']} transformer tensors ({cs['before_stage2']['values']:,} values)"
    en = claims["english"]
    words = f"the same {en['source_words']:,} held-out words" if en["source_words"] == en["final_words"] else \
        f"DIFFERENT held-out words ({en['source_words']:,} vs {en['final_words']:,})"
    direction = "worse" if en["difference"] > 0 else "better"
    rows = [
        ("mean-of-pieces rows beat random rows (before any training)",
         versus(claims["transferred_vs_random"], "loss per word", "mean of pieces", "random rows"), claims["transferred_vs_random"]["holds"]),
        ("the mean-of-pieces LM head beats the input-embeddings-only variant (before any training)",
         versus(claims["head_mean_vs_input_only"], "loss per word", "both", "LM head random"), claims["head_mean_vs_input_only"]["holds"]),
        ("the transfer copies the source model's transformer bit for bit",
         f"{tensors}: source model {_short(cs['source'])}, transferred {_short(cs['before_stage2'])}", same(cs["source"], cs["before_stage2"])),
        ("stage 2 leaves every transformer weight bit-identical",
         f"{tensors}: before stage 2 {_short(cs['before_stage2'])}, after {_short(cs['after_stage2'])} "
         f"(after stage 3, which trains them: {_short(cs['after_stage3'])}, {same(cs['after_stage2'], cs['after_stage3'])})",
         same(cs["before_stage2"], cs["after_stage2"])),
        ("English held-out loss per word, final model vs source model",
         f"on {words}: source {en['source']:.3f}, final {en['final']:.3f}; final − source = {en['difference']:+.3f} "
         f"({en['difference'] / en['source']:+.1%})", f"{direction} by {abs(en['difference']):.3f}"),
        ("the masked mode learns (accuracy above every constant prediction)",
         versus(m, "masked-token accuracy", "final model", "the best single token, chosen with hindsight")
         + f"; copying the input token at the label's position gets {m['vs_copy_visible']['other']:.3f}", m["holds"]),
    ]
    claim_rows = "\n".join(f"| {name} | {measured} | {verdict} |" for name, measured, verdict in rows)
    return f"""## The method's claims, measured

Each row is computed by the demo from this run's checkpoints, data and held-out evaluation.

| claim | measured | holds |
|---|---|---|
{claim_rows}

Held-out loss per word before any training, by the initialisation of the new tokens' rows (same
source transformer, same tokenizer, same words; `tools/transfer_embeddings.py --init/--head`;
special tokens follow the transfer's table in all three):

{header.format("initialisation")}
{init_rows}

Languages where the source model's loss per token beats a uniform guess over its
{su['vocab_size']:,} entries (ln {su['vocab_size']} = {su['uniform_loss']:.3f}): {', '.join(su['better_languages']) or 'none'};
where the transferred rows beat random rows: {', '.join(claims['transferred_vs_random']['better_languages']) or 'none'}.

Masked-token accuracy on the positions stage 3's evaluation scores in masked mode (positions:
{positions}), the final model vs predictors that learned nothing (best single tokens: {best_tokens}):

{header.format("predictor")}
{base_rows}
"""


def write_report(run: Path, scale, timings: dict[str, tuple[float, float]], source_recipe: Path) -> None:
    # tools/plot_run.py's reader: one record per step (a resumed step's last), evaluations apart.
    logs = {name: read_run_log(run / "logs" / f"{name}.jsonl", name) for name in TRAININGS}
    evals = {name: last_eval(log.evals) for name, log in logs.items()}
    evals.update(evaluate_model_results(run / "logs" / "eval_init.json"))
    started, cpu_started = time.perf_counter(), time.process_time()
    claims = measure_claims(run, evals)
    timings = dict(timings, **{"report: claims measured": (time.perf_counter() - started, time.process_time() - cpu_started)})
    (run / "claims.json").write_text(json.dumps(claims, indent=1, ensure_ascii=False) + "\n")
    table = {name: {lang: r["loss_per_word"] for lang, r in evals[name].items()} for name, _ in PHASES}
    accuracy = {name: {lang: r.get("masked_accuracy") for lang, r in evals[name].items()} for name, _ in PHASES}
    source_text = source_mixture(source_recipe)
    show = json.loads((run / "showcase.json").read_text())
    new, source = json.loads((run / "logs" / "inference.json").read_text())["models"]
    fertility = (run / "fertility.md").read_text() if (run / "fertility.md").exists() else "(not found)"

    def fmt(v):
        return "–" if v is None or v != v else f"{v:.3f}"

    eval_rows = "\n".join(f"| {label} | " + " | ".join(fmt(table[key].get(lang)) for lang in LANGS) + " |" for key, label in PHASES)
    acc_rows = "\n".join(f"| {label} | " + " | ".join(fmt(accuracy[key].get(lang)) for lang in LANGS) + " |" for key, label in PHASES[1:])
    speed_rows = []
    for name in ("source", "stage2", "stage3"):
        recs = logs[name].train[1:]  # the first step includes warm-up
        if recs:
            speed_rows.append(f"| {name} | {len(recs) + 1} | {statistics.median(r['tokens_per_s'] for r in recs):,.0f} | "
                              f"{statistics.median(r['step_time_s'] for r in recs):.3f} |")
    new_nb, source_nb = new["languages"]["nb"], source["languages"]["nb"]
    generation_ratio = new_nb["generation_s_per_1000_words"] / source_nb["generation_s_per_1000_words"]
    timing_rows = "\n".join(f"| {k} | {wall:.1f} | {cpu:.1f} |" for k, (wall, cpu) in timings.items())
    total_wall, total_cpu = sum(w for w, _ in timings.values()), sum(c for _, c in timings.values())
    mask_top = ", ".join(f"`{t!r}` ({p:.2f})" for t, p in show["mask_top5"])
    text = f"""# megatron-normistral CPU demo report

The whole pipeline of NorMistral-11b-warm, tiny: an English-centric source model with Tekken's
vocabulary, trained on {source_text} (the stand-in for Mistral-NeMo-Base-2407, which saw
multilingual text; no Norwegian), a new tokenizer ({scale.vocab_size} entries), embedding transfer, stage 2
(embeddings only, TP=2) and stage 3 (full, 90% causal / 10% masked next-token prediction,
PP=2), export to Hugging Face. Settings: {scale}.

{claims_section(claims)}
## Fertility (subword tokens per word)

{fertility}

![fertility](fertility.png)

## Held-out loss per word

Total negative log-likelihood of each language's held-out text divided by its number of words
(whitespace-separated), so the rows are comparable across tokenizers. Lower is better.

| model | {' | '.join(LANGS)} |
|---|{'---|' * len(LANGS)}
{eval_rows}

![eval](plots/eval_loss_per_word.png)

Masked-token accuracy (the model used bidirectionally on masked held-out text):

| model | {' | '.join(LANGS)} |
|---|{'---|' * len(LANGS)}
{acc_rows}

## Training

Curves by `tools/plot_run.py` (the source model, stage 2 and stage 3 end to end on one step
axis): ![loss curves](plots/loss.png) ![learning rate](plots/lr.png) ![gradient norm](plots/grad_norm.png)

| run | steps | median tokens/s | median step s |
|---|---|---|---|
{chr(10).join(speed_rows)}

Stage 3 mixture plan (upsampling; printed by the run before training):

```
{mixture_plan_text(run)}
```

## The exported model, with `transformers`

- Greedy continuation of "{show['prompt']}": `{show['continuation']!r}`
- Fill-mask "{show['mask_sentence'].format(mask='<mask>')}" (the original word: {show['mask_word']}): {mask_top}

## Inference cost: new tokenizer vs source

`tools/evaluate_model.py` on the same {new_nb['words']:,} words of held-out Bokmål (logs/inference.json),
both exported models read with `transformers`; generation: greedy, batch 1, {new['generation']['new_tokens']} new tokens
timed, seconds per token x tokens per word x 1,000:

| model | parameters | tokens per word | loss per word | generation s / 1,000 words |
|---|---:|---:|---:|---:|
| {new['label']} | {new['parameters'] / 1e6:.1f}M | {new_nb['tokens_per_word']:.3f} | {new_nb['loss_per_word']:.3f} | {new_nb['generation_s_per_1000_words']:.2f} |
| {source['label']} | {source['parameters'] / 1e6:.1f}M | {source_nb['tokens_per_word']:.3f} | {source_nb['loss_per_word']:.3f} | {source_nb['generation_s_per_1000_words']:.2f} |

Tokens per word: {new_nb['tokens_per_word'] / source_nb['tokens_per_word']:.2f} of the source's; generation time per word:
{generation_ratio:.2f} of the source's. At this tiny size the 131,072-entry output layer of the source model dominates
its time, so the time ratio overstates what the 11B model gains; the token ratio carries over.

## Step times

CPU seconds: user + system time of the demo and of the processes it ran (torchrun's workers
included), which a shared machine does not inflate as it does wall time.

| step | wall s | CPU s |
|---|---|---|
{timing_rows}
| total | {total_wall:.1f} | {total_cpu:.1f} |
"""
    (run / "report.md").write_text(text)
