#!/usr/bin/env python
"""Print the mixture plan (samples, epochs, unique and total tokens per corpus) for a config,
without training. Fails, naming the corpus, when one would exceed its max_epochs (unless the
config or --allow-redistribute allows redistribution).

Config (JSON or YAML):
    {"seq_length": 4096, "seed": 1234, "allow_redistribute": false,
     "corpora": [{"prefix": "data/nb", "language": "nb", "weight": 0.488, "max_epochs": 4}, ...]}
A corpus may give "tokens": N instead of reading PREFIX.idx (all corpora or none).
Example:
    python tools/plan_mixture.py examples/data/mixture_paper.json --steps 60000 --global-batch 1024
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.data.mixture import EpochCapError, compute_plan, load_mixture_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="mixture config file (.json, .yaml or .yml)")
    p.add_argument("--train-samples", type=int, help="run length in sequences (or give --steps and --global-batch)")
    p.add_argument("--steps", type=int, help="training steps (run length = steps x global batch)")
    p.add_argument("--global-batch", type=int, help="sequences per step")
    p.add_argument("--seq-length", type=int, help="override the config's seq_length")
    p.add_argument("--allow-redistribute", action="store_true",
                   help="cap corpora at max_epochs and give their excess to the others (default: error)")
    p.add_argument("--save", metavar="PLAN.json", help="also write the plan as JSON")
    args = p.parse_args(argv)
    if args.train_samples is None:
        if args.steps is None or args.global_batch is None:
            p.error("give --train-samples, or --steps and --global-batch")
        args.train_samples = args.steps * args.global_batch
    cfg, tokens = load_mixture_config(args.config)
    if args.seq_length:
        cfg.seq_length = args.seq_length
    if args.allow_redistribute:
        cfg.allow_redistribute = True
    try:
        plan = compute_plan(cfg, args.train_samples, corpus_tokens=tokens)
    except EpochCapError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    plan.print()
    if args.save:
        plan.save(args.save)
        print(f"saved {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
