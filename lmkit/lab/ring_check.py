"""Ring attention checked against full causal attention, on real processes (chapter 5, section 5.8).

`ring_attention_worker` runs under `lmkit.parallel.launch.run_local`: every rank draws the same
full q, k, v, computes the reference with ``F.scaled_dot_product_attention`` and runs
`lmkit.parallel.context_parallel.ring_attention` on its own shard; it returns the differences,
the ring's work, the bytes it sent and saved, and its events. Chapter 5 and
``tests/test_context_parallel.py`` call it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lmkit.parallel.context_parallel import chunk_ids, position_ids, ring_attention, shard_sequence
from lmkit.parallel.instrument import CommCounter

__all__ = ["ring_attention_worker"]


def ring_attention_worker(cases: Sequence[tuple[int, int, str, str]], batch: int = 2, heads: int = 3,
                          head_dim: int = 8, seed: int = 0) -> list[dict]:
    """For `lmkit.parallel.launch.run_local`: ring attention against full causal attention, per case.

    Each case is ``(cp, seq_len, layout, dtype)``; the world is cut into groups of ``cp``
    consecutive ranks (ranks left over sit the case out), so one launch checks several ring sizes
    on groups that are not the world. Every rank draws the same full q, k, v and output gradient,
    computes the reference with ``F.scaled_dot_product_attention(is_causal=True)`` and its
    gradients, then runs `ring_attention` on its own shard. Returns, per case this rank took part
    in, the largest absolute difference of the output and of dq, dk, dv from this rank's part of
    the reference (and the reference's largest magnitude); the forward's work (`ring_attention`'s
    ``stats``); the calls and bytes of the sends and receives forward and backward
    (`lmkit.parallel.instrument.CommCounter`); the bytes the forward saves for backward; and the
    ring's ``events`` as its ``on_event`` callback saw them: ``(phase, what, ring_step, start, end,
    blocks)``.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    groups = {}
    for cp in sorted({case[0] for case in cases}):  # every rank creates every group, in one order
        for first in range(0, world - cp + 1, cp):
            group = dist.new_group(list(range(first, first + cp)))
            if first <= me < first + cp:
                groups[cp] = group
    return [_check_case(groups[cp], cp, seq_len, layout, dtype, (batch, heads, head_dim), seed)
            for cp, seq_len, layout, dtype in cases if cp in groups]


def _check_case(group, cp: int, seq_len: int, layout: str, dtype: str, dims: tuple[int, int, int],
                seed: int) -> dict:
    rank, (batch, heads, head_dim) = dist.get_rank(group), dims
    g = torch.Generator().manual_seed(seed + seq_len)
    q, k, v, dout = (torch.randn(batch, heads, seq_len, head_dim, generator=g, dtype=getattr(torch, dtype))
                     for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)
    ref.backward(dout)

    def part(t: Tensor) -> Tensor:
        return shard_sequence(t.detach(), rank, cp, dim=2, layout=layout)

    mine = [part(t).requires_grad_() for t in (q, k, v)]
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    stats: dict[str, int] = {}
    events: list[tuple] = []

    def on_event(phase: str, what: str, ring_step: int, start: float, end: float, blocks: int) -> None:
        events.append((phase, what, ring_step, start, end, blocks))

    with CommCounter() as forward_comm, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ring_attention(*mine, group=group, layout=layout, stats=stats, on_event=on_event)
    with CommCounter() as backward_comm:
        out.backward(part(dout))
    pairs = {"out": (out, ref), "dq": (mine[0].grad, full[0].grad), "dk": (mine[1].grad, full[1].grad),
             "dv": (mine[2].grad, full[2].grad)}
    return {
        "cp": cp, "seq_len": seq_len, "layout": layout, "dtype": dtype, "rank": rank,
        "shape": [batch, heads, seq_len // cp, head_dim], "chunks": list(chunk_ids(rank, cp, layout)),
        "positions": position_ids(seq_len, rank, cp, layout).tolist(),
        "max_diff": {name: (a.detach() - part(b)).abs().max().item() for name, (a, b) in pairs.items()},
        "max_abs": {name: b.detach().abs().max().item() for name, (_, b) in pairs.items()},
        "work": stats, "saved_bytes": sum(saved), "events": events,
        "comm": {"forward": forward_comm.summary(), "backward": backward_comm.summary()},
    }
