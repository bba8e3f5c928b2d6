"""Measure a parallel training step: bytes per collective, device audits, and `Instrument`, which
joins them with the per-rank timelines of `lmkit.parallel.timeline` (re-exported here with the
memory counts of `lmkit.parallel.memory`), and this process's GPU peak FLOP/s for MFU.

Observes either engine from outside: `CommCounter` counts every ``c10d`` collective at the
dispatcher's ``BackendSelect`` key. Definitions, per call for a group of ``n`` ranks
(nccl-tests): ``bytes`` is the payload ``B`` (the buffer; the gathered output of an all-gather;
the unreduced input of a reduce-scatter); ``wire_bytes`` what this rank sends under ring
algorithms (all-reduce ``2 (n-1)/n B``; reduce-scatter, all-gather, reduce, broadcast ``(n-1)/n
B``; all-to-all: the input rows sent to the other ranks (exact, uneven splits too); send ``B``; recv
0). Why and how, in the book: chapter 5, section 5.1; the measurements:
chapter 6.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.overrides import TorchFunctionMode

# The formulas live in the cost model (pure Python, also in the browser); re-exported for the instruments.
from lmkit.costs import bubble_fraction as bubble_formula
from lmkit.costs import lookup_peak_flops, wire_bytes
from lmkit.parallel.memory import AllocationTracker, memory_report
from lmkit.parallel.timeline import (
    Timeline,
    attach_timeline,
    idle_fractions,
    read_jsonl,
    reports_events,
)

__all__ = ["COLLECTIVE_KINDS", "CommCounter", "DeviceAudit", "wire_bytes", "Timeline", "attach_timeline",
           "Instrument", "idle_fractions", "bubble_formula", "memory_report", "AllocationTracker",
           "peak_flops", "read_jsonl"]

COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "send", "recv",
                    "all_to_all", "gather", "scatter", "barrier")

# c10d operator -> (kind, index of the argument holding the payload, payload x group size?)
_C10D_OPS: dict[str, tuple[str, int | None, bool]] = {
    "allreduce_": ("all_reduce", 0, False),
    "allreduce_coalesced_": ("all_reduce", 0, False),
    "broadcast_": ("broadcast", 0, False),
    "reduce_": ("reduce", 0, False),
    "allgather_": ("all_gather", 0, False),
    "_allgather_base_": ("all_gather", 0, False),
    "allgather_coalesced_": ("all_gather", 0, False),
    "allgather_into_tensor_coalesced_": ("all_gather", 0, False),
    "reduce_scatter_": ("reduce_scatter", 1, False),
    "_reduce_scatter_base_": ("reduce_scatter", 1, False),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, False),
    "alltoall_": ("all_to_all", 1, False),
    "alltoall_base_": ("all_to_all", 1, False),
    "gather_": ("gather", 1, True),
    "scatter_": ("scatter", 0, True),
    "send": ("send", 0, False),
    "recv_": ("recv", 0, False),
    "recv_any_source_": ("recv", 0, False),
    "barrier": ("barrier", None, False),
    "monitored_barrier_": ("barrier", None, False),
}


# --------------------------------------------------------------------------- counting collectives


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


class _Registry:
    """The process-wide ``BackendSelect`` kernels and the counters and audits they report to."""

    lock = threading.Lock()
    library: Any = None
    active: list[CommCounter] = []
    audits: list[DeviceAudit] = []
    groups: dict[str, tuple[int, tuple[int, ...]]] = {}  # group name -> (size, global ranks)

    @classmethod
    def add(cls, listener: CommCounter | DeviceAudit) -> None:
        with cls.lock:
            if cls.library is None:
                cls.groups.clear()  # process groups may have been destroyed and re-created since
                cls.library = _register_kernels()
            (cls.audits if isinstance(listener, DeviceAudit) else cls.active).append(listener)

    @classmethod
    def remove(cls, listener: CommCounter | DeviceAudit) -> None:
        with cls.lock:
            for listeners in (cls.active, cls.audits):
                if listener in listeners:
                    listeners.remove(listener)
            if not cls.active and not cls.audits and cls.library is not None:
                cls.library._destroy()
                cls.library = None


def _group_info(pg_script: Any) -> tuple[int, str, tuple[int, ...]]:

    pg = torch._C._distributed_c10d.ProcessGroup.unbox(pg_script)
    name = pg.group_name
    info = _Registry.groups.get(name)
    if info is None:
        try:
            ranks = tuple(dist.get_process_group_ranks(pg))
        except Exception:  # noqa: BLE001 - a group torch.distributed does not know by this object
            ranks = ()
        info = _Registry.groups[name] = (pg.size(), ranks)
    return info[0], name, info[1]


def _all_to_all_sent(args: tuple, ranks: tuple[int, ...]) -> float | None:
    """Bytes an all-to-all (``alltoall_base_(output, input, group, output_splits, input_splits)``) sends
    to the other ranks: its input minus the rows it keeps (uneven splits: experts' token dispatch)."""
    x, splits = args[1], list(args[4]) or None
    if not ranks or x.dim() == 0 or x.size(0) == 0:
        return None
    me = ranks.index(dist.get_rank())
    per_row = x.numel() // x.size(0) * x.element_size()
    kept = splits[me] if splits is not None else x.size(0) // len(ranks)
    return float((x.size(0) - kept) * per_row)


def _register_kernels():
    after = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.BackendSelect)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    library = torch.library.Library("c10d", "IMPL")
    for name, spec in _C10D_OPS.items():
        packet = getattr(torch.ops.c10d, name, None)
        if packet is None:
            continue
        op = packet.default
        arg_names = [a.name for a in op._schema.arguments]
        pg_index = arg_names.index("process_group")

        def kernel(*args, _op=op, _spec=spec, _pg=pg_index, _a2a=name == "alltoall_base_", **kwargs):
            first = next(_tensors(args), None)
            keys = (torch._C._dispatch_keys(first) & after) if first is not None else cpu
            for audit in list(_Registry.audits):
                audit._inspect(_spec[0], args)
            counters = list(_Registry.active)
            if not counters:
                return _op.redispatch(keys, *args, **kwargs)
            start = time.perf_counter()
            out = _op.redispatch(keys, *args, **kwargs)
            end = time.perf_counter()
            kind, payload, times_n = _spec
            size, group, ranks = _group_info(args[_pg])
            nbytes = 0 if payload is None else _nbytes(args[payload]) * (size if times_n else 1)
            work = out[-1] if isinstance(out, (tuple, list)) else out
            on_cpu = first is None or first.device.type == "cpu"
            wire = _all_to_all_sent(args, ranks) if _a2a else None
            for counter in counters:
                counter._record(kind, nbytes, size, group, ranks, start, end, work if on_cpu else None, wire)
            spent = time.perf_counter() - end
            for counter in counters:
                counter.overhead_s += spent
            return out

        library.impl(name, kernel, "BackendSelect")
    return library


