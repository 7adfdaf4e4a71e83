#!/usr/bin/env python
"""Train a NorMistral-style tokenizer on per-language corpora: JSON Lines (.gz), parquet or saved
Hugging Face datasets (thin CLI over megatron_normistral.tokenizer.trainer.train_tokenizer)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.tokenizer.corpus import add_language_input_flags, parse_assignments, parse_language_inputs  # noqa: E402
from megatron_normistral.tokenizer.trainer import (  # noqa: E402
    AUTHORS_EVERY,
    BACKENDS,
    SamplingConfig,
    TokenizerTrainingConfig,
    train_tokenizer,
)
from megatron_normistral.tool_io import run_tool, staged_folder  # noqa: E402

EPILOG = f"""\
Special tokens get fixed ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <mask>=4, <reserved_5>..<reserved_15>;
regular tokens start at 16 (the 256 byte tokens first).

Backends:
  bytelevel      Hugging Face byte-level BPE with the authors' settings: NFKC normalisation, single
                 digits, pieces of at most 24 characters, BOS added by the post-processor.
                 decode(encode(text)) == NFKC(text).
  sentencepiece  SentencePiece BPE with byte fallback (nothing is ever unknown), no normalisation,
                 dummy prefix space, single digits, pieces of at most 24 characters; the native
                 model is saved as tokenizer.model next to an exactly equivalent tokenizer.json.
                 decode(encode(text)) == text with U+2581 read as a space.
The output folder loads with transformers.AutoTokenizer.from_pretrained(DIR).

Inputs: every language's documents are read as a stream from its files (several --input LANG=...
and globs per language, read in the order given, each glob sorted) and sampled as they are read:
--every in one pass, holding nothing; --share in two passes, holding 16 bytes per document. The
sample goes straight into the trainer (byte-level BPE keeps word counts; SentencePiece holds the
sampled sentences). Parquet files and saved datasets need pyarrow and datasets (pip install -e .[data]).

The authors' sampling (every N-th document) was: {' '.join(f'{k}={v}' for k, v in AUTHORS_EVERY.items())}
(on a far larger corpus; on the small development corpus use every document).

Example:
  python tools/train_tokenizer.py --input nb=examples/data/corpus/nb.jsonl.gz \\
      --input nn=examples/data/corpus/nn.jsonl.gz --every nb=2 --vocab-size 51200 \\
      --backend bytelevel --output out/tok51k
  python tools/train_tokenizer.py --input 'nb=corpus/nb/*.jsonl.gz' --input nb=extra/nb.parquet \\
      --input nn=corpus/nn_dataset --every nb=20 --output out/tok51k
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_language_input_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--every", action="append", metavar="LANG=N",
                   help="keep documents 0, N, 2N, ... of LANG (the authors' rule). Languages not named keep every document.")
    g.add_argument("--share", action="append", metavar="LANG=FRACTION",
                   help="target fraction of the sample's characters for LANG (normalised to sum to 1; languages not named get 0). "
                        "The sample is as large as possible without a language running out; documents drawn in seeded random order.")
    p.add_argument("--max-chars", type=int, default=None,
                   help="with --share: cap on the total characters sampled (default: no cap)")
    p.add_argument("--seed", type=int, default=0, help="with --share: seed of the document order (default 0)")
    p.add_argument("--vocab-size", type=int, default=51200,
                   help="vocabulary size including the 16 specials and 256 byte tokens (default 51200)")
    p.add_argument("--backend", choices=BACKENDS, default="bytelevel", help="tokenizer kind (default bytelevel); see below")
    p.add_argument("--min-frequency", type=int, default=2,
                   help="bytelevel: a pair must occur this often to be merged (default 2)")
    p.add_argument("--threads", type=int, default=0, help="sentencepiece: training threads (default: all cores)")
    p.add_argument("--output", required=True, help="folder to write (created if missing; an existing one is "
                   "replaced once the new tokenizer is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    inputs = parse_language_inputs(args.input, "--input")
    with staged_folder(args.output, replace_existing=True) as staging:
        cfg = TokenizerTrainingConfig(
            inputs=inputs,
            output=str(staging),
            vocab_size=args.vocab_size,
            backend=args.backend,
            sampling=SamplingConfig(
                every=parse_assignments(args.every, "--every", int),
                share=parse_assignments(args.share, "--share", float),
                max_chars=args.max_chars,
                seed=args.seed,
            ),
            min_frequency=args.min_frequency,
            threads=args.threads,
            verbose=not args.quiet,
            text_key=args.json_key,
        )
        result = dataclasses.replace(train_tokenizer(cfg), output=Path(args.output))
    print(f"{result.output}: {result.backend}, vocabulary {result.vocab_size}, "
          f"documents {result.documents}, {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
