"""Measure a parallel training step: bytes per collective, per-rank timelines, memory, MFU, bubble.

Observes an engine from outside, for both engines: `CommCounter` counts every ``c10d`` collective
at the dispatcher's ``BackendSelect`` key, `Timeline` records forward/backward/communication events,
`idle_fractions` measures the pipeline bubble, `memory_report` counts allocated storage (each
storage once: parameters, gradient buffers, optimizer state; a DTensor's local shard) and
`AllocationTracker` the live and peak bytes allocated while it is active (on a CPU too). Definitions,
per call for a group of ``n`` ranks (nccl-tests): ``bytes`` is the payload ``B`` (the buffer; the
gathered output of an all-gather; the unreduced input of a reduce-scatter); ``wire_bytes`` what this
rank sends under ring algorithms (all-reduce ``2 (n-1)/n B``; reduce-scatter, all-gather, reduce,
broadcast ``(n-1)/n B``; send ``B``; recv 0). A rank's idle fraction in a step is ``1 - busy / T``:
``busy`` the union of its forward/backward intervals, ``T`` the first start to the last end of any
rank's. Why and how, in the book: chapter 5, section 5.1; the measurements: chapter 6.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# The formulas live in the cost model (pure Python, also in the browser); re-exported for the instruments.
from lmkit.costs import bubble_fraction as bubble_formula
from lmkit.costs import wire_bytes

__all__ = [
    "COLLECTIVE_KINDS",
    "CommCounter",
    "DeviceAudit",
    "wire_bytes",
    "Timeline",
    "attach_timeline",
    "Instrument",
    "idle_fractions",
    "bubble_formula",
    "memory_report",
    "AllocationTracker",
    "PEAK_FLOPS",
    "lookup_peak_flops",
    "peak_flops",
    "mfu",
    "read_jsonl",
]

COLLECTIVE_KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "send", "recv",
                    "all_to_all", "gather", "scatter", "barrier")
COMPUTE_KINDS = ("forward", "backward")

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
    import torch.distributed as dist

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

        def kernel(*args, _op=op, _spec=spec, _pg=pg_index, **kwargs):
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
            for counter in counters:
                counter._record(kind, nbytes, size, group, ranks, start, end, work if on_cpu else None)
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
        import torch.distributed as dist

        if dist.is_available():
            _Registry.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _Registry.remove(self)

    def _record(self, kind: str, nbytes: int, size: int, group: str, ranks: tuple[int, ...], start: float,
                end: float, work: Any) -> None:
        wire = wire_bytes(kind, nbytes, size)
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
    makes it visible without a GPU, in two ways (the book, chapter 6, section 6.9 "On GPUs"):

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
        import torch.distributed as dist

        if dist.is_available():
            _Registry.add(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        _Registry.remove(self)


# --------------------------------------------------------------------------- timelines


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Timeline:
    """Per-rank events ``{rank, step, kind, microbatch, chunk, start, end}`` (see the module doc).

    `on_event` has `lmkit.parallel.pipeline.run_pipeline`'s callback signature; `add` takes
    absolute `time.perf_counter` times and stores them relative to the last `begin_step`.
    """

    def __init__(self, rank: int | None = None) -> None:
        self._rank = rank
        self.events: list[dict[str, Any]] = []
        self.step = 0
        self.origin = time.perf_counter()
        self._forwards: dict[int, int] = {}  # chunk -> forwards seen this step (microbatch numbers)

    @property
    def rank(self) -> int:
        if self._rank is None:
            self._rank = _global_rank()
        return self._rank

    def begin_step(self, step: int | None = None) -> None:
        """Start a step: times are measured from now (call it right after a barrier)."""
        self.step = self.step + 1 if step is None else step
        self.origin = time.perf_counter()
        self._forwards = {}

    def next_microbatch(self, chunk: int) -> int:
        n = self._forwards.get(chunk, 0)
        self._forwards[chunk] = n + 1
        return n

    def add(self, kind: str, microbatch: int, chunk: int, start: float, end: float,
            step: tuple[int, float] | None = None) -> None:
        """Record an event; `step` = ``(step, origin)`` pins it to a step that may have ended."""
        index, origin = step if step is not None else (self.step, self.origin)
        self.events.append({"rank": self.rank, "step": index, "kind": kind, "microbatch": int(microbatch),
                            "chunk": int(chunk), "start": start - origin, "end": end - origin})

    def on_event(self, kind: str, microbatch: int, chunk: int, t_start: float, t_end: float) -> None:
        self.add(kind, microbatch, chunk, t_start, t_end)

    def step_events(self, step: int | None = None) -> list[dict[str, Any]]:
        """Events of `step` (default: the current one), sorted by start time."""
        step = self.step if step is None else step
        return sorted((e for e in self.events if e["step"] == step), key=lambda e: (e["start"], e["end"]))

    def to_jsonl(self, path: str | Path, append: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for event in sorted(self.events, key=lambda e: (e["step"], e["start"])):
                f.write(json.dumps(event) + "\n")
        return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Events written by `Timeline.to_jsonl` (of any number of ranks, concatenated)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _BackwardMarker(torch.autograd.Function):
    """Identity whose backward times the rest of the autograd pass (one microbatch's backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, timeline: Timeline, microbatch: int, chunk: int) -> Tensor:
        ctx.info = (timeline, microbatch, chunk)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        timeline, microbatch, chunk = ctx.info
        start = time.perf_counter()

        def done() -> None:
            timeline.add("backward", microbatch, chunk, start, time.perf_counter())

        torch.autograd.Variable._execution_engine.queue_callback(done)
        return grad, None, None, None


def _time_module(module: nn.Module, timeline: Timeline, chunk: int) -> list[Any]:
    starts: list[float] = []

    def pre(_mod, _args):
        if torch.is_grad_enabled():
            starts.append(time.perf_counter())

    def post(_mod, _args, out):
        if not torch.is_grad_enabled() or not starts:
            return None
        start, end = starts.pop(), time.perf_counter()
        microbatch = timeline.next_microbatch(chunk)
        timeline.add("forward", microbatch, chunk, start, end)
        if isinstance(out, Tensor) and out.requires_grad:
            return _BackwardMarker.apply(out, timeline, microbatch, chunk)
        return None

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _pp_size(engine: Any) -> int:
    pcfg = getattr(engine, "pcfg", None) or getattr(engine, "parallel", None)
    return int(getattr(pcfg, "pp", 1) or 1)


def _modules_of(engine: Any) -> list[nn.Module]:
    if isinstance(engine, nn.Module):
        return [engine]
    for attr in ("stages", "model_parts", "modules_"):
        value = getattr(engine, attr, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(m, nn.Module) for m in value):
            return list(value)
    for attr in ("model", "module"):
        value = getattr(engine, attr, None)
        if isinstance(value, nn.Module):
            return [value]
    return []


def _reports_events(engine: Any) -> bool:
    """Whether `engine` is the lmkit engine running a pipeline (its schedule reports events)."""
    from lmkit.parallel.engine import ParallelEngine

    return isinstance(engine, ParallelEngine) and _pp_size(engine) > 1


def attach_timeline(engine: Any, timeline: Timeline) -> Callable[[], None]:
    """Record `engine`'s forward/backward (and pipeline send/recv) events; returns a remover.

    The lmkit engine with ``pp > 1``: its ``forward_backward`` is wrapped on the instance so
    that `run_pipeline` reports to `timeline` (``on_event``). Otherwise (``pp == 1``, or the
    native engine, whose ``torch.distributed.pipelining`` schedule has no such callback)
    forward hooks time each stage module (``engine.stages``, ``engine.model``, or `engine`
    itself if it is a module); the native pipeline's send/recv then come from the counter.
    """
    if _reports_events(engine):
        method = engine.forward_backward
        had = "forward_backward" in vars(engine)

        def forward_backward(micro, autocast, on_event=None, **kwargs):
            def both(*event):
                timeline.on_event(*event)
                if on_event is not None:
                    on_event(*event)

            return method(micro, autocast, on_event=both, **kwargs)

        engine.forward_backward = forward_backward

        def remove() -> None:
            if had:
                engine.forward_backward = method
            else:
                del engine.forward_backward

        return remove
    handles = [h for chunk, m in enumerate(_modules_of(engine)) for h in _time_module(m, timeline, chunk)]

    def remove_hooks() -> None:
        for handle in handles:
            handle.remove()

    return remove_hooks


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
            timeline_p2p = engine is None or not _reports_events(engine)
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
        import torch.distributed as dist

        if self.barrier and dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.counter.reset()
        self.timeline.begin_step(index)
        start = time.perf_counter()
        yield
        self.steps.append({"step": self.timeline.step, "wall_s": time.perf_counter() - start,
                           "comm": self.counter.summary(), "counter_overhead_s": self.counter.overhead_s})


# --------------------------------------------------------------------------- bubble


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def idle_fractions(events: Sequence[dict[str, Any]], step: int | None = None,
                   compute_kinds: Sequence[str] = COMPUTE_KINDS) -> dict[str, Any]:
    """Measured idle fraction per rank of one step (definitions in the module docstring).

    `events`: every rank's events (e.g. concatenated `Timeline.events`); `step`: which step
    (default: the last one present). Returns ``{"span_s", "busy_s": {rank: s}, "idle":
    {rank: fraction}, "mean_idle"}``.
    """
    if step is None:
        step = max(e["step"] for e in events)
    compute = [e for e in events if e["step"] == step and e["kind"] in compute_kinds]
    if not compute:
        raise ValueError(f"no {'/'.join(compute_kinds)} events in step {step}")
    span = max(e["end"] for e in compute) - min(e["start"] for e in compute)
    ranks = sorted({e["rank"] for e in compute})
    busy = {r: _union_length((e["start"], e["end"]) for e in compute if e["rank"] == r) for r in ranks}
    idle = {r: 1.0 - busy[r] / span for r in ranks}
    return {"span_s": span, "busy_s": busy, "idle": idle, "mean_idle": sum(idle.values()) / len(idle)}


# --------------------------------------------------------------------------- memory


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, any other tensor as is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, Tensor) else t