class CommCounter:
    """Calls and bytes of every collective issued while it is active (a context manager).

    ``summary()`` gives ``{kind: {"calls", "bytes", "wire_bytes"}}`` since the last `reset`
    (definitions in the module docstring); ``summary(by_group=True)`` keys by ``(kind, group
    ranks)`` instead, which separates e.g. a tensor-parallel all-reduce from a data-parallel
    one. ``keep_records=True`` also keeps one dict per call in ``records``. With a `timeline`,
    collectives become timeline events (``send``/``recv`` only with ``timeline_p2p=True``: a
    pipeline reports its own, with microbatch numbers; barriers never).

    Example::

        with CommCounter() as comm:
            trainer.train_step()
        comm.summary()["all_reduce"]["bytes"]
    """

    def __init__(self, timeline: Timeline | None = None, timeline_p2p: bool = False,
                 keep_records: bool = False) -> None:
        self.timeline, self.timeline_p2p, self.keep_records = timeline, timeline_p2p, keep_records
        self.reset()

    def reset(self) -> None:
        self.totals: dict[tuple[str, tuple[int, ...]], list[float]] = {}
        self.records: list[dict[str, Any]] = []
        self.overhead_s = 0.0  # time spent in the bookkeeping after the collectives returned

    def __enter__(self) -> CommCounter:

        if dist.is_available():
            _Registry.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _Registry.remove(self)

    def _record(self, kind: str, nbytes: int, size: int, group: str, ranks: tuple[int, ...], start: float,
                end: float, work: Any, wire: float | None = None) -> None:
        wire = wire_bytes(kind, nbytes, size) if wire is None else wire
        entry = self.totals.setdefault((kind, ranks), [0, 0, 0.0])
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += wire
        if self.keep_records:
            self.records.append({"kind": kind, "bytes": nbytes, "wire_bytes": wire, "group_size": size,
                                 "group": group, "ranks": list(ranks), "start": start})
        timeline = self.timeline
        if timeline is None or kind == "barrier" or (kind in ("send", "recv") and not self.timeline_p2p):
            return
        if work is not None:  # gloo: the event ends when the work completes (in gloo's thread)
            step = (timeline.step, timeline.origin)
            try:
                future = torch._C._distributed_c10d.Work.unbox(work).get_future()
                future.then(lambda _f: timeline.add(kind, -1, -1, start, time.perf_counter(), step))
                return
            except RuntimeError:  # send/recv works have no future
                pass
        timeline.add(kind, -1, -1, start, end)

    def summary(self, by_group: bool = False) -> dict[Any, dict[str, float]]:
        out: dict[Any, dict[str, float]] = {}
        for (kind, ranks), (calls, nbytes, wire) in sorted(self.totals.items()):
            key = (kind, ranks) if by_group else kind
            agg = out.setdefault(key, {"calls": 0, "bytes": 0, "wire_bytes": 0.0})
            agg["calls"] += calls
            agg["bytes"] += nbytes
            agg["wire_bytes"] += wire
        return out


