#!/usr/bin/env python
"""Convert checkpoints between Hugging Face Mistral and megatron-core (torch_dist).

    python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out MCORE_DIR --tp 2 --pp 2
    python tools/convert_checkpoint.py mcore-to-hf --mcore MCORE_DIR --out HF_DIR --tokenizer TOK_DIR \
        [--fertility fertility.md] [--base-model mistralai/Mistral-Nemo-Base-2407]

mcore-to-hf also writes a model card, HF_DIR/README.md: the architecture, the training steps (of a
training checkpoint), the tokenizer's training record and fertility table, how to load the model;
the licence is a placeholder to fill in. Every figure in it comes from those files.

Both directions stream one layer at a time; see megatron_normistral/convert/. Inputs are checked
before anything is written (a megatron checkpoint's files against its .metadata, so an
interrupted save or partial copy is named); the output is written into a hidden sibling folder
and renamed into place at the end. Bad input: one line naming the file, exit status 2.
Progress goes to stderr (--quiet: none): a line after a layer, at most one every few seconds,
with the share of the parameters done and an ETA; the summary line goes to stdout.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_normistral.model.architectures import UnknownArchitectureError  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-mcore", help="Hugging Face Mistral folder -> megatron-core distributed checkpoint",
                         allow_abbrev=False,
                         description="Read config.json + safetensors (single file or sharded with an index; "
                                     "bf16/fp16/fp32) and write a torch_dist checkpoint that loads at any TP/PP/VPP "
                                     "layout, plus normistral_model.json describing the architecture.")
    h2m.add_argument("--hf", required=True, help="input Hugging Face folder (config.json, *.safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint folder (created; must be empty)")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size training will use: checked against "
                     "the architecture now and recorded (the checkpoint itself loads at any layout). Default 1")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size training will use (checked, "
                     "recorded). Default 1")
    h2m.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank (checked, "
                     "recorded). Default: no interleaving")
    h2m.add_argument("--arch", default=None, help="named architecture (megatron_normistral.model.architectures) "
                     "the HF config must match; recorded by name. Default: taken from config.json, named 'hf'")
    h2m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "source"],
                     help="dtype stored in the checkpoint. 'source' keeps the HF dtype. Default fp32 (exact for "
                          "bf16/fp16 sources; what training's fp32 main weights hold)")
    h2m.add_argument("--quiet", action="store_true", help="no progress output on stderr")

    m2h = sub.add_parser("mcore-to-hf", help="megatron-core distributed checkpoint -> Hugging Face Mistral folder",
                         allow_abbrev=False,
                         description="Read the model weights of a torch_dist checkpoint saved at any layout (a "
                                     "training checkpoint with optimizer state is fine: only model keys are read) and "
                                     "write config.json, safetensors shards with an index, the tokenizer files and a "
                                     "model card (README.md).")
    m2h.add_argument("--mcore", required=True, help="input checkpoint folder (with normistral_model.json, or pass --arch)")
    m2h.add_argument("--out", required=True, help="output Hugging Face folder (created; must be empty)")
    m2h.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer folder whose files are copied into "
                     "--out; its bos/eos/pad ids go into config.json. Default: no tokenizer, ids 1/2/none")
    m2h.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                     help="dtype of the written safetensors. Default bf16")
    m2h.add_argument("--arch", default=None, help="named architecture, for checkpoints without normistral_model.json "
                     "(if the JSON exists, the two must match)")
    m2h.add_argument("--max-shard-size", type=float, default=5.0,
                     help="largest safetensors shard in GB (10^9 bytes). Default 5")
    m2h.add_argument("--bos-id", type=int, default=None, help="override bos_token_id in config.json")
    m2h.add_argument("--eos-id", type=int, default=None, help="override eos_token_id in config.json")
    m2h.add_argument("--pad-id", type=int, default=None, help="override pad_token_id in config.json")
    m2h.add_argument("--fertility", default=None, metavar="FILE.md",
                     help="a fertility table written by tools/fertility.py --markdown, copied into the model card's "
                          "tokenizer section. Default: none")
    m2h.add_argument("--base-model", default=None, metavar="NAME",
                     help="the model this one was trained from (e.g. a Hugging Face id), for the model card and its "
                          "base_model field; checkpoints do not record it. Default: none (a checkpoint converted from "
                          "a Hugging Face folder names that folder)")
    m2h.add_argument("--no-model-card", action="store_true",
                     help="do not write README.md (the model card) into --out")
    m2h.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _convert(args), also=(UnknownArchitectureError,))


def _convert(args: argparse.Namespace) -> int:
    from megatron_normistral.convert import hf_mcore

    start = time.time()
    if args.command == "hf-to-mcore":
        report = hf_mcore.hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, arch_name=args.arch,
                                      dtype=None if args.dtype == "source" else args.dtype, verbose=not args.quiet)
    else:
        ids = {k: v for k, v in (("bos_token_id", args.bos_id), ("eos_token_id", args.eos_id),
                                 ("pad_token_id", args.pad_id)) if v is not None}
        report = hf_mcore.mcore_to_hf(args.mcore, args.out, tokenizer_dir=args.tokenizer, dtype=args.dtype,
                                      arch_name=args.arch, max_shard_bytes=int(args.max_shard_size * 1000**3),
                                      special_ids=ids, fertility=args.fertility, base_model=args.base_model,
                                      write_model_card=not args.no_model_card, verbose=not args.quiet)
    print(f"{args.command}: {report.arch.name}: read {report.tensors_read} tensors, wrote {report.tensors_written}"
          f"{', skipped ' + str(report.skipped) if report.skipped else ''} in {time.time() - start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer spawns processes
    # SIGTERM -> normal exception path, so the staging folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
