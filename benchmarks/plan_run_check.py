#!/usr/bin/env python
"""The run planner (``tools/plan_run.py``) against measurement: for each tiny configuration of
``megatron_normistral.testing.memory_probes.CASES`` (bf16 per-document SDPA, a plain causal
batch at another length, the dense backend in fp32, stage 2, TP=2 with sequence parallelism,
DP=2 with the distributed optimizer), the model is built on CPU as training builds it (gloo,
one process, or two for TP=2 / DP=2), one optimizer step is taken, and rank 0's weights,
gradient buffers and optimizer state are summed by storage; the tensors one micro-batch's
forward saves for backward are summed (``saved_tensors_hooks``, storages deduplicated) without
recomputation, with selective and with full recomputation. Printed: planned vs measured bytes
and the plan's relative error per item, and the largest error per kind. Nothing is asserted
(``tests/tools/test_plan_run.py`` asserts).

    .venv/bin/python benchmarks/plan_run_check.py [--case NAME ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from megatron_normistral.testing.memory_probes import CASES, compare

    names = [case.name for case in CASES]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--case", action="append", choices=names, help="measure only this configuration (repeatable; default: all)")
    args = p.parse_args(argv)
    cases = [case for case in CASES if not args.case or case.name in args.case]
    print(f"load average {os.getloadavg()[0]:.2f} at start; device cpu, local layers")
    print("| configuration | item | planned bytes | measured bytes | error |")
    print("|---|---|---:|---:|---:|")
    worst = {"weights/gradients/optimizer": 0.0, "activations": 0.0}
    for case in cases:
        start = time.perf_counter()
        for item, planned, measured, error in compare(case):
            print(f"| {case.name} | {item} | {planned:,} | {measured:,} | {100 * error:+.3f}% |")
            kind = "activations" if item.startswith("activations") else "weights/gradients/optimizer"
            worst[kind] = max(worst[kind], abs(error))
        print(f"<!-- {case.name}: {time.perf_counter() - start:.1f} s, load {os.getloadavg()[0]:.2f} -->")
    for kind, error in worst.items():
        print(f"largest |error|, {kind}: {100 * error:.3f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
