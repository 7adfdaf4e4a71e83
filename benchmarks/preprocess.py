#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py: tokens/s, docs/s, MB/s, CPU time and peak RSS of the
whole process tree, for 1 and 2 workers, on a >= 40 MB JSONL built by repeating the corpus in
examples/data/corpus (a copy of the shared development corpus), with a SentencePiece BPE 32k
model trained on that corpus (or --model). Prints numbers; asserts nothing.

Each worker count runs with the segment cache (the default) and with --no-segment-cache. A
repeated corpus flatters a cache, so the same runs are also made on one copy of the corpus
(skip them with --no-unique): its hit rate is what text never seen before gets.

Reference (Megatron-LM core_v0.16.1 tools/preprocess_data.py, same kind of machine, quiet, 40 MB,
SentencePiece BPE 32k, --append-eod; from the shared bench README): 2 workers 13.1 s wall,
0.645M tokens/s (6.5 s of it start-up), 1 worker 0.43M tokens/s; largest process 489 MB RSS.
    python benchmarks/preprocess.py [--mb 40] [--workers 1 2] [--runs 1]
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_normistral.data.indexed import IndexedReader  # noqa: E402

CORPUS = ROOT / "examples" / "data" / "corpus"
LANGS = ["nb", "nn", "se", "sv", "da", "en"]


def build_input(path: Path, mb: float) -> tuple[int, bytes]:
    data = b"".join(gzip.open(CORPUS / f"{lang}.jsonl.gz").read() for lang in LANGS)
    n = 0
    with open(path, "wb") as f:
        while n < mb * 1e6:
            f.write(data)
            n += len(data)
    return n, data


def train_model(prefix: Path, data: bytes) -> str:
    import json

    import sentencepiece as spm

    texts = [json.loads(line)["text"] for line in data.splitlines() if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=32000,
                                   model_type="bpe", num_threads=2, minloglevel=2, max_sentence_length=1_000_000,
                                   input_sentence_size=200_000, shuffle_input_sentence=True)
    return str(prefix) + ".model"


def run(cmd: list[str]) -> dict:
    """Run cmd; poll the process tree's RSS (sum and largest process) every 10 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
        except psutil.Error:
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err}")
    hit = re.search(r"([0-9.]+)% found in the cache", err)
    return {"wall": wall, "peak_sum": peak_sum, "peak_one": peak_one, "hit": f"{hit.group(1)}%" if hit else "-"}


def calibrate(src: Path, model: str, max_docs: int) -> float:
    """tokens per CPU-second of one process doing only json.loads + tokenizer encode (what
    the reference README quotes as ~0.73M tokens/s per core on a quiet machine for
    SentencePiece): a load-robust yardstick for the tool's CPU efficiency on a shared machine."""
    import json

    from megatron_normistral.tokenizer import load_tokenizer

    encode = load_tokenizer(model).encode
    n = 0
    t = time.process_time()
    with open(src, "rb") as f:
        for i, line in enumerate(f):
            if i == max_docs:
                break
            n += len(encode(json.loads(line)["text"])) + 1
    return n / (time.process_time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40, help="input size in MB (corpus repeated), default 40")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    ap.add_argument("--runs", type=int, default=1, help="runs per worker count; the best wall time is kept")
    ap.add_argument("--model", help="tokenizer to use, any --tokenizer spec of tools/preprocess_data.py "
                                    "(default: train a SentencePiece BPE 32k model on the corpus)")
    ap.add_argument("--workdir", help="keep input/outputs here (default: a temporary folder)")
    ap.add_argument("--no-unique", action="store_true", help="skip the runs on one copy of the corpus")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        src = work / "bench.jsonl"
        nbytes, data = build_input(src, args.mb)
        model = args.model or train_model(work / "bpe32k", data)
        print(f"input {src}: {nbytes / 1e6:.1f} MB; tokenizer {model}; {os.cpu_count()} cores; "
              f"load average {os.getloadavg()[0]:.1f}")
        pure = calibrate(src, model, data.count(b"\n"))  # exactly one copy of the corpus: same mix
        print(f"bare json.loads + encode loop, 1 process: {pure / 1e6:.3f}M tokens per CPU-second")
        unique = work / "unique.jsonl"
        unique.write_bytes(data)
        inputs = [("repeated", src, nbytes)] + ([] if args.no_unique else [("one copy", unique, len(data))])
        print(f"{'input':>8} {'workers':>7} {'cache':>5} {'wall s':>7} {'CPU s':>7} {'M tokens/s':>10} {'M tok/CPU-s':>11} "
              f"{'docs/s':>8} {'MB/s':>6} {'tree RSS MB':>11} {'max proc MB':>11} {'hits':>6}")
        for label, path, size in inputs:
            for w in args.workers:
                for cache in (True, False):
                    best = None
                    for _ in range(args.runs):
                        prefix = work / f"out{w}"
                        cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(path),
                               "--output-prefix", str(prefix), "--tokenizer", model, "--workers", str(w),
                               "--append-eod", "--progress-interval", "0"] + ([] if cache else ["--no-segment-cache"])
                        c0 = os.times()
                        r = run(cmd)
                        c1 = os.times()
                        r["cpu"] = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
                        if best is None or r["wall"] < best["wall"]:
                            best = r
                    ds = IndexedReader(prefix)
                    tok, docs = ds.num_tokens, ds.num_documents
                    print(f"{label:>8} {w:>7} {'on' if cache else 'off':>5} {best['wall']:>7.2f} {best['cpu']:>7.2f} "
                          f"{tok / best['wall'] / 1e6:>10.3f} {tok / best['cpu'] / 1e6:>11.3f} {docs / best['wall']:>8.0f} "
                          f"{size / 1e6 / best['wall']:>6.2f} {best['peak_sum'] / 2**20:>11.0f} "
                          f"{best['peak_one'] / 2**20:>11.0f} {best['hit']:>6}", flush=True)
        print(f"last run: tokens {tok:,}, documents {docs:,}. hits: segments found in the cache. CPU s: the tool's process tree (start-up included). tree RSS sums forked processes (shared pages counted "
              f"in each); 'max proc' is the largest single process.")
        print(f"load average now {os.getloadavg()[0]:.1f}")
        print("reference, Megatron-LM preprocess_data.py (quiet machine): 2 workers 0.645M tokens/s, "
              "1 worker 0.43M tokens/s, 489 MB largest process")


if __name__ == "__main__":
    main()
