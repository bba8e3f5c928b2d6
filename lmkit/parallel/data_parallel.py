"""Data parallelism by hand: bucketed gradient all-reduce, ``no_sync`` accumulation, ZeRO-1/2 AdamW.

Gradients live in flat buckets (views, no copies) all-reduced as soon as backward fills them
(PyTorch DDP, Li et al. 2020). Under ZeRO every bucket is padded to a multiple of dp and split
into dp chunks, one per rank (Megatron-LM's distributed optimizer); ZeRO-1 steps AdamW on the
rank's chunks only, ZeRO-2 also keeps only their gradients: one reduce-scatter per bucket and
backward into the rank's shard (Rajbhandari et al. 2020), so gradient memory is divided by dp.
Checkpoints hold the full state, so they load under any dp/zero. Explained in the book,
chapter 5, section 5.3.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmkit.config import TrainConfig
from lmkit.parallel.mesh import Topology

__all__ = ["DataParallel", "Bucket"]

# torch 2.13 renamed the tensor collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Bucket:
    """A contiguous range ``[start, end)`` of parameter group ``group``'s flat buffers.

    ``index`` is the launch order (all ranks launch in this order); ``params`` are the indices
    of the parameters it holds, whole (a larger parameter than the cap gets a bucket of its own).
    Under ZeRO the range is padded to a multiple of dp and each dp rank owns one ``chunk`` of it,
    ``[start + r * chunk, start + (r + 1) * chunk)`` (Megatron-LM's distributed optimizer: every
    bucket sharded over all dp ranks); ``shard_offset`` is where that chunk sits in the rank's
    shard of the group (ZeRO-2's gradient accumulator).
    """

    index: int
    group: int
    start: int
    end: int
    params: list[int]
    chunk: int = 0
    shard_offset: int = 0

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class _FlatGroup:
    """One optimizer parameter group laid out in flat buffers (reverse registration order)."""

    members: list[int]  # parameter indices, in buffer order
    offsets: dict[int, int] = field(default_factory=dict)  # parameter index -> start in the buffer
    numel: int = 0  # buffer elements (with ZeRO's padding: every bucket a multiple of dp)
    shard: int = 0  # elements this rank owns under ZeRO (the sum of its buckets' chunks), else numel
    grad: Tensor | None = None  # ZeRO-0/1: flat gradients; every member's .grad is a view into it
    shard_grad: Tensor | None = None  # ZeRO-2: this rank's reduced gradient shard (the accumulator)
    param: Tensor | None = None  # ZeRO only: flat parameters; every member's .data is a view into it
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # norm's share: (param, lo, hi)


class DataParallel:
    """Gradient averaging over ``topo.dp_group`` plus AdamW, optionally ZeRO-1/2 sharded.

    ``named_params``: ``(name, parameter)`` pairs, possibly from several pipeline chunks; names
    must be unique (they key the checkpointed optimizer state). Parameters that do not require
    grad are ignored; all others must share one dtype and device. ``zero``: 0, 1 or 2 (the book,
    chapter 5, section 5.3). ``bucket_cap_mb``: the most bytes of gradients per bucket (MiB, as
    DDP; a larger parameter gets a bucket of its own). ``isolate``: names that get a bucket of
    their own (the tied embedding's two copies under pipelining, so that ZeRO-2 shards both alike).

    Construction is a collective over the dp group: dp rank 0's parameters are broadcast, as
    DDP does, so replicas start identical. ZeRO-0/1: every ``p.grad`` is a view into a flat
    buffer (call `zero_grad`; ``dp.optimizer.zero_grad()`` is redirected to it) and each bucket
    is all-reduced as soon as backward fills it. ZeRO-2 keeps no full gradient buffer: when a
    bucket's gradients are complete it is reduce-scattered (one collective) into every rank's
    shard of it, added to the shard accumulator, and the full ``p.grad`` are dropped; this
    happens after *every* backward (accumulation happens in the shard, as DeepSpeed's ZeRO-2
    does), so ``no_sync`` does not apply to it. Under ZeRO every ``p.data`` is a view into a
    flat parameter buffer: replacing ``p.data`` afterwards (``model.to(...)``) would cut the model
    off from the optimizer. ``dp.optimizer`` is a real `torch.optim.AdamW` (over this rank's
    bucket chunks under ZeRO), so ``LambdaLR(dp.optimizer, ...)`` drives its learning rate. Set
    ``dp.comm_log = []`` to record ``(bucket, "backward" | "finish", gradients ready)`` at every
    launch.

    Typical step::

        dp.zero_grad()
        for i, (x, y) in enumerate(micro_batches):
            with dp.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                (model(x, y)[1] / len(micro_batches)).backward()
        dp.finish_grad_sync()
        norm = dp.clip_grad_norm_(cfg.grad_clip)
        dp.step(); scheduler.step()        # scheduler = LambdaLR(dp.optimizer, ...)
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], topo: Topology,
                 train_cfg: TrainConfig, zero: int = 0, bucket_cap_mb: float = 25.0,
                 isolate: Iterable[str] = ()):
        if zero not in (0, 1, 2):
            raise ValueError(f"zero={zero} is not supported by the lmkit engine; use 0, 1 or 2 "
                             "(ZeRO-3 is the native engine's FSDP2)")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        pairs = [(n, p) for n, p in named_params if p.requires_grad]
        if not pairs:
            raise ValueError("DataParallel got no parameters that require grad")
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        if len(set(self.names)) != len(self.names):
            raise ValueError("parameter names passed to DataParallel must be unique")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("the same parameter was passed twice (tied weights must appear once)")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"all parameters need one dtype and device, got {dtypes} / {devices}")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.zero, self.cfg = zero, train_cfg
        self.dp, self.dp_rank = topo.dp, topo.dp_rank
        self.dp_group, self.dp_ranks = topo.dp_group, list(topo.dp_ranks)
        if self.dp > 1 and not dist.is_initialized():
            raise RuntimeError(f"dp={self.dp} but torch.distributed is not initialised")
        self._index = {id(p): i for i, p in enumerate(self.params)}
        isolated = {self.names.index(n) for n in isolate if n in self.names}

        cap = int(bucket_cap_mb * 2**20) // self.params[0].element_size()
        self.groups, self.buckets = self._layout(cap, isolated)
        self._bucket_of = [0] * len(self.params)
        for b in self.buckets:
            for i in b.params:
                self._bucket_of[i] = b.index
        self._allocate_buffers()
        self._grad_views = [self._grad_view(i) for i in range(len(self.params))] if zero < 2 else []
        self.optimizer = self._make_optimizer()
        # `dp.optimizer.zero_grad()` (train.py's habit) would drop the gradient views; route it here.
        self.optimizer.zero_grad = lambda set_to_none=True: self.zero_grad()  # type: ignore[method-assign]

        self._require_sync = True
        self.comm_log: list[tuple[int, str, int]] | None = None  # set to [] to record launches
        self._in_flight: dict[int, tuple[Any, Tensor, Tensor]] = {}  # ZeRO-2: bucket -> (work, out, in)
        self._reset_round()
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self.params)]

    # ------------------------------------------------------------------ layout

    def _layout(self, cap: int, isolated: set[int]) -> tuple[list[_FlatGroup], list[Bucket]]:
        """Two groups like `lmkit.train.configure_optimizer` (decay: dim >= 2, then no decay), and
        greedy buckets of at most `cap` elements of whole parameters.

        Within a group the buffer holds the parameters in *reverse* registration order, the
        order backward produces their gradients, so that buckets fill one after another. Under
        ZeRO each bucket is padded to a multiple of dp and split into dp equal chunks.
        """
        decay = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        no_decay = [i for i, p in enumerate(self.params) if p.dim() < 2]
        groups: list[_FlatGroup] = []
        raw: list[Bucket] = []
        for gi, members in enumerate((decay, no_decay)):
            g = _FlatGroup(members=list(reversed(members)))
            runs: list[list[int]] = []
            for i in g.members:
                n = self.params[i].numel()
                if (not runs or i in isolated or runs[-1][0] in isolated
                        or sum(self.params[j].numel() for j in runs[-1]) + n > cap):
                    runs.append([i])
                else:
                    runs[-1].append(i)
            for run in runs:
                start = g.numel
                for i in run:
                    g.offsets[i] = g.numel
                    g.numel += self.params[i].numel()
                chunk = 0
                if self.zero:
                    chunk = math.ceil((g.numel - start) / self.dp)
                    g.numel = start + chunk * self.dp
                raw.append(Bucket(-1, gi, start, g.numel, run, chunk, g.shard))
                g.shard += chunk
            if not self.zero:
                g.shard = g.numel
            groups.append(g)
        # Launch order: a bucket is complete when its earliest-registered parameter's gradient
        # arrives, and backward reaches early-registered parameters last.
        raw.sort(key=lambda b: (-min(b.params), b.group, b.start))
        for k, b in enumerate(raw):
            b.index = k
        for b in raw:  # the gradients this rank is responsible for: its chunks under ZeRO-2, else all
            g = groups[b.group]
            lo, hi = (b.start + self.dp_rank * b.chunk, b.start + (self.dp_rank + 1) * b.chunk) \
                if self.zero == 2 else (b.start, b.end)
            for i in b.params:
                a, e = g.offsets[i], g.offsets[i] + self.params[i].numel()
                if max(a, lo) < min(e, hi):
                    shift = b.shard_offset - lo if self.zero == 2 else 0
                    g.segments.append((i, max(a, lo) + shift, min(e, hi) + shift))
        return groups, raw

    def _chunk_range(self, b: Bucket) -> tuple[int, int]:
        """This rank's chunk of bucket `b` in its group's flat buffer (ZeRO)."""
        lo = b.start + self.dp_rank * b.chunk
        return lo, lo + b.chunk

    def _allocate_buffers(self) -> None:
        for g in self.groups:
            if self.zero == 2:
                g.shard_grad = torch.zeros(g.shard, dtype=self.dtype, device=self.device)
            else:
                g.grad = torch.zeros(g.numel, dtype=self.dtype, device=self.device)
            if self.zero:
                g.param = torch.zeros(g.numel, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                for i in g.members:
                    p = self.params[i]
                    if g.grad is not None:
                        view = self._grad_view(i)
                        if p.grad is not None:
                            view.copy_(p.grad)
                        p.grad = view
                    else:
                        p.grad = None  # ZeRO-2: full gradients exist only until their bucket is reduced
                    if g.param is not None:
                        flat = g.param[g.offsets[i]:g.offsets[i] + p.numel()].view_as(p)
                        flat.copy_(p)
                        p.data = flat  # the model's parameter now lives in the flat buffer
        if self.dp > 1:
            # Like DDP's construction: replicas start from dp rank 0's parameters.
            if self.zero:
                tensors = [g.param for g in self.groups if g.numel]
            else:
                tensors = [p.data for p in self.params]
            works = [dist.broadcast(t, src=self.dp_ranks[0], group=self.dp_group, async_op=True)
                     for t in tensors]
            for w in works:
                w.wait()

    def _grad_view(self, i: int) -> Tensor:
        g = self.groups[0 if self.params[i].dim() >= 2 else 1]
        start = g.offsets[i]
        return g.grad[start:start + self.params[i].numel()].view_as(self.params[i])

    def _make_optimizer(self) -> torch.optim.AdamW:
        """AdamW with `lmkit.train.configure_optimizer`'s hyper-parameters and groups.

        ZeRO: each group's "parameters" are this rank's chunks of its buckets (views of the flat
        parameter buffer), so `torch.optim.AdamW` keeps moments for the chunks only and writes
        into the model; their gradients are views of the reduced gradients (ZeRO-1: of the full
        buffer; ZeRO-2: of the shard accumulator).
        """
        cfg = self.cfg
        decays = (cfg.weight_decay, 0.0)
        if self.zero:
            self._chunks: list[tuple[Bucket, Tensor]] = []
            groups = []
            for gi, (g, wd) in enumerate(zip(self.groups, decays, strict=True)):
                chunk_params = []
                for b in (b for b in sorted(self.buckets, key=lambda b: b.start) if b.group == gi):
                    lo, hi = self._chunk_range(b)
                    chunk = g.param[lo:hi]
                    chunk.grad = self._chunk_grad(b)
                    self._chunks.append((b, chunk))
                    chunk_params.append(chunk)
                groups.append({"params": chunk_params, "weight_decay": wd})
        else:
            groups = [{"params": [self.params[i] for i in sorted(g.members)], "weight_decay": wd}
                      for g, wd in zip(self.groups, decays, strict=True)]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                 fused=fused or None)

    def _chunk_grad(self, b: Bucket) -> Tensor:
        """The reduced gradient of this rank's chunk of bucket `b` (ZeRO)."""
        g = self.groups[b.group]
        if self.zero == 2:
            return g.shard_grad[b.shard_offset:b.shard_offset + b.chunk]
        lo, hi = self._chunk_range(b)
        return g.grad[lo:hi]

    # ------------------------------------------------------------------ gradient sync

    def _reset_round(self) -> None:
        self._pending = [len(b.params) for b in self.buckets]
        self._arrived = [False] * len(self.params)  # ZeRO-2: a gradient waits in p.grad
        self._next = 0  # buckets [0, _next) are launched (ZeRO-0/1)
        self._works: list[Any] = []
        self._n_ready = 0  # gradients that arrived in this synchronised round (for comm_log)
        self._dirty = False  # a gradient arrived since the last sync

    def _adopt_grad(self, i: int) -> None:
        """Make ``p.grad`` the view into the flat buffer again if someone replaced it (ZeRO-0/1)."""
        p, view = self.params[i], self._grad_views[i]
        if p.grad is None:
            view.zero_()  # no gradient since it was set to None: zero, not stale
            p.grad = view
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
            p.grad = view

    def _make_hook(self, i: int):
        def hook(_param: Tensor) -> None:
            self._grad_ready(i)
        return hook

    def _grad_ready(self, i: int) -> None:
        self._dirty = True
        if self.zero == 2:
            self._n_ready += 1
            self._arrived[i] = True
            b = self._bucket_of[i]
            if all(self._arrived[j] for j in self.buckets[b].params):
                self._reduce_scatter(b, "backward")
            return
        self._adopt_grad(i)
        if not self._require_sync or self.dp == 1:
            return
        self._n_ready += 1
        b = self._bucket_of[i]
        if self._pending[b] == 0:
            raise RuntimeError(
                f"gradient of {self.names[i]!r} arrived twice in one synchronised step; run every "
                "backward but the last inside DataParallel.no_sync()")
        self._pending[b] -= 1
        # Launch in the fixed order, so every rank issues the same collective sequence.
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next, "backward")

    def _launch(self, b: int, where: str) -> None:
        """ZeRO-0/1: all-reduce bucket `b` of the flat gradient buffer, asynchronously."""
        bucket = self.buckets[b]
        flat = self.groups[bucket.group].grad[bucket.start:bucket.end]
        flat.div_(self.dp)  # average = sum of grad / dp; dividing first keeps magnitudes small
        self._works.append(dist.all_reduce(flat, group=self.dp_group, async_op=True))
        self._next = b + 1
        if self.comm_log is not None:
            self.comm_log.append((b, where, self._n_ready))

    def _reduce_scatter(self, b: int, where: str) -> None:
        """ZeRO-2: one reduce-scatter of bucket `b`'s gradients into every rank's chunk of it.

        The bucket's ``p.grad`` are copied into one padded flat input (divided by dp) and dropped;
        the reduced chunk is added to the shard accumulator when the work completes (`_settle`),
        so gradients accumulate over backward passes in the shard, never in a full buffer.
        """
        bucket, g = self.buckets[b], self.groups[self.buckets[b].group]
        self._settle(b)  # at most one reduction of a bucket in flight
        flat = torch.zeros(bucket.numel, dtype=self.dtype, device=self.device)
        for i in bucket.params:
            p = self.params[i]
            if p.grad is not None:
                start = g.offsets[i] - bucket.start
                flat[start:start + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None
            self._arrived[i] = False
        flat.div_(self.dp)
        if self.dp == 1:
            g.shard_grad[bucket.shard_offset:bucket.shard_offset + bucket.chunk].add_(flat)
        else:
            out = torch.empty(bucket.chunk, dtype=self.dtype, device=self.device)
            work = _reduce_scatter_single(out, flat, group=self.dp_group, async_op=True)
            self._in_flight[b] = (work, out, flat)
        if self.comm_log is not None:
            self.comm_log.append((b, where, self._n_ready))

    def _settle(self, b: int | None = None) -> None:
        """Wait for ZeRO-2's reduction of bucket `b` (None: all) and add it to the accumulator."""
        for k in ([b] if b is not None else sorted(self._in_flight)):
            if k not in self._in_flight:
                continue
            work, out, _ = self._in_flight.pop(k)
            work.wait()
            bucket = self.buckets[k]
            acc = self.groups[bucket.group].shard_grad
            acc[bucket.shard_offset:bucket.shard_offset + bucket.chunk].add_(out)

    def remove_hooks(self) -> None:
        """Detach the backward hooks (e.g. before wrapping the same parameters again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def require_sync(self, flag: bool) -> None:
        """Whether backward hooks communicate (False = accumulate locally, like `no_sync`; ZeRO-0/1)."""
        self._require_sync = bool(flag)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (DDP's ``no_sync``).

        ZeRO-2 has no full buffer to accumulate in: its backward passes reduce-scatter into the
        shard regardless (one reduce-scatter per bucket and backward).
        """
        previous = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets that have not been launched, and wait for all of them.

        Afterwards every rank holds the averaged gradients (ZeRO-0/1) or the averaged
        gradients of its own chunks in the shard accumulator (ZeRO-2). A call with no new
        gradient since the last one does nothing (it would average the averages again).
        """
        if self.zero == 2:
            for i, p in enumerate(self.params):  # gradients set by hand (no hook): reduce them too
                if p.grad is not None:
                    self._arrived[i] = True
            for b in range(len(self.buckets)):
                if any(self._arrived[i] for i in self.buckets[b].params):
                    self._reduce_scatter(b, "finish")
            self._settle()
            self._reset_round()
            return
        for i in range(len(self.params)):
            self._adopt_grad(i)
        if self.dp > 1 and (self._dirty or self._next > 0):
            while self._next < len(self.buckets):
                self._launch(self._next, "finish")
            for work in self._works:
                work.wait()
        self._reset_round()

    def grad_shards(self) -> dict[str, tuple[int, int, Tensor]]:
        """The reduced gradients this rank holds, by name: ``(lo, hi, values)`` where `values` are
        elements ``[lo, hi)`` of the flattened parameter (ZeRO-2: its share of the shard; else all)."""
        out = {}
        for g in self.groups:
            store = g.shard_grad if self.zero == 2 else g.grad
            for i, lo, hi in g.segments:
                start = lo - g.offsets[i] if self.zero != 2 else self._flat_start(i, lo)
                out[self.names[i]] = (start, start + hi - lo, store[lo:hi])
        return out

    def _flat_start(self, i: int, lo: int) -> int:
        """Element of parameter `i` (flattened) at position `lo` of its group's shard accumulator."""
        b = self.buckets[self._bucket_of[i]]
        g = self.groups[b.group]
        return lo - b.shard_offset + self._chunk_range(b)[0] - g.offsets[i]

    def all_reduce_grads(self, params: Sequence[Tensor], group: Any) -> None:
        """Sum the (dp-reduced) gradients of `params` over `group`, whose ranks hold the same
        parameters with the same layout (the tensor-parallel group for sequence-parallel
        LayerNorms; the first and last pipeline stage for the tied embedding, isolated in a
        bucket of its own). ZeRO-0/1: the full gradients; ZeRO-2: this rank's shard of them.
        One all-reduce of one flat tensor."""
        wanted = {self._index[id(p)] for p in params if id(p) in self._index}
        views = []
        for g in self.groups:
            store = g.shard_grad if self.zero == 2 else g.grad
            views += [store[lo:hi] for i, lo, hi in g.segments if i in wanted]
        if not views:
            return
        flat = torch.cat(views)
        dist.all_reduce(flat, group=group)
        offset = 0
        for v in views:
            v.copy_(flat[offset:offset + v.numel()])
            offset += v.numel()

    # ------------------------------------------------------------------ optimizer

    def zero_grad(self) -> None:
        """Zero the gradient buffers (ZeRO-0/1: the ``.grad`` views stay in place)."""
        if self.zero == 2:
            self._settle()
            for g in self.groups:
                g.shard_grad.zero_()
            for p in self.params:
                p.grad = None
            self._reset_round()
            return
        for g in self.groups:
            g.grad.zero_()
        for i in range(len(self.params)):
            self._adopt_grad(i)
        self._reset_round()

    def step(self) -> None:
        """One AdamW step (on this rank's chunks under ZeRO, then all-gather every bucket)."""
        if self._dirty or self._next > 0:
            self.finish_grad_sync()
        if not self.zero:
            self.optimizer.step()
            return
        for b, chunk in self._chunks:
            chunk.grad = self._chunk_grad(b)  # in case someone reset it
        self.optimizer.step()
        if self.dp > 1:
            works = [_all_gather_single(self.groups[b.group].param[b.start:b.end], chunk.clone(),
                                        group=self.dp_group, async_op=True) for b, chunk in self._chunks]
            for w in works:
                w.wait()

    # ------------------------------------------------------------------ gradient norm

    def grad_sq_sum(self) -> Tensor:
        """Sum of ``norm_weight * grad**2`` over the gradients this rank is responsible for,
        summed over the dp group (the same value on every dp rank).

        ZeRO-0/1: every rank holds all averaged gradients, so the local sum is already the
        group's. ZeRO-2: each rank sums its shard and the shards are all-reduced.
        ``p.norm_weight`` (default 1) lets the engine count replicated tensor-parallel
        parameters once (0.0 on all but one tp rank).
        """
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in self.groups:
            store = g.shard_grad if self.zero == 2 else g.grad
            for i, lo, hi in g.segments:
                weight = float(getattr(self.params[i], "norm_weight", 1.0))
                if weight:
                    total += weight * torch.linalg.vector_norm(store[lo:hi], dtype=torch.float32) ** 2
        if self.zero == 2 and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    def scale_grads(self, factor: float | Tensor) -> None:
        """Multiply the (averaged) gradients in place; under ZeRO-2 only the own shard."""
        for g in self.groups:
            (g.shard_grad if self.zero == 2 else g.grad).mul_(factor)

    def clip_grad_norm_(self, max_norm: float, extra_groups: Sequence[Any] = ()) -> Tensor:
        """Clip like `torch.nn.utils.clip_grad_norm_` and return the total norm (before clipping).

        The squared norm is summed over the dp group and then over each of `extra_groups`
        (e.g. tp and pp groups; ``None`` entries are skipped, as `Topology` uses None for
        "no group").
        """
        sq = self.grad_sq_sum()
        for group in extra_groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
        self.scale_grads(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    # ------------------------------------------------------------------ checkpoints

    def optimizer_segments(self, create: bool = False) -> list[tuple[int, int, int, dict[str, Tensor]]]:
        """This rank's AdamW moments without any gathering: ``(param index, lo, hi, {exp_avg,
        exp_avg_sq})`` with the moments of elements ``[lo, hi)`` of the flattened parameter (views;
        ZeRO: the parts of the rank's bucket chunks). `create`: allocate zero moments first where no
        step was taken yet (to load into). For sharded checkpoints (chapter 6, section 6.5)."""
        if create:
            for p in (p for pg in self.optimizer.param_groups for p in pg["params"]):
                if not self.optimizer.state.get(p):
                    self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                               "exp_avg_sq": torch.zeros_like(p)}
        out = []
        if not self.zero:
            for i, p in enumerate(self.params):
                st = self.optimizer.state.get(p)
                if st:
                    out.append((i, 0, p.numel(), {k: st[k].view(-1) for k in ("exp_avg", "exp_avg_sq")}))
            return out
        for b, chunk in self._chunks:
            st = self.optimizer.state.get(chunk)
            if not st:
                continue
            g, (clo, chi) = self.groups[b.group], self._chunk_range(b)
            for i in b.params:
                a, e = max(g.offsets[i], clo), min(g.offsets[i] + self.params[i].numel(), chi)
                if a < e:
                    out.append((i, a - g.offsets[i], e - g.offsets[i],
                                {k: st[k][a - clo:e - clo] for k in ("exp_avg", "exp_avg_sq")}))
        return out

    def optimizer_meta(self) -> dict[str, Any] | None:
        """Hyper-parameters of the two groups and the step count (the same on every rank), or None."""
        steps = [float(st["step"]) for st in self.optimizer.state.values() if st]
        if not steps:
            return None
        groups = [{k: v for k, v in pg.items() if k != "params"} for pg in self.optimizer.param_groups]
        return {"param_groups": groups, "step": steps[0]}

    def load_optimizer_meta(self, meta: dict[str, Any]) -> None:
        """Inverse of `optimizer_meta` (after the moments were loaded into `optimizer_segments`)."""
        for group, saved in zip(self.optimizer.param_groups, meta["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for st in self.optimizer.state.values():
            if st:
                st["step"] = torch.tensor(float(meta["step"]))

    def _gather_bucket(self, b: Bucket, chunk: Tensor) -> Tensor:
        """The whole (padded) bucket from every dp rank's chunk (collective over dp)."""
        if self.dp == 1:
            return chunk
        full = torch.empty(b.numel, dtype=chunk.dtype, device=chunk.device)
        _all_gather_single(full, chunk.contiguous(), group=self.dp_group)
        return full

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state in full, name-keyed form, independent of dp and zero.

        ``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [hyper-params]}``
        (decay group first). Under ZeRO this is a collective: every dp rank must call it.
        """
        param_groups = [{k: v for k, v in pg.items() if k != "params"} for pg in self.optimizer.param_groups]
        state: dict[str, dict[str, Tensor]] = {}
        if not self.zero:
            for name, p in zip(self.names, self.params, strict=True):
                if self.optimizer.state.get(p):
                    state[name] = {k: v.detach().clone() for k, v in self.optimizer.state[p].items()}
            return {"state": state, "param_groups": param_groups}
        for b, chunk in self._chunks:
            st = self.optimizer.state.get(chunk)
            if not st:  # no step taken yet: the same on every rank
                continue
            full = {k: self._gather_bucket(b, v) for k, v in st.items() if v.dim() > 0}
            g = self.groups[b.group]
            for i in b.params:
                p, off = self.params[i], g.offsets[i] - b.start
                entry = {k: v.detach().clone() for k, v in st.items() if v.dim() == 0}
                entry.update({k: v[off:off + p.numel()].view_as(p).clone() for k, v in full.items()})
                state[self.names[i]] = entry
        return {"state": state, "param_groups": param_groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict` saved under any dp/zero; entries for other names are ignored
        (they belong to other pipeline stages)."""
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.optimizer.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} param groups, expected "
                             f"{len(self.optimizer.param_groups)} (decay, no decay)")
        by_name = dict(zip(self.names, self.params, strict=True))
        for name, entry in state.items():
            if name in by_name:
                p = by_name[name]
                for k, v in entry.items():
                    if v.dim() > 0 and v.numel() != p.numel():
                        raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, the "
                                         f"parameter {tuple(p.shape)}: saved under another tensor layout?")
        torch_sd: dict[str, Any] = {"state": {}, "param_groups": []}
        idx = 0
        if not self.zero:
            for pg, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
                ids = []
                for p in pg["params"]:
                    name = self.names[self._index[id(p)]]
                    if name in state:
                        torch_sd["state"][idx] = {k: v.clone() for k, v in state[name].items()}
                    ids.append(idx)
                    idx += 1
                torch_sd["param_groups"].append({**saved, "params": ids})
            self.optimizer.load_state_dict(torch_sd)
            return
        index_of = {id(chunk): k for k, (_, chunk) in enumerate(self._chunks)}
        for pg, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
            ids = []
            for chunk in pg["params"]:
                k = index_of[id(chunk)]
                b = self._chunks[k][0]
                names = [self.names[i] for i in b.params]
                present = [n for n in names if n in state]
                if present and len(present) != len(names):
                    missing = sorted(set(names) - set(present))
                    raise ValueError(f"optimizer state lacks {missing[:5]}; ZeRO needs all or none of "
                                     "a bucket's parameters")
                if present:
                    first = state[present[0]]
                    entry = {key: v.clone() for key, v in first.items() if v.dim() == 0}
                    g = self.groups[b.group]
                    lo, hi = self._chunk_range(b)
                    for key in (key for key, v in first.items() if v.dim() > 0):
                        full = torch.zeros(b.numel, dtype=self.dtype, device=self.device)
                        for i in b.params:
                            off = g.offsets[i] - b.start
                            values = state[self.names[i]][key].reshape(-1)
                            full[off:off + values.numel()].copy_(values)
                        entry[key] = full[lo - b.start:hi - b.start].clone()
                    torch_sd["state"][idx] = entry
                ids.append(idx)
                idx += 1
            torch_sd["param_groups"].append({**saved, "params": ids})
        self.optimizer.load_state_dict(torch_sd)
