#!/usr/bin/env python
"""Plot one or more runs' step logs (logging.json / --log-json of pretrain_normistral.py) as PNGs:
training loss (causal and masked), learning rate, gradient norm, throughput, and held-out loss
per word and masked-token accuracy per language. Several runs are placed end to end on one step
axis, in the order given (thin CLI over megatron_normistral.reporting.run_plots.plot_runs)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.reporting.run_plots import parse_run_argument, plot_runs, read_run_log  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402

EPILOG = """\
Each run's steps are shifted by the last steps of the runs before it (stage 2's 1..1000 and stage
3's 1..60000 become 1..61000); a dashed line and the run's label mark where it starts. A step
logged twice (after a resume) counts once, with its last record. Files written into --out-dir:
loss.png, lr.png, grad_norm.png, throughput.png, eval_loss_per_word.png, eval_masked_accuracy.png
(a figure with no values in any run is left out).

Example:
  python tools/plot_run.py stage2=logs/stage2.jsonl stage3=logs/stage3.jsonl --out-dir plots/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("logs", nargs="+", metavar="[LABEL=]LOG.jsonl",
                   help="a run's step log, optionally labelled (default label: the file name without .jsonl); "
                        "several runs are placed end to end in the order given")
    p.add_argument("--out-dir", required=True, help="folder for the PNG files (created if missing)")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG files (default 100)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _plot(args))


def _plot(args: argparse.Namespace) -> int:
    if args.dpi < 1:
        raise ValueError(f"--dpi {args.dpi}: must be >= 1")
    runs = [read_run_log(path, label) for label, path in map(parse_run_argument, args.logs)]
    plots = plot_runs(runs, args.out_dir, dpi=args.dpi)
    for run, offset in zip(runs, plots.offsets):
        print(f"{run.label}: {len(run.train)} steps, {len(run.evals)} evaluation records, steps shifted by "
              f"{offset:,} ({run.path})")
    for name, path in plots.files.items():
        print(f"wrote {path} ({len(plots.series[name])} series)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
