"""Per-rank timelines of a training step and the pipeline bubble measured from them.

`Timeline` records ``{rank, step, kind, microbatch, chunk, start, end}`` events (forward and
backward per stage module or reported by the lmkit pipeline, send/recv from the `CommCounter` of
`lmkit.parallel.instrument`; under context parallelism also every ring step of every layer's ring
attention, `RING_KINDS`); `idle_fractions` measures each rank's idle share of a step: ``1 -
busy / T`` with ``busy`` the union of its forward/backward intervals and ``T`` the first start to
the last end of any rank's. The book, chapter 5, section 5.6, and chapter 6.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmkit.parallel.context_parallel import ContextParallelAttention, RingObserver
from lmkit.parallel.engine import ParallelEngine
from lmkit.parallel.stage import GPTStage

__all__ = ["COMPUTE_KINDS", "RING_KINDS", "Timeline", "read_jsonl", "attach_timeline", "modules_of",
           "reports_events", "idle_fractions"]

COMPUTE_KINDS = ("forward", "backward", "weight")  # weight: a zero-bubble schedule's W
#: Ring attention's events (`Timeline.ring_observer`): a ring step's block compute, forward and
#: backward; a K/V block and a dK/dV accumulator in flight (posted to waited for); blocked in a wait.
RING_KINDS = {"compute": ("ring_forward", "ring_backward"), "kv": "kv_transfer", "dkv": "dkv_transfer",
              "wait": "ring_wait"}


def _global_rank() -> int:
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
            step: tuple[int, float] | None = None, **extra: Any) -> None:
        """Record an event; `step` = ``(step, origin)`` pins it to a step that may have ended;
        `extra` adds fields of its own (a ring step's ``phase``, ``ring_step``, ``blocks``)."""
        index, origin = step if step is not None else (self.step, self.origin)
        self.events.append({"rank": self.rank, "step": index, "kind": kind, "microbatch": int(microbatch),
                            "chunk": int(chunk), "start": start - origin, "end": end - origin, **extra})

    def ring_observer(self, layer: int) -> RingObserver:
        """`ring_attention`'s ``on_event`` for layer `layer`: events of `RING_KINDS` with ``chunk`` =
        the layer, ``microbatch`` = which pass of that layer in this step (forward and backward counted
        apart: the microbatch under pipelining), and ``phase``, ``ring_step`` and ``blocks`` (score
        blocks of a compute event)."""
        passes: dict[str, list[int]] = {}  # phase -> [step, passes begun in it]

        def on_event(phase: str, what: str, ring_step: int, start: float, end: float, blocks: int) -> None:
            seen = passes.setdefault(phase, [self.step, -1])
            if seen[0] != self.step:
                seen[:] = [self.step, -1]
            if what == "compute" and ring_step == 0:  # a pass begins with the step on its own block
                seen[1] += 1
            names = RING_KINDS[what]
            kind = names[phase == "backward"] if isinstance(names, tuple) else names
            self.add(kind, seen[1], layer, start, end, phase=phase, ring_step=ring_step, blocks=blocks)

        return on_event

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
    """Identity whose backward times the rest of the autograd pass (one microbatch's backward).

    It returns a copy, not a view: torch's zero-bubble schedules detach a stage's output in place
    when they hand it to the next stage on the same rank (ZB-V), which a view does not allow."""

    @staticmethod
    def forward(ctx, x: Tensor, timeline: Timeline, microbatch: int, chunk: int) -> Tensor:
        ctx.info = (timeline, microbatch, chunk)
        return x.clone()

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


def modules_of(engine: Any) -> list[nn.Module]:
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


def reports_events(engine: Any) -> bool:
    """Whether `engine` is the lmkit engine running a pipeline (its schedule reports events)."""
    return isinstance(engine, ParallelEngine) and _pp_size(engine) > 1


def _attach_rings(engine: Any, timeline: Timeline) -> list[ContextParallelAttention]:
    """Give every ring attention of `engine`'s stages an observer that records into `timeline`."""
    rings = []
    for stage in modules_of(engine):
        if not isinstance(stage, GPTStage):  # the plain GPT, the native engine: no ring attention
            continue
        blocks = stage.blocks.values() if isinstance(stage.blocks, nn.ModuleDict) else stage.blocks
        for layer, block in zip(stage.layers, blocks, strict=True):
            if isinstance(block.attn, ContextParallelAttention):
                block.attn.on_event = timeline.ring_observer(layer)
                rings.append(block.attn)
    return rings


def attach_timeline(engine: Any, timeline: Timeline) -> Callable[[], None]:
    """Record `engine`'s forward/backward (and pipeline send/recv) events; returns a remover.

    The lmkit engine with ``pp > 1``: its ``forward_backward`` is wrapped on the instance so
    that `run_pipeline` reports to `timeline` (``on_event``). Otherwise (``pp == 1``, or the
    native engine, whose ``torch.distributed.pipelining`` schedule has no such callback)
    forward hooks time each stage module (``engine.stages``, ``engine.model``, or `engine`
    itself if it is a module); the native pipeline's send/recv then come from the counter.
    Under context parallelism every layer's ring attention reports its ring steps (`RING_KINDS`).
    """
    rings = _attach_rings(engine, timeline)

    def detach_rings() -> None:
        for ring in rings:
            ring.on_event = None

    if reports_events(engine):
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
            detach_rings()
            if had:
                engine.forward_backward = method
            else:
                del engine.forward_backward

        return remove
    handles = [h for chunk, m in enumerate(modules_of(engine)) for h in _time_module(m, timeline, chunk)]

    def remove_hooks() -> None:
        detach_rings()
        for handle in handles:
            handle.remove()

    return remove_hooks


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
