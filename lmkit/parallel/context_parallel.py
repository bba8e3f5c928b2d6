"""Context parallelism: ring attention over a process group, with load-balanced causal sharding.

The sequence of every layer is split over the ``cp`` ranks of a context-parallel group. Each rank
keeps the queries of its tokens; the key/value blocks travel around the ring, one hop per step, and
the rank computes blockwise attention of its queries against the block it holds while the next one
is in transit (Liu et al. 2023, "Ring Attention with Blockwise Transformers"). The partial results
are merged with the online-softmax (log-sum-exp) rule, so the output equals full causal attention.

Causal masking makes a contiguous split unbalanced: the rank holding the end of the sequence attends
to every key, the first rank to almost none. With the *zigzag* (head-tail) split the sequence is cut
into ``2 cp`` chunks and rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r``, one from each end, so
every rank computes the same number of score entries. Tensors have lmkit's attention layout
``[B, H, T, head_dim]`` (`lmkit.model.CausalSelfAttention`), ``T`` being this rank's ``seq_len / cp``
tokens in the order `shard_sequence` gives them. Explained in the book, chapter 5, section 5.8.

In the engine (`lmkit.parallel.engine`), `parallelize_context` gives every block of a stage a
`ContextParallelAttention` (the plan's ``heads`` modules: the same ``qkv``/``proj`` children, so the
names, the tensor-parallel rows and the checkpoints are unchanged) and tells the stage which
positions its tokens have; the engine shards each microbatch with `shard_sequence` and averages the
gradients over dp x cp (`lmkit.parallel.mesh.Topology.gradient_view`).

PyTorch's own ``torch.distributed.tensor.experimental.context_parallel`` (torch 2.13) does not run
on CPU/gloo: causal SDPA there dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which "does not have a sharding strategy registered" (and the math backend, forced, fails with
"aten.add.Tensor got mixed torch.Tensor and DTensor"), so ``--engine native`` refuses ``cp > 1``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmkit.config import ConfigError
from lmkit.model import apply_rope, split_heads
from lmkit.parallel import plan

__all__ = [
    "LAYOUTS",
    "validate_cp",
    "chunk_ids",
    "shard_sequence",
    "unshard_sequence",
    "position_ids",
    "block_attention",
    "merge_partials",
    "ring_attention",
    "RingObserver",
    "RingAttention",
    "ContextParallelAttention",
    "parallelize_context",
]

#: "zigzag": rank r holds chunks r and 2 cp - 1 - r of 2 cp; "contiguous": chunk r of cp (unbalanced).
LAYOUTS = ("zigzag", "contiguous")


# --------------------------------------------------------------------------- sharding the sequence


def validate_cp(seq_len: int, cp: int, layout: str = "zigzag") -> None:
    """Raise `ConfigError` (a ValueError) in one line if `seq_len` cannot be split over `cp` ranks."""
    if layout not in LAYOUTS:
        raise ConfigError(f"context-parallel layout {layout!r} is unknown; use one of {LAYOUTS}")
    if not isinstance(cp, int) or cp < 1:
        raise ConfigError(f"cp must be a positive integer, got {cp!r}")
    chunks = 2 * cp if layout == "zigzag" else cp
    if seq_len % chunks:
        what = "2 cp chunks, two per rank" if layout == "zigzag" else "cp chunks, one per rank"
        raise ConfigError(
            f"sequence length {seq_len} is not divisible by {chunks} ({layout} context parallelism with "
            f"cp={cp} cuts it into {what}); use a sequence length that is a multiple of {chunks}")


def chunk_ids(rank: int, cp: int, layout: str = "zigzag") -> tuple[int, ...]:
    """The chunks of the sequence rank `rank` holds, in the order it holds them."""
    return (rank, 2 * cp - 1 - rank) if layout == "zigzag" else (rank,)


def _n_chunks(cp: int, layout: str) -> int:
    return 2 * cp if layout == "zigzag" else cp


def shard_sequence(x: Tensor, rank: int, cp: int, dim: int = 1, layout: str = "zigzag") -> Tensor:
    """This rank's tokens of the full sequence `x` (its chunks along `dim`, concatenated)."""
    validate_cp(x.size(dim), cp, layout)
    chunks = x.chunk(_n_chunks(cp, layout), dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, cp, layout)], dim=dim)


def unshard_sequence(parts: Sequence[Tensor], dim: int = 1, layout: str = "zigzag") -> Tensor:
    """The inverse of `shard_sequence`: the full sequence from every rank's part, in rank order."""
    cp = len(parts)
    per_rank = 2 if layout == "zigzag" else 1
    chunks: list[Tensor | None] = [None] * (per_rank * cp)
    for rank, part in enumerate(parts):
        for i, piece in zip(chunk_ids(rank, cp, layout), part.chunk(per_rank, dim=dim), strict=True):
            chunks[i] = piece
    return torch.cat(chunks, dim=dim)


