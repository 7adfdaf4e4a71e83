#!/usr/bin/env python
"""Move a Hugging Face Mistral checkpoint to a new tokenizer: resize embed_tokens and lm_head,
initialising each new token's row from the source rows of its source-tokenizer pieces (thin CLI
over megatron_normistral.tokenizer.transfer.transfer_embeddings)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.tokenizer.transfer import (  # noqa: E402
    HEAD_METHODS,
    INIT_METHODS,
    SPECIAL_TABLE,
    TransferConfig,
    TransferError,
    transfer_embeddings,
)
from megatron_normistral.tool_io import run_tool, staged_folder  # noqa: E402

EPILOG = f"""\
Rule: a regular target token's surface (its raw bytes: U+2581 and byte-level characters turned
back into spaces/bytes, <0xNN> byte-fallback pieces into byte NN) is encoded with the source
tokenizer as it stands (no BOS/EOS, no dummy prefix, no normalisation); its new row is the mean
of those pieces' source rows, computed in fp32, stored in the checkpoint's dtype.
Special tokens: {', '.join(f'{k} <- source {v}' for k, v in SPECIAL_TABLE.items())};
any other special (reserved) <- mean of all source rows ("all"); pad falls back to eos when the
source tokenizer has no pad. Tokens with an empty surface or spelt only with the source <unk>
get random rows N(0, s^2), s = std of the source matrix; the report lists them.
Every other tensor is copied bit for bit; config.json gets the new vocab_size and bos/eos/pad
ids; the target tokenizer's files are copied in; transfer_report.json records what was done.

Example:
  python tools/transfer_embeddings.py --source ckpt/mistral-nemo --source-tokenizer tekken \\
      --target-tokenizer out/tok51k --output ckpt/normistral-init
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--source", required=True, help="Hugging Face Mistral folder (config.json + safetensors, sharded or not)")
    p.add_argument("--source-tokenizer", required=True,
                   help="the source model's tokenizer: 'tekken' or a tokenizer folder (its ids must index the source embedding)")
    p.add_argument("--target-tokenizer", required=True, help="the new tokenizer folder (e.g. from tools/train_tokenizer.py)")
    p.add_argument("--output", required=True, help="folder to write the new checkpoint to (created if missing; an "
                   "existing one is replaced once the new checkpoint is complete)")
    p.add_argument("--init", choices=INIT_METHODS, default="mean",
                   help="input embedding rows: mean of the pieces' rows (default), the first piece's row, or random")
    p.add_argument("--head", choices=HEAD_METHODS, default="mean",
                   help="lm_head rows: mean of the pieces' source lm_head rows (default), 'source' = the same method "
                        "as --init applied to the source lm_head, or random. Ignored when the model has no lm_head (tied).")
    p.add_argument("--seed", type=int, default=0, help="seed for random rows (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _transfer(args))


def _transfer(args: argparse.Namespace) -> int:
    if Path(args.output).resolve() == Path(args.source).resolve():  # checked here: staging would hide it
        raise TransferError("--output must differ from --source")
    with staged_folder(args.output, replace_existing=True) as staging:
        cfg = TransferConfig(
            source=args.source, source_tokenizer=args.source_tokenizer, target_tokenizer=args.target_tokenizer,
            output=str(staging), init=args.init, head=args.head, seed=args.seed, verbose=not args.quiet,
        )
        report = dataclasses.replace(transfer_embeddings(cfg), output=Path(args.output))
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
