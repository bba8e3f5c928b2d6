"""Step time and the layout search: what ``lmkit estimate`` ranks (chapter 5).

`Cluster` is the devices and their links (`DEVICES`: datasheet presets); `step_time` estimates a
layout's step as compute at a fraction of peak, the pipeline bubble, tensor- and pipeline-parallel
traffic and the experts' all-to-alls on the critical path, and the data-parallel and ring-attention
traffic that compute does not hide; `search` enumerates every ``dp x cp x tp x pp`` layout (and
``ep`` inside ``dp x cp`` for a model with experts) that fits the devices' memory and ranks them
by it (`Candidate`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from lmkit.costs.bubble import bubble_fraction
from lmkit.costs.collectives import CommTerm, communication
from lmkit.costs.context import RING_BACKWARD_COMPUTE, cp_ring_step
from lmkit.costs.layout import RECOMPUTE, Layout, stage_counts
from lmkit.costs.model import GB, CostError, Model, flops_per_token, tp_choices
from lmkit.costs.per_rank import Memory, memory

__all__ = ["Cluster", "DEVICES", "Candidate", "step_time", "search"]


@dataclass(frozen=True)
class Cluster:
    """Devices and links: memory in GB (1e9 bytes), peak in FLOP/s, bandwidths in GB/s per device."""

    devices: int
    device_memory_gb: float
    peak_flops: float
    devices_per_node: int = 8
    intra_node_gbps: float = 450.0  # NVLink 4 (H100 SXM), one direction
    inter_node_gbps: float = 50.0  # one 400 Gb/s InfiniBand NIC per GPU
    name: str = ""
    #: Seconds every message costs besides its bytes (the alpha of alpha-beta models), per collective
    #: call and per point-to-point send: the small-message times of NCCL, a few microseconds over
    #: NVLink and some 10-20 microseconds across InfiniBand nodes (nccl-tests' 8-byte all-reduce; the
    #: protocol latencies analysed by Hu et al. 2025, "Demystifying NCCL", arXiv:2507.04786).
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 15e-6

    def validate(self) -> Cluster:
        if self.devices < 1 or self.devices_per_node < 1:
            raise CostError("a cluster needs at least one device and one device per node")
        if min(self.device_memory_gb, self.peak_flops, self.intra_node_gbps, self.inter_node_gbps) <= 0:
            raise CostError("device memory, peak FLOP/s and bandwidths must be positive")
        if min(self.intra_node_latency_s, self.inter_node_latency_s) < 0:
            raise CostError("message latencies must be >= 0 seconds")
        return self


#: Devices for `lmkit estimate --device`: (memory GB, dense bf16 peak FLOP/s, intra-node GB/s,
#: inter-node GB/s), from the vendors' datasheets (no sparsity).
DEVICES: dict[str, tuple[float, float, float, float]] = {
    "h100": (80, 989e12, 450, 50),
    "h200": (141, 989e12, 450, 50),
    "a100-80gb": (80, 312e12, 300, 25),
    "a100-40gb": (40, 312e12, 300, 25),
    "l4": (24, 121e12, 32, 12.5),
}


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its memory and estimated step time (seconds) by component."""

    layout: Layout
    memory: Memory
    compute_s: float
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float
    tokens_per_step: int
    cp_exposed_s: float = 0.0  # the ring's transfers that its block computations do not hide
    ep_s: float = 0.0  # the experts' all-to-alls and router all-reduces, on the critical path

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_exposed_s + self.cp_exposed_s
                + self.ep_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a group whose ranks lie within `span` consecutive devices."""
    gbps = cluster.intra_node_gbps if span <= cluster.devices_per_node else cluster.inter_node_gbps
    return gbps * GB


def _latency(cluster: Cluster, span: int) -> float:
    """Seconds per message of a group whose ranks lie within `span` consecutive devices."""
    return cluster.intra_node_latency_s if span <= cluster.devices_per_node else cluster.inter_node_latency_s


def _seconds(term: CommTerm, cluster: Cluster, span: int) -> float:
    """A term's bytes at the group's bandwidth plus a latency per message (a receive is its send's)."""
    messages = 0 if term.kind == "recv" else (term.calls if term.calls is not None else 1)
    return term.wire_bytes / _bandwidth(cluster, span) + messages * _latency(cluster, span)


def step_time(model: Model, layout: Layout, global_batch: int, cluster: Cluster, precision: str = "mixed",
              efficiency: float = 0.5, flash_attention: bool = True, reduce: str = "fp32",
              imbalance: float = 1.0) -> Candidate:
    """Estimated step time: compute at `efficiency` of peak, bubble, exposed communication.

    Compute: training FLOPs (plus one forward under full recomputation, the attention scores under
    selective) over ``devices x peak x efficiency``; bubble: ``compute x bubble / (1 - bubble)``;
    tensor- and pipeline-parallel traffic is on the critical path; the data-parallel gradient
    reduction overlaps the last microbatch's backward (2/3 of its compute) and ZeRO-3's parameter
    gathers the whole step's compute, only the rest is exposed; ZeRO-1/2's all-gather of the updated
    parameters follows the optimizer step and is exposed (as in lmkit's engine). `reduce` is the
    gradients' dtype under mixed precision (`communication`, `memory`). Context parallelism
    adds no FLOPs (the attention of a sequence is split, not repeated) and its ring hides behind
    the block computations step by step (`_ring_exposed_s`). Ranks are ordered tp fastest, then cp,
    then dp, then pp: a group is on NVLink when it spans at most one node. Every collective call and
    every point-to-point send also costs the cluster's per-message latency (`Cluster`), so that
    thousands of tiny microbatches, each with its tensor- and pipeline-parallel messages, are not free.
    Experts: compute counts the active parameters (`flops_per_token`); the all-to-alls (with load
    imbalance `imbalance`, `all_to_all_bytes`) and the router's all-reduces are on the critical path
    (``ep_s``): an ep group spans ``tp x ep`` consecutive devices, on NVLink while that is at most a
    node, across InfiniBand beyond; expert gradients (over ``dp x cp / ep``) overlap the backward as
    the dense ones do.
    """
    mem = memory(model, layout, global_batch, precision, flash_attention=flash_attention, reduce=reduce)
    tokens = global_batch * model.seq_len
    flops = flops_per_token(model) * tokens
    if layout.recompute == "full":
        flops += flops_per_token(model, training=False) * tokens
    elif layout.recompute == "selective" and not flash_attention:
        flops += 4 * model.n_layer * model.d_model * model.seq_len * tokens
    compute = flops / (layout.world_size * cluster.peak_flops * efficiency)
    bubble = (bubble_fraction(layout.pp, layout.microbatches, layout.virtual_stages, layout.schedule)
              if layout.pp > 1 else 0.0)
    bubble_s = compute * bubble / (1 - bubble)
    tp_s = pp_s = dp_s = 0.0
    hidden = {"backward": [0.0, compute * 2 / 3 / layout.microbatches], "compute": [0.0, compute]}
    # The busiest rank sets the pace: an end stage (embedding, head) or an inner one (both directions).
    loads = {r: communication(model, layout, global_batch, precision, r, reduce=reduce, imbalance=imbalance)
             for r in {0, min(1, layout.pp - 1), layout.pp - 1}}
    ep_s = 0.0
    worst = max(loads, key=lambda r: sum(t.wire_bytes for t in loads[r]))
    for term in loads[worst]:
        if term.group == "tp":
            tp_s += _seconds(term, cluster, layout.tp)
        elif term.group in ("pp", "embedding"):
            pp_s += _seconds(term, cluster, layout.world_size)
        elif term.group == "ep":  # ep consecutive dp x cp ranks, tp apart: tp x ep consecutive devices
            ep_s += _seconds(term, cluster, layout.tp * layout.ep)
        elif term.group == "router":
            ep_s += _seconds(term, cluster, layout.tp * layout.cp * layout.dp)
        elif term.group in ("dp", "edp"):  # dp x cp (and dp x cp / ep): within tp x cp x dp devices
            seconds = _seconds(term, cluster, layout.tp * layout.cp * layout.dp)
            if term.hidden_by:
                hidden[term.hidden_by][0] += seconds
            else:
                dp_s += seconds
    dp_s += sum(max(0.0, busy - window) for busy, window in hidden.values())
    cp_s = _ring_exposed_s(model, layout, global_batch, cluster, precision, efficiency, worst)
    return Candidate(layout, mem, compute, bubble_s, tp_s, pp_s, dp_s, tokens, cp_s, ep_s)


def _ring_exposed_s(model: Model, layout: Layout, global_batch: int, cluster: Cluster, precision: str,
                    efficiency: float, stage: int) -> float:
    """Seconds per step of ring attention's transfers that the block computations leave exposed.

    Per layer and microbatch, as `lmkit.parallel.context_parallel.RingAttention` runs: a forward ring
    step computes two ``C x C`` blocks in ``f`` seconds (`cp_ring_step`) while the next K/V block
    (``k`` seconds) is in transit, exposing ``max(0, k - f)``, ``cp - 1`` times. A backward step
    computes for ``2.5 f`` (`RING_BACKWARD_COMPUTE`: 5 block matmuls against the forward's 2) while the
    K/V block and the dK/dV accumulator of the previous step (``g`` seconds, fp32) travel:
    ``max(0, k - 2.5f)`` for the first, ``max(0, k + g - 2.5f)`` for the ``cp - 2`` middle ones,
    ``max(0, g - 2.5f)`` for the last, and the
    accumulator's final hop home, ``g``, after all compute. Full recomputation repeats the forward.
    The ring's neighbours are tp ranks apart in a group of ``tp x cp`` consecutive devices.
    """
    cp = layout.cp
    if cp == 1:
        return 0.0
    e = 4 if precision == "fp32" else 2
    b, s, h, t = global_batch // (layout.dp * layout.microbatches), model.seq_len, model.d_model, layout.tp
    beta = _bandwidth(cluster, t * cp)
    step = cp_ring_step(b, s, h, cp, cluster.peak_flops * efficiency, beta, t, e, kv_width=model.kv_width)
    alpha = _latency(cluster, t * cp)  # every K/V block and dK/dV accumulator is one message
    f, k = step["compute_s"], step["comm_s"] + alpha
    g = step["comm_s"] * max(e, 4) / e + alpha
    forward = (cp - 1) * max(0.0, k - f)
    fb = RING_BACKWARD_COMPUTE * f
    backward = max(0.0, k - fb) + (cp - 2) * max(0.0, k + g - fb) + max(0.0, g - fb) + g
    if layout.recompute == "full":
        forward *= 2
    layers = stage_counts(model, layout.pp, layout.virtual_stages, t, stage)[4]
    return layers * layout.microbatches * (forward + backward)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(model: Model, global_batch: int, cluster: Cluster, precision: str = "mixed",
           efficiency: float = 0.5, zero_stages: tuple[int, ...] = (0, 1, 2, 3), top: int | None = None,
           flash_attention: bool = True, reduce: str = "fp32", imbalance: float = 1.0,
           ep_sizes: tuple[int, ...] | None = None) -> list[Candidate]:
    """Every dp x cp x tp x pp layout (with zero, sp, recomputation, microbatches, schedule) that fits.

    Ranked by `step_time` (`precision` and `reduce` as there). Raises `CostError` when nothing fits,
    saying by how much the layout that needs the least memory misses. Context parallelism (``cp`` dividing
    the devices, the sequence a multiple of ``2 cp``) is enumerated where it can win: with flash
    attention, a cp layout whose batch would also split over ``dp x cp`` data-parallel ranks is left out,
    since that layout holds the same tokens per rank with the same model states and sends no ring. Tensor
    parallelism takes the sizes `tp_choices` allows (whole query heads, key/value heads and MLP features
    on every rank) that divide the vocabulary. With experts, every expert-parallel size ``ep`` that
    divides both ``dp x cp`` and ``n_experts`` (or those of `ep_sizes`), with sequence parallelism
    whenever tp > 1; `imbalance` is the all-to-alls' load-imbalance factor (`step_time`).
    """
    model.validate()
    cluster.validate()
    if not isinstance(global_batch, int) or global_batch <= 0:
        raise CostError(f"the global batch must be a positive number of sequences, got {global_batch!r}")
    fits, best_miss = [], None
    tp_options = tp_choices(model)  # whole query and key/value heads, whole MLP features per rank
    for tp, pp, cp in itertools.product(_divisors(cluster.devices), repeat=3):
        if (cluster.devices % (tp * pp * cp) or tp not in tp_options or model.vocab_size % tp
                or pp > model.n_layer or (cp > 1 and (model.seq_len % (2 * cp) or model.dropout))):
            continue
        dp = cluster.devices // (tp * pp * cp)
        if global_batch % dp:
            continue
        per_dp = global_batch // dp
        micro = [m for m in _divisors(per_dp) if m >= pp] if pp > 1 else _divisors(per_dp)
        if cp > 1 and flash_attention:  # dominated by dp x cp data-parallel ranks where the batch splits
            micro = [m for m in micro if global_batch % (dp * cp * m)]
        # Under flash attention nothing is left for selective recomputation to drop (no s x s matrix).
        recomputes = [r for r in RECOMPUTE if not (flash_attention and r == "selective")]
        local = model.seq_len // cp
        eps = [e for e in _divisors(dp * cp) if model.n_experts % e == 0] if model.n_experts else [1]
        if ep_sizes is not None:
            eps = [e for e in eps if e in ep_sizes]
        for m, zero, sp, rc, ep in itertools.product(micro, zero_stages, (False, True), recomputes, eps):
            if (sp and tp == 1) or (zero and dp == 1) or (sp and local % tp) or (cp > 1 and zero == 3):
                continue
            if model.n_experts and ((tp > 1 and not sp) or (ep > 1 and zero == 3)):
                continue
            schedules = [("1f1b", 1)]
            if pp > 1 and m % pp == 0 and model.n_layer >= 2 * pp:
                schedules.append(("interleaved", 2))
            for schedule, v in schedules:
                layout = Layout(dp, tp, pp, zero, sp, m, schedule, v, rc, cp, ep)
                try:
                    cand = step_time(model, layout, global_batch, cluster, precision, efficiency,
                                     flash_attention, reduce, imbalance)
                except CostError:
                    continue
                need = cand.memory.total
                if need <= cluster.device_memory_gb * GB:
                    fits.append(cand)
                elif best_miss is None or need < best_miss[0]:
                    best_miss = (need, layout)
    if not fits:
        if best_miss is None:
            raise CostError(f"no dp x cp x tp x pp layout of {cluster.devices} devices suits this model and "
                            f"a global batch of {global_batch}; check that heads, key/value heads, MLP "
                            "width, vocabulary and batch divide")
        need, layout = best_miss
        raise CostError(
            f"{model.name or 'the model'} fits on no layout of {cluster.devices} "
            f"device{'s' if cluster.devices > 1 else ''} of "
            f"{cluster.device_memory_gb:g} GB: the leanest ({layout.name}) needs {need / GB:.1f} GB per "
            f"device, {need / GB - cluster.device_memory_gb:.1f} GB too many; add devices or memory")
    fits.sort(key=lambda c: (round(c.step_s, 9), c.memory.total))  # equal times: the leaner first
    return fits[:top] if top else fits
