#!/usr/bin/env python
"""Tokenise JSON Lines into megatron-core's indexed format (PREFIX.bin/PREFIX.idx).

Thin CLI over megatron_normistral.data.preprocess.preprocess; see that module for the design.
Example:
    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix out/nb \\
        --tokenizer tekken --workers 2 --append-eod
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_normistral.data.preprocess import BadInputError, PreprocessConfig, preprocess  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = PreprocessConfig([], "", "")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="JSON Lines files (plain or .gz), one document per line; several paths and/or globs "
                        "(quote globs); processed in the order given, each glob sorted")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin and PREFIX.idx (with --shards N: PREFIX-0000i-of-0000N.{bin,idx})")
    p.add_argument("--tokenizer", required=True,
                   help="'tekken' (Mistral-NeMo, from mistral-common), a SentencePiece .model file, or a Hugging "
                        "Face tokenizer folder / tokenizer.json")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="tokenising processes (default %(default)s); 0 runs everything in this process")
    p.add_argument("--json-key", default=d.json_key, help="key holding the document text (default %(default)s)")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOD (EOS) id to each document")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk Punkt with default parameters; no data download)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad line (file:line in the message) instead of skipping it")
    p.add_argument("--shards", type=int, default=d.shards,
                   help="write N output datasets, input blocks round-robin (merge with tools/merge_datasets.py)")
    p.add_argument("--chunk-mb", type=float, default=d.chunk_bytes / 2**20,
                   help="input MiB per work item; memory is about workers x 2 x chunk x ~10 (default %(default)s)")
    p.add_argument("--writer", choices=["cpp", "python"], default=d.backend,
                   help="C++ writer (default) or the pure-Python reference writer (byte-identical, slower)")
    p.add_argument("--max-reported", type=int, default=d.max_reported,
                   help="bad lines reported with file:line; the rest are only counted (default %(default)s)")
    p.add_argument("--no-segment-cache", action="store_true",
                   help="call the tokenizer on every document instead of reusing the encodings of repeated "
                        "space-separated segments (the cache is used only where it gives identical tokens: "
                        "SentencePiece and byte-level BPE tokenizers that pass the checks in "
                        "megatron_normistral/tokenizer/segment_cache.py; Tekken is never cached)")
    p.add_argument("--progress-interval", type=float, default=d.progress_interval,
                   help="seconds between progress lines on stderr, 0 for none (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM -> normal exception path, so temporary outputs are removed (SIGKILL leaves only
    # temporary names, never a .bin/.idx pair that looks whole).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer, workers=args.workers,
        json_key=args.json_key, append_eod=args.append_eod, split_sentences=args.split_sentences,
        strict=args.strict, shards=args.shards, chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
        backend=args.writer, max_reported=args.max_reported, progress_interval=args.progress_interval,
        segment_cache=not args.no_segment_cache)
    try:
        preprocess(cfg)
    except (BadInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
