#!/usr/bin/env python
"""Write rate of a megatron-core distributed checkpoint save on this machine.

    .venv/bin/python benchmarks/checkpoint_save.py [--gb 2] [--tensor-mb 64] [--runs 2] [--dir /tmp/ckpt_save_bench]

Builds a synthetic sharded state dict of ``--gb`` GB (fp32 tensors of ``--tensor-mb`` MB, the
size of one 12B layer's matrices) in a world of one process and saves it with
``dist_checkpointing.save``, the call ``checkpoint/resume.save_checkpoint`` makes (default
``torch_dist`` strategy; its writer fsyncs every file, so the rate is the disk's, not the page
cache's). Prints GB, seconds and GB/s per run, and the load average.

Used to size the SLURM launcher's ``SHUTDOWN_TIMEOUT`` (examples/normistral_11b/train_slurm.sbatch):
a 12B checkpoint's save time is *estimated* from this rate; no cluster was measured.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--gb", type=float, default=2.0, help="size of the state dict in GB (default 2)")
    parser.add_argument("--tensor-mb", type=float, default=64.0, help="size of each tensor in MB (default 64)")
    parser.add_argument("--runs", type=int, default=2, help="saves to time (default 2)")
    parser.add_argument("--dir", default="/tmp/ckpt_save_bench", help="where to write (deleted after each run)")
    args = parser.parse_args(argv)

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_normistral.convert.mcore_io import single_process_world

    numel = int(args.tensor_mb * 2**20 / 4)
    count = max(1, round(args.gb * 2**30 / (numel * 4)))
    total_gb = count * numel * 4 / 1e9
    generator = torch.Generator().manual_seed(0)
    tensors = {f"layer_{i:03d}.weight": torch.rand(numel, generator=generator) for i in range(count)}
    with single_process_world():
        for run in range(args.runs):
            target = Path(args.dir) / f"run{run}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            sharded = {k: ShardedTensor.from_rank_offsets(k, t) for k, t in tensors.items()}
            started = time.perf_counter()
            dist_checkpointing.save(sharded, str(target))
            seconds = time.perf_counter() - started
            written = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 1e9
            print(f"run {run}: {count} tensors, {total_gb:.2f} GB of tensors, {written:.2f} GB on disk, "
                  f"{seconds:.2f} s, {written / seconds:.3f} GB/s (load average {os.getloadavg()[0]:.2f})", flush=True)
            shutil.rmtree(target, ignore_errors=True)
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer starts processes
    sys.exit(main())
