#!/usr/bin/env python
"""Score local Hugging Face causal LMs on held-out text with the training loop's metrics: loss per
word (the same words for every tokenizer), tokens per word, masked-token accuracy (where the
tokenizer has <mask>) and generation time per 1,000 words; several --model folders give one table
(thin CLI over megatron_normistral.reporting.model_evaluation). Offline: local folders only."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.reporting.files import save_json, save_text  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402

EPILOG = """\
The text, windows, document masks and masked spans are those of the training loop's evaluation
(training/evaluation.py): the first --max-words words of each file, each paragraph packed as
<s> text </s> (<s> when the model's tokenizer adds it) into windows of --seq-length, attention
within each paragraph (causal; bidirectional for masked accuracy). With --recipe, the run's own
settings (data.eval_sets, evaluation.max_words, training.seq_length, the objective) are used, so
the numbers equal those the run logged for the same weights; flags given override them.
Generation: seconds per new token (greedy, batch 1, --generation-tokens after a held-out prompt)
x the text's tokens per word x 1000.

Example (an exported model against the source model, same words):
  python tools/evaluate_model.py --model normistral-11b-hf --model checkpoints/nemo-hf \\
      --eval nb=heldout/nb.jsonl.gz --eval nn=heldout/nn.jsonl.gz --seq-length 4096 --json eval.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a local Hugging Face model folder (config.json, weights, tokenizer). Repeat to compare")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="display name of each --model, in order (default: the folder name)")
    p.add_argument("--tokenizer", action="append", default=None, metavar="SPEC",
                   help="tokenizer of each --model, in order: 'own' (the folder's, read with AutoTokenizer; the "
                        "default), or 'tekken', a SentencePiece .model, a tokenizer folder, for a model folder "
                        "written without a tokenizer")
    p.add_argument("--recipe", default=None, metavar="RECIPE.yaml",
                   help="take the held-out sets and evaluation settings from this training recipe")
    p.add_argument("--eval", action="append", default=None, metavar="LANG=PATH",
                   help="held-out text of a language: JSONL(.gz) with a 'text' field (or parquet, a saved dataset). "
                        "Repeat per language; replaces the recipe's data.eval_sets")
    p.add_argument("--max-words", type=int, default=None,
                   help="words per language: the first N of each file (default: the recipe's, else 32768; 0: all)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="tokens per window (default: the recipe's training.seq_length, else 4096)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="windows per forward pass; the scores do not depend on it (default: the recipe's, else 1)")
    p.add_argument("--num-special-tokens", type=int, default=None,
                   help="ids below this are never scored or masked (default: the recipe's objective.num_special_tokens, "
                        "else the run of special tokens at the start of each model's vocabulary)")
    p.add_argument("--generation-tokens", type=int, default=128,
                   help="new tokens generated to time each model (default 128; 0: no timing)")
    p.add_argument("--prompt-words", type=int, default=64,
                   help="words of the first held-out file used as the generation prompt (default 64)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and activations: auto (the checkpoint's), fp32, bf16, fp16 (default auto)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write every number as JSON to this file")
    p.add_argument("--markdown", default=None, metavar="OUT.md", help="also write the table to this Markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach the Hub
    from megatron_normistral.training.errors import RecipeError

    return run_tool(lambda: _evaluate(args), also=(RecipeError,))


def settings_from_args(args: argparse.Namespace):
    from megatron_normistral.reporting.model_evaluation import EvalSettings, settings_from_recipe
    from megatron_normistral.tokenizer.corpus import parse_assignments

    for flag in ("max_words", "generation_tokens", "prompt_words", "num_special_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 0")
    for flag in ("seq_length", "micro_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    for flag in ("label", "tokenizer"):
        values = getattr(args, flag)
        if values and len(values) != len(args.model):
            raise ValueError(f"--{flag} given {len(values)} times for {len(args.model)} --model folders: give one per model")
    if args.recipe:
        from megatron_normistral.config.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        if recipe.evaluation.max_tokens is not None:
            print(f"note: {args.recipe}: evaluation.max_tokens is not applied here; every model is scored on the "
                  f"same evaluation.max_words words", file=sys.stderr)
        settings = settings_from_recipe(recipe)
    else:
        settings = EvalSettings(sets={})
    given = {"seq_length": args.seq_length, "max_words": args.max_words, "micro_batch_size": args.micro_batch_size,
             "num_special_tokens": args.num_special_tokens}
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None},
                       sets=parse_assignments(args.eval, "--eval") if args.eval else settings.sets,
                       generation_tokens=args.generation_tokens, prompt_words=args.prompt_words, device=args.device,
                       dtype=args.dtype)
    if not settings.sets:
        raise ValueError("no held-out text: give --eval LANG=PATH (repeat per language) or a --recipe with data.eval_sets")
    for language, path in settings.sets.items():
        if not Path(path).exists():
            raise ValueError(f"{path}: held-out text for {language} not found")
    return settings


def _evaluate(args: argparse.Namespace) -> int:
    from megatron_normistral.reporting.model_evaluation import evaluate_models, results_table

    settings = settings_from_args(args)
    tokenizers = [None if t == "own" else t for t in args.tokenizer or []]
    results = evaluate_models(args.model, settings, args.label, tokenizers=tokenizers)
    table = results_table(results)
    print(table)
    for r in results:
        for note in r.notes:
            print(f"note: {r.label}: {note}")
    if args.markdown:
        save_text(args.markdown, table + "\n")
    if args.json:
        payload = {"settings": {"sets": settings.sets, "seq_length": settings.seq_length, "max_words": settings.max_words,
                                "micro_batch_size": settings.micro_batch_size, "objective": vars(settings.objective),
                                "generation_tokens": settings.generation_tokens, "prompt_words": settings.prompt_words},
                   "models": [r.to_dict() for r in results]}
        save_json(args.json, payload, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