def position_ids(seq_len: int, rank: int, cp: int, layout: str = "zigzag", start: int = 0,
                 device: torch.device | str | None = None) -> Tensor:
    """The positions (columns) of this rank's tokens: what its position embedding must look up."""
    return shard_sequence(torch.arange(start, start + seq_len, device=device), rank, cp, dim=0, layout=layout)


# --------------------------------------------------------------------------- one block, and the merge


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scaled scores ``q k^T / sqrt(d)``; on a diagonal block, -inf above the diagonal (future keys)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def block_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of `q` over one block of keys: the output and the log-sum-exp of every query's scores.

    ``causal`` masks the upper triangle (the block on the diagonal, queries and keys at the same
    positions). The pair (output, lse) is all the merge needs: the output is already normalised
    over this block, and ``exp(lse)`` is the normaliser it was divided by.
    """
    scores = _scores(q, k, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def merge_partials(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Online-softmax merge of two partial attentions of the same queries over disjoint key sets.

    ``lse = log(exp(lse_1) + exp(lse_2))`` and ``out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2``:
    each partial output is re-weighted by its share of the combined normaliser.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    old_share, block_share = torch.exp(lse - new_lse), torch.exp(block_lse - new_lse)
    out = old_share.unsqueeze(-1) * out + block_share.unsqueeze(-1) * block_out
    return out, new_lse


# --------------------------------------------------------------------------- the ring


def _ring_peers(group) -> tuple[int, int, int, int]:
    """(cp, this rank in the group, global rank of the right neighbour, of the left neighbour)."""
    if not dist.is_initialized():
        return 1, 0, 0, 0  # one rank, no ring: plain blockwise causal attention
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    right, left = (rank + 1) % cp, (rank - 1) % cp
    if group is not None:
        right, left = dist.get_global_rank(group, right), dist.get_global_rank(group, left)
    return cp, rank, right, left


def _start_exchange(send: Tensor, recv: Tensor, right: int, left: int, group, tag: int) -> list:
    """Post "send to the right, receive from the left" together (no deadlock) and return the works."""
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, right, group, tag),
                                   dist.P2POp(dist.irecv, recv, left, group, tag)])


def _wait(works: list) -> None:
    for work in works:
        work.wait()


#: ``on_event(phase, what, ring_step, start, end, blocks)``: ``phase`` "forward" or "backward"; ``what``
#: "compute" (the step's score blocks, ``blocks`` of them), "kv" / "dkv" (a K/V block / dK/dV accumulator
#: in flight: posted to waited for) or "wait" (blocked in ``wait``); times from `time.perf_counter`.
RingObserver = Callable[[str, str, int, float, float, int], None]


def _now(on_event: RingObserver | None) -> float:
    return time.perf_counter() if on_event is not None else 0.0


def _report(on_event: RingObserver | None, phase: str, what: str, step: int, start: float,
            blocks: int = 0) -> None:
    """Tell `on_event` (if any) that `what` of ring step `step` ran from `start` until now."""
    if on_event is not None:
        on_event(phase, what, step, start, time.perf_counter(), blocks)


def _block_pairs(rank: int, src: int, cp: int, layout: str):
    """(query chunk slot, key chunk slot, causal) for each score block rank `rank` computes against
    the keys of rank `src`; blocks entirely above the diagonal (keys after every query) are skipped."""
    for i, qc in enumerate(chunk_ids(rank, cp, layout)):
        for j, kc in enumerate(chunk_ids(src, cp, layout)):
            if kc <= qc:
                yield i, j, kc == qc


def _count(stats: dict | None, q: Tensor, k: Tensor, causal: bool) -> None:
    """Tally the score entries one block computes (and how many the causal mask keeps)."""
    if stats is None:
        return
    n, m = q.size(-2), k.size(-2)
    heads = math.prod(q.shape[:-2])
    stats["blocks"] = stats.get("blocks", 0) + 1
    stats["scores"] = stats.get("scores", 0) + heads * n * m
    stats["unmasked"] = stats.get("unmasked", 0) + heads * (n * (n + 1) // 2 if causal else n * m)


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the whole sequence, K/V passed around the ring.

    Forward: ``cp`` steps; in step ``i`` the rank holds the K/V block of rank ``r - i``, sends it to
    ``r + 1`` and receives the next from ``r - 1`` while it computes, then merges. Backward: the
    same ring again. The rank keeps only its own q, k, v, output and log-sum-exp and receives the
    K/V blocks a second time instead of storing all ``cp`` of them (that would bring back the
    activation memory context parallelism is there to divide); the score blocks are recomputed
    from lse as in flash attention. The gradient of a K/V block is accumulated by every rank that
    used it: an accumulator travels with the block, one hop behind, and its ``cp``-th hop brings
    it home to the owner.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group, layout: str, scale: float,
                stats: dict | None, on_event: RingObserver | None) -> Tensor:
        cp, rank, right, left = _ring_peers(group)
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax statistics in at least fp32
        n = len(chunk_ids(rank, cp, layout))
        qs = _grouped(q, k).chunk(n, dim=-2)  # [B, Hkv, group, T, hd]: the query heads of each k/v head
        outs: list[Tensor | None] = [None] * n
        lses: list[Tensor | None] = [None] * n
        kv = torch.stack([k, v]).contiguous()  # one message per step: [2, B, H, T, hd]
        for step in range(cp):
            src = (rank - step) % cp  # whose block this rank holds now
            posted = _now(on_event)
            if step < cp - 1:  # start moving it on before computing with it: overlap
                incoming = torch.empty_like(kv)
                works = _start_exchange(kv, incoming, right, left, group, tag=0)
            began, blocks = _now(on_event), 0
            ks, vs = kv[0].unsqueeze(2).chunk(n, dim=-2), kv[1].unsqueeze(2).chunk(n, dim=-2)
            for i, j, causal in _block_pairs(rank, src, cp, layout):
                blocks += 1
                _count(stats, qs[i], ks[j], causal)
                o, lse = block_attention(qs[i].to(acc), ks[j].to(acc), vs[j].to(acc), causal, scale)
                if outs[i] is None:
                    outs[i], lses[i] = o, lse
                else:
                    outs[i], lses[i] = merge_partials(outs[i], lses[i], o, lse)
            _report(on_event, "forward", "compute", step, began, blocks)
            if step < cp - 1:
                waited = _now(on_event)
                _wait(works)
                _report(on_event, "forward", "wait", step, waited)
                _report(on_event, "forward", "kv", step, posted)
                kv = incoming
        out, lse = torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.layout, ctx.scale, ctx.on_event = group, layout, scale, on_event
        return out.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale, on_event = ctx.group, ctx.layout, ctx.scale, ctx.on_event
        cp, rank, right, left = _ring_peers(group)
        acc = out.dtype
        n = len(chunk_ids(rank, cp, layout))
        dout = _grouped(dout.to(acc), k)
        delta = (dout * out).sum(-1)  # D_i = sum_j P_ij dP_ij = rowsum(dO * O)
        qs, dos = _grouped(q.to(acc), k).chunk(n, dim=-2), dout.chunk(n, dim=-2)
        lses, deltas = lse.chunk(n, dim=-1), delta.chunk(n, dim=-1)
        dq = torch.zeros_like(out)
        dqs = dq.chunk(n, dim=-2)
        kv = torch.stack([k, v]).contiguous()
        dkv_in: Tensor | None = None  # the accumulator arriving from the left: for the next block
        dkv_works: list = []
        dkv_posted = 0.0
        for step in range(cp):
            src = (rank - step) % cp
            posted = _now(on_event)
            if step < cp - 1:
                incoming = torch.empty_like(kv)
                kv_works = _start_exchange(kv, incoming, right, left, group, tag=0)
            began, blocks = _now(on_event), 0
            ks, vs = (t.to(acc).unsqueeze(2).chunk(n, dim=-2) for t in kv)
            dkv = torch.zeros_like(kv, dtype=acc)  # this rank's share of src's block gradient
            dks, dvs = dkv[0].chunk(n, dim=-2), dkv[1].chunk(n, dim=-2)
            for i, j, causal in _block_pairs(rank, src, cp, layout):
                blocks += 1
                # the forward's probabilities, recomputed from its scores and log-sum-exp
                p = torch.exp(_scores(qs[i], ks[j], causal, scale) - lses[i].unsqueeze(-1))
                # a key/value head's gradient sums over the query heads that share it (dim 2)
                dvs[j].add_((p.transpose(-2, -1) @ dos[i]).sum(2))
                ds = p * (dos[i] @ vs[j].transpose(-2, -1) - deltas[i].unsqueeze(-1))
                dqs[i].add_((ds @ ks[j]) * scale)
                dks[j].add_((ds.transpose(-2, -1) @ qs[i]).sum(2) * scale)
            _report(on_event, "backward", "compute", step, began, blocks)
            if step > 0:  # add what the ranks before us accumulated for the same block
                waited = _now(on_event)
                _wait(dkv_works)
                _report(on_event, "backward", "wait", step, waited)
                _report(on_event, "backward", "dkv", step - 1, dkv_posted)
                dkv += dkv_in
            if cp == 1:
                dkv_in = dkv
            else:  # pass the accumulator on, one hop behind its block
                dkv_in = torch.empty_like(dkv)
                dkv_posted = _now(on_event)
                dkv_works = _start_exchange(dkv, dkv_in, right, left, group, tag=1)
            if step < cp - 1:
                waited = _now(on_event)
                _wait(kv_works)
                _report(on_event, "backward", "wait", step, waited)
                _report(on_event, "backward", "kv", step, posted)
                kv = incoming
        if cp > 1:  # the last hop: our own block's gradient, summed over every rank
            waited = _now(on_event)
            _wait(dkv_works)
            _report(on_event, "backward", "wait", cp - 1, waited)
            _report(on_event, "backward", "dkv", cp - 1, dkv_posted)
        return (dq.flatten(1, 2).to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype),
                None, None, None, None, None)


def _grouped(q: Tensor, k: Tensor) -> Tensor:
    """``[B, Hq, T, hd]`` -> ``[B, Hkv, Hq / Hkv, T, hd]``: the query heads grouped by the key/value head
    they share (grouped-query attention; a group of one for multi-head attention)."""
    return q.unflatten(1, (k.size(1), q.size(1) // k.size(1)))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, layout: str = "zigzag",
                   scale: float | None = None, stats: dict | None = None,
                   on_event: RingObserver | None = None) -> Tensor:
    """Causal attention of this rank's q ``[B, Hq, T, hd]`` and k, v ``[B, Hkv, T, hd]`` (its
    `shard_sequence` part) over the whole sequence held by the ranks of `group`; the output
    ``[B, Hq, T, hd]`` is this rank's part of the full result. With grouped-query attention
    (``Hkv < Hq``) only the key/value heads travel the ring: ``Hq / Hkv`` times fewer bytes.

    `stats`, if given, accumulates the forward's work on this rank: ``blocks`` (score blocks computed),
    ``scores`` (score entries computed) and ``unmasked`` (entries the causal mask keeps).
    `on_event`, if given, is told of every ring step's compute, transfers and waits, forward and
    backward (`RingObserver`; `lmkit.parallel.timeline.attach_timeline` records them as events).
    """
    cp = _ring_peers(group)[0]
    validate_cp(q.size(-2) * cp, cp, layout)
    if (k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]
            or q.size(1) % k.size(1)):
        raise ValueError(f"ring_attention needs q [B, Hq, T, hd] and k, v [B, Hkv, T, hd] with Hkv dividing "
                         f"Hq, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    return RingAttention.apply(q, k, v, group, layout, scale, stats, on_event)


# --------------------------------------------------------------------------- in the model


class ContextParallelAttention(nn.Module):
    """`lmkit.model.CausalSelfAttention` with ring attention over `group`: built from one (its
    ``qkv``, ``proj``, ``resid_drop`` and QK-norms taken over), for the training path of a stage
    (causal, no mask, no cache, no attention dropout: the layouts refuse it). Rotary tables are
    those of this rank's tokens (`lmkit.parallel.stage.GPTStage.rope`: their zigzag positions)."""

    def __init__(self, attn: nn.Module, group, layout: str = "zigzag") -> None:
        super().__init__()
        self.n_head, self.head_dim, self.group_size = attn.n_head, attn.head_dim, attn.group
        self.qkv, self.proj, self.resid_drop = attn.qkv, attn.proj, attn.resid_drop
        if hasattr(attn, "q_norm"):
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.group, self.layout = group, layout
        self.on_event: RingObserver | None = None  # set by `lmkit.parallel.timeline.attach_timeline`

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = True, cache=None,
                layer: int = 0, start: int = 0, rope=None) -> Tensor:
        if mask is not None or not is_causal or cache is not None or start:
            raise ValueError("context-parallel attention computes the causal training path only "
                             "(no mask, KV cache or start offset)")
        B, T, _ = x.shape
        q, k, v = split_heads(self.qkv(x), self.head_dim, self.group_size)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = ring_attention(q, k, v, group=self.group, layout=self.layout, on_event=self.on_event)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, q.size(1) * self.head_dim)))

    def extra_repr(self) -> str:
        return f"ring over cp, layout={self.layout}"


def parallelize_context(stage: nn.Module, topo, layout: str = "zigzag") -> nn.Module:
    """Context parallelism for `stage` (a `GPTStage`) over ``topo.cp_group``, in place: each
    attention of the plan's ``heads`` style becomes a `ContextParallelAttention`, and the stage
    learns its cp rank so its position embedding looks up this rank's chunks (`position_ids`).
    Call it before tensor parallelism, which then hooks the new attention modules."""
    if topo.cp == 1:
        return stage
    stage.cp_size = topo.cp
    stage.cp_positions = functools.partial(position_ids, rank=topo.cp_rank, cp=topo.cp, layout=layout)
    for path, row in list(plan.rows_in(stage)):
        if row.style == "heads":
            ring = ContextParallelAttention(stage.get_submodule(path), topo.cp_group, layout)
            stage.set_submodule(path, ring)
    return stage
