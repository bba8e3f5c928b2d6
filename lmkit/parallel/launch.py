"""Run a function on N local processes with a gloo process group, without torchrun.

Tests and notebooks call `run_local(world_size, fn, *args)`. Each launch by torchrun costs
7-20 s on a small CPU, mostly ``import torch`` in every process; here the workers come from a
*forkserver* that imported torch and lmkit once, so a layout starts in well under a second and
a test can check many layouts cheaply. The workers see the same environment variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so code under
test (`lmkit.parallel.mesh.init_topology`) runs exactly as under torchrun.

`fn` must be importable (a module-level function); its return values come back in rank order.
An exception in any worker is re-raised in the caller with the worker's traceback, and the
other workers are terminated instead of waiting forever on a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_local", "free_port", "WorkerError"]

# The engines bring torch.distributed.checkpoint/tensor/fsdp with them: ~1 s of CPU per worker if each
# imported them itself (8 ranks on 2 cores: seconds per launch). What the workers run on top of them
# (the trainer, lmkit.lab) then imports in milliseconds.
_PRELOAD = ["torch", "torch.distributed", "numpy", "lmkit.model", "lmkit.parallel.mesh",
            "lmkit.parallel.engine", "lmkit.parallel.native"]


class WorkerError(RuntimeError):
    """A worker process raised; the message holds its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, env: dict[str, str], fn: Callable, args: tuple,
            kwargs: dict, queue) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)  # N processes share the cores; oversubscription is slow
    try:
        result = fn(*args, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(world_size: int, fn: Callable, *args: Any, timeout: float = 300.0,
              env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on `world_size` processes; return the results by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, dict(env or {}), fn, args, kwargs, queue),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = queue.get(timeout=timeout)
            except Exception as e:  # queue.Empty
                missing = world_size - len(results)
                raise WorkerError(f"no result from {missing} worker(s) within {timeout:.0f} s (a collective "
                                  "is probably waiting for a rank that failed)") from e
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    return [results[r] for r in range(world_size)]
