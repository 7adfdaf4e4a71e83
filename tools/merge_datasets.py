#!/usr/bin/env python
"""Concatenate indexed datasets (e.g. the shards of tools/preprocess_data.py --shards) into one.

Documents keep their boundaries and order: all of the first input, then the second, ...
Example:
    python tools/merge_datasets.py --input 'out/nb-*-of-00004' --output-prefix out/nb
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.data.indexed import merge_indexed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_GLOB",
                   help="dataset prefixes (without .bin/.idx) or globs over prefixes; globs are sorted")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/PREFIX.idx (atomically)")
    p.add_argument("--writer", choices=["cpp", "python"], default="cpp", help="writer backend (default cpp)")
    args = p.parse_args(argv)
    prefixes: list[str] = []
    for x in args.input:
        if any(c in x for c in "*?["):
            found = sorted({m[:-4] for m in glob.glob(x + ".idx")} | {m[:-4] for m in glob.glob(x) if m.endswith(".idx")})
            if not found:
                print(f"error: {x!r} matches no dataset", file=sys.stderr)
                return 1
            prefixes.extend(found)
        else:
            prefixes.append(x[:-4] if x.endswith((".bin", ".idx")) else x)
    r = merge_indexed(prefixes, args.output_prefix, backend=args.writer)
    print(f"merged {len(prefixes)} datasets -> {args.output_prefix}: {r.num_documents:,} documents, "
          f"{r.num_tokens:,} tokens ({r.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
