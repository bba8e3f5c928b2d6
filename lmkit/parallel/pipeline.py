"""Pipeline parallelism by hand: GPipe, 1F1B, interleaved 1F1B and the zero-bubble ZB-H1 over
point-to-point messages.

Schedules are plain data (`schedule_steps`, `schedule_actions`) that can be printed and simulated
(`simulate_schedule`, `ideal_timeline`) without processes; `run_pipeline` executes them with one
batched ``batch_isend_irecv`` exchange per step, which cannot deadlock under rendezvous sends. The
zero-bubble schedules (Qi et al. 2024) split a stage's backward into ``B``, the gradient of its
input, which the previous stage waits for, and ``W``, the gradients of its weights, which nothing
needs before the optimizer step: `zero_bubble_orders` places the W's in the bubbles of 1F1B;
`lmkit.parallel.weight_grads` is how a stage's backward computes B now and W later. Explained in the
book, chapter 5 (schedules, bubbles, messages, memory in flight).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from lmkit.config import V_SCHEDULES, ConfigError, ParallelConfig
from lmkit.parallel.weight_grads import Accumulate, WeightGradStore, add_to_grad, deferred_weight_grads

__all__ = [
    "SCHEDULES",
    "Action",
    "PipelineStats",
    "SPLIT_BACKWARD",
    "schedule_steps",
    "schedule_actions",
    "zero_bubble_orders",
    "ideal_timeline",
    "peak_in_flight",
    "simulate_schedule",
    "run_pipeline",
    "last_stats",
    "allreduce_tied_embedding_grads",
    "validate_pipeline",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
#: schedules whose backward is split into B (input gradient) and W (weight gradients)
SPLIT_BACKWARD = ("zb-h1",)


# --------------------------------------------------------------------------- validation


def _check(schedule: str, pp: int, virtual_stages: int, microbatches: int,
           n_layer: int | None = None) -> None:
    """The rules every schedule needs; raises `ConfigError` naming the numbers and the fix."""
    if schedule in V_SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} places two chunks per rank in a V, which only "
                          "engine='native' runs; use --engine native, or schedule='zb-h1' here")
    if schedule not in SCHEDULES:
        raise ConfigError(f"pipeline schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if microbatches < 1:
        raise ConfigError(f"the pipeline needs at least one microbatch, got {microbatches}")
    if schedule != "interleaved" and virtual_stages != 1:
        raise ConfigError(f"schedule={schedule!r} runs one stage per rank but got virtual_stages="
                          f"{virtual_stages}; use schedule='interleaved' or virtual_stages=1")
    if schedule == "interleaved" and (pp < 2 or virtual_stages < 2):
        raise ConfigError(f"schedule='interleaved' needs pp >= 2 and virtual_stages >= 2 (got pp={pp}, "
                          f"virtual_stages={virtual_stages}); use schedule='1f1b' otherwise")
    if n_layer is not None and n_layer < pp * virtual_stages:
        raise ConfigError(f"pp={pp} x virtual_stages={virtual_stages} = {pp * virtual_stages} pipeline "
                          f"stages but model.n_layer={n_layer}; every stage needs at least one block: lower "
                          "pp or virtual_stages, or add layers")
    if schedule in ("1f1b", "interleaved") and microbatches < pp:
        raise ConfigError(f"schedule={schedule!r} needs microbatches >= pp, got microbatches={microbatches} "
                          f"< pp={pp}; use at least {pp} microbatches (more shrinks the bubble) "
                          "or schedule='gpipe'")
    if schedule == "interleaved" and microbatches % pp != 0:
        lo = microbatches // pp * pp
        raise ConfigError(f"schedule='interleaved' needs microbatches divisible by pp, got microbatches="
                          f"{microbatches} and pp={pp}; use {lo} or {lo + pp} microbatches")


def validate_pipeline(cfg: ParallelConfig, n_layer: int, microbatches: int) -> None:
    """Check a pipeline layout before any process starts work (raises `ConfigError`); the V schedules
    are the native engine's (`lmkit.parallel.native_plan.validate_native_schedule` checks them)."""
    if cfg.engine == "native" and cfg.schedule in V_SCHEDULES:
        return
    _check(cfg.schedule, cfg.pp, cfg.virtual_stages, microbatches, n_layer)


