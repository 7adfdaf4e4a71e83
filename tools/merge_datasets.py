#!/usr/bin/env python
"""Concatenate indexed datasets (e.g. the shards of tools/preprocess_data.py --shards) into one.

Documents keep their boundaries and order: all of the first input, then the second, ...
Every input is checked first (.bin and .idx exist and agree); the output gets PREFIX.stats.json
like preprocess_data.py's. Bad input: one line naming the file, exit status 2, no output.
Example:
    python tools/merge_datasets.py --input 'out/nb-*-of-00004' --output-prefix out/nb
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.data.indexed import CorpusError, check_corpus_files, merge_indexed  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Dataset prefixes named or matched (globs over prefixes or .idx files, sorted), checked."""
    prefixes: list[str] = []
    for x in patterns:
        if any(c in x for c in "*?["):
            found = sorted({m[:-4] for m in glob.glob(x + ".idx")} | {m[:-4] for m in glob.glob(x) if m.endswith(".idx")})
            if not found:
                raise CorpusError(f"--input {x!r} matches no dataset (no PATTERN.idx and no .idx among its matches)")
            prefixes.extend(found)
        else:
            prefixes.append(x[:-4] if x.endswith((".bin", ".idx")) else x)
    for prefix in prefixes:
        check_corpus_files(prefix, allow_empty=True)  # empty shards are normal
    return prefixes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_GLOB",
                   help="dataset prefixes (without .bin/.idx) or globs over prefixes; globs are sorted")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/PREFIX.idx (atomically)")
    p.add_argument("--writer", choices=["cpp", "reference", "python"], default="cpp",
                   help="cpp: the C++ writer (default); reference: the pure-Python reference writer "
                        "(byte-identical, slower; 'python' is its old name)")
    args = p.parse_args(argv)

    def run() -> int:
        prefixes = expand_prefixes(args.input)
        r = merge_indexed(prefixes, args.output_prefix, backend=args.writer)
        print(f"merged {len(prefixes)} datasets -> {args.output_prefix}: {r.num_documents:,} documents, "
              f"{r.num_tokens:,} tokens ({r.dtype})", file=sys.stderr)
        return 0

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
