"""Where every gradient and parameter element of data parallelism lives, and the optimizer
state in full, name-keyed form computed from that layout.

`bucket_layout` lays the parameters out in flat buffers (two groups: decay, no decay), cut into
buckets and, under ZeRO, every bucket into dp chunks (Megatron-LM's distributed optimizer);
`BucketState` turns this rank's AdamW state on those chunks into full tensors by name and back,
so checkpoints load under any dp/zero. Used by `lmkit.parallel.data_parallel.DataParallel`; the
book, chapter 5, section 5.3, and chapter 6, section 6.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmkit.parallel.comm import all_gather_single

__all__ = ["Bucket", "FlatGroup", "bucket_layout", "BucketState"]


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
class FlatGroup:
    """One optimizer parameter group laid out in flat buffers (reverse registration order)."""

    members: list[int]  # parameter indices, in buffer order
    offsets: dict[int, int] = field(default_factory=dict)  # parameter index -> start in the buffer
    numel: int = 0  # buffer elements (with ZeRO's padding: every bucket a multiple of dp)
    shard: int = 0  # elements this rank owns under ZeRO (the sum of its buckets' chunks), else numel
    grad: Tensor | None = None  # ZeRO-0/1: flat gradients; every member's .grad is a view into it
    shard_grad: Tensor | None = None  # ZeRO-2: this rank's reduced gradient shard (the accumulator)
    param: Tensor | None = None  # ZeRO only: flat parameters; every member's .data is a view into it
    # the reduced gradients this rank holds (its chunks under ZeRO): (param, lo, hi) in `grad` (ZeRO-0/1)
    # or in `shard_grad` (ZeRO-2)
    segments: list[tuple[int, int, int]] = field(default_factory=list)


def bucket_layout(params: Sequence[Tensor], cap: int, isolated: set[int], zero: int, dp: int, dp_rank: int,
                  leading: set[int] | None = None) -> tuple[list[FlatGroup], list[Bucket]]:
    """Two groups like `lmkit.optim.configure_optimizer` (decay: dim >= 2, then no decay), and
    greedy buckets of at most `cap` elements of whole parameters. `leading`: parameter indices that
    form a group of their own before those two (Muon's matrices, `lmkit.optim.MuonAdamW`'s order).

    Within a group the buffer holds the parameters in *reverse* registration order, the
    order backward produces their gradients, so that buckets fill one after another. Under
    ZeRO each bucket is padded to a multiple of dp and split into dp equal chunks. No
    communication: every rank computes the same layout (`isolated`: parameter indices that get a
    bucket of their own).
    """
    leading = leading or set()
    decay = [i for i, p in enumerate(params) if p.dim() >= 2 and i not in leading]
    no_decay = [i for i, p in enumerate(params) if p.dim() < 2 and i not in leading]
    groups: list[FlatGroup] = []
    raw: list[Bucket] = []
    for gi, members in enumerate(([sorted(leading)] if leading else []) + [decay, no_decay]):
        g = FlatGroup(members=list(reversed(members)))
        runs: list[list[int]] = []
        for i in g.members:
            n = params[i].numel()
            if (not runs or i in isolated or runs[-1][0] in isolated
                    or sum(params[j].numel() for j in runs[-1]) + n > cap):
                runs.append([i])
            else:
                runs[-1].append(i)
        for run in runs:
            start = g.numel
            for i in run:
                g.offsets[i] = g.numel
                g.numel += params[i].numel()
            chunk = 0
            if zero:
                chunk = math.ceil((g.numel - start) / dp)
                g.numel = start + chunk * dp
            raw.append(Bucket(-1, gi, start, g.numel, run, chunk, g.shard))
            g.shard += chunk
        if not zero:
            g.shard = g.numel
        groups.append(g)
    # Launch order: a bucket is complete when its earliest-registered parameter's gradient
    # arrives, and backward reaches early-registered parameters last.
    raw.sort(key=lambda b: (-min(b.params), b.group, b.start))
    for k, b in enumerate(raw):
        b.index = k
    for b in raw:  # the reduced gradients this rank holds: its chunks under ZeRO, else all
        g = groups[b.group]
        lo, hi = (b.start + dp_rank * b.chunk, b.start + (dp_rank + 1) * b.chunk) \
            if zero else (b.start, b.end)
        for i in b.params:
            a, e = g.offsets[i], g.offsets[i] + params[i].numel()
            if max(a, lo) < min(e, hi):
                shift = b.shard_offset - lo if zero == 2 else 0
                g.segments.append((i, max(a, lo) + shift, min(e, hi) + shift))
    return groups, raw


def _moments(state: dict[str, Tensor], numel: int) -> list[tuple[str, Tensor]]:
    """The per-element tensors of an optimizer state entry (not its step counter)."""
    return [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numel]


class BucketState:
    """Checkpoint conversions of `DataParallel` (a mixin: they read its ``params``, ``names``,
    ``groups``, ``optimizer``, ``zero``, ``dp``, ``mixed``, ``_unit`` and, under ZeRO, ``_chunks``,
    this rank's bucket chunks, and ``_chunk_range``). In mixed precision the fp32 master weights are
    one more per-element entry of the state, ``"master"``, saved and resharded like the moments."""

    def _state_of(self, unit: Tensor) -> dict[str, Tensor]:
        """The optimizer state of `unit` (a parameter, a master or a ZeRO chunk), with its master."""
        st = dict(self.optimizer.state.get(unit) or {})
        if st and self.mixed:
            st["master"] = unit.data
        return st

    def refresh_masters(self) -> None:
        """Mixed precision: set the fp32 masters from the (just loaded) bf16 weights; a checkpoint's own
        masters, when it has them, overwrite these in `load_state_dict`."""
        if not self.mixed:
            return
        with torch.no_grad():
            if not self.zero:
                for i in range(len(self.params)):
                    self._unit(i).copy_(self.params[i].reshape(self._unit(i).shape))
                return
            for b, chunk in self._chunks:
                lo, hi = self._chunk_range(b)
                chunk.copy_(self.groups[b.group].param[lo:hi])

    def optimizer_segments(self, create: bool = False) -> list[tuple[int, int, int, dict[str, Tensor]]]:
        """This rank's optimizer moments without any gathering: ``(param index, lo, hi, {name: moment})``
        with the moments (AdamW's ``exp_avg``, ``exp_avg_sq``; Muon's ``momentum_buffer``) of elements
        ``[lo, hi)`` of the flattened parameter (views; ZeRO: the parts of the rank's bucket chunks).
        `create`: allocate zero moments first where no step was taken yet (to load into). For sharded
        checkpoints (chapter 6, section 6.5)."""
        if create:
            for p in (p for pg in self.optimizer.param_groups for p in pg["params"]):
                if not self.optimizer.state.get(p):
                    self._new_state(p)
        out = []
        if not self.zero:
            for i, p in enumerate(self.params):
                st = self._state_of(self._unit(i))
                if st:
                    out.append((i, 0, p.numel(), {k: v.view(-1) for k, v in _moments(st, p.numel())}))
            return out
        for b, chunk in self._chunks:
            st = self._state_of(chunk)
            if not st:
                continue
            g, (clo, chi) = self.groups[b.group], self._chunk_range(b)
            for i in b.params:
                a, e = max(g.offsets[i], clo), min(g.offsets[i] + self.params[i].numel(), chi)
                if a < e:
                    out.append((i, a - g.offsets[i], e - g.offsets[i],
                                {k: v[a - clo:e - clo] for k, v in _moments(st, chunk.numel())}))
        return out

    def _gather_bucket(self, b: Bucket, chunk: Tensor) -> Tensor:
        """The whole (padded) bucket from every dp rank's chunk (collective over dp)."""
        if self.dp == 1:
            return chunk
        full = torch.empty(b.numel, dtype=chunk.dtype, device=chunk.device)
        all_gather_single(full, chunk.contiguous(), group=self.dp_group)
        return full

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state in full, name-keyed form, independent of dp and zero.

        ``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [hyper-params]}``
        (decay group first). Under ZeRO this is a collective: every dp rank must call it.
        """
        param_groups = [{k: v for k, v in pg.items() if k != "params"} for pg in self.optimizer.param_groups]
        state: dict[str, dict[str, Tensor]] = {}
        if not self.zero:
            for i, (name, p) in enumerate(zip(self.names, self.params, strict=True)):
                st = self._state_of(self._unit(i))
                if st:
                    state[name] = {k: v.detach().clone().view_as(v) for k, v in st.items()}
                    if "master" in st:
                        state[name]["master"] = state[name]["master"].view_as(p)
            return {"state": state, "param_groups": param_groups}
        for b, chunk in self._chunks:
            st = self._state_of(chunk)
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
        bucket_of_chunk = {id(chunk): b for b, chunk in getattr(self, "_chunks", [])}
        masters: list[tuple[Tensor, Tensor]] = []  # (unit, its saved fp32 master)
        idx = 0
        for pg, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
            ids = []
            for p in pg["params"]:  # ZeRO: this rank's bucket chunks; else the parameters (or masters)
                if self.zero:
                    entry = self._chunk_entry(bucket_of_chunk[id(p)], state)
                else:
                    entry = state.get(self.names[self._index[id(p)]])
                    entry = None if entry is None else {k: v.clone() for k, v in entry.items()}
                if entry is not None:
                    master = entry.pop("master", None)
                    if master is not None and self.mixed:
                        masters.append((p, master))
                    torch_sd["state"][idx] = entry
                ids.append(idx)
                idx += 1
            torch_sd["param_groups"].append({**saved, "params": ids})
        self.optimizer.load_state_dict(torch_sd)
        with torch.no_grad():
            for unit, master in masters:
                unit.copy_(master.reshape(unit.shape))

    def _chunk_entry(self, b: Bucket, state: dict[str, Any]) -> dict[str, Tensor] | None:
        """ZeRO: the AdamW state of this rank's chunk of bucket `b`, cut from the full tensors by
        name (None when the state has none of the bucket's parameters)."""
        names = [self.names[i] for i in b.params]
        present = [n for n in names if n in state]
        if not present:
            return None
        if len(present) != len(names):
            raise ValueError(f"optimizer state lacks {sorted(set(names) - set(present))[:5]}; ZeRO needs "
                             "all or none of a bucket's parameters")
        first = state[present[0]]
        entry = {key: v.clone() for key, v in first.items() if v.dim() == 0}
        g, (lo, hi) = self.groups[b.group], self._chunk_range(b)
        for key in (key for key, v in first.items() if v.dim() > 0):
            full = torch.zeros(b.numel, dtype=self.dtype, device=self.device)
            for i in b.params:
                off, values = g.offsets[i] - b.start, state[self.names[i]][key].reshape(-1)
                full[off:off + values.numel()].copy_(values)
            entry[key] = full[lo - b.start:hi - b.start].clone()
        return entry
