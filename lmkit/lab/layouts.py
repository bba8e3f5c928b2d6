"""Running and measuring parallel layouts: loss curves, bytes, timelines, memory.

This module sits *above* the trainer (`lmkit.train`): it trains layouts with the real `Trainer`
and observes them with `lmkit.parallel.instrument`; nothing in `lmkit.parallel` imports it. The
notebooks (chapters 5 and 6), the chapter-6 program (`lmkit.lab.experiments`), the benchmarks and
the tests call the same functions:

- `layout_losses` trains one layout and returns rank 0's loss curve (the loss-compare of
  torchtitan and picotron: every layout must reproduce the single-process curve, chapter 6);
- `measure_layouts` trains layouts and returns every rank's bytes per collective, timeline,
  memory and step times (``benchmarks/parallel.py``, chapter 6);
- `start_memory` measures each rank's peak memory while it builds its part of the model
  (from the meta device) against building the whole model (chapter 6, construction at scale);
- `ideal_timeline` and `ring_pass` are the schedules' timelines without communication and one
  pass of ring attention, for the Gantt charts;
- `max_relative_difference` is the criterion; `layout_name`, `label`, `group_label` and
  `collective_dim` are the labels; `layout_groups` lists a layout's process groups from
  `lmkit.parallel.mesh`'s rank order, and `topology_groups` the groups a built rank belongs to.

Layouts run in gloo processes forked by `lmkit.parallel.launch.run_local` from a parent that
has imported torch, exactly as ``torchrun -m lmkit train`` would run them, at a fraction of the
start-up cost; `train_on_rank` and `measure_on_rank` are what each rank runs (also under torchrun,
by the chapter-6 program).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.experts import expert_counts
from lmkit.model import build_model
from lmkit.parallel.experts import expert_traffic
from lmkit.parallel.instrument import AllocationTracker, Instrument, memory_report
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import coords_of, cp_rank_of, init_topology
from lmkit.parallel.pipeline import ideal_timeline as pipeline_ideal_timeline
from lmkit.parallel.timeline import RING_KINDS
from lmkit.run import build_engine, prepare_run, seed_everything
from lmkit.train import Trainer

__all__ = [
    "layout_name", "label", "group_label", "collective_dim", "max_relative_difference", "ranks_of",
    "layout_groups", "topology_groups",
    "layout_losses", "train_on_rank", "measure_layouts", "measure_on_rank", "wait_for_all_ranks",
    "start_memory", "ideal_timeline", "ring_pass",
]


def layout_name(p: ParallelConfig | None) -> str:
    """Short label such as ``dp2 zero1``, ``cp2``, ``tp2 sp``, ``pp2 1f1b m4`` or ``1 process``.

    The engine is not part of the label; `None` (the plain single-process trainer) is
    ``1 process``, like a layout of one rank.
    """
    if p is None:
        return "1 process"
    parts = []
    if p.dp > 1:
        parts.append(f"dp{p.dp}" + (f" zero{p.zero}" if p.zero else ""))
    if p.cp > 1:
        parts.append(f"cp{p.cp}")
    if p.ep > 1:
        parts.append(f"ep{p.ep}")
    if p.tp > 1:
        parts.append(f"tp{p.tp}" + (" sp" if p.sequence_parallel else ""))
    if p.pp > 1:
        sched = p.schedule + (f" v{p.virtual_stages}" if p.schedule == "interleaved" else "")
        parts.append(f"pp{p.pp} {sched} m{p.microbatches}")
    return " x ".join(parts) or "1 process"


def label(layout: ParallelConfig | None) -> str:
    """`layout_name` with the engine: ``native dp2 zero3``, ``pp2 1f1b m4`` (lmkit), ``1 process``."""
    name = layout_name(layout)
    return f"native {name}" if layout is not None and layout.engine == "native" else name


def _varying(ranks: Sequence[int], layout: ParallelConfig) -> list[str]:
    """The dimensions (of pp, dp, tp, cp) whose coordinate differs among `ranks`."""
    coords = [(*coords_of(r, layout.dp, layout.tp, layout.cp), cp_rank_of(r, layout.tp, layout.cp))
              for r in ranks]  # (pp, dp, tp, cp)
    return [dim for i, dim in enumerate(("pp", "dp", "tp", "cp")) if len({c[i] for c in coords}) > 1]


def group_label(ranks: Sequence[int], layout: ParallelConfig | None) -> str:
    """Which dimension a collective's group spans: ``dp``, ``cp``, ``tp``, ``pp``, ``embedding`` (the first
    and last stage when pp > 2, the tied embedding: `lmkit.costs` calls it so), ``dp x tp`` (a 2-D
    mesh), ``world`` or ``self``."""
    if layout is None or len(ranks) <= 1:
        return "self"
    varying = _varying(ranks, layout)
    if len(ranks) == layout.world_size and len(varying) > 1:
        return "world"
    if varying == ["pp"] and len(ranks) < layout.pp:
        return "embedding"
    return " x ".join(varying)  # "dp x tp": the 2-D mesh of FSDP2 + TP


def collective_dim(collective: dict[str, Any], layout: ParallelConfig | None) -> str:
    """`group_label` of a counted collective, in `lmkit.costs`'s terms. Point-to-point messages
    are the pipeline's in both engines, whatever group carries them (the lmkit engine sends
    through the default group with global peer ranks, so their group is the whole world), except
    ring attention's, which go through the cp group. Under context parallelism the collectives of
    the gradient group, dp x cp (`lmkit.parallel.mesh.Topology.gradient_view`), are ``dp``: the
    parameters are replicated over cp as over dp, and `lmkit.costs` counts them so. Under expert
    parallelism a group inside dp x cp is ``ep`` (the all-to-all) or ``edp`` (an expert's replicas)."""
    group = group_label(collective["ranks"], layout)
    p2p = collective["kind"] in ("send", "recv")
    ranks = collective["ranks"]
    if layout is not None and layout.ep > 1 and collective["kind"] == "all_to_all":
        return "ep"  # the experts' all-to-all (`lmkit.parallel.experts`), also when ep spans all of dp x cp
    if layout is not None and layout.ep > 1 and not p2p and 1 < len(ranks) < layout.dp * layout.cp \
            and set(_varying(ranks, layout)) <= {"dp", "cp"}:
        cp = layout.cp
        j = [coords_of(r, layout.dp, layout.tp, cp)[1] * cp + cp_rank_of(r, layout.tp, cp) for r in ranks]
        if len({i // layout.ep for i in j}) == 1:
            return "ep"  # the experts' all-to-all (`lmkit.parallel.experts`)
        if len({i % layout.ep for i in j}) == 1:
            return "edp"  # an expert's replicas: its gradient reduction
    if p2p and layout is not None and layout.pp > 1 and group != "cp":
        return "pp"
    if not p2p and layout is not None and layout.cp > 1 and len(collective["ranks"]) > 1 \
            and set(_varying(collective["ranks"], layout)) <= {"dp", "cp"}:
        return "dp"
    return group


DIMENSIONS = ("dp", "cp", "tp", "pp")


def layout_groups(layout: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every process group of `layout` by dimension: the ranks that share all coordinates but that one.

    Coordinates come from `lmkit.parallel.mesh.coords_of` and `cp_rank_of` (tp fastest, then cp,
    dp, pp), so these are the groups `init_topology` builds; `topology_groups` of each built rank
    must find its own among them. Groups are sorted lists of global ranks, in order of their first rank.
    """
    coords = {}
    for r in range(layout.world_size):
        pp, dp, tp = coords_of(r, layout.dp, layout.tp, layout.cp)
        coords[r] = {"pp": pp, "dp": dp, "tp": tp, "cp": cp_rank_of(r, layout.tp, layout.cp)}
    out: dict[str, list[list[int]]] = {}
    for dim in DIMENSIONS:
        groups: dict[tuple[int, ...], list[int]] = {}
        for r, c in coords.items():
            groups.setdefault(tuple(c[d] for d in DIMENSIONS if d != dim), []).append(r)
        out[dim] = sorted(groups.values())
    return out


def topology_groups(topology: Any) -> dict[str, list[int]]:
    """The ranks of each group a built rank belongs to (`lmkit.parallel.mesh.Topology`); ``cp`` is
    read off its gradient group (dp x cp ranks) as the ranks with its own dp coordinate."""
    cp = [r for r in topology.grad_ranks if coords_of(r, topology.dp, topology.tp, topology.cp)[1]
          == topology.dp_rank] if topology.cp > 1 else [topology.rank]
    return {"dp": list(topology.dp_ranks), "cp": cp, "tp": list(topology.tp_ranks),
            "pp": list(topology.pp_ranks)}


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / |b_i| (the loss-compare criterion of chapter 6)."""
    if len(a) != len(b):
        raise ValueError(f"curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- loss curves


def train_on_rank(model: dict, train: dict, parallel: dict | None, text: str | None, steps: int,
                  cache_dir: str | None, resume: str | None = None, save: bool = False) -> dict[str, Any]:
    """One rank (or the single process, ``parallel=None``) of `layout_losses`."""
    mc, tc = ModelConfig(**model), TrainConfig(**train)
    pc = ParallelConfig(**parallel) if parallel else None
    topology = init_topology(pc, tc.device) if pc is not None else None
    run = prepare_run(mc, tc, text=text, cache_dir=Path(cache_dir) if cache_dir else None,
                      meta=pc is not None)  # each rank allocates its own part only
    trainer = Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      tokenizer=run.tokenizer, parallel=pc, topology=topology)
    run.model = None
    if resume:
        trainer.resume(resume)
    start = trainer.step
    losses, norms = [], []
    for _ in range(steps):
        stats = trainer.train_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
    saved = str(trainer.save()) if save else None
    val = trainer.evaluate(2)["val_loss"]
    return {"losses": losses, "grad_norms": norms, "val": val, "checkpoint": saved, "start_step": start}


def layout_losses(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig | None,
                  steps: int, text: str | None = None, cache_dir: str | None = None,
                  timeout: float = 600.0, resume: str | None = None, save: bool = False) -> dict[str, Any]:
    """Train `steps` optimizer steps under a layout; returns rank 0's losses and gradient norms.

    ``parallel_cfg=None`` is the single-process reference, run in this process. `resume` starts
    from a checkpoint (saved under any layout); `save` writes one into ``train_cfg.out_dir`` at
    the end (its path is returned as ``"checkpoint"``). Every rank must report the same losses.
    """
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    if parallel_cfg is None:
        return train_on_rank(model, train, None, text, steps, cache_dir, resume, save)
    layout = dataclasses.asdict(parallel_cfg)
    results = run_local(parallel_cfg.world_size, train_on_rank, model, train, layout, text, steps, cache_dir,
                        resume, save, timeout=timeout)
    first = results[0]
    for rank, other in enumerate(results[1:], start=1):  # every rank reports the same loss
        if other["losses"] != first["losses"]:
            raise AssertionError(f"rank {rank} reports losses {other['losses']} but rank 0 {first['losses']}")
    return first


# --------------------------------------------------------------------------- measured steps


def _jsonable_comm(counter_summary: dict[Any, dict[str, float]]) -> list[dict[str, Any]]:
    return [{"kind": kind, "ranks": list(ranks), **values}
            for (kind, ranks), values in counter_summary.items()]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def wait_for_all_ranks() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def measure_on_rank(model: dict, train: dict, layouts: list[dict | None], steps: int, warmup: int,
                    text: str | None, cache_dir: str | None) -> list[dict[str, Any]]:
    """One rank of `measure_layouts`: every layout of `layouts` (one world size) in turn.

    Each ``dp x cp x tp x pp`` builds its process groups once (`init_topology` on the one default
    group). A ``None`` layout is the plain single-process `Trainer` (no engine), run on one process.
    """
    mc, tc = ModelConfig(**model), TrainConfig(**train)
    topologies: dict[tuple[int, ...], Any] = {}

    def topology_of(pc: ParallelConfig | None) -> Any:
        if pc is None:
            return None
        shape = (pc.dp, pc.cp, pc.tp, pc.pp, pc.ep, pc.sequence_parallel)
        if shape not in topologies:  # every rank builds the same groups in the same order
            topologies[shape] = init_topology(pc, tc.device)
        return topologies[shape]

    topology_of(next((ParallelConfig(**lay) for lay in layouts if lay is not None), None))
    run = prepare_run(mc, tc, text=text, cache_dir=Path(cache_dir) if cache_dir else None)
    results = []
    for layout in layouts:
        pc = ParallelConfig(**layout) if layout is not None else None
        topology = topology_of(pc)
        seed_everything(tc.seed)
        with torch.device("meta") if pc is not None else contextlib.nullcontext():  # a rank builds its part
            model_ = build_model(run.model_config)
        flops = model_.flops_per_token()
        try:
            trainer = Trainer(model_, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                              tokenizer=run.tokenizer, parallel=pc, topology=topology if pc else None)
        except Exception as e:  # noqa: BLE001 - the same on every rank (validation); reported per layout
            results.append({"layout": layout, "error": f"{type(e).__name__}: {e}"})
            continue
        engine = trainer.engine if trainer.engine is not None else trainer.model
        losses = [trainer.train_step()["loss"] for _ in range(warmup)]
        # The plain trainer talks to nobody: no barriers (under torchrun every rank runs it alone).
        inst, plain = Instrument(engine, keep_records=True, barrier=pc is not None), []
        for i in range(steps):  # alternate plain and instrumented steps: the overhead, measured
            if pc is not None:
                wait_for_all_ranks()
            start = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            plain.append(time.perf_counter() - start)
            expert_traffic(trainer.engine.stages if pc is not None else [], reset=True)
            with inst, inst.step(i):
                losses.append(trainer.train_step()["loss"])
            experts = expert_traffic(trainer.engine.stages if pc is not None else [])
        comm = _jsonable_comm(inst.counter.summary(by_group=True))
        last = inst.steps[-1]["step"]
        topo = trainer.topology
        results.append({
            "layout": layout, "rank": topo.rank if topo else 0, "world_size": topo.world_size if topo else 1,
            "coords": {"pp": topo.pp_rank, "dp": topo.dp_rank, "cp": topo.cp_rank, "tp": topo.tp_rank} if topo
            else {"pp": 0, "dp": 0, "cp": 0, "tp": 0},
            "groups": topology_groups(topo) if topo else {d: [0] for d in DIMENSIONS},
            "step_s": [s["wall_s"] for s in inst.steps], "plain_step_s": plain,
            "counter_overhead_s": [s["counter_overhead_s"] for s in inst.steps],
            "comm": comm, "records": inst.counter.records,
            "timeline": inst.timeline.step_events(last),
            "memory": memory_report(engine, trainer.optimizer),
            "device": _device_name(trainer.device),
            "tokens_per_step": tc.batch_size * run.model_config.block_size,
            "flops_per_token": flops, "losses": losses, "experts": experts,
            "expert_counts": expert_counts(trainer.model),
        })
        del trainer, engine, inst, model_
        gc.collect()
    return results


def ranks_of(layout: ParallelConfig | None) -> int:
    """Ranks of a layout (1 for the plain trainer): layouts of one world size share a launch."""
    return 1 if layout is None else layout.world_size


def measure_layouts(model_cfg: ModelConfig, train_cfg: TrainConfig, layouts: Sequence[ParallelConfig | None],
                    steps: int = 2, warmup: int = 1, text: str | None = None, cache_dir: str | None = None,
                    timeout: float = 600.0) -> list[dict[str, Any]]:
    """Train each layout with the real `Trainer`: `warmup` steps, then `steps` pairs of one plain
    and one instrumented step (alternating, so that the instrumentation's cost is measured too).

    Layouts with the same number of ranks share one `run_local` launch (one default process
    group, the groups of each ``dp x cp x tp x pp`` built once, one `Trainer` after another);
    ``None`` is the plain single-process trainer (one forked process). Returns, per layout,
    ``{"name", "layout", "ranks": [...]}`` where each rank reports ``step_s`` (instrumented
    steps), ``plain_step_s``, ``comm`` (the last step's collectives by kind and group:
    ``{kind, ranks, calls, bytes, wire_bytes}``), ``records``
    (the last step's collectives, one dict per call), ``timeline`` (its events of the last
    step), ``memory`` (`memory_report`), ``device`` (the GPU's name or "cpu"),
    ``tokens_per_step``, ``flops_per_token`` (the model's, for training) and ``losses`` (all
    ``warmup + 2 steps`` of them); or ``{"name", "layout", "error"}`` if the layout could not
    be built. Chapter 6 of the book plots them.
    """
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    groups: dict[int, list[int]] = {}  # world size -> indices into layouts
    for index, layout in enumerate(layouts):
        groups.setdefault(ranks_of(layout), []).append(index)
    out: list[dict[str, Any]] = [{} for _ in layouts]
    for world, members in groups.items():
        dicts = [dataclasses.asdict(layouts[i]) if layouts[i] is not None else None for i in members]
        per_rank = run_local(world, measure_on_rank, model, train, dicts, steps, warmup, text,
                             cache_dir, timeout=timeout)
        for k, index in enumerate(members):
            ranks = [results[k] for results in per_rank]
            entry: dict[str, Any] = {"name": layout_name(layouts[index]), "layout": dicts[k]}
            if "error" in ranks[0]:
                entry["error"] = ranks[0]["error"]
            else:
                entry["ranks"] = ranks
            out[index] = entry
    return out


# --------------------------------------------------------------------------- memory at start


def _built(model_cfg: ModelConfig, train_cfg: TrainConfig, layout: ParallelConfig, topology: Any,
           meta: bool) -> tuple[Any, dict[str, int]]:
    """This rank's engine, cut from a GPT built with the run's seed on the meta device or whole;
    with the bytes allocated on the way: the peak, and the model's own (live and peak) before the cut."""
    seed_everything(train_cfg.seed)
    with AllocationTracker() as alloc:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = build_model(model_cfg)
        model_bytes = {"model_bytes": alloc.live_bytes, "model_peak_bytes": alloc.peak_bytes}
        engine = build_engine(model, layout, train_cfg, topology)
        del model
    return engine, {"peak_bytes": alloc.peak_bytes, **model_bytes}


def _start_memory_worker(model: dict, train: dict, layouts: list[dict]) -> list[dict[str, Any]]:
    """One rank of `start_memory`: every layout in turn (one process group)."""
    mc, tc = ModelConfig(**model), TrainConfig(**train)
    layouts_ = [ParallelConfig(**layout) for layout in layouts]
    topology = init_topology(layouts_[0], tc.device)
    largest = max(p.numel() * p.element_size() for p in _model_shapes(mc))
    results = []
    for pc in layouts_:
        cut, whole = _built(mc, tc, pc, topology, meta=False)  # the whole model first, then cut
        from_meta, meta = _built(mc, tc, pc, topology, meta=True)
        local = memory_report(from_meta)
        same = [torch.equal(_local_tensor(a), _local_tensor(b))
                for (_, a), (_, b) in zip(cut.named_params, from_meta.named_params, strict=True)]
        results.append({
            "rank": topology.rank, "coords": {"pp": topology.pp_rank, "dp": topology.dp_rank,
                                              "tp": topology.tp_rank},
            "full_model_bytes": whole["model_bytes"], "full_model_peak_bytes": whole["model_peak_bytes"],
            "cut_from_full_peak_bytes": whole["peak_bytes"], "meta_peak_bytes": meta["peak_bytes"],
            "local_param_bytes": local["param_bytes"], "local_grad_bytes": local["grad_bytes"],
            "largest_parameter_bytes": largest, "same_weights": all(same)})
        del cut, from_meta
        gc.collect()
    return results


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _model_shapes(model_cfg: ModelConfig) -> list[torch.Tensor]:
    with torch.device("meta"):
        return list(build_model(model_cfg).parameters())


def start_memory(model_cfg: ModelConfig, layouts: Sequence[ParallelConfig],
                 train_cfg: TrainConfig | None = None, timeout: float = 300.0) -> list[list[dict[str, Any]]]:
    """Each rank's peak memory while it builds its part of `model_cfg`, per layout (one list of
    ranks per layout; the layouts share one launch, so they need one world size).

    Per rank (`AllocationTracker`: bytes of tensor storage; gloo processes from `run_local`):
    ``meta_peak_bytes`` builds the GPT on the meta device and lets the engine materialise and
    initialise this rank's shards, one parameter drawn at a time (what `lmkit train` does);
    ``cut_from_full_peak_bytes`` builds the whole GPT first and cuts it (the way before);
    ``full_model_bytes`` / ``full_model_peak_bytes`` are the whole model's weights and the peak
    of building it; ``local_param_bytes`` and ``local_grad_bytes`` what the rank keeps
    (`memory_report`; the lmkit engine allocates its gradient buckets at start);
    ``largest_parameter_bytes`` the biggest single tensor (the temporary a rank draws whole);
    ``same_weights``: the two constructions gave this rank bit-identical shards.
    """
    worlds = {layout.world_size for layout in layouts}
    if len(worlds) != 1:
        raise ValueError(f"start_memory runs its layouts in one launch: they need one world size, "
                         f"got {sorted(worlds)}")
    micro = max(layout.dp * layout.microbatches for layout in layouts)
    train_cfg = train_cfg or TrainConfig(batch_size=micro, eval_interval=0, device="cpu")
    per_rank = run_local(worlds.pop(), _start_memory_worker, to_dict(model_cfg), to_dict(train_cfg),
                         [dataclasses.asdict(layout) for layout in layouts], timeout=timeout)
    return [[ranks[k] for ranks in per_rank] for k in range(len(layouts))]


# --------------------------------------------------------------------------- ideal schedules


def ideal_timeline(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1,
                   forward_s: float = 1.0, backward_s: float = 2.0,
                   weight_s: float = 0.0) -> list[dict[str, Any]]:
    """The timeline a pipeline schedule would have if communication were free and every stage
    (chunk) took `forward_s` per forward and `backward_s` per backward (chapter 6, the Gantt charts);
    a zero-bubble schedule's B takes `backward_s` and its W `weight_s` (the others run both as one
    backward of ``backward_s + weight_s``).

    `lmkit.parallel.pipeline.ideal_timeline` replays the order the engine runs; this returns its
    actions as `Timeline` events (``step`` 0), so `lmkit.lab.plots.gantt` draws them and
    `lmkit.parallel.instrument.idle_fractions` measures them; for uniform stages the idle fraction
    is the bubble (`lmkit.costs.bubble_fraction`).
    """
    v = virtual_stages
    kinds = {"F": "forward", "B": "backward", "W": "weight"}
    timeline = pipeline_ideal_timeline(schedule, microbatches, pp, v, forward_s * v, backward_s * v,
                                       weight_s * v)
    events = [{"rank": r, "step": 0, "kind": kinds[a.kind], "microbatch": a.microbatch, "chunk": a.chunk,
               "start": start, "end": end} for r, rank in enumerate(timeline) for a, start, end in rank]
    return sorted(events, key=lambda e: (e["rank"], e["start"]))


def ring_pass(events: Sequence[dict[str, Any]], layer: int = 0, phase: str = "forward",
              microbatch: int = 0) -> list[dict[str, Any]]:
    """One pass of one layer's ring attention on every rank (chapter 6, the ring-step Gantt chart).

    `events`: timelines of a context-parallel layout (`lmkit.parallel.timeline.RING_KINDS`, recorded
    when a `Timeline` is attached); `phase` "forward" or "backward"; `microbatch`: which pass of the
    layer in the step. Returns those events sorted by rank and start, with times measured from the
    pass's first event on any rank, so that `lmkit.lab.plots.gantt` draws the pass alone.
    """
    kinds = {k for names in RING_KINDS.values() for k in ((names,) if isinstance(names, str) else names)}
    mine = [e for e in events if e["kind"] in kinds and e.get("phase") == phase and e["chunk"] == layer
            and e["microbatch"] == microbatch]
    if not mine:
        raise ValueError(f"no ring-attention events for layer {layer}, {phase} pass {microbatch}: the "
                         "timeline must come from a context-parallel layout (cp > 1), timeline attached")
    origin = min(e["start"] for e in mine)
    return sorted(({**e, "start": e["start"] - origin, "end": e["end"] - origin} for e in mine),
                  key=lambda e: (e["rank"], e["start"], e["end"]))
