#!/usr/bin/env python
"""Tokenise JSON Lines, parquet or saved Hugging Face datasets into megatron-core's indexed
format (PREFIX.bin/PREFIX.idx).

Thin CLI over megatron_normistral.data.preprocess.preprocess; see that module for the design.
Each document is written as <s> text [</s>]: BOS first whenever the tokenizer has one (as the
exported Hugging Face tokenizer encodes at inference; --no-bos leaves it out), EOD last with
--append-eod. Writes PREFIX.stats.json beside the pair (token-id range, counts, whether documents
start with BOS / end with EOD; training reads it).
Bad input (unreadable or truncated file, an input without documents, --strict's first bad line,
a full disk) ends the run with one line naming the file, exit status 2, and no output.
Inputs: JSON Lines files (plain or .gz), parquet files (*.parquet) and folders written by
datasets' save_to_disk, mixed freely; globs are expanded (quote them). The text is under
--json-key (the column of a parquet file or dataset). Parquet and datasets need the optional
packages pyarrow and datasets (pip install -e .[data]).
Megatron-LM's --json-keys K1 [K2 ...] writes one dataset per key named as Megatron-LM names them,
PREFIX_<key>_document (PREFIX_<key>_sentence with --split-sentences); --json-key writes PREFIX.
Examples:
    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix out/nb \\
        --tokenizer tekken --workers 2 --append-eod
    python tools/preprocess_data.py --input 'data/nb/*.parquet' data/nb-extra --output-prefix out/nb \\
        --tokenizer tekken --json-keys text      # writes out/nb_text_document.{bin,idx}
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_normistral.data.preprocess import PreprocessConfig, preprocess, preprocess_json_keys  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = PreprocessConfig([], "", "")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="JSON Lines files (plain or .gz; one document per line), parquet files (*.parquet) and/or "
                        "saved Hugging Face dataset folders (datasets' save_to_disk); several paths and/or globs "
                        "(quote globs); processed in the order given, each glob sorted")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin and PREFIX.idx (with --shards N: PREFIX-0000i-of-0000N.{bin,idx})")
    p.add_argument("--tokenizer", required=True,
                   help="'tekken' (Mistral-NeMo, from mistral-common), a SentencePiece .model file, or a Hugging "
                        "Face tokenizer folder / tokenizer.json")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="tokenising processes (default %(default)s); 0 runs everything in this process")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--json-key", default=d.json_key,
                      help="key (JSON) or column (parquet, datasets) holding the document text; the output is "
                           "PREFIX.bin/.idx (default %(default)s)")
    keys.add_argument("--json-keys", nargs="+", metavar="KEY",
                      help="Megatron-LM's flag: one dataset per key, written to PREFIX_<key>_document.bin/.idx "
                           "(PREFIX_<key>_sentence with --split-sentences), one pass over the input per key; "
                           "all are published together when every key is done")
    p.add_argument("--append-eod", action="store_true", help="append the tokenizer's EOD (EOS) id to each document")
    p.add_argument("--no-bos", action="store_true",
                   help="do not put the tokenizer's BOS (<s>) before each document (by default it is put there "
                        "whenever the tokenizer has one; the choice is logged and recorded in PREFIX.stats.json)")
    p.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk Punkt with default parameters; no data download)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad line (file:line in the message) instead of skipping it")
    p.add_argument("--max-document-mb", type=float, default=d.max_document_bytes / 2**20,
                   help="JSON lines longer than this many MiB are skipped and reported as 'document too long' "
                        "(fatal with --strict) and never held in memory: tokenising one text takes up to ~200 "
                        "bytes of memory per byte (default %(default)s)")
    p.add_argument("--shards", type=int, default=d.shards,
                   help="write N output datasets, input blocks round-robin (merge with tools/merge_datasets.py)")
    p.add_argument("--chunk-mb", type=float, default=d.chunk_bytes / 2**20,
                   help="input MiB per work item; memory is about workers x 2 x chunk x ~10 (default %(default)s)")
    p.add_argument("--writer", choices=["cpp", "reference", "python"], default=d.backend,
                   help="cpp: the C++ writer (default); reference: the pure-Python reference writer "
                        "(byte-identical, slower; 'python' is its old name)")
    p.add_argument("--max-reported", type=int, default=d.max_reported,
                   help="bad lines reported with file:line; the rest are only counted (default %(default)s)")
    p.add_argument("--no-segment-cache", action="store_true",
                   help="call the tokenizer on every document instead of reusing the encodings of repeated "
                        "space-separated segments (the cache is used only where it gives identical tokens: "
                        "SentencePiece and byte-level BPE tokenizers that pass the checks in "
                        "megatron_normistral/tokenizer/segment_cache.py; Tekken is never cached)")
    p.add_argument("--progress-interval", type=float, default=d.progress_interval,
                   help="seconds between progress lines on stderr (percentage of the inputs' bytes on disk over "
                        "all --json-keys passes, counts and rates, elapsed, ETA), 0 for none (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM -> normal exception path, so temporary outputs are removed (SIGKILL leaves only
    # temporary names, never a .bin/.idx pair that looks whole).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer, workers=args.workers,
        json_key=args.json_key, append_eod=args.append_eod, bos=False if args.no_bos else None,
        split_sentences=args.split_sentences, strict=args.strict, shards=args.shards,
        chunk_bytes=max(1, int(args.chunk_mb * 2**20)), backend=args.writer, max_reported=args.max_reported,
        progress_interval=args.progress_interval, segment_cache=not args.no_segment_cache,
        max_document_bytes=max(1, int(args.max_document_mb * 2**20)))

    def run() -> int:
        if args.json_keys:
            preprocess_json_keys(cfg, args.json_keys)
        else:
            preprocess(cfg)
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
