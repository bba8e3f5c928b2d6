"""Data parallelism by hand: bucketed gradient all-reduce, ``no_sync`` accumulation, ZeRO-1/2 AdamW.

Gradients live in flat buckets (views, no copies) all-reduced as soon as backward fills them
(PyTorch DDP, Li et al. 2020); ZeRO-1 shards AdamW's state over the dp ranks, ZeRO-2 also reduces
each gradient bucket only to its owner (Rajbhandari et al. 2020). Checkpoints hold the full state,
so they load under any dp/zero. Explained in the book, chapter 5, section 5.3 (including why
ZeRO-2 here keeps the full gradient buffer).
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


@dataclass
class Bucket:
    """A contiguous range ``[start, end)`` of parameter group ``group``'s flat gradient buffer.

    ``index`` is the launch order (all ranks launch in this order); ``params`` are the indices
    of the parameters overlapping the range; ``owner`` is the dp rank that receives the reduced
    bucket under ZeRO-2 (None otherwise).
    """

    index: int
    group: int
    start: int
    end: int
    params: list[int]
    owner: int | None = None

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class _FlatGroup:
    """One optimizer parameter group laid out in a flat buffer (reverse registration order)."""

    members: list[int]  # parameter indices, in buffer order
    offsets: dict[int, int] = field(default_factory=dict)  # parameter index -> start in the buffer
    numel: int = 0  # parameters' elements; the buffer is padded to `shard * dp`
    shard: int = 0  # elements per dp shard (ceil(numel / dp) under ZeRO, else numel)
    grad: Tensor | None = None  # flat gradients; every member's .grad is a view into it
    param: Tensor | None = None  # ZeRO only: flat parameters; every member's .data is a view into it
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # norm's share: (param, lo, hi)


class DataParallel:
    """Gradient averaging over ``topo.dp_group`` plus AdamW, optionally ZeRO-1/2 sharded.

    ``named_params``: ``(name, parameter)`` pairs, possibly from several pipeline chunks; names
    must be unique (they key the checkpointed optimizer state). Parameters that do not require
    grad are ignored; all others must share one dtype and device. ``zero``: 0, 1 or 2 (the book,
    section 5.3). ``bucket_cap_mb``: the most bytes of gradients per bucket (MiB, as DDP;
    a larger parameter gets a bucket of its own).

    Construction is a collective over the dp group: dp rank 0's parameters are broadcast, as
    DDP does, so replicas start identical. From then on every ``p.grad`` is a view into a flat
    buffer (call `zero_grad`; ``dp.optimizer.zero_grad()`` is redirected to it), and under ZeRO
    every ``p.data`` is a view into a flat parameter buffer: replacing ``p.data`` afterwards
    (``model.to(...)``) would cut the model off from the optimizer. ``dp.optimizer`` is a real
    `torch.optim.AdamW` (over shards under ZeRO), so ``LambdaLR(dp.optimizer, ...)`` drives its
    learning rate. Set ``dp.comm_log = []`` to record ``(bucket, "backward" | "finish",
    gradients ready)`` at every launch.

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
                 train_cfg: TrainConfig, zero: int = 0, bucket_cap_mb: float = 25.0):
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

        self.groups = self._layout()
        self.buckets = self._make_buckets(int(bucket_cap_mb * 2**20) // self.params[0].element_size())
        self._buckets_of: list[list[int]] = [[] for _ in self.params]
        for b in self.buckets:
            for i in b.params:
                self._buckets_of[i].append(b.index)
        self._allocate_buffers()
        self._grad_views = [self._grad_view(i) for i in range(len(self.params))]
        self.optimizer = self._make_optimizer()
        # `dp.optimizer.zero_grad()` (train.py's habit) would drop the gradient views; route it here.
        self.optimizer.zero_grad = lambda set_to_none=True: self.zero_grad()  # type: ignore[method-assign]

        self._require_sync = True
        self.comm_log: list[tuple[int, str, int]] | None = None  # set to [] to record launches
        self._reset_round()
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self.params)]

    # ------------------------------------------------------------------ layout

    def _layout(self) -> list[_FlatGroup]:
        """Two groups like `lmkit.train.configure_optimizer`: decay (dim >= 2), then no decay.

        Within a group the buffer holds the parameters in *reverse* registration order, the
        order backward produces their gradients, so that buckets fill one after another.
        """
        decay = [i for i, p in enumerate(self.params) if p.dim() >= 2]
        no_decay = [i for i, p in enumerate(self.params) if p.dim() < 2]
        groups = []
        for members in (decay, no_decay):
            g = _FlatGroup(members=list(reversed(members)))
            for i in g.members:
                g.offsets[i] = g.numel
                g.numel += self.params[i].numel()
            g.shard = math.ceil(g.numel / self.dp) if self.zero else g.numel
            # The gradients this rank is responsible for: its shard under ZeRO-2, else all.
            lo, hi = 0, g.numel
            if self.zero == 2:
                lo, hi = self.dp_rank * g.shard, (self.dp_rank + 1) * g.shard
            for i in g.members:
                a, b = g.offsets[i], g.offsets[i] + self.params[i].numel()
                if max(a, lo) < min(b, hi):
                    g.segments.append((i, max(a, lo), min(b, hi)))
            groups.append(g)
        return groups

    def _make_buckets(self, cap: int) -> list[Bucket]:
        """Greedy buckets of at most `cap` elements (a larger parameter gets a bucket of its own).

        Under ZeRO-2 a bucket never crosses a shard boundary, so it has a single owner; a
        parameter straddling a boundary is split between two buckets.
        """
        raw: list[Bucket] = []
        for gi, g in enumerate(self.groups):
            pieces = []  # (start, end, param, owner)
            for i in g.members:
                a, b = g.offsets[i], g.offsets[i] + self.params[i].numel()
                while a < b:
                    if self.zero == 2:
                        owner = a // g.shard
                        end = min(b, (owner + 1) * g.shard)
                    else:
                        owner, end = None, b
                    pieces.append((a, end, i, owner))
                    a = end
            current: Bucket | None = None
            for a, b, i, owner in pieces:
                if current is not None and (owner != current.owner or current.numel + (b - a) > cap):
                    raw.append(current)
                    current = None
                if current is None:
                    current = Bucket(-1, gi, a, a, [], owner)
                current.end = b
                if not current.params or current.params[-1] != i:
                    current.params.append(i)
            if current is not None:
                raw.append(current)
        # Launch order: a bucket is complete when its earliest-registered parameter's gradient
        # arrives, and backward reaches early-registered parameters last.
        raw.sort(key=lambda b: (-min(b.params), b.group, b.start))
        for k, b in enumerate(raw):
            b.index = k
        return raw

    def _allocate_buffers(self) -> None:
        for g in self.groups:
            size = g.shard * self.dp if self.zero else g.numel
            g.grad = torch.zeros(size, dtype=self.dtype, device=self.device)
            if self.zero:
                g.param = torch.zeros(size, dtype=self.dtype, device=self.device)
            with torch.no_grad():
                for i in g.members:
                    p = self.params[i]
                    view = self._grad_view(i)
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view
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

    def _shard(self, flat: Tensor, g: _FlatGroup) -> Tensor:
        """This rank's shard of a group's flat buffer (the whole buffer without ZeRO)."""
        if not self.zero:
            return flat
        return flat[self.dp_rank * g.shard:(self.dp_rank + 1) * g.shard]

    def _make_optimizer(self) -> torch.optim.AdamW:
        """AdamW with `lmkit.train.configure_optimizer`'s hyper-parameters and groups.

        ZeRO: each group's single "parameter" is this rank's shard of the flat parameter buffer,
        so `torch.optim.AdamW` keeps moments for the shard only and writes into the model.
        """
        cfg = self.cfg
        decays = (cfg.weight_decay, 0.0)
        if self.zero:
            self._shard_params = []
            for g in self.groups:
                shard = self._shard(g.param, g)
                shard.grad = self._shard(g.grad, g)
                self._shard_params.append(shard)
            groups = [{"params": [s], "weight_decay": wd}
                      for s, wd in zip(self._shard_params, decays, strict=True)]
        else:
            groups = [{"params": [self.params[i] for i in sorted(g.members)], "weight_decay": wd}
                      for g, wd in zip(self.groups, decays, strict=True)]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                 fused=fused or None)

    # ------------------------------------------------------------------ gradient sync

    def _reset_round(self) -> None:
        self._pending = [len(b.params) for b in self.buckets]
        self._next = 0  # buckets [0, _next) are launched
        self._works: list[Any] = []
        self._n_ready = 0  # gradients that arrived in this synchronised round (for comm_log)
        self._dirty = False  # a gradient arrived since the last sync

    def _adopt_grad(self, i: int) -> None:
        """Make ``p.grad`` the view into the flat buffer again if someone replaced it."""
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
        self._adopt_grad(i)
        self._dirty = True
        if not self._require_sync or self.dp == 1:
            return
        self._n_ready += 1
        for b in self._buckets_of[i]:
            if self._pending[b] == 0:
                raise RuntimeError(
                    f"gradient of {self.names[i]!r} arrived twice in one synchronised step; run every "
                    "backward but the last inside DataParallel.no_sync()")
            self._pending[b] -= 1
        # Launch in the fixed order, so every rank issues the same collective sequence.
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next, "backward")

    def _launch(self, b: int, where: str) -> None:
        bucket = self.buckets[b]
        flat = self.groups[bucket.group].grad[bucket.start:bucket.end]
        flat.div_(self.dp)  # average = sum of grad / dp; dividing first keeps magnitudes small
        if self.zero == 2:
            work = dist.reduce(flat, dst=self.dp_ranks[bucket.owner], group=self.dp_group, async_op=True)
        else:
            work = dist.all_reduce(flat, group=self.dp_group, async_op=True)
        self._works.append(work)
        self._next = b + 1
        if self.comm_log is not None:
            self.comm_log.append((b, where, self._n_ready))

    def remove_hooks(self) -> None:
        """Detach the backward hooks (e.g. before wrapping the same parameters again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def require_sync(self, flag: bool) -> None:
        """Whether backward hooks communicate (False = accumulate locally, like `no_sync`)."""
        self._require_sync = bool(flag)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (DDP's ``no_sync``)."""
        previous = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = previous

    def finish_grad_sync(self) -> None:
        """Launch the buckets that have not been launched, and wait for all of them.

        Afterwards every rank holds the averaged gradients (ZeRO-0/1) or the averaged
        gradients of its own shard (ZeRO-2). A call with no new gradient since the last one
        does nothing (it would average the averages again: harmless, but wasted traffic).
        """
        for i in range(len(self.params)):
            self._adopt_grad(i)
        if self.dp > 1 and (self._dirty or self._next > 0):
            while self._next < len(self.buckets):
                self._launch(self._next, "finish")
            for work in self._works:
                work.wait()
        self._reset_round()

    # ------------------------------------------------------------------ optimizer

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers (the ``.grad`` views stay in place)."""
        for g in self.groups:
            g.grad.zero_()
        for i in range(len(self.params)):
            self._adopt_grad(i)
        self._reset_round()

    def step(self) -> None:
        """One AdamW step (on this rank's shard under ZeRO, then all-gather the parameters)."""
        if self._dirty or self._next > 0:
            self.finish_grad_sync()
        if not self.zero:
            self.optimizer.step()
            return
        for g, shard in zip(self.groups, self._shard_params, strict=True):
            shard.grad = self._shard(g.grad, g)  # in case someone reset it
        self.optimizer.step()
        if self.dp > 1:
            works = [_all_gather_single(g.param, shard.clone(), group=self.dp_group, async_op=True)
                     for g, shard in zip(self.groups, self._shard_params, strict=True) if g.numel]
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
            for i, lo, hi in g.segments:
                weight = float(getattr(self.params[i], "norm_weight", 1.0))
                if weight:
                    total += weight * torch.linalg.vector_norm(g.grad[lo:hi], dtype=torch.float32) ** 2
        if self.zero == 2 and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    def scale_grads(self, factor: float | Tensor) -> None:
        """Multiply the (averaged) gradients in place; under ZeRO-2 only the own shard."""
        for g in self.groups:
            (self._shard(g.grad, g) if self.zero == 2 else g.grad).mul_(factor)

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

    def _gather_flat(self, shard: Tensor, g: _FlatGroup) -> Tensor:
        if self.dp == 1 or not g.numel:
            return shard
        full = torch.empty(g.shard * self.dp, dtype=shard.dtype, device=shard.device)
        _all_gather_single(full, shard.contiguous(), group=self.dp_group)
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
        for g, shard in zip(self.groups, self._shard_params, strict=True):
            st = self.optimizer.state.get(shard)
            if not st:  # no step taken yet: the same on every rank
                continue
            full = {k: self._gather_flat(v, g) for k, v in st.items() if v.dim() > 0}
            for i in g.members:
                p, off = self.params[i], g.offsets[i]
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
        if not self.zero:
            idx = 0
            for pg, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
                ids = []
                for p in pg["params"]:
                    name = self.names[self._index[id(p)]]
                    if name in state:
                        torch_sd["state"][idx] = {k: v.clone() for k, v in state[name].items()}
                    ids.append(idx)
                    idx += 1
                torch_sd["param_groups"].append({**saved, "params": ids})
        else:
            for gi, (g, saved) in enumerate(zip(self.groups, saved_groups, strict=True)):
                names = [self.names[i] for i in g.members]
                present = [n for n in names if n in state]
                if present and len(present) != len(names):
                    missing = sorted(set(names) - set(present))
                    raise ValueError(f"optimizer state lacks {missing[:5]}; ZeRO needs all or none of "
                                     "a parameter group")
                if present:
                    first = state[present[0]]
                    entry = {k: v.clone() for k, v in first.items() if v.dim() == 0}
                    for k in (k for k, v in first.items() if v.dim() > 0):
                        full = torch.zeros(g.shard * self.dp, dtype=self.dtype, device=self.device)
                        for i in g.members:
                            off = g.offsets[i]
                            full[off:off + self.params[i].numel()].copy_(state[self.names[i]][k].reshape(-1))
                        entry[k] = self._shard(full, g).clone()
                    torch_sd["state"][gi] = entry
                torch_sd["param_groups"].append({**saved, "params": [gi]})
        self.optimizer.load_state_dict(torch_sd)
