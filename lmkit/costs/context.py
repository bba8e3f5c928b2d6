"""Context parallelism on paper: ring attention's work, memory and timing per rank.

`lmkit.parallel.context_parallel` runs ring attention over ``cp`` ranks, the sequence cut zigzag
("head-tail") or contiguously. `cp_attention_work` counts the score blocks each rank computes,
`cp_attention_memory` what it holds, `cp_ring_step` whether a ring step's transfer hides behind its
compute; the ring's messages are `lmkit.costs.collectives.cp_communication`. Pure Python, like all of
`lmkit.costs`.
"""

from __future__ import annotations

from lmkit.costs.model import CostError

__all__ = ["CP_LAYOUTS", "RING_BACKWARD_COMPUTE", "cp_chunks", "cp_attention_work", "cp_attention_memory",
           "cp_ring_step"]

#: A ring step's backward compute over its forward's: `lmkit.parallel.context_parallel.RingAttention`
#: runs 2 block matmuls per block pair forward (``Q K^T``, ``P V``) and 5 backward (``Q K^T`` again to
#: recompute ``P``, ``P^T dO``, ``dO V^T``, ``dS K``, ``dS^T Q``), as FlashAttention's backward does.
RING_BACKWARD_COMPUTE = 2.5

# lmkit.parallel.context_parallel: ring attention over cp ranks, zigzag ("head-tail") or contiguous
# causal sharding. Per layer and microbatch, for this rank's s/cp tokens and h/t of the width (its heads).

CP_LAYOUTS = ("zigzag", "contiguous")


def cp_chunks(s: int, cp: int, layout: str) -> tuple[int, int]:
    """(chunks of the sequence, tokens per chunk), validated."""
    if layout not in CP_LAYOUTS:
        raise CostError(f"context-parallel layout {layout!r} is unknown; use one of {CP_LAYOUTS}")
    n = 2 * cp if layout == "zigzag" else cp
    if cp < 1 or s % n:
        raise CostError(f"seq_len={s} is not divisible by {n} ({layout} sharding over cp={cp}); "
                        f"use a multiple of {n}")
    return n, s // n


