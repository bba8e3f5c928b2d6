"""Data parallelism by hand: bucketed gradient all-reduce, ``no_sync`` accumulation, ZeRO-1/2 AdamW
(and Muon, `lmkit.optim.Muon`), and mixed precision with fp32 master weights.

Gradients live in flat buckets (views, no copies) all-reduced as soon as backward fills them
(PyTorch DDP, Li et al. 2020). Under ZeRO every bucket is padded to a multiple of dp and split
into dp chunks, one per rank (Megatron-LM's distributed optimizer): each bucket is
reduce-scattered, every rank steps AdamW on its chunks only and the updated chunks are
all-gathered, so ZeRO moves the bytes of one all-reduce (Rajbhandari et al. 2020, section 7).
ZeRO-1 accumulates the microbatches in a full gradient buffer and reduce-scatters once per step;
ZeRO-2 keeps only the rank's shard: one reduce-scatter per bucket and backward into it, so
gradient memory is divided by dp. With ``train.param_dtype="bfloat16"`` the model computes with
bf16 weights while the optimizer steps fp32 master weights (sharded with its moments under ZeRO)
and gradients are accumulated and reduced in ``train.reduce_dtype`` (Micikevicius et al. 2018;
Megatron-LM's ``main_grad``). Checkpoints hold the full state, so they load under any dp/zero.
Explained in the book, chapter 5, sections on ZeRO and on mixed precision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmkit.config import TrainConfig
from lmkit.optim import Direction, Muon, MuonAdamW, is_muon_matrix, muon_lr_scale, orthogonalize
from lmkit.parallel.buckets import Bucket, BucketState, bucket_layout
from lmkit.parallel.comm import all_gather_single, reduce_scatter_single
from lmkit.parallel.grad_norm import GradientNorm
from lmkit.parallel.mesh import Topology

#: ``(GPT name, this rank's Nesterov update of it) -> (this rank's part of the orthogonalised full
#: matrix, Muon's lr factor of the full shape)``: the engine's gathers tensor-parallel shards.
Orthogonalizer = Callable[[str, Tensor], tuple[Tensor, float]]


def local_orthogonalizer(_name: str, update: Tensor, precision: str = "bfloat16") -> tuple[Tensor, float]:
    """Orthogonalise a whole matrix held by this rank (no tensor parallelism)."""
    return orthogonalize(update, precision), muon_lr_scale(update.shape)

__all__ = ["DataParallel", "Bucket"]


class DataParallel(BucketState, GradientNorm):
    """Gradient averaging over ``topo.dp_group`` plus AdamW, optionally ZeRO-1/2 sharded.

    ``named_params``: ``(name, parameter)`` pairs, possibly from several pipeline chunks; names
    must be unique (they key the checkpointed optimizer state). Parameters that do not require
    grad are ignored; all others must share one dtype and device. ``zero``: 0, 1 or 2 (the book,
    chapter 5, section 5.3). ``bucket_cap_mb``: the most bytes of gradients per bucket (MiB, as
    DDP; a larger parameter gets a bucket of its own). ``isolate``: names that get a bucket of
    their own (the tied embedding's two copies under pipelining, so that ZeRO-2 shards both alike).
    ``average_over``: what the summed gradients are divided by (default the group's size; the
    experts' replicas divide by dp x cp, `lmkit.parallel.experts`). ``norm_weights``: a factor per
    name for the squared gradient in the norm (default 1; the engine
    counts a tensor-parallel replica on one tp rank only: 0 on the others), as ``dp.norm_weights``.
    ``train_cfg.optimizer == "muon"``: the blocks' matrices (`lmkit.optim.is_muon_matrix`) form a
    group of their own, stepped by `lmkit.optim.Muon` (its momentum sharded like
    AdamW's moments under ZeRO; the Nesterov update of a bucket all-gathered before
    ``orthogonalizer`` turns each matrix into its direction), the rest by AdamW; ``dp.optimizer`` is
    then a `lmkit.optim.MuonAdamW` of the two, as in one process.

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
                 isolate: Iterable[str] = (), norm_weights: dict[str, float] | None = None,
                 orthogonalizer: Orthogonalizer | None = None, average_over: int | None = None):
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
        self.dtype, self.device = dtypes.pop(), devices.pop()  # the optimizer's (master) dtype
        # Mixed precision: the model's weights become `compute_dtype`; the optimizer keeps `dtype` masters.
        self.compute_dtype = getattr(torch, train_cfg.param_dtype)
        self.mixed = self.compute_dtype != self.dtype
        if self.mixed and self.dtype != torch.float32:
            raise ValueError(f"train.param_dtype={train_cfg.param_dtype} needs float32 parameters to keep as "
                             f"master weights, got {self.dtype}")
        self.grad_dtype = getattr(torch, train_cfg.reduce_dtype) if self.mixed else self.dtype
        # autograd's .grad has the weights' dtype; a buffer of another dtype takes it in the hook
        self.split_grads = self.grad_dtype != self.compute_dtype
        self.zero, self.cfg = zero, train_cfg
        self.dp, self.dp_rank = topo.dp, topo.dp_rank
        self.dp_group, self.dp_ranks = topo.dp_group, list(topo.dp_ranks)
        # the sum over the group is divided by this (experts: dp x cp, more than their edp group)
        self.divisor = average_over or self.dp
        if self.dp > 1 and not dist.is_initialized():
            raise RuntimeError(f"dp={self.dp} but torch.distributed is not initialised")
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.norm_weights = [float((norm_weights or {}).get(n, 1.0)) for n in self.names]
        isolated = {self.names.index(n) for n in isolate if n in self.names}
        self.orthogonalizer = orthogonalizer or functools.partial(local_orthogonalizer,
                                                                  precision=train_cfg.muon_precision)
        self.muon = ({i for i, (n, p) in enumerate(pairs) if is_muon_matrix(n, p)}
                     if train_cfg.optimizer == "muon" else set())

        cap = int(bucket_cap_mb * 2**20) // torch.empty((), dtype=self.grad_dtype).element_size()
        self.groups, self.buckets = bucket_layout(self.params, cap, isolated, zero, self.dp, self.dp_rank,
                                                  leading=self.muon)
        self._group_of = {i: gi for gi, g in enumerate(self.groups) for i in g.members}
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

    def _chunk_range(self, b: Bucket) -> tuple[int, int]:
        """This rank's chunk of bucket `b` in its group's flat buffer (ZeRO)."""
        lo = b.start + self.dp_rank * b.chunk
        return lo, lo + b.chunk

    def _allocate_buffers(self) -> None:
        """Flat gradient buffers (or ZeRO-2 shards), flat parameter buffers under ZeRO, and, in mixed
        precision, the fp32 values the masters start from (``_staging``: the flat fp32 parameters under
        ZeRO, ``_masters`` without); then every replica takes dp rank 0's values."""
        self._masters: dict[int, Tensor] = {}  # ZeRO-0 mixed precision: parameter index -> fp32 master
        self._staging: dict[int, Tensor] = {}  # ZeRO mixed precision: group -> fp32 flat parameters
        for gi, g in enumerate(self.groups):
            if self.zero == 2:
                g.shard_grad = torch.zeros(g.shard, dtype=self.grad_dtype, device=self.device)
            else:
                g.grad = torch.zeros(g.numel, dtype=self.grad_dtype, device=self.device)
            if self.zero:
                g.param = torch.zeros(g.numel, dtype=self.compute_dtype, device=self.device)
                if self.mixed:
                    self._staging[gi] = torch.zeros(g.numel, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                for i in g.members:
                    p = self.params[i]
                    old_grad, p.grad = p.grad, None
                    if gi in self._staging:
                        self._staging[gi][g.offsets[i]:g.offsets[i] + p.numel()].copy_(p.reshape(-1))
                    elif self.mixed:
                        self._masters[i] = p.detach().clone()
                    if g.param is not None:
                        flat = g.param[g.offsets[i]:g.offsets[i] + p.numel()].view_as(p)
                        flat.copy_(p)
                        p.data = flat  # the model's parameter now lives in the flat buffer
                    elif self.mixed:
                        p.data = p.data.to(self.compute_dtype)
                    if g.grad is not None:
                        view = self._grad_view(i)
                        if old_grad is not None:
                            view.copy_(old_grad)
                        p.grad = None if self.split_grads else view
                    # (ZeRO-2: full gradients exist only until their bucket is reduced)
        if self.dp > 1:
            # Like DDP's construction: replicas start from dp rank 0's parameters (mixed precision: its
            # fp32 values, from which the masters and the bf16 weights both follow).
            if self.mixed:
                tensors = list(self._staging.values()) if self.zero else list(self._masters.values())
            elif self.zero:
                tensors = [g.param for g in self.groups if g.numel]
            else:
                tensors = [p.data for p in self.params]
            works = [dist.broadcast(t, src=self.dp_ranks[0], group=self.dp_group, async_op=True)
                     for t in tensors]
            for w in works:
                w.wait()
        with torch.no_grad():
            for gi, flat32 in self._staging.items():
                self.groups[gi].param.copy_(flat32)
            for i, master in self._masters.items():
                self.params[i].data = master.to(self.compute_dtype)

    def _grad_view(self, i: int) -> Tensor:
        g = self.groups[self._group_of[i]]
        start = g.offsets[i]
        return g.grad[start:start + self.params[i].numel()].view_as(self.params[i])

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with `lmkit.optim.configure_optimizer`'s hyper-parameters and groups (with Muon:
        `lmkit.optim.MuonAdamW`'s, its Muon's directions `_muon_directions`).

        ZeRO: each group's "parameters" are this rank's chunks of its buckets (views of the flat
        parameter buffer), so `torch.optim.AdamW` keeps moments for the chunks only and writes
        into the model; their gradients are views of the reduced gradients (ZeRO-1: of the full
        buffer; ZeRO-2: of the shard accumulator).
        """
        cfg = self.cfg
        decays = ((cfg.weight_decay,) if self.muon else ()) + (cfg.weight_decay, 0.0)
        if self.zero:
            self._chunks: list[tuple[Bucket, Tensor]] = []  # (bucket, the optimizer's tensor of its chunk)
            groups = []
            for gi, (g, wd) in enumerate(zip(self.groups, decays, strict=True)):
                chunk_params = []
                for b in (b for b in sorted(self.buckets, key=lambda b: b.start) if b.group == gi):
                    lo, hi = self._chunk_range(b)
                    # mixed precision: an fp32 master of the chunk; else the chunk of the weights itself
                    chunk = self._staging[gi][lo:hi].clone() if self.mixed else g.param[lo:hi]
                    self._set_unit_grad(chunk, self._chunk_grad(b))
                    self._chunks.append((b, chunk))
                    chunk_params.append(chunk)
                groups.append({"params": chunk_params, "weight_decay": wd})
            self._staging = {}
        else:
            groups = [{"params": [self._unit(i) for i in sorted(g.members)], "weight_decay": wd}
                      for g, wd in zip(self.groups, decays, strict=True)]
            self._index.update({id(m): i for i, m in self._masters.items()})
        fused = self.device.type == "cuda"
        if not self.muon:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                     fused=fused or None)
        muon = Muon(groups[0]["params"], lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                    momentum=cfg.muon_momentum, directions=self._muon_directions)
        adamw = torch.optim.AdamW(groups[1:], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  fused=fused or None)
        return MuonAdamW.combine(muon, adamw)

    def _muon_directions(self, updates: list[Tensor]) -> list[list[Direction]]:
        """Per Muon unit (a parameter; under ZeRO this rank's chunk of a Muon bucket), the pieces of the
        orthogonalised full matrices that fall in it. ZeRO: the chunks' updates are all-gathered over
        dp first (one collective per bucket, all posted before any is waited for)."""
        if not self.zero:
            units = self.optimizer.muon.param_groups[0]["params"]
            out = []
            for unit, update in zip(units, updates, strict=True):
                i = self._index[id(unit)]
                direction, scale = self.orthogonalizer(self.names[i], update)
                out.append([(0, unit.numel(), direction.reshape(-1), scale)])
            return out
        chunks = [(b, c) for b, c in self._chunks if b.group == 0]
        fulls = []
        for (b, _), update in zip(chunks, updates, strict=True):
            full = torch.empty(b.numel, dtype=update.dtype, device=update.device)
            work = all_gather_single(full, update.contiguous(), group=self.dp_group, async_op=True) \
                if self.dp > 1 else None
            fulls.append((full if work is not None else update, work))
        out = []
        g = self.groups[0]
        for (b, _), (full, work) in zip(chunks, fulls, strict=True):
            if work is not None:
                work.wait()
            lo, hi = self._chunk_range(b)
            pieces = []
            for i in b.params:
                a, e = g.offsets[i], g.offsets[i] + self.params[i].numel()
                direction, scale = self.orthogonalizer(
                    self.names[i], full[a - b.start:e - b.start].view_as(self.params[i]))
                if max(a, lo) < min(e, hi):
                    pieces.append((max(a, lo) - lo, min(e, hi) - lo,
                                   direction.reshape(-1)[max(a, lo) - a:min(e, hi) - a], scale))
            out.append(pieces)
        return out

    def _unit(self, i: int) -> Tensor:
        """What the optimizer steps for parameter `i` without ZeRO: its fp32 master, or itself."""
        return self._masters.get(i, self.params[i])

    def _set_unit_grad(self, unit: Tensor, grad: Tensor) -> None:
        """Give an optimizer tensor its reduced gradient: a view when the dtypes agree, else an fp32 copy
        (bf16 reduction with fp32 masters; dropped after the step)."""
        unit.grad = grad if grad.dtype == unit.dtype else grad.to(unit.dtype)

    def _new_state(self, p: Tensor) -> None:
        """Zero optimizer state for unit `p` (to load a sharded checkpoint into)."""
        if self.muon and any(p is q for q in self.optimizer.muon.param_groups[0]["params"]):
            self.optimizer.muon.state[p] = {"momentum_buffer": torch.zeros_like(p)}
            return
        adamw = self.optimizer.adamw if self.muon else self.optimizer
        adamw.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.zeros_like(p)}

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
        """Make ``p.grad`` the view into the flat buffer again if someone replaced it (ZeRO-0/1).

        When the buffer has another dtype than the weights (bf16 weights, fp32 reduction) ``p.grad`` is
        autograd's own tensor: it is added into the buffer and dropped (Megatron's ``main_grad``)."""
        p, view = self.params[i], self._grad_views[i]
        if self.split_grads:
            if p.grad is not None:
                view.add_(p.grad)
                p.grad = None
            return
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
        """ZeRO-0: all-reduce bucket `b` of the flat gradient buffer; ZeRO-1: reduce-scatter it, each
        rank receiving the reduced chunk it updates (half the bytes; the all-gather of the updated
        parameters is the other half). Asynchronous; `finish_grad_sync` waits."""
        bucket = self.buckets[b]
        flat = self.groups[bucket.group].grad[bucket.start:bucket.end]
        flat.div_(self.divisor)  # average = sum of grad / dp; dividing first keeps magnitudes small
        if self.zero == 1:
            lo, hi = self._chunk_range(bucket)
            out = torch.empty(bucket.chunk, dtype=flat.dtype, device=flat.device)
            work = reduce_scatter_single(out, flat, group=self.dp_group, async_op=True)
            self._works.append((work, out, self.groups[bucket.group].grad[lo:hi]))
        else:
            self._works.append((dist.all_reduce(flat, group=self.dp_group, async_op=True), None, None))
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
        flat = torch.zeros(bucket.numel, dtype=self.grad_dtype, device=self.device)
        for i in bucket.params:
            p = self.params[i]
            if p.grad is not None:
                start = g.offsets[i] - bucket.start
                flat[start:start + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None
            self._arrived[i] = False
        flat.div_(self.divisor)
        if self.dp == 1:
            g.shard_grad[bucket.shard_offset:bucket.shard_offset + bucket.chunk].add_(flat)
        else:
            out = torch.empty(bucket.chunk, dtype=self.grad_dtype, device=self.device)
            work = reduce_scatter_single(out, flat, group=self.dp_group, async_op=True)
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
        if self.dp == 1 and self.divisor != 1 and self._dirty:  # no collective divides: divide here
            for g in self.groups:
                g.grad.div_(self.divisor)
        if self.dp > 1 and (self._dirty or self._next > 0):
            while self._next < len(self.buckets):
                self._launch(self._next, "finish")
            for work, out, chunk in self._works:
                work.wait()
                if chunk is not None:  # ZeRO-1: the reduced chunk lands in place of this rank's part
                    chunk.copy_(out)
        self._reset_round()

    def grad_shards(self) -> dict[str, tuple[int, int, Tensor]]:
        """The reduced gradients this rank holds, by name: ``(lo, hi, values)`` where `values` are
        elements ``[lo, hi)`` of the flattened parameter (ZeRO: its chunks' share; else all)."""
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
        """Sum the gradients of `params` over `group`, whose ranks hold the same parameters with the
        same layout (the tensor-parallel group for sequence-parallel LayerNorms and QK-norms; the
        first and last pipeline stage for the tied embedding, isolated in a bucket of its own).
        ZeRO-0/1: the full local gradients, before the dp reduction; ZeRO-2: this rank's reduced
        shard of them (the sum is linear: its order with the dp average does not matter). One
        all-reduce of one flat tensor."""
        wanted = {self._index[id(p)] for p in params if id(p) in self._index}
        if self.zero < 2:
            for i in wanted:
                self._adopt_grad(i)
            views = [self._grad_views[i].view(-1) for i in sorted(wanted, key=lambda i: self.names[i])]
        else:
            views = [g.shard_grad[lo:hi] for g in self.groups for i, lo, hi in g.segments if i in wanted]
        if not views:
            return
        flat = torch.cat(views)
        dist.all_reduce(flat, group=group)
        offset = 0
        for v in views:
            v.copy_(flat[offset:offset + v.numel()])
            offset += v.numel()

    # ------------------------------------------------------------------ optimizer

    def add_grad(self, param: Tensor, grad: Tensor) -> None:
        """Accumulate `grad` into `param`'s gradient as backward would (a zero-bubble pipeline's
        deferred weight gradient, `lmkit.parallel.pipeline`): into the fp32 buffer directly when the
        weights are bf16, and counted as arrived, so that ZeRO-2 reduces a completed bucket."""
        i = self._index[id(param)]
        if self.zero < 2 and self.split_grads:
            self._grad_views[i].add_(grad.reshape(self._grad_views[i].shape))
            self._dirty = True
            return
        if param.grad is None:
            param.grad = grad.to(param.dtype).reshape(param.shape)
        else:
            param.grad.add_(grad.reshape(param.shape))
        self._grad_ready(i)

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
            if self.split_grads:
                self.params[i].grad = None  # (autograd's own: not yet added to the buffer)
            self._adopt_grad(i)
        self._reset_round()

    def step(self) -> None:
        """One AdamW step (on this rank's chunks under ZeRO, then all-gather every bucket). Mixed
        precision: the step updates the fp32 masters, which are then rounded into the bf16 weights."""
        if self._dirty or self._next > 0:
            self.finish_grad_sync()
        if not self.zero:
            for i, master in self._masters.items():
                self._set_unit_grad(master, self._grad_views[i])
            self.optimizer.step()
            with torch.no_grad():
                for i, master in self._masters.items():
                    self.params[i].copy_(master)
                    if master.grad.data_ptr() != self._grad_views[i].data_ptr():
                        master.grad = None  # the fp32 copy of a bf16 reduction
            return
        for b, chunk in self._chunks:
            self._set_unit_grad(chunk, self._chunk_grad(b))  # (a view: in case someone reset it)
        self.optimizer.step()
        weights = []
        with torch.no_grad():
            for b, chunk in self._chunks:
                lo, hi = self._chunk_range(b)
                weights.append(self.groups[b.group].param[lo:hi])
                if self.mixed:
                    weights[-1].copy_(chunk)
                    if chunk.grad.data_ptr() != self._chunk_grad(b).data_ptr():
                        chunk.grad = None  # the fp32 copy of a bf16 reduction
        if self.dp > 1:
            works = [all_gather_single(self.groups[b.group].param[b.start:b.end], w.clone(),
                                        group=self.dp_group, async_op=True)
                     for (b, _), w in zip(self._chunks, weights, strict=True)]
            for w in works:
                w.wait()
