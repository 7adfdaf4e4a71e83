"""Write the demo's report.md and its PNGs from what the steps left in the run folder."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

LANGS = ["nb", "nn", "se", "sv", "da", "en"]
PHASES = [
    ("source", "source model (Tekken, English only)"),
    ("eval_before", "transferred, before stage 2"),
    ("stage2", "after stage 2 (embeddings)"),
    ("stage3", "after stage 3 (full, hybrid)"),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(records: list[dict]) -> list[dict]:
    """Training lines, the last one of each step (a resumed step is logged again)."""
    by_step = {r["step"]: r for r in records if "eval" not in r}
    return [by_step[s] for s in sorted(by_step)]


def last_eval(records: list[dict]) -> dict[str, dict]:
    evals = [r for r in records if "eval" in r]
    if not evals:
        return {}
    last = max(r["step"] for r in evals)
    return {r["eval"]: r for r in evals if r["step"] == last}


def plot_losses(run: Path, logs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, title in zip(axes, ("source", "stage2", "stage3"), ("source model (English, Tekken)", "stage 2: embeddings only (TP=2)", "stage 3: full, hybrid objective (PP=2)")):
        recs = train_records(logs[name])
        steps = [r["step"] for r in recs]
        for key, label in (("loss_causal", "causal"), ("loss_masked", "masked")):
            pts = [(s, r[key]) for s, r in zip(steps, recs) if r[key] == r[key]]  # drop NaN (no masked sample)
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss per token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=90)
    plt.close(fig)


def plot_eval(run: Path, table: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(PHASES)
    x = np.arange(len(LANGS))
    for i, (key, label) in enumerate(PHASES):
        values = [table.get(key, {}).get(lang, float("nan")) for lang in LANGS]
        ax.bar(x + i * width, values, width, label=label)
    ax.set_xticks(x + width * (len(PHASES) - 1) / 2, LANGS)
    ax.set_ylabel("held-out loss per word (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "eval_loss_per_word.png", dpi=90)
    plt.close(fig)


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


def write_report(run: Path, scale, timings: dict[str, float]) -> None:
    logs = {name: read_jsonl(run / "logs" / f"{name}.jsonl") for name, _ in PHASES}
    table = {name: {lang: r["loss_per_word"] for lang, r in last_eval(logs[name]).items()} for name, _ in PHASES}
    accuracy = {name: {lang: r.get("masked_accuracy") for lang, r in last_eval(logs[name]).items()} for name, _ in PHASES}
    plot_losses(run, logs)
    plot_eval(run, table)
    show = json.loads((run / "showcase.json").read_text())
    fertility = (run / "fertility.md").read_text() if (run / "fertility.md").exists() else "(not found)"

    def fmt(v):
        return "–" if v is None or v != v else f"{v:.3f}"

    eval_rows = "\n".join(f"| {label} | " + " | ".join(fmt(table[key].get(lang)) for lang in LANGS) + " |" for key, label in PHASES)
    acc_rows = "\n".join(f"| {label} | " + " | ".join(fmt(accuracy[key].get(lang)) for lang in LANGS) + " |" for key, label in PHASES[1:])
    speed_rows = []
    for name in ("source", "stage2", "stage3"):
        recs = train_records(logs[name])[1:]  # the first step includes warm-up
        if recs:
            speed_rows.append(f"| {name} | {len(recs) + 1} | {statistics.median(r['tokens_per_s'] for r in recs):,.0f} | "
                              f"{statistics.median(r['step_time_s'] for r in recs):.3f} |")
    tokens_ratio = show["new_tokens"] / show["source_tokens"]
    time_ratio = show["new_forward_s"] / show["source_forward_s"]
    timing_rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in timings.items())
    mask_top = ", ".join(f"`{t!r}` ({p:.2f})" for t, p in show["mask_top5"])
    text = f"""# megatron-normistral CPU demo report

The whole pipeline of NorMistral-11b-warm, tiny: an English-only source model with Tekken's
vocabulary, a new tokenizer ({scale.vocab_size} entries), embedding transfer, stage 2
(embeddings only, TP=2) and stage 3 (full, 90% causal / 10% masked next-token prediction,
PP=2), export to Hugging Face. Settings: {scale}.

## Fertility (subword tokens per word)

{fertility}

![fertility](fertility.png)

## Held-out loss per word

Total negative log-likelihood of each language's held-out text divided by its number of words
(whitespace-separated), so the rows are comparable across tokenizers. Lower is better.

| model | {' | '.join(LANGS)} |
|---|{'---|' * len(LANGS)}
{eval_rows}

![eval](eval_loss_per_word.png)

Masked-token accuracy (the model used bidirectionally on masked held-out text):

| model | {' | '.join(LANGS)} |
|---|{'---|' * len(LANGS)}
{acc_rows}

## Training

![loss curves](loss.png)

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

The same {show['timing_words']} words of held-out Bokmål: {show['source_tokens']} Tekken tokens vs
{show['new_tokens']} new tokens (ratio {tokens_ratio:.2f}); forward time {show['source_forward_s'] * 1e3:.1f} ms vs
{show['new_forward_s'] * 1e3:.1f} ms (ratio {time_ratio:.2f}). At this tiny size the 131,072-entry output layer of the
source model ({show['source_parameters'] / 1e6:.1f}M parameters vs {show['new_parameters'] / 1e6:.1f}M) dominates the time,
so the time ratio overstates what the 11B model gains; the token ratio carries over.

## Step times (s)

| step | seconds |
|---|---|
{timing_rows}
"""
    (run / "report.md").write_text(text)