def cp_attention_work(s: int, cp: int, layout: str = "zigzag") -> list[dict[str, int]]:
    """Per rank: score blocks, score entries and unmasked (causal) entries of one head's forward.

    Rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (zigzag) or chunk ``r`` (contiguous) of ``C``
    tokens. Its queries of chunk ``i`` meet keys of chunk ``j <= i``: a full ``C x C`` block below
    the diagonal, a triangle of ``C (C+1)/2`` on it. Zigzag: ``2 cp + 1`` blocks and
    ``(2 cp - 1) C^2 + C (C + 1)`` unmasked entries on every rank; contiguous: ``r + 1`` blocks and
    ``r C^2 + C (C+1)/2``, growing with the rank.
    """
    n, c = cp_chunks(s, cp, layout)
    out = []
    for r in range(cp):
        mine = (r, n - 1 - r) if layout == "zigzag" else (r,)
        blocks = [(i, j) for i in mine for src in range(cp)
                  for j in ((src, n - 1 - src) if layout == "zigzag" else (src,)) if j <= i]
        diagonal = sum(1 for i, j in blocks if i == j)
        out.append({"blocks": len(blocks), "scores": len(blocks) * c * c,
                    "unmasked": (len(blocks) - diagonal) * c * c + diagonal * c * (c + 1) // 2})
    return out


def cp_attention_memory(b: int, s: int, h: int, a: int, cp: int, tp: int = 1, act_bytes: int = 4,
                        layout: str = "zigzag", *, kv_width: int | None = None) -> dict[str, float]:
    """Bytes one rank's ring attention holds, against the score matrix of attention without it.

    ``kv_width`` is the keys' (and the values') width, key/value heads x head_dim (default `h`:
    as many key/value heads as the ``a`` query heads; grouped-query attention has fewer).

    - ``saved``: what the forward keeps for backward: q (``h``), k and v (``kv_width`` each) in
      ``act_bytes``, and the output (``h``) and log-sum-exp in the accumulation precision
      (``max(act_bytes, 4)``): linear in ``s / cp``;
    - ``kv_in_flight``: the K/V block computed on plus the one arriving (2 blocks of
      ``2 b (s/cp) kv_width/t``);
    - ``dkv_in_flight``: in backward, the dK/dV accumulator computed into plus the one arriving (2 blocks
      in the accumulation precision);
    - ``score_block``: the largest score block alive at once (one chunk pair, fp32 or wider);
    - ``scores_full``: the ``a s^2 b / t`` score matrix one rank would hold without context parallelism.
    """
    n, c = cp_chunks(s, cp, layout)
    acc = max(act_bytes, 4)
    kv = h if kv_width is None else kv_width
    local, width, kv_local = s // cp, h // tp, kv // tp
    return {"saved": (act_bytes * (width + 2 * kv_local) + acc * width) * b * local
                     + acc * b * (a // tp) * local,
            "kv_in_flight": 2 * 2 * b * local * kv_local * act_bytes,
            "dkv_in_flight": 2 * 2 * b * local * kv_local * acc,
            "score_block": acc * b * (a // tp) * c * c,
            "scores_full": act_bytes * b * (a // tp) * s * s}


def cp_ring_step(b: int, s: int, h: int, cp: int, peak_flops: float, bandwidth: float, tp: int = 1,
                 act_bytes: int = 2, layout: str = "zigzag", *,
                 kv_width: int | None = None) -> dict[str, float]:
    """Seconds of one forward ring step (a K/V block that is not the rank's own): compute and transfer.

    Zigzag: two ``C x C`` blocks (``C = s / 2cp``) of ``QK^T`` and ``PV``, ``4 b C^2 h/t`` FLOPs each
    (every query head computes; a contiguous rank below the diagonal: one ``(s/cp)^2`` block, twice
    as much); the transfer is one K/V block, ``2 b (s/cp) (kv_width/t) e`` bytes at `bandwidth`
    bytes/s (``kv_width`` default `h`). The transfer hides behind the compute when
    ``compute_s >= comm_s``: for zigzag when ``s / cp >= (kv_width / h) e F / beta`` tokens per rank
    (``hide_tokens``), so grouped-query attention hides its ring at ``n_head / n_kv_head`` times
    shorter chunks. Backward (`lmkit.parallel.context_parallel.RingAttention.backward`): a step's
    compute, `RING_BACKWARD_COMPUTE` = 2.5 times the forward's (5 block matmuls against 2), runs while
    the next K/V block and the previous step's dK/dV accumulator travel, the latter in the
    accumulation precision ``max(e, 4)``: it hides when ``2.5 compute_s >= comm_s (1 + max(e, 4) /
    e)``, at ``hide_tokens_backward`` = ``(1 + max(e, 4) / e) / 2.5`` times ``hide_tokens`` per rank:
    1.2x in bf16, 0.8x in fp32 (as `_ring_exposed_s`).
    """
    _, c = cp_chunks(s, cp, layout)
    width, kv = h // tp, (h if kv_width is None else kv_width) // tp
    block_pairs = 2 if layout == "zigzag" else 1
    flops = block_pairs * 4 * b * c * c * width
    comm = 2 * b * (s // cp) * kv * act_bytes
    hide = (s // cp) * (comm / bandwidth) / (flops / peak_flops)  # tokens per rank where f = k
    return {"flops": float(flops), "compute_s": flops / peak_flops, "bytes": float(comm),
            "comm_s": comm / bandwidth, "hide_tokens": hide,
            "hide_tokens_backward": hide * (1 + max(act_bytes, 4) / act_bytes) / RING_BACKWARD_COMPUTE}
