#!/usr/bin/env python
"""Measure tokenizer fertility (subword tokens per word) per tokenizer and language (thin CLI
over megatron_normistral.tokenizer.fertility.measure_fertility)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.tokenizer.corpus import add_language_input_flags, parse_language_inputs  # noqa: E402
from megatron_normistral.tokenizer.fertility import FERTILITY_RULE, FertilityConfig, measure_fertility  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402

EPILOG = f"""\
Rule: {FERTILITY_RULE}.
The first --tokenizer is the reference: the output also gives every tokenizer's relative sequence
length (its fertility / the reference's, = the per-token inference cost ratio) and, in brackets,
its square (the attention cost ratio).

Example:
  python tools/fertility.py --tokenizer tekken --tokenizer out/tok51k \\
      --input nb=examples/data/corpus/nb.jsonl.gz --input nn=examples/data/corpus/nn.jsonl.gz \\
      --markdown fertility.md --plot fertility.png
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--tokenizer", action="append", required=True, metavar="SPEC",
                   help="'tekken', a SentencePiece .model, or a Hugging Face tokenizer folder / tokenizer.json. "
                        "Repeat; the first is the reference.")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="display name for each --tokenizer, in order (default: 'tekken' or the folder name)")
    add_language_input_flags(p, read_note=". Read as a stream, once")
    p.add_argument("--max-documents", type=int, default=None, help="use only the first N documents of each language")
    p.add_argument("--markdown", metavar="OUT.md", help="also write the tables as Markdown to this file")
    p.add_argument("--plot", metavar="OUT.png", help="also write a bar chart (PNG) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _measure(args))


def _measure(args: argparse.Namespace) -> int:
    cfg = FertilityConfig(
        tokenizers=args.tokenizer,
        inputs=parse_language_inputs(args.input, "--input"),
        max_documents=args.max_documents,
        labels=args.label,
        verbose=not args.quiet,
        text_key=args.json_key,
    )
    result = measure_fertility(cfg)
    md = result.to_markdown()
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)
    if args.plot:
        result.plot(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
