"""Run a function in N processes over gloo: how every parallel layout is tested on CPU.

    result = run_distributed(my_module.worker, world_size=2, args=(config,))

``worker(rank, world_size, *args)`` runs in each of N spawned processes after
torch.distributed is initialised (gloo; the CPU layer for megatron-core is active). Rank 0's
return value is returned; an exception in any rank is re-raised here with that rank's
traceback. The worker must be importable by its module path (spawn pickles it by name), so
workers live in library modules, not in test files.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from megatron_normistral.runtime.parallel import free_port


class DistributedTestError(RuntimeError):
    pass




def _entry(rank: int, world_size: int, port: int, result_dir: str, threads: int, cpu_compat_skip, fn, args, kwargs) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    from megatron_normistral.runtime import cpu_compat, parallel

    out = Path(result_dir) / f"rank{rank}.pkl"
    try:
        if cpu_compat_skip:
            cpu_compat.activate(skip=cpu_compat_skip)
        parallel.init_distributed(timeout_minutes=5)
        result = fn(rank, world_size, *args, **kwargs)
        parallel.shutdown()
        out.write_bytes(pickle.dumps(("ok", result)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        out.write_bytes(pickle.dumps(("error", f"rank {rank}: {exc!r}\n{traceback.format_exc()}")))
        raise


def run_distributed(
    fn,
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout_s: float = 300.0,
    threads: int | None = None,
    cpu_compat_skip: tuple[str, ...] = (),
):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo processes.

    ``cpu_compat_skip`` leaves patches of the CPU layer out (tests showing each is needed).
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="normistral-dist-") as result_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, result_dir, threads, tuple(cpu_compat_skip), fn, args, kwargs or {}), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = {}
        for r in range(world_size):
            path = Path(result_dir) / f"rank{r}.pkl"
            if path.exists():
                results[r] = pickle.loads(path.read_bytes())
        errors = [msg for status, msg in results.values() if status == "error"]
        if errors:
            raise DistributedTestError("\n".join(errors))
        if hung:
            raise DistributedTestError(f"ranks {hung} did not finish within {timeout_s:.0f} s")
        missing = [r for r in range(world_size) if r not in results]
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            raise DistributedTestError(f"ranks {missing} exited without a result (exit codes {codes})")
        return results[0][1]
