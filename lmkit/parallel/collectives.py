"""A ring all-reduce written with send/recv, and a demonstration that counts every byte.

An all-reduce is a reduce-scatter followed by an all-gather; the ring algorithm does each in
``N - 1`` steps of ``1/N`` of the tensor, so every rank sends ``2 (N-1)/N`` of it, the figure
`lmkit.parallel.instrument.wire_bytes` and `lmkit.costs` use. `collectives_worker` runs the three
forms side by side on a gloo group under a `CommCounter` (chapter 5, section "Collectives").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmkit.parallel.comm import all_gather_single, reduce_scatter_single
from lmkit.parallel.instrument import CommCounter

__all__ = ["ring_all_reduce", "collectives_worker"]

def _exchange(send: Tensor, to: int, recv: Tensor, frm: int, group) -> None:
    """Send to the right neighbour and receive from the left one, posted together (no deadlock)."""
    ops = [dist.P2POp(dist.isend, send, dist.get_global_rank(group, to) if group else to, group),
           dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, frm) if group else frm, group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def ring_all_reduce(tensor: Tensor, group=None) -> Tensor:
    """Sum `tensor` over the group in place with the ring algorithm; returns it.

    Phase 1 (reduce-scatter): in step ``k`` rank ``r`` sends chunk ``(r - k) mod N`` to rank
    ``r + 1`` and adds the chunk ``(r - k - 1) mod N`` it receives from rank ``r - 1``; after
    ``N - 1`` steps rank ``r`` holds the full sum of chunk ``(r + 1) mod N``. Phase 2
    (all-gather): the summed chunks travel once more round the ring, copied instead of added.
    The tensor's numel must be divisible by the group size.
    """
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if n == 1:
        return tensor
    if tensor.numel() % n:
        raise ValueError(f"ring_all_reduce needs numel divisible by the group size {n}, got {tensor.numel()}")
    chunks = tensor.view(-1).chunk(n)
    buffer = torch.empty_like(chunks[0])
    right, left = (r + 1) % n, (r - 1) % n
    for k in range(n - 1):  # reduce-scatter
        _exchange(chunks[(r - k) % n].clone(), right, buffer, left, group)
        chunks[(r - k - 1) % n].add_(buffer)
    for k in range(n - 1):  # all-gather
        _exchange(chunks[(r + 1 - k) % n].clone(), right, buffer, left, group)
        chunks[(r - k) % n].copy_(buffer)
    return tensor


def collectives_worker(numel: int, seed: int = 0) -> dict[str, Any]:
    """For `lmkit.parallel.launch.run_local`: one all-reduce done three ways, each one counted.

    Every rank builds a float64 tensor of small integers (so every summation order gives the
    same, exact sum) and reduces it with ``dist.all_reduce``, with ``reduce_scatter`` followed by
    ``all_gather``, and with `ring_all_reduce`. Returns, per way, the `CommCounter` summary
    (``{kind: {calls, bytes, wire_bytes}}``) and whether the result equals ``dist.all_reduce``'s.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randint(-100, 100, (numel,), generator=torch.Generator().manual_seed(seed + rank)).double()
    out: dict[str, Any] = {"rank": rank, "world_size": n, "payload_bytes": x.numel() * x.element_size()}

    with CommCounter() as comm:
        reference = x.clone()
        dist.all_reduce(reference)
    out["all_reduce"] = {"comm": comm.summary(), "equal": True}

    with CommCounter() as comm:
        shard = torch.empty(numel // n, dtype=x.dtype)
        reduce_scatter_single(shard, x.clone())
        gathered = torch.empty_like(x)
        all_gather_single(gathered, shard)
    out["reduce_scatter + all_gather"] = {"comm": comm.summary(), "equal": torch.equal(gathered, reference),
                                          "shard_equal": torch.equal(shard, reference.chunk(n)[rank])}

    with CommCounter() as comm:
        ring = ring_all_reduce(x.clone())
    out["ring (send/recv)"] = {"comm": comm.summary(), "equal": torch.equal(ring, reference)}
    return out