def _storage_bytes(tensors: Iterable[Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        t = _local(t)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.data_ptr() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _params_and_optimizer(obj: Any, optimizer: Any) -> tuple[list[Tensor], Any]:
    if getattr(obj, "engine", None) is not None:  # a Trainer with a parallel engine
        obj = obj.engine
    elif hasattr(obj, "model") and hasattr(obj, "optimizer") and not hasattr(obj, "named_params"):
        optimizer = optimizer or obj.optimizer  # a single-process Trainer
        obj = obj.model if isinstance(obj.model, nn.Module) else obj
    optimizer = optimizer if optimizer is not None else getattr(obj, "optimizer", None)
    if hasattr(obj, "named_params"):  # lmkit ParallelEngine
        params = [p for _, p in obj.named_params]
    elif isinstance(obj, nn.Module):
        params = list(obj.parameters())
    elif callable(getattr(obj, "parameters", None)):
        params = list(obj.parameters())
    else:
        params = [p for m in _modules_of(obj) for p in m.parameters()]
    return params, optimizer


def memory_report(engine: Any, optimizer: Any = None) -> dict[str, Any]:
    """This rank's parameter, gradient and optimizer-state bytes, and the CUDA peak.

    `engine`: an lmkit `ParallelEngine`, a native engine (anything with ``parameters()``,
    ``stages`` or ``model``, and ``optimizer``), a `Trainer`, or an ``nn.Module`` together with
    its `optimizer`. Bytes are allocated storage, each storage counted once (module docstring).
    ``cuda_peak_bytes`` is ``torch.cuda.max_memory_allocated`` on a GPU, None on a CPU (no
    allocator statistics there).
    """
    params, optimizer = _params_and_optimizer(engine, optimizer)
    numel = sum(_local(p).numel() for p in {id(p): p for p in params}.values())
    if optimizer is not None:  # ZeRO's shard "parameters" are views of the same flat buffers
        params += [p for group in optimizer.param_groups for p in group["params"]]
    seen: set = set()
    param_bytes = _storage_bytes(params, seen)
    grad_bytes = _storage_bytes((p.grad for p in params if p.grad is not None), seen)
    state_tensors = []
    if optimizer is not None:
        for state in optimizer.state.values():
            state_tensors += [v for v in state.values() if isinstance(v, Tensor)]
    opt_bytes = _storage_bytes(state_tensors, seen)
    devices = {_local(p).device for p in params}
    cuda = next((d for d in devices if d.type == "cuda"), None)
    return {
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "total_bytes": param_bytes + grad_bytes + opt_bytes,
        "param_numel": numel,
        "device": str(cuda or next(iter(devices), "cpu")),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(cuda) if cuda is not None else None,
    }


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storage allocated while active, on any device.

    A CPU has no allocator statistics (``torch.cuda.max_memory_allocated`` is GPU-only), so the
    tracker watches the dispatcher: the storage of every tensor an operator returns is counted
    once, when first seen, and uncounted when torch frees it (a finalizer on the storage object,
    which torch keeps alive exactly as long as the storage). Views and parameters wrapping a
    counted storage add nothing; meta tensors have none. Not counted: storage allocated before
    the tracker started, and kernels' internal scratch space. What chapter 6 uses to measure a
    rank's peak memory at start::

        with AllocationTracker() as alloc:
            engine = build_engine(model, layout, train_cfg, topology)
        alloc.peak_bytes, alloc.live_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[tuple[str, int]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._count(_local(t))
        return out

    def _count(self, t: Tensor) -> None:
        if t.is_meta or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key[1] == 0 or key in self._live:
            return
        n = storage.nbytes()
        self._live.add(key)
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: tuple[str, int], n: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.live_bytes -= n


# --------------------------------------------------------------------------- throughput and MFU

#: Dense peak FLOP/s per GPU (NVIDIA datasheets, no 2:4 sparsity), by dtype. "float32" is plain
#: FP32 (PyTorch's default; TF32 tensor cores run faster when enabled). Patterns are matched
#: against ``torch.cuda.get_device_name()`` in order; the first match wins.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*NVL|H200.*NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    (r"H100.*PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    (r"H100|H200|GH200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    (r"A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    (r"L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
    (r"\bA10\b", {"bfloat16": 125e12, "float16": 125e12, "float32": 31.2e12}),
    (r"V100.*PCIE", {"float16": 112e12, "float32": 14e12}),
    (r"V100", {"float16": 125e12, "float32": 15.7e12}),
    (r"\bT4\b", {"float16": 65e12, "float32": 8.1e12}),
]


def lookup_peak_flops(device_name: str, dtype: str | torch.dtype = "bfloat16") -> float | None:
    """Peak FLOP/s of the GPU called `device_name` for `dtype`; None if unknown."""
    key = str(dtype).replace("torch.", "")
    for pattern, table in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return table.get(key)
    return None


def peak_flops(device: torch.device | str | None = None,
               dtype: str | torch.dtype = "bfloat16") -> float | None:
    """Peak FLOP/s of this process's GPU (`lookup_peak_flops`); None on a CPU or an unknown GPU."""
    device = torch.device(device) if device is not None else None
    if (device is not None and device.type != "cuda") or not torch.cuda.is_available():
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device), dtype)


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``tokens/s x flops_per_token / (n_devices x peak)``; None without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak)
