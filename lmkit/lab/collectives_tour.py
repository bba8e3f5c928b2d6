"""The five collectives of data, tensor and expert parallelism on numbers small enough to read.

`collectives_tour_worker` runs under `lmkit.parallel.launch.run_local` (chapter 5, section
"Collectives"): rank ``r`` of ``N`` holds the ``N`` integers ``10 r + 1, ..., 10 r + N`` and runs an
all-reduce, a reduce-scatter, an all-gather of the reduce-scatter's shards, a broadcast from rank 0
and an all-to-all on them, each under a `CommCounter`, and returns what it held after each one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lmkit.parallel.comm import all_gather_single, reduce_scatter_single
from lmkit.parallel.instrument import CommCounter

__all__ = ["collectives_tour_worker"]


def collectives_tour_worker() -> dict[str, Any]:
    """For `run_local`: each collective once on this rank's ``N`` integers.

    Returns what each collective left on this rank (lists of ints under
    ``"all_reduce"``, ``"reduce_scatter"``, ``"all_gather"``, ``"broadcast"``,
    ``"all_to_all"``), what the rank held (``"holds"``), and under ``"comm"`` the
    `CommCounter` summary of each one's single call (calls, payload bytes, wire bytes).
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    x = torch.arange(1, n + 1) + 10 * rank          # rank r: 10r+1, ..., 10r+N (int64)
    out: dict[str, Any] = {"rank": rank, "holds": x.tolist(), "comm": {}}

    def run(name: str, result: torch.Tensor, collective) -> None:
        with CommCounter() as comm:
            collective()
        out[name], out["comm"][name] = result.tolist(), comm.summary()[name]

    total = x.clone()                               # every rank: the sum
    run("all_reduce", total, lambda: dist.all_reduce(total))
    shard = torch.empty(1, dtype=x.dtype)           # rank r: entry r of the sum
    run("reduce_scatter", shard, lambda: reduce_scatter_single(shard, x.clone()))
    gathered = torch.empty_like(x)                  # the shards, concatenated
    run("all_gather", gathered, lambda: all_gather_single(gathered, shard))
    root = x.clone()                                # rank 0's numbers, everywhere
    run("broadcast", root, lambda: dist.broadcast(root, src=0))
    swapped = torch.empty_like(x)                   # entry j of each rank: to rank j
    run("all_to_all", swapped, lambda: dist.all_to_all_single(swapped, x))
    return out