# --------------------------------------------------------------------------- schedules as data


class Action(NamedTuple):
    """One compute action of a rank: ``kind`` "F", "B" or "W" of ``microbatch`` on local ``chunk``.

    In the zero-bubble schedules "B" is the input gradient only and "W" the weight gradients; in the
    others "B" is the whole backward."""

    kind: str
    microbatch: int
    chunk: int


Step = list  # the actions a rank runs between two exchanges: [F], [B], or [F, B]


def _one_f_one_b(forwards: list[Action], backwards: list[Action], warmup: int, pair: bool) -> list[Step]:
    """``warmup`` forwards, then forward/backward pairs, then the remaining backwards.

    With ``pair`` a steady-state forward and backward form one step, run back to back
    between two exchanges (what Megatron does for the interleaved schedule, whose messages
    would otherwise wait on each other; see `simulate_schedule`).
    """
    warmup = min(warmup, len(forwards))
    steps = [[f] for f in forwards[:warmup]]
    for i in range(len(forwards) - warmup):
        f, b = forwards[warmup + i], backwards[i]
        steps += [[f, b]] if pair else [[f], [b]]
    return steps + [[b] for b in backwards[len(forwards) - warmup:]]


def schedule_steps(schedule: str, microbatches: int, pp: int, pp_rank: int,
                   virtual_stages: int = 1) -> list[Step]:
    """Rank `pp_rank`'s compute steps for one optimizer step, in order (see the module doc)."""
    m, v = microbatches, virtual_stages
    _check(schedule, pp, v, m)
    if schedule in SPLIT_BACKWARD:
        return [[a] for a in zero_bubble_orders(schedule, m, pp)[pp_rank]]
    fwd = [Action("F", i, 0) for i in range(m)]
    bwd = [Action("B", i, 0) for i in range(m)]
    if schedule == "gpipe":
        return [[a] for a in fwd + bwd]
    if schedule == "1f1b":
        return _one_f_one_b(fwd, bwd, warmup=pp - pp_rank - 1, pair=False)
    # Interleaved (Megatron-LM): the k-th forward runs chunk (k mod pp*v) // pp on microbatch
    # (k // (pp*v)) * pp + k mod pp, i.e. pp microbatches through chunk 0, the same pp through
    # chunk 1, ..., then the next pp microbatches. Backwards visit the chunks in reverse. Rank r
    # warms up with 2 (pp - r - 1) + (v - 1) pp forwards; with m == pp that leaves no steady
    # state worth having and Megatron runs all forwards first (the paired exchanges would
    # deadlock there, which `simulate_schedule` confirms).
    group = pp * v

    def mb(k: int) -> int:
        return (k // group) * pp + k % pp

    fwd = [Action("F", mb(k), (k % group) // pp) for k in range(m * v)]
    bwd = [Action("B", mb(k), v - 1 - (k % group) // pp) for k in range(m * v)]
    warmup = m * v if m == pp else (pp - pp_rank - 1) * 2 + (v - 1) * pp
    return _one_f_one_b(fwd, bwd, warmup, pair=True)


def schedule_actions(schedule: str, microbatches: int, pp: int, pp_rank: int,
                     virtual_stages: int = 1) -> list[Action]:
    """The order in which rank `pp_rank` runs its forwards and backwards in one step."""
    return [a for step in schedule_steps(schedule, microbatches, pp, pp_rank, virtual_stages) for a in step]


def zero_bubble_orders(schedule: str, microbatches: int, pp: int) -> list[list[Action]]:
    """Every rank's order of F, B and W for ZB-H1 (Qi et al. 2024, section 2.1), found by running the
    pipeline on paper with unit times: whenever a rank is free it runs a B whose output gradient has
    arrived; else a W if ``pp`` of them are pending (what bounds their memory); else the next F if
    fewer than 1F1B's ``pp - r`` microbatches wait for their B on rank ``r`` (1F1B's activation
    memory); else the oldest pending W; else it waits. The W's thus fill what 1F1B leaves idle, and
    the step leaves ``(p - 1) max(t_F, t_F + t_B - t_W)`` idle (`ideal_timeline`), a third of 1F1B's
    ``(p - 1)(t_F + t_B + t_W)`` when the three are equal: ``(p - 1) t_F``, the least any schedule
    can leave when the optimizer step waits for every stage (the paper's ZB-H2 and ZB-V reach zero
    only by letting the next step start before this one's step is validated)."""
    if schedule not in SPLIT_BACKWARD:
        raise ValueError(f"{schedule!r} is not a zero-bubble schedule ({SPLIT_BACKWARD})")
    m = microbatches
    limit = [pp - r for r in range(pp)]
    done: dict[tuple[str, int, int], int] = {}  # (kind, rank, microbatch) -> finish time
    free, orders = [0] * pp, [[] for _ in range(pp)]
    nxt = {k: [0] * pp for k in "FBW"}
    while any(len(o) < 3 * m for o in orders):
        best = None  # (start, rank, kind)
        for r in range(pp):
            options = []
            if nxt["B"][r] < nxt["F"][r]:
                i = nxt["B"][r]
                dep = done.get(("B", r + 1, i)) if r < pp - 1 else done.get(("F", r, i))
                if dep is not None:
                    options.append((max(free[r], dep), 0, "B"))
            if nxt["F"][r] < m and nxt["F"][r] - nxt["B"][r] < limit[r]:
                dep = done.get(("F", r - 1, nxt["F"][r])) if r > 0 else 0
                if dep is not None:
                    options.append((max(free[r], dep), 1, "F"))
            if nxt["W"][r] < nxt["B"][r]:  # a W that has waited its turn goes first (bounded memory)
                options.append((free[r], 0.5 if nxt["B"][r] - nxt["W"][r] >= pp else 2, "W"))
            if options:
                start, _, kind = min(options)
                if best is None or (start, r) < best[:2]:
                    best = (start, r, kind)
        start, r, kind = best  # (a rank can always move: the order is dependency-closed)
        i = nxt[kind][r]
        nxt[kind][r] += 1
        done[(kind, r, i)] = free[r] = start + 1
        orders[r].append(Action(kind, i, 0))
    return orders


def ideal_timeline(schedule: str, microbatches: int, pp: int, virtual_stages: int = 1, t_f: float = 1.0,
                   t_b: float = 1.0, t_w: float = 1.0) -> list[list[tuple[Action, float, float]]]:
    """Every rank's ``(action, start, end)`` with free communication and fixed compute times: a
    forward takes `t_f`, an input gradient `t_b`, a weight gradient `t_w` (a whole backward, in the
    schedules that do not split it, ``t_b + t_w``), each divided by `virtual_stages` (a chunk is that
    much smaller). An action starts when its rank is free and its input exists (the previous stage's
    F; the next stage's B; the same stage's F for the last stage's B; its own B for a W). The step
    ends when the last rank finishes (the optimizer step waits for every stage), so a rank's idle
    time, the bubble, is the end minus its busy time (`lmkit.costs.bubble_time` gives it in closed
    form)."""
    v = virtual_stages
    n = pp * v
    split = schedule in SPLIT_BACKWARD
    dur = {"F": t_f / v, "B": (t_b if split else t_b + t_w) / v, "W": t_w / v}
    orders = [schedule_actions(schedule, microbatches, pp, r, v) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, global stage, microbatch) -> end
    free, pos = [0.0] * pp, [0] * pp
    out: list[list[tuple[Action, float, float]]] = [[] for _ in range(pp)]
    moved = True
    while moved:
        moved = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                a = orders[r][pos[r]]
                stage = a.chunk * pp + r
                if a.kind == "F":
                    dep = done.get(("F", stage - 1, a.microbatch)) if stage > 0 else 0.0
                elif a.kind == "B":
                    key = ("B", stage + 1, a.microbatch) if stage < n - 1 else ("F", stage, a.microbatch)
                    dep = done.get(key)
                else:
                    dep = done.get(("B", stage, a.microbatch))
                if dep is None:
                    break
                start = max(free[r], dep)
                free[r] = done[(a.kind, stage, a.microbatch)] = start + dur[a.kind]
                out[r].append((a, start, free[r]))
                pos[r] += 1
                moved = True
    if any(pos[r] < len(orders[r]) for r in range(pp)):
        raise RuntimeError(f"{schedule}: the orders wait on each other (pp={pp}, m={microbatches})")
    return out


def peak_in_flight(actions: Sequence[Action]) -> int:
    """Most (microbatch, chunk) activations a rank holds at once under this order."""
    held = peak = 0
    for a in actions:
        held += {"F": 1, "B": -1}.get(a.kind, 0)
        peak = max(peak, held)
    return peak


class _Msg(NamedTuple):
    """A tensor between two global stages: an activation (forward) or a gradient (backward)."""

    kind: str  # "act" or "grad"
    microbatch: int
    src: int  # global stage index of the sender
    dst: int

    def tag(self, n_stages: int) -> int:  # unique within a step (gloo matches on it)
        return (self.microbatch * n_stages + self.src) * 2 + (self.kind == "grad")


def _incoming(a: Action, stage: int, n_stages: int) -> _Msg | None:
    """What `a` must receive before it can run (None on the first stage's F, the last's B)."""
    if a.kind == "F":
        return _Msg("act", a.microbatch, stage - 1, stage) if stage > 0 else None
    if a.kind == "W":  # the weight gradients need only what this stage's B left behind
        return None
    return _Msg("grad", a.microbatch, stage + 1, stage) if stage < n_stages - 1 else None


def _outgoing(a: Action, stage: int, n_stages: int) -> _Msg | None:
    """What `a` produces for a neighbour (None on the last stage's F, the first's B)."""
    if a.kind == "F":
        return _Msg("act", a.microbatch, stage, stage + 1) if stage < n_stages - 1 else None
    if a.kind == "W":
        return None
    return _Msg("grad", a.microbatch, stage, stage - 1) if stage > 0 else None


Exchange = tuple  # (messages to send, messages to receive), posted together in one batch


def _exchanges(steps: list[Step], pp: int, pp_rank: int, v: int) -> list[Exchange]:
    """The batched exchange before step 0, then after every step ``i``: send what step ``i``
    produced, receive what step ``i + 1`` needs. Lists keep action order, on both ends."""
    n = pp * v
    out, prev = [], []
    for step in [*steps, []]:
        out.append(([m for a in prev if (m := _outgoing(a, a.chunk * pp + pp_rank, n))],
                    [m for a in step if (m := _incoming(a, a.chunk * pp + pp_rank, n))]))
        prev = step
    return out


def simulate_schedule(schedule: str, microbatches: int, pp: int, virtual_stages: int = 1) -> int:
    """Replay every rank's exchanges with rendezvous sends; return the number of rounds.

    Each round, every rank posts the sends and receives of the exchange it is at; a message
    is delivered once both its send and its receive are posted, and a rank moves on (computes
    its next step, reaches its next exchange) when its whole exchange is delivered. Raises
    ``RuntimeError`` if the ranks would deadlock, or if two ranks disagree on the order of the
    messages between them (NCCL matches by order, not by tag).
    """
    v = virtual_stages
    ex = [_exchanges(schedule_steps(schedule, microbatches, pp, r, v), pp, r, v) for r in range(pp)]
    for src in range(pp):
        for dst in range(pp):
            sent = [m for sends, _ in ex[src] for m in sends if m.dst % pp == dst]
            got = [m for _, recvs in ex[dst] for m in recvs if m.src % pp == src]
            if sent != got:
                raise RuntimeError(f"{schedule}: rank {src} sends to rank {dst} in another order than "
                                   f"rank {dst} receives (pp={pp}, m={microbatches}, v={v})")
    pos, delivered, rounds = [0] * pp, set(), 0
    while any(pos[r] < len(ex[r]) for r in range(pp)):
        at = [ex[r][pos[r]] for r in range(pp) if pos[r] < len(ex[r])]
        sends = {m for s, _ in at for m in s}
        delivered |= {m for _, g in at for m in g if m in sends}
        moved = [r for r in range(pp) if pos[r] < len(ex[r])
                 and all(m in delivered for m in ex[r][pos[r]][0] + ex[r][pos[r]][1])]
        if not moved:
            raise RuntimeError(f"{schedule} deadlocks: pp={pp}, m={microbatches}, v={v}, "
                               f"ranks stuck at exchanges {pos}")
        for r in moved:
            pos[r] += 1
        rounds += 1
    return rounds


# --------------------------------------------------------------------------- running a step


@dataclass
class PipelineStats:
    """What one `run_pipeline` call measured on this rank."""

    schedule: str = ""
    microbatches: int = 0
    virtual_stages: int = 1
    peak_in_flight: int = 0  # most (microbatch, chunk) activations held at once (F done, B not)
    peak_pending_w: int = 0  # zero-bubble: most (microbatch, chunk) whose W waits (B done, W not)
    compute_s: float = 0.0  # forward + backward time
    comm_s: float = 0.0  # time waiting in exchanges (includes the bubble)
    wall_s: float = 0.0
    messages: int = 0  # point-to-point messages sent and received


_LAST_STATS = PipelineStats()


def last_stats() -> PipelineStats:
    """Stats of the most recent `run_pipeline` call in this process."""
    return _LAST_STATS


class _P2P:
    """Batched point-to-point exchanges between this rank and its pipeline neighbours."""

    def __init__(self, topo, n_stages: int, act_shape: torch.Size, dtype: torch.dtype,
                 on_event: Callable | None, stats: PipelineStats) -> None:
        self.topo, self.n_stages, self.shape, self.dtype = topo, n_stages, act_shape, dtype
        self.on_event, self.stats = on_event, stats
        # gloo completes a posted send in the background: a rank need not wait for its peer to receive
        # before it computes on (`flush` waits at the end). NCCL's batch is one request: wait for it.
        self.eager = topo.pp > 1 and dist.get_backend(topo.pp_group) == "gloo"
        self.pending: list[tuple[_Msg, Tensor, object, float]] = []  # (msg, buffer, request, posted at)

    def peer(self, stage: int) -> int:
        """Global rank running global `stage`, with this rank's dp and tp coordinates."""
        return self.topo.pp_peer(stage % self.topo.pp)

    def exchange(self, sends: list[_Msg], tensors: dict[_Msg, Tensor],
                 recvs: list[_Msg]) -> dict[_Msg, Tensor]:
        """Post all `sends` and `recvs` in one ``batch_isend_irecv``, then wait for the receives (and,
        on NCCL, the sends; on gloo a send completes in the background: `flush`).

        Posting both before waiting on either is what keeps two neighbours that send to each
        other at the same moment from blocking each other (see the module doc); not waiting for a
        send keeps a rank from idling while its peer is still busy with another action (a
        zero-bubble schedule's W), as the ideal timeline assumes.
        """
        self._settle(wait=False)
        if not sends and not recvs:
            return {}
        t0 = time.perf_counter()
        ops, received, bufs = [], {}, []
        for msg in recvs:
            received[msg] = torch.empty(self.shape, dtype=self.dtype, device=self.topo.device)
            ops.append(dist.P2POp(dist.irecv, received[msg], self.peer(msg.src), tag=msg.tag(self.n_stages)))
        for msg in sends:
            bufs.append(tensors[msg].detach().to(self.dtype).contiguous())
            ops.append(dist.P2POp(dist.isend, bufs[-1], self.peer(msg.dst), tag=msg.tag(self.n_stages)))
        reqs = dist.batch_isend_irecv(ops)
        if self.eager and len(reqs) == len(ops):
            self.pending += [(msg, buf, req, t0) for msg, buf, req in zip(sends, bufs, reqs[len(recvs):],
                                                                         strict=True)]
            reqs, done = reqs[:len(recvs)], recvs
        else:
            done = recvs + sends
        ends = []
        for req in reqs:  # gloo returns one request per op; NCCL may return one for the batch
            req.wait()
            ends.append(time.perf_counter())
        if self.on_event is not None:
            for j, msg in enumerate(done):
                kind, stage = ("recv", msg.dst) if j < len(recvs) else ("send", msg.src)
                t1 = ends[j] if len(ends) == len(done) else ends[-1]
                self.on_event(kind, msg.microbatch, stage // self.topo.pp, t0, t1)
        self.stats.comm_s += time.perf_counter() - t0
        self.stats.messages += len(ops)
        return received

    def _settle(self, wait: bool) -> None:
        """Report the sends that completed (all of them, waiting, with `wait`), freeing their buffers."""
        still = []
        for msg, buf, req, posted in self.pending:
            if wait:
                t0 = time.perf_counter()
                req.wait()
                self.stats.comm_s += time.perf_counter() - t0
            elif not req.is_completed():
                still.append((msg, buf, req, posted))
                continue
            if self.on_event is not None:
                self.on_event("send", msg.microbatch, msg.src // self.topo.pp, posted, time.perf_counter())
        self.pending = still

    def flush(self) -> None:
        """Wait for every send still in flight (the end of the step)."""
        self._settle(wait=True)


def run_pipeline(schedule: str, stages: list, topo, microbatches: list[tuple[Tensor, Tensor]],
                 act_shape: torch.Size, dtype: torch.dtype = torch.float32,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 on_event: Callable[[str, int, int, float, float], None] | None = None,
                 stats: PipelineStats | None = None, accumulate: Accumulate | None = None) -> float:
    """Forward and backward of all `microbatches` of one optimizer step on this rank's `stages`.

    Leaves the accumulated gradient of the *mean* loss in the stages' parameters (each
    microbatch's loss is scaled by ``1 / m`` before its backward) and returns that mean loss on
    every pipeline rank (broadcast from the last stage). `stages` is `build_stages`' list for
    this rank; `microbatches` holds (input_ids, targets) for every microbatch, the same on every
    rank. `autocast` (a factory of context managers) wraps each forward; activations travel as
    `dtype`. `on_event(kind, microbatch, chunk, t_start, t_end)` is called after every forward,
    backward, send and recv (``chunk`` is the local virtual stage). Tied embedding gradients are
    summed afterwards by `allreduce_tied_embedding_grads`. `stats` (or `last_stats()`) receives
    the measurements, among them the peak number of microbatch activations held. Zero-bubble
    schedules run each stage's weight gradients as separate W actions (`deferred_weight_grads`) and
    hand them to `accumulate(param, grad)` (default: added to ``param.grad``; the engine's
    `DataParallel.add_grad` adds them to its buffers).
    """
    global _LAST_STATS
    m, v, pp, rank = len(microbatches), len(stages), topo.pp, topo.pp_rank
    _check(schedule, pp, v, m)
    n_stages = pp * v
    if [s.stage_index for s in stages] != [c * pp + rank for c in range(v)]:
        raise ValueError("stages must be build_stages(model, pp, pp_rank, virtual_stages) of this rank")
    steps = schedule_steps(schedule, m, pp, rank, v)
    exchanges = _exchanges(steps, pp, rank, v)
    stats = stats if stats is not None else PipelineStats()
    stats.schedule, stats.microbatches, stats.virtual_stages = schedule, m, v
    _LAST_STATS = stats
    p2p = _P2P(topo, n_stages, act_shape, dtype, on_event, stats)
    autocast_ctx = autocast or contextlib.nullcontext
    split = schedule in SPLIT_BACKWARD
    store = WeightGradStore(accumulate or add_to_grad)
    weights = {id(p) for s in stages for p in s.parameters() if p.requires_grad}

    def ctx():
        return deferred_weight_grads(store, weights) if split else contextlib.nullcontext()

    inputs: dict[tuple[int, int], Tensor] = {}  # (microbatch, chunk) -> kept from F until B
    outputs: dict[tuple[int, int], Tensor] = {}
    losses: list[Tensor] = []
    t_step = time.perf_counter()

    received = p2p.exchange([], {}, exchanges[0][1])
    for i, step in enumerate(steps):
        produced: dict[_Msg, Tensor] = {}
        for a in step:
            stage, key = stages[a.chunk], (a.microbatch, a.chunk)
            index = stage.stage_index
            t0 = time.perf_counter()
            if a.kind == "F":
                idx, targets = microbatches[a.microbatch]
                if stage.is_first:
                    x = idx.to(topo.device)
                else:
                    x = received.pop(_incoming(a, index, n_stages)).requires_grad_()
                with ctx(), autocast_ctx():
                    out = stage(x, targets.to(topo.device) if stage.is_last else None)
                if stage.is_last:
                    losses.append(out.detach().float())
                    out = out / m  # so the accumulated gradient is that of the mean loss
                else:
                    produced[_outgoing(a, index, n_stages)] = out
                inputs[key], outputs[key] = x, out
                stats.peak_in_flight = max(stats.peak_in_flight, len(outputs))
            elif a.kind == "W":
                store.run(key)
            else:
                x, out = inputs.pop(key), outputs.pop(key)
                store.key = key
                with ctx():
                    if stage.is_last:
                        out.backward()
                    else:
                        grad = received.pop(_incoming(a, index, n_stages))
                        torch.autograd.backward(out, grad.to(out.dtype))
                if not stage.is_first:
                    produced[_outgoing(a, index, n_stages)] = x.grad
                del x, out  # this microbatch's activations die here (but what its W keeps): 1F1B's saving
                stats.peak_pending_w = max(stats.peak_pending_w, store.held())
            t1 = time.perf_counter()
            stats.compute_s += t1 - t0
            if on_event is not None:
                kind = {"F": "forward", "B": "backward", "W": "weight"}[a.kind]
                on_event(kind, a.microbatch, a.chunk, t0, t1)
        sends, recvs = exchanges[i + 1]
        received.update(p2p.exchange(sends, produced, recvs))
        del produced

    p2p.flush()
    mean = (torch.stack(losses).mean().double() if losses
            else torch.zeros((), dtype=torch.float64, device=topo.device))  # NCCL: device tensors only
    if pp > 1:
        dist.broadcast(mean, src=topo.pp_peer(pp - 1), group=topo.pp_group)
    stats.wall_s = time.perf_counter() - t_step
    return float(mean)


# --------------------------------------------------------------------------- tied embedding


def allreduce_tied_embedding_grads(stages: list, topo) -> None:
    """Sum the gradients of the two copies of the tied embedding (first and last stage).

    GPT ties the LM head to the token embedding. With ``pp > 1`` the head lives on the last
    pipeline rank, which keeps its own copy (`GPTStage.tied_embedding_copy`); both copies start
    equal, and stay equal if both receive the *sum* of their gradients -- the gradient of the
    single tied matrix. Only the first and last pipeline ranks (``topo.embedding_group``) take
    part; a rank in between holds neither copy and returns at once. With virtual stages rank 0
    holds the first chunk and rank ``pp - 1`` the last, as without them.
    """
    if topo.pp == 1 or not (topo.is_first_stage or topo.is_last_stage) or not stages[0].config.tie_embeddings:
        return  # (an untied head is a matrix of its own: nothing to sum)
    weight = None
    for stage in stages:
        if stage.is_first:
            weight = stage.tok_emb.weight
        elif stage.tied_embedding_copy() is not None:
            weight = stage.tied_embedding_copy()
    if weight is None:  # cannot happen with build_stages; fail loudly rather than hang the peer
        raise RuntimeError("first/last pipeline rank without an embedding copy; were the stages built "
                           "with build_stages(model, pp, pp_rank, virtual_stages)?")
    if weight.grad is None:  # no microbatch reached it: contribute zeros, the peer still waits
        weight.grad = torch.zeros_like(weight)
    grad = weight.grad  # the native engine's: a DTensor, summed shard by shard
    dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=topo.embedding_group)


@torch.no_grad()
def pipeline_forward(stages: list, topo, x: Tensor, y: Tensor, act_shape: torch.Size,
                     dtype: torch.dtype = torch.float32) -> float:
    """Loss of one batch through all stages, forward only (evaluation); returned on every pp rank.

    No schedule is needed without a backward pass: the batch visits global stages 0, 1, ... in
    order, each rank receiving from the owner of the previous stage and sending to the next with
    blocking point-to-point calls; the last stage's loss is then broadcast over the pp group.
    """
    pp = topo.pp
    n_stages = pp * len(stages)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    for s in range(n_stages):
        if s % pp != topo.pp_rank:
            continue
        stage = stages[s // pp]
        if s == 0:
            inp = x
        else:
            inp = torch.empty(act_shape, dtype=dtype, device=x.device)
            dist.recv(inp, src=topo.pp_peer((s - 1) % pp), group=topo.pp_group)
        out = stage(inp, y if s == n_stages - 1 else None)
        if s == n_stages - 1:
            loss = out.detach().float()
        else:
            dist.send(out.to(dtype).contiguous(), dst=topo.pp_peer((s + 1) % pp), group=topo.pp_group)
    dist.broadcast(loss, src=topo.pp_peer(pp - 1), group=topo.pp_group)
    return float(loss)