# --------------------------------------------------------------------------- device audit

_LMKIT_DIR = str(Path(__file__).resolve().parents[1])
_THIS_FILE = str(Path(__file__).resolve())
# Factories that place their result on the default device (the CPU) unless given ``device=``.
_FACTORIES = frozenset(getattr(torch, n) for n in (
    "tensor", "as_tensor", "from_numpy", "zeros", "ones", "empty", "full", "arange", "linspace", "rand",
    "randn", "randint", "eye", "scalar_tensor"))
_MOVES = frozenset((Tensor.to, Tensor.cuda, Tensor.cpu))


def _caller_file() -> str:
    """File of the code that called the torch function being handled (skipping this module)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _THIS_FILE:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


class DeviceAudit(TorchFunctionMode):
    """Checks that every tensor handed to a ``c10d`` collective lives on the engine's device.

    NCCL rejects a CPU tensor; gloo takes any, so on a CPU the mistake is invisible. The audit
    makes it visible without a GPU, in two ways (the book, chapter 6, section 6.10 "On GPUs"):

    * ``records``: every tensor argument of every collective, with its device; `violations` lists
      those whose device is not ``device`` (the group's device: the engine's);
    * *placement*: while active it is a ``TorchFunctionMode`` that marks every tensor which lmkit's
      own code creates with a factory (``torch.tensor``, ``torch.zeros``, ...) **without**
      ``device=`` (``code``: the files or folders whose code is audited; lmkit's by default),
      and every tensor computed from marked tensors only; ``.to(device)`` clears the
      mark. Such a tensor sits on the CPU on a GPU run too, so handing it to a collective is a
      violation even when the run is on a CPU. ``torch``'s own tensors (e.g. AdamW's CPU step
      counters, object collectives' byte buffers) are not marked: torch places those itself.

    Example (every rank)::

        with DeviceAudit(topo.device) as audit:
            trainer.train_step()
        assert not audit.violations, audit.violations
    """

    def __init__(self, device: torch.device | str, code: Sequence[str] = (_LMKIT_DIR,)) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.code = tuple(str(c) for c in code)
        self.records: list[dict[str, Any]] = []
        self._marked: dict[int, weakref.ref] = {}  # id -> tensor created on the default device

    # -- placement marks
    def _mark(self, value: Any) -> None:
        for t in _tensors(value):
            self._marked[id(t)] = weakref.ref(t)

    def _unmark(self, value: Any) -> None:
        for t in _tensors(value):
            self._marked.pop(id(t), None)

    def is_marked(self, t: Tensor) -> bool:
        """Whether `t` (or the tensor it is a view of) was created without a device by lmkit."""
        with torch._C.DisableTorchFunction():
            base = t._base
        for candidate in (t, base):
            if candidate is None:
                continue
            ref = self._marked.get(id(candidate))
            if ref is not None and ref() is candidate:
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            if kwargs.get("device") is None and _caller_file().startswith(self.code):
                self._mark(out)
        elif func in _MOVES:
            explicit = func is not Tensor.to or "device" in kwargs or any(
                isinstance(a, (str, torch.device, Tensor)) for a in args[1:])
            source_marked = isinstance(args[0], Tensor) and self.is_marked(args[0])
            if explicit:
                self._unmark(out)
            elif source_marked:
                self._mark(out)
        else:
            inputs = list(_tensors(list(args) + list(kwargs.values())))
            if inputs and all(self.is_marked(t) for t in inputs):
                self._mark(out)  # computed from default-device tensors only: on the CPU as well
        return out

    # -- collectives
    def _inspect(self, kind: str, args: tuple) -> None:
        for t in _tensors(args):  # (called by the c10d kernel, outside the mode's handler)
            self.records.append({"kind": kind, "device": str(t.device), "shape": tuple(t.shape),
                                 "dtype": str(t.dtype).replace("torch.", ""),
                                 "bytes": t.numel() * t.element_size(),
                                 "placed_by_default": self.is_marked(t)})

    @property
    def violations(self) -> list[dict[str, Any]]:
        """Records of tensors not on ``device``, or created by lmkit without a device."""
        return [r for r in self.records if torch.device(r["device"]) != self.device or r["placed_by_default"]]

    def __enter__(self) -> DeviceAudit:

        if dist.is_available():
            _Registry.add(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        _Registry.remove(self)


# --------------------------------------------------------------------------- one instrumented step


class Instrument:
    """A `CommCounter`, a `Timeline` and the engine hooks, per step. Every rank runs it.

    Example (inside each rank of a layout)::

        with Instrument(trainer.engine) as inst:
            for step in range(3):
                with inst.step(step):
                    trainer.train_step()
        inst.steps[-1]["comm"]; inst.timeline.step_events(); memory_report(trainer.engine)

    `step` runs a barrier (when a process group exists) *before* it resets the counter and
    starts the timeline's clock, so every rank's times start together and the barrier is not
    counted. ``steps`` holds ``{"step", "wall_s", "comm", "counter_overhead_s"}`` per step (the
    last: time the counter's bookkeeping took, not counting the Python kernel call itself).
    """

    def __init__(self, engine: Any = None, timeline_p2p: bool | None = None, barrier: bool = True,
                 keep_records: bool = False) -> None:
        self.engine = engine
        self.timeline = Timeline()
        if timeline_p2p is None:  # the lmkit pipeline reports its own send/recv events
            timeline_p2p = engine is None or not reports_events(engine)
        self.counter = CommCounter(self.timeline, timeline_p2p=timeline_p2p, keep_records=keep_records)
        self.barrier = barrier
        self.steps: list[dict[str, Any]] = []
        self._detach: Callable[[], None] | None = None

    def __enter__(self) -> Instrument:
        self.counter.__enter__()
        if self.engine is not None:
            self._detach = attach_timeline(self.engine, self.timeline)
        return self

    def __exit__(self, *exc) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None
        self.counter.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, index: int | None = None) -> Iterator[None]:
        if self.barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.counter.reset()
        self.timeline.begin_step(index)
        start = time.perf_counter()
        yield
        self.steps.append({"step": self.timeline.step, "wall_s": time.perf_counter() - start,
                           "comm": self.counter.summary(), "counter_overhead_s": self.counter.overhead_s})


def peak_flops(device: torch.device | str | None = None,
               dtype: str | torch.dtype = "bfloat16") -> float | None:
    """This process's GPU's peak FLOP/s (`lmkit.costs.lookup_peak_flops`); None on a CPU or unknown GPU."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device), dtype)
