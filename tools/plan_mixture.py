#!/usr/bin/env python
"""Print the mixture plan (samples, epochs, unique and total tokens per corpus) without
training: of a training recipe (every phase, mixture changes included, as the run will print
it) or of a mixture config. Fails, naming the corpus, when one would exceed its max_epochs
(unless the config or --allow-redistribute allows redistribution).

A training recipe (YAML, as pretrain_normistral.py --config takes it): the run length, sequence
length and seed come from its training section, the corpora and changes from its data section.

A mixture config (JSON or YAML): MixtureConfig's fields, each corpus as a recipe's data.corpora
gives it (data/mixture.py's CorpusSpec), plus an optional "tokens": N instead of reading
PREFIX.idx (all corpora or none):
    {"seq_length": 4096, "seed": 1234, "allow_redistribute": false,
     "corpora": [{"prefix": "data/nb", "language": "nb", "weight": 0.488, "max_epochs": 4}, ...]}
Examples:
    python tools/plan_mixture.py --recipe examples/normistral_11b/stage3_full.yaml
    python tools/plan_mixture.py examples/data/mixture_paper.json --steps 60000 --global-batch 1024
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.data.indexed import check_corpus_files  # noqa: E402
from megatron_normistral.data.mixture import compute_plan, load_mixture_config  # noqa: E402
from megatron_normistral.tool_io import one_line, run_tool  # noqa: E402


def load_config(path: str):
    """(config, tokens or None); a missing or malformed file is one ValueError naming it, and
    every corpus prefix it names is checked (.bin/.idx exist and agree) unless it gives tokens."""
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file (give a mixture config, .json or .yaml)")
    try:
        cfg, tokens = load_mixture_config(path)
    except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        why = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else one_line(e)
        raise ValueError(f"{path}: not a valid mixture config ({why})") from None
    if tokens is None:
        for corpus in cfg.corpora:
            check_corpus_files(corpus.prefix)
    return cfg, tokens


def recipe_plans(path: str, args: argparse.Namespace) -> list:
    """The plans of the recipe's mixture phases, with the command line's overrides."""
    from megatron_normistral.config.recipe import load_recipe
    from megatron_normistral.training.data_setup import mixture_plans

    recipe = load_recipe(path)
    t = recipe.training
    t.train_iters = args.steps if args.steps is not None else t.train_iters
    t.global_batch_size = args.global_batch if args.global_batch is not None else t.global_batch_size
    t.seq_length = args.seq_length or t.seq_length
    recipe.data.allow_redistribute = recipe.data.allow_redistribute or args.allow_redistribute
    return mixture_plans(recipe)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("config", nargs="?", help="mixture config file (.json, .yaml or .yml); or give --recipe")
    p.add_argument("--recipe", metavar="RECIPE.yaml", help="a training recipe: plan every phase of its run")
    p.add_argument("--train-samples", type=int, help="run length in sequences (or give --steps and --global-batch); "
                   "not with --recipe")
    p.add_argument("--steps", type=int, help="training steps (run length = steps x global batch); with --recipe: "
                   "instead of its training.train_iters")
    p.add_argument("--global-batch", type=int, help="sequences per step; with --recipe: instead of its "
                   "training.global_batch_size")
    p.add_argument("--seq-length", type=int, help="override the config's (the recipe's) seq_length")
    p.add_argument("--allow-redistribute", action="store_true",
                   help="cap corpora at max_epochs and give their excess to the others (default: error)")
    p.add_argument("--save", metavar="PLAN.json", help="also write the plan as JSON (with --recipe: "
                   '{"phases": [plan, ...]}, as the run\'s mixture_plan.json without its fingerprint)')
    args = p.parse_args(argv)
    if (args.config is None) == (args.recipe is None):
        p.error("give a mixture config or --recipe RECIPE.yaml (one of them)")
    if args.recipe is not None and args.train_samples is not None:
        p.error("--train-samples does not apply to --recipe (its mixture changes are at steps): give --steps")
    if args.config is not None and args.train_samples is None:
        if args.steps is None or args.global_batch is None:
            p.error("give --train-samples, or --steps and --global-batch")
        args.train_samples = args.steps * args.global_batch

    def run() -> int:
        if args.recipe is not None:
            plans = recipe_plans(args.recipe, args)
            saved = {"phases": [plan.to_dict() for plan in plans]}
        else:
            cfg, tokens = load_config(args.config)
            if args.seq_length:
                cfg.seq_length = args.seq_length
            if args.allow_redistribute:
                cfg.allow_redistribute = True
            plans = [compute_plan(cfg, args.train_samples, corpus_tokens=tokens)]  # EpochCapError names the corpus
            saved = plans[0].to_dict()
        for plan in plans:
            plan.print(sys.stdout)
        if args.save:
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save).write_text(json.dumps(saved, indent=2) + "\n")
            print(f"saved {args.save}")
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
