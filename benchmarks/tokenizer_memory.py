#!/usr/bin/env python
"""Peak memory of tools/train_tokenizer.py on 1x and 4x the input. The input is the bundled
corpus (examples/data/corpus, six languages, 8 MB of text) with every document repeated in place
B times (--base-copies, default 1) for 1x, and B x --copies (default 4) times for 4x. Prints the
tool's peak RSS (the kernel's ru_maxrss of the process and its children), wall time and the size
of the sample it trained on (from its training.json) per case; asserts nothing.

Cases (byte-level BPE unless named):
  every=1        every document: the 4x sample is 4x larger (each document 4 times as often)
  same sample    --every B at 1x, --every 4B at 4x: both keep each document exactly once, so the
                 sample (and the tokenizer) is the same, from 4x the input
  share          --share, all languages equal, capped at --max-chars characters
  sentencepiece  the same-sample case with the SentencePiece backend (which holds the sample)

With streaming sampling the same-sample cases need the same memory at 1x and 4x; a tool that
reads every document into memory first grows with the input in all cases. --repo runs the
tools/train_tokenizer.py of another checkout (e.g. an older one) on the same inputs.

    python benchmarks/tokenizer_memory.py [--base-copies 1] [--copies 4] [--vocab-size 4096] [--repo PATH]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "corpus"
LANGS = ("nb", "nn", "se", "sv", "da", "en")
# Runs the command and prints its exit status and the largest RSS (KiB on Linux) of it and its descendants.
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.PIPE).returncode; print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def build_inputs(folder: Path, repeat: int) -> dict[str, Path]:
    """Each language's corpus file with every line (document) repeated ``repeat`` times in place."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for lang in LANGS:
        lines = gzip.decompress((CORPUS / f"{lang}.jsonl.gz").read_bytes()).splitlines(keepends=True)
        out[lang] = folder / f"{lang}.jsonl.gz"
        with gzip.open(out[lang], "wb", compresslevel=1) as f:
            for line in lines:
                f.write((line if line.endswith(b"\n") else line + b"\n") * repeat)
    return out


def measure(repo: Path, inputs: dict[str, Path], extra: list[str], out: Path,
            vocab_size: int) -> tuple[int, float, float, str]:
    """(exit status, peak RSS MiB, wall seconds, sample size) of one train_tokenizer run."""
    cmd = [sys.executable, str(repo / "tools" / "train_tokenizer.py"), "--vocab-size", str(vocab_size),
           "--output", str(out), "--quiet", *[a for lang, p in inputs.items() for a in ("--input", f"{lang}={p}")],
           *extra]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rc, kib = proc.stdout.split()
    sample = "-"
    if (out / "training.json").exists():
        meta = json.loads((out / "training.json").read_text())
        sample = f"{sum(meta['documents'].values())} docs / {sum(meta['characters'].values()) / 1e6:.1f}M chars"
    return int(rc), int(kib) / 1024, seconds, sample


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--base-copies", type=int, default=1,
                   help="1x: every document repeated this many times (default 1: the corpus as it is)")
    p.add_argument("--copies", type=int, default=4, help="the larger input is this many times the 1x one (default 4)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the trained tokenizers (default 4096)")
    p.add_argument("--max-chars", type=int, default=500_000,
                   help="the share case's sample size in characters (default 500,000: below what the smallest language allows at 1x)")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose tools/train_tokenizer.py runs (default this one)")
    p.add_argument("--cases", nargs="+", default=["every1", "same-sample", "share", "sentencepiece"],
                   choices=["every1", "same-sample", "share", "sentencepiece"], help="which cases to run")
    args = p.parse_args()
    b, k = args.base_copies, args.base_copies * args.copies

    def every(n: int) -> list[str]:
        return [a for lang in LANGS for a in ("--every", f"{lang}={n}")] if n > 1 else []

    share = [a for lang in LANGS for a in ("--share", f"{lang}=1")] + ["--max-chars", str(args.max_chars)]
    cases = {  # name -> (label, flags at 1x, flags at 4x)
        "every1": ("every=1 (the sample grows with the input)", [], []),
        "same-sample": (f"every={b} at 1x, every={k} at {args.copies}x: same sample", every(b), every(k)),
        "share": (f"share, languages equal, max-chars {args.max_chars:,}", share, share),
        "sentencepiece": (f"sentencepiece, every={b} / every={k}: same sample", ["--backend", "sentencepiece", *every(b)],
                          ["--backend", "sentencepiece", *every(k)]),
    }
    big = f"{args.copies}x"
    print(f"train_tokenizer.py of {args.repo}; vocabulary {args.vocab_size}; 1x = the bundled corpus, every document "
          f"{b} time(s); {big} = {k} times")
    print(f"{'case':<50} {'1x MiB':>7} {big + ' MiB':>7} {'ratio':>6} {'1x s':>6} {big + ' s':>6}  sample 1x | {big}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = {1: build_inputs(tmp / "x1", b), args.copies: build_inputs(tmp / "xk", k)}
        for name in args.cases:
            label, flags_1x, flags_kx = cases[name]
            (rc1, mib1, s1, sample1), (rck, mibk, sk, samplek) = (
                measure(args.repo, inputs[size], flags, tmp / f"out-{name}-{size}", args.vocab_size)
                for size, flags in ((1, flags_1x), (args.copies, flags_kx)))
            status = "" if rc1 == rck == 0 else f"  (exit status {rc1} / {rck})"
            print(f"{label:<50} {mib1:>7.0f} {mibk:>7.0f} {mibk / mib1:>6.2f} {s1:>6.1f} {sk:>6.1f}  "
                  f"{sample1} | {samplek}{status}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
