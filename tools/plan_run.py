#!/usr/bin/env python
"""Plan a training run before any GPU is spent: memory per GPU for the recipe's TP/PP/DP layout
(weights, gradients, optimizer state, activations without, with selective and with full
recomputation, and the attention backend's share), whether it fits the given GPU memory with a
margin, and the GPU-hours of the run's tokens at a given MFU (thin CLI over
megatron_normistral.reporting.run_plan)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.config.fields import field_help, field_type, strip_optional  # noqa: E402
from megatron_normistral.reporting.run_plan import PlanOptions, format_plan, plan_run  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402

EXIT_DOES_NOT_FIT = 1

EPILOG = """\
Memory is per GPU, for the first and the last pipeline stage (the first holds the embedding and
the most micro-batches in flight, the last the LM head and the logits); "fits" judges the worst
stage under the recipe's model.recompute_granularity, and the other recomputation modes are
judged too. Activations are the tensors each micro-batch's forward keeps for the backward pass,
counted tensor by tensor as this project's layers save them (checked against a built model:
benchmarks/plan_run_check.py), times the micro-batches the pipeline schedule holds.
GPU-hours = train_iters x global_batch_size x seq_length tokens x the architecture's model FLOPs
per token / (MFU x peak FLOP/s).

Exit status: 0 when the plan fits, 1 when it does not ("does not fit"), 2 on bad input (one
line on stderr).

Example (NorMistral-11b stage 3 on 512 MI250X GCDs):
  python tools/plan_run.py examples/normistral_11b/stage3_full.yaml --gpus 512 --gpu-memory 64
"""

FLAGS = {  # PlanOptions field -> flag
    "gpus": "--gpus",
    "gpu_memory_gib": "--gpu-memory",
    "mfu": "--mfu",
    "peak_tflops": "--peak-tflops",
    "margin": "--margin",
    "attention_backend": "--attention-backend",
    "transformer_impl": "--transformer-impl",
    "device": "--device",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("recipe", metavar="RECIPE.yaml", help="a training recipe (as pretrain_normistral.py --config takes it)")
    for f in dataclasses.fields(PlanOptions):
        tp = strip_optional(field_type(PlanOptions, f.name))
        kwargs: dict = {"dest": f.name}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        else:
            kwargs["type"] = tp
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
            default = ""
        else:
            kwargs["default"] = f.default
            default = f" (default: {f.default})" if f.default is not None else ""
        if f.name == "gpu_memory_gib":
            kwargs["metavar"] = "GIB"
        p.add_argument(FLAGS[f.name], help=(field_help(PlanOptions, f.name) + default).replace("%", "%%"), **kwargs)
    p.add_argument("--json", action="store_true",
                   help="print the plan as JSON (every stage and figure, in bytes) instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _plan(args), also=(KeyError,))  # an unknown architecture is a KeyError


def _plan(args: argparse.Namespace) -> int:
    from megatron_normistral.config.recipe import load_recipe

    options = PlanOptions(**{name: getattr(args, name) for name in FLAGS})
    options.validate()  # before the recipe: its import of megatron-core takes seconds
    plan = plan_run(load_recipe(args.recipe), options, name=args.recipe)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.fits() else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
