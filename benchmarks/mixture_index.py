#!/usr/bin/env python
"""Time the mixture plan + global index for the full run: 60,000 steps x 1024 sequences of 4096
tokens (61.44M samples) over 9 corpora with the paper's blend weights and synthetic corpus
sizes from examples/data/mixture_paper.json (no files needed: the index depends only on each
corpus's token count).

Goal on the 2-core dev machine: under 5 s and 1.5 GB peak RSS. Prints numbers; asserts nothing.
    python benchmarks/mixture_index.py [--steps 60000 --global-batch 1024 --seq-length 4096]
    python benchmarks/mixture_index.py --change-at-step 13337   # a mid-run mixture change
With --change-at-step the run has two phases: the config's mixture planned over the whole run
and cut at that step, then the same corpora again from there (the cost does not depend on the
weights): the plans (with each corpus's count at the cut) and both phases' index are timed.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from megatron_normistral.data.mixture import (build_index_arrays, compute_plan, load_mixture_config,  # noqa: E402
                                              plan_phases)

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "data" / "mixture_paper.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=60_000, help="training steps")
    ap.add_argument("--global-batch", type=int, default=1024, help="sequences per step")
    ap.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--seed", type=int, default=1234, help="shuffle seed")
    ap.add_argument("--config", default=str(CONFIG), help="mixture config with synthetic sizes (default %(default)s)")
    ap.add_argument("--change-at-step", type=int, default=0,
                    help="also change the mixture at this step (0: no change, one phase)")
    args = ap.parse_args()
    n = args.steps * args.global_batch
    cfg, tokens = load_mixture_config(args.config)  # paper's weights, synthetic sizes ("tokens")
    cfg.seq_length, cfg.seed = args.seq_length, args.seed
    rss0 = peak_rss_mb()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if args.change_at_step:
        phases = [(0, cfg), (args.change_at_step * args.global_batch, cfg)]
        plans = plan_phases(phases, n, {c.prefix: t for c, t in zip(cfg.corpora, tokens)})
    else:
        plans = [compute_plan(cfg, n, corpus_tokens=tokens)]
    t1 = time.perf_counter()
    corpus, window = build_index_arrays([(p, list(range(len(cfg.corpora)))) for p in plans], args.seed)
    t2 = time.perf_counter()
    cpu_build = time.process_time() - cpu0
    with tempfile.TemporaryDirectory() as d:  # what the dataset's cache does
        np.save(Path(d) / "corpus.npy", corpus)
        np.save(Path(d) / "window.npy", window)
        t3 = time.perf_counter()
        c2 = np.load(Path(d) / "corpus.npy", mmap_mode="r")
        w2 = np.load(Path(d) / "window.npy", mmap_mode="r")
        g = n // 2
        _ = int(c2[g]), int(w2[g])
        t4 = time.perf_counter()
    peak = peak_rss_mb()
    for plan in plans:
        plan.print()
    # Check per chunk: bincount casts to int64, which would dwarf the index itself.
    counts = sum(np.bincount(corpus[i:i + (1 << 22)], minlength=len(cfg.corpora)) for i in range(0, n, 1 << 22))
    assert all(int(counts[i]) == sum(p.corpora[i].samples for p in plans) for i in range(len(cfg.corpora))), \
        "index disagrees with plan"
    print(f"\nsamples {n:,}{f', mixture change at sample {plans[1].start_sample:,}' if len(plans) > 1 else ''}; "
          f"index arrays {(corpus.nbytes + window.nbytes) / 1e6:.0f} MB (uint8 corpus + uint32 window)")
    print(f"plan {t1 - t0:.3f} s | build index (C++) {t2 - t1:.3f} s | save cache {t3 - t2:.3f} s | "
          f"reopen cache (mmap) {t4 - t3:.4f} s")
    print(f"total plan+build {t2 - t0:.3f} s wall, {cpu_build:.3f} s CPU; peak RSS {peak:.0f} MB "
          f"(after imports {rss0:.0f} MB); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
