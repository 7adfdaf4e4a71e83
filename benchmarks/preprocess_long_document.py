#!/usr/bin/env python
"""Memory of tools/preprocess_data.py on one very long document: the largest process's peak RSS
(kernel's ru_maxrss over the tool and its workers) and wall time, for a JSONL of one
single-line document of --mb MB (the bundled Bokmål corpus repeated) plus one short document.

Each tokenizer runs twice: with --max-document-mb above the document (the tool tokenises it,
as every run did before the limit existed) and with the default limit (the document is skipped
as "document too long" and never held in memory). The tokenizers: a byte-level BPE trained on
the bundled corpus (the kind of tokenizer NorMistral's is) without the segment cache (the worst
case: the cache splits text into short segments), the same with the cache, and Tekken. Prints
numbers; asserts nothing.

    python benchmarks/preprocess_long_document.py [--mb 50] [--tokenizers bytelevel bytelevel-cached tekken]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_normistral.data.preprocess import DEFAULT_MAX_DOCUMENT_BYTES  # noqa: E402

CORPUS = ROOT / "examples" / "data" / "corpus"
# Runs the command and prints the largest RSS (KiB on Linux) of it and its descendants.
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL).returncode; print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def build_input(path: Path, mb: float) -> int:
    with gzip.open(CORPUS / "nb.jsonl.gz", "rt", encoding="utf-8") as f:
        base = "\n".join(json.loads(line)["text"] for line in f)
    n = int(mb * 2**20)
    text = (base * (n // len(base) + 1))[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text": "Et kort dokument."}) + "\n")
    return path.stat().st_size


def train_bytelevel(out: Path) -> str:
    from megatron_normistral.tokenizer.corpus import parse_assignments
    from megatron_normistral.tokenizer.trainer import SamplingConfig, TokenizerTrainingConfig, train_tokenizer

    inputs = parse_assignments([f"nb={CORPUS / 'nb.jsonl.gz'}", f"en={CORPUS / 'en.jsonl.gz'}"], "--input")
    train_tokenizer(TokenizerTrainingConfig(inputs=inputs, output=str(out), vocab_size=4096, backend="bytelevel",
                                            sampling=SamplingConfig(), verbose=False))
    return str(out)


def measure(cmd: list[str]) -> tuple[int, float, float]:
    """(exit status, largest process MiB, wall seconds)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True).stdout
    rc, kib = out.split()
    return int(rc), int(kib) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--mb", type=float, default=50, help="size of the long document in MiB (default 50)")
    ap.add_argument("--tokenizers", nargs="+", default=["bytelevel", "bytelevel-cached", "tekken"],
                    choices=["bytelevel", "bytelevel-cached", "tekken"], help="tokenizers to run (default: all three)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = build_input(work / "long.jsonl", args.mb)
        bytelevel = train_bytelevel(work / "bytelevel") if any(t.startswith("bytelevel") for t in args.tokenizers) else ""
        print(f"input: one document of {size / 2**20:.1f} MiB of JSON + one short one; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'tokenizer':>17} {'--max-document-mb':>17} {'exit':>4} {'documents':>9} {'largest process MiB':>19} "
              f"{'wall s':>7}")
        for name in args.tokenizers:
            spec = "tekken" if name == "tekken" else bytelevel
            extra = ["--no-segment-cache"] if name == "bytelevel" else []
            for limit_mb in (2 * size / 2**20, DEFAULT_MAX_DOCUMENT_BYTES / 2**20):
                prefix = work / f"out-{name}"
                cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(work / "long.jsonl"),
                       "--output-prefix", str(prefix), "--tokenizer", spec, "--workers", "1", "--progress-interval",
                       "0", "--max-document-mb", f"{limit_mb:g}", *extra]
                rc, mib, wall = measure(cmd)
                docs = json.loads(Path(f"{prefix}.stats.json").read_text())["documents"] if rc == 0 else "-"
                print(f"{name:>17} {limit_mb:>17.1f} {rc:>4} {docs:>9} {mib:>19.0f} {wall:>7.1f}", flush=True)
        print(f"load average now {os.getloadavg()[0]:.1f}. documents 1: the long one was skipped (reported as "
              f"'document too long'); 2: it was tokenised.")


if __name__ == "__main__":
    main()
