"""Experiments over parallel layouts: run a layout, compare loss curves, measure a step.

This module sits *above* the trainer (`lmkit.train`): it trains layouts with the real `Trainer`
and observes them with `lmkit.parallel.instrument`; nothing in `lmkit.parallel` imports it. The
notebooks, the benchmarks and the tests call the same functions:

- `layout_losses` trains one layout and returns rank 0's loss curve (the loss-compare of
  torchtitan and picotron: every layout must reproduce the single-process curve, chapter 6);
- `measure_layouts` trains layouts and returns every rank's bytes per collective, timeline,
  memory and step times (``benchmarks/parallel.py``, chapter 6);
- `start_memory` measures each rank's peak memory while it builds its part of the model
  (from the meta device) against building the whole model (chapter 6, construction at scale);
- `max_relative_difference` and `layout_name` are the criterion and the labels.

Layouts run in gloo processes forked by `lmkit.parallel.launch.run_local` from a parent that
has imported torch, exactly as ``torchrun -m lmkit train`` would run them, at a fraction of the
start-up cost.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmkit import atomic
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.model import build_model
from lmkit.parallel.context_parallel import chunk_ids, position_ids, ring_attention, shard_sequence
from lmkit.parallel.instrument import AllocationTracker, CommCounter, Instrument, memory_report
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import coords_of, cp_rank_of, init_topology
from lmkit.parallel.pipeline import schedule_actions
from lmkit.parallel.timeline import RING_KINDS
from lmkit.tokenizer import CharTokenizer
from lmkit.train import Trainer, build_engine, prepare_run, seed_everything

__all__ = [
    "ring_attention_worker",
    "layout_losses", "layout_name", "label", "max_relative_difference", "measure_layouts", "start_memory",
    "ideal_timeline", "ring_pass",
    "group_label", "CHAPTER6_MODEL", "CHAPTER6_TEXT", "CHAPTER6_CP_LAYOUTS", "chapter6_model_config",
    "chapter6_train_config",
    "chapter6_layouts", "chapter6_checkpoint_plan", "run_chapter6", "load_results", "summary_table",
    "chapter6_command", "missing_layouts", "missing_notice", "main",
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
    if p.tp > 1:
        parts.append(f"tp{p.tp}" + (" sp" if p.sequence_parallel else ""))
    if p.pp > 1:
        sched = p.schedule + (f" v{p.virtual_stages}" if p.schedule == "interleaved" else "")
        parts.append(f"pp{p.pp} {sched} m{p.microbatches}")
    return " x ".join(parts) or "1 process"


def max_relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """max_i |a_i - b_i| / |b_i| (the loss-compare criterion of chapter 6)."""
    if len(a) != len(b):
        raise ValueError(f"curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- loss curves


def _train_worker(model: dict, train: dict, parallel: dict | None, text: str | None, steps: int,
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
        return _train_worker(model, train, None, text, steps, cache_dir, resume, save)
    layout = dataclasses.asdict(parallel_cfg)
    results = run_local(parallel_cfg.world_size, _train_worker, model, train, layout, text, steps, cache_dir,
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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _measure_worker(model: dict, train: dict, layouts: list[dict | None], steps: int, warmup: int,
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
        shape = (pc.dp, pc.cp, pc.tp, pc.pp)
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
                _barrier()
            start = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            plain.append(time.perf_counter() - start)
            with inst, inst.step(i):
                losses.append(trainer.train_step()["loss"])
        comm = _jsonable_comm(inst.counter.summary(by_group=True))
        last = inst.steps[-1]["step"]
        topo = trainer.topology
        results.append({
            "layout": layout, "rank": topo.rank if topo else 0, "world_size": topo.world_size if topo else 1,
            "coords": {"pp": topo.pp_rank, "dp": topo.dp_rank, "cp": topo.cp_rank, "tp": topo.tp_rank} if topo
            else {"pp": 0, "dp": 0, "cp": 0, "tp": 0},
            "step_s": [s["wall_s"] for s in inst.steps], "plain_step_s": plain,
            "counter_overhead_s": [s["counter_overhead_s"] for s in inst.steps],
            "comm": comm, "records": inst.counter.records,
            "timeline": inst.timeline.step_events(last),
            "memory": memory_report(engine, trainer.optimizer),
            "device": _device_name(trainer.device),
            "tokens_per_step": tc.batch_size * run.model_config.block_size,
            "flops_per_token": flops, "losses": losses,
        })
        del trainer, engine, inst, model_
        gc.collect()
    return results


def _world(layout: ParallelConfig | None) -> int:
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
        groups.setdefault(_world(layout), []).append(index)
    out: list[dict[str, Any]] = [{} for _ in layouts]
    for world, members in groups.items():
        dicts = [dataclasses.asdict(layouts[i]) if layouts[i] is not None else None for i in members]
        per_rank = run_local(world, _measure_worker, model, train, dicts, steps, warmup, text,
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
                   forward_s: float = 1.0, backward_s: float = 2.0) -> list[dict[str, Any]]:
    """The timeline a pipeline schedule would have if communication were free and every stage
    (chunk) took `forward_s` per forward and `backward_s` per backward (chapter 6, the Gantt charts).

    Each rank runs its actions in the order `lmkit.parallel.pipeline.schedule_actions` gives
    (the order the engine runs), each as early as its inputs allow: a forward of global stage
    ``s`` after the same microbatch's forward on stage ``s - 1``, a backward after the backward
    on stage ``s + 1`` (and its own forward). Events have `Timeline`'s format (``step`` 0), so
    `lmkit.plots.gantt` draws them and `lmkit.parallel.instrument.idle_fractions` measures them;
    for uniform stages the idle fraction is the bubble ``(p-1) / (v m + p-1)``.
    """
    v, n_stages = virtual_stages, pp * virtual_stages
    orders = [schedule_actions(schedule, microbatches, pp, r, v) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}  # (kind, microbatch, global stage) -> end time
    position, free = [0] * pp, [0.0] * pp
    events: list[dict[str, Any]] = []
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                a = orders[r][position[r]]
                stage = a.chunk * pp + r
                if a.kind == "F":
                    needs = [("F", a.microbatch, stage - 1)] if stage > 0 else []
                else:
                    needs = [("F", a.microbatch, stage)]
                    needs += [("B", a.microbatch, stage + 1)] if stage < n_stages - 1 else []
                if any(n not in done for n in needs):
                    break
                start = max([free[r], *(done[n] for n in needs)])
                end = start + (forward_s if a.kind == "F" else backward_s)
                done[(a.kind, a.microbatch, stage)] = free[r] = end
                events.append({"rank": r, "step": 0, "kind": "forward" if a.kind == "F" else "backward",
                               "microbatch": a.microbatch, "chunk": a.chunk, "start": start, "end": end})
                position[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule} with pp={pp}, m={microbatches}, v={v} cannot make progress")
    return sorted(events, key=lambda e: (e["rank"], e["start"]))


def ring_pass(events: Sequence[dict[str, Any]], layer: int = 0, phase: str = "forward",
              microbatch: int = 0) -> list[dict[str, Any]]:
    """One pass of one layer's ring attention on every rank (chapter 6, the ring-step Gantt chart).

    `events`: timelines of a context-parallel layout (`lmkit.parallel.timeline.RING_KINDS`, recorded
    when a `Timeline` is attached); `phase` "forward" or "backward"; `microbatch`: which pass of the
    layer in the step. Returns those events sorted by rank and start, with times measured from the
    pass's first event on any rank, so that `lmkit.plots.gantt` draws the pass alone.
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


# --------------------------------------------------------------------------- chapter 6

#: The chapter's corpus: 600 short lines over 29 symbols (30 with the end-of-text token, so the
#: vocabulary splits over tp=2), the same as the loss-compare tests; it needs no download.
CHAPTER6_TEXT = "".join(
    f"{w} {i % 7} sat on the {v}{'.!'[i % 2]}\n"
    for i, (w, v) in enumerate(zip(["the cat", "a dog", "one bird", "my fish"] * 150,
                                   ["mat", "log", "rug"] * 200, strict=True)))
#: The chapter's GPT: 4 layers (enough for pp2 x 2 virtual stages), 4 heads (tp2), fp32, no dropout.
CHAPTER6_MODEL = ModelConfig(n_layer=4, n_head=4, d_model=32, block_size=16, dropout=0.0)
CHAPTER6_STEPS, CHAPTER6_SMOKE_STEPS = 20, 10
CHAPTER6_WORLDS = (1, 2, 4, 8)  # the world sizes of the chapter's layouts (torchrun mode)
RESULTS_VERSION = 1


def chapter6_model_config() -> ModelConfig:
    """`CHAPTER6_MODEL` with the vocabulary of its character tokenizer on `CHAPTER6_TEXT` (30)."""
    vocab = CharTokenizer.train(CHAPTER6_TEXT).vocab_size
    return dataclasses.replace(CHAPTER6_MODEL, vocab_size=vocab)


def chapter6_train_config(steps: int, out_dir: str | Path, device: str = "auto") -> TrainConfig:
    """Global batch 16, lr 3e-3 with 2 warm-up steps, clipping at 0.5 (it bites), seed 11."""
    return TrainConfig(batch_size=16, max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=2, grad_clip=0.5,
                       eval_interval=0, seed=11, device=device, out_dir=str(out_dir))


#: Context parallelism (ring attention, zigzag sharding) alone and with each other dimension: the
#: chapter's block size, 16, splits into 2 cp chunks for cp = 2 and 4; its GPT has no dropout.
CHAPTER6_CP_LAYOUTS = (ParallelConfig(cp=2), ParallelConfig(cp=4), ParallelConfig(dp=2, cp=2),
                       ParallelConfig(cp=2, tp=2, sequence_parallel=True),
                       ParallelConfig(cp=2, pp=2, schedule="1f1b", microbatches=4))


def chapter6_layouts(smoke: bool = False) -> list[ParallelConfig | None]:
    """The chapter's layouts, ``None`` (the plain single-process trainer) first.

    Both engines where the native one has the layout (it has no ZeRO-1, the lmkit engine no
    ZeRO-3, and only the lmkit engine has context parallelism: `CHAPTER6_CP_LAYOUTS`). `smoke`
    keeps one of each kind: ZeRO-1, native ZeRO-3, TP+SP, the three pipeline schedules, the 3-D
    layout and cp2.
    """
    P, pipe = ParallelConfig, {"microbatches": 4}
    lmkit_layouts = [
        P(dp=2), P(dp=2, zero=1), P(dp=2, zero=2), P(tp=2), P(tp=2, sequence_parallel=True),
        P(pp=2, schedule="gpipe", **pipe), P(pp=2, schedule="1f1b", **pipe),
        P(pp=2, schedule="interleaved", virtual_stages=2, **pipe),
        P(dp=2, tp=2, pp=2, zero=1, sequence_parallel=True, microbatches=2),
        *CHAPTER6_CP_LAYOUTS,
    ]
    native = [P(engine="native", **kw) for kw in (
        {"dp": 2}, {"dp": 2, "zero": 2}, {"dp": 2, "zero": 3},
        {"tp": 2}, {"tp": 2, "sequence_parallel": True},
        {"pp": 2, "schedule": "gpipe", **pipe}, {"pp": 2, "schedule": "1f1b", **pipe},
        {"pp": 2, "schedule": "interleaved", "virtual_stages": 2, **pipe},
        {"dp": 2, "tp": 2, "pp": 2, "zero": 3, "sequence_parallel": True, "microbatches": 2})]
    if smoke:
        keep = {"dp2 zero1", "native dp2 zero3", "tp2 sp", "pp2 gpipe m4", "pp2 1f1b m4",
                "pp2 interleaved v2 m4", "dp2 zero1 x tp2 sp x pp2 1f1b m2", "cp2"}
        return [None, *(p for p in lmkit_layouts + native if label(p) in keep)]
    return [None, *lmkit_layouts, *native]


def chapter6_checkpoint_plan(world: int | None, smoke: bool = False) -> tuple[ParallelConfig, ParallelConfig]:
    """(save under, resume under) for a checkpoint moved between layouts; then 1 process resumes.

    ``None`` (forked gloo processes): dp2 x tp2 ZeRO-1 saves, pp2 resumes (with `smoke`, dp2
    ZeRO-1 saves: two processes start faster than four). Under torchrun both use the launched
    world: 2 ranks dp2 ZeRO-1 -> pp2; 4 ranks dp2 x cp2 ZeRO-1 -> tp2 x pp2; 8 ranks dp2 x tp2 x
    pp2 ZeRO-1 -> dp4 x tp2.
    """
    P = ParallelConfig
    plans = {None: (P(dp=2, tp=2, zero=1), P(pp=2, schedule="1f1b", microbatches=2)),
             2: (P(dp=2, zero=1), P(pp=2, schedule="1f1b", microbatches=2)),
             4: (P(dp=2, cp=2, zero=1), P(tp=2, pp=2, schedule="1f1b", microbatches=2)),
             8: (P(dp=2, tp=2, pp=2, zero=1, sequence_parallel=True, microbatches=2), P(dp=4, tp=2, zero=1))}
    if world not in plans:
        raise ValueError(f"no checkpoint plan for a world of {world} processes")
    return plans[2 if world is None and smoke else world]


def label(layout: ParallelConfig | None) -> str:
    """`layout_name` with the engine: ``native dp2 zero3``, ``pp2 1f1b m4`` (lmkit), ``1 process``."""
    name = layout_name(layout)
    return f"native {name}" if layout is not None and layout.engine == "native" else name


def _slug(name: str) -> str:
    return "-".join(name.replace(" x ", " ").split())


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


def _dim(collective: dict[str, Any], layout: ParallelConfig | None) -> str:
    """`group_label` of a counted collective, in `lmkit.costs`'s terms. Point-to-point messages
    are the pipeline's in both engines, whatever group carries them (the lmkit engine sends
    through the default group with global peer ranks, so their group is the whole world), except
    ring attention's, which go through the cp group. Under context parallelism the collectives of
    the gradient group, dp x cp (`lmkit.parallel.mesh.Topology.gradient_view`), are ``dp``: the
    parameters are replicated over cp as over dp, and `lmkit.costs` counts them so."""
    label = group_label(collective["ranks"], layout)
    p2p = collective["kind"] in ("send", "recv")
    if p2p and layout is not None and layout.pp > 1 and label != "cp":
        return "pp"
    if not p2p and layout is not None and layout.cp > 1 and len(collective["ranks"]) > 1 \
            and set(_varying(collective["ranks"], layout)) <= {"dp", "cp"}:
        return "dp"
    return label


def _measured_entry(result: dict[str, Any], layout: ParallelConfig | None) -> dict[str, Any]:
    """A `measure_layouts` entry as stored in the results folder (JSON, collectives labelled)."""
    entry = {"name": label(layout), "engine": None if layout is None else layout.engine,
             "layout": None if layout is None else dataclasses.asdict(layout),
             "world_size": 1 if layout is None else layout.world_size}
    if "error" in result:
        return {**entry, "error": result["error"]}
    ranks = []
    for rank in result["ranks"]:
        rank = dict(rank)
        rank["comm"] = [{**c, "dim": _dim(c, layout)} for c in rank["comm"]]
        rank["records"] = [{**r, "dim": _dim(r, layout)} for r in rank["records"]]
        ranks.append(rank)
    return {**entry, "losses": ranks[0]["losses"], "ranks": ranks}


def _write_json(path: Path, value: Any) -> None:
    atomic.write_text(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def _env_world() -> int | None:
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None


def _gather_to_rank0(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (on every rank; rank 0 writes them)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _run_here(model: dict, train: dict, layouts: list[ParallelConfig | None], steps: int, warmup: int,
              cache_dir: str) -> list[dict[str, Any]]:
    """`measure_layouts` on the ranks torchrun started (layouts of this world's size, or ``[None]``):
    one `_measure_worker` call, which builds each layout's process groups once."""
    dicts = [dataclasses.asdict(layout) if layout is not None else None for layout in layouts]
    mine = _measure_worker(model, train, dicts, steps, warmup, CHAPTER6_TEXT, cache_dir)
    per_rank = _gather_to_rank0(mine) if dist.is_initialized() and dicts[0] is not None else [mine]
    out: list[dict[str, Any]] = []
    for k, layout in enumerate(layouts):
        ranks = [results[k] for results in per_rank]
        entry: dict[str, Any] = {"name": layout_name(layout), "layout": dicts[k]}
        failed = "error" in ranks[0]
        out.append({**entry, "error": ranks[0]["error"]} if failed else {**entry, "ranks": ranks})
    return out


def run_chapter6(out: str | Path, smoke: bool = False, steps: int | None = None, device: str = "auto",
                 timeout: float = 600.0, log: Any = print) -> dict[str, Any]:
    """Run chapter 6's experiments and write them to the folder `out`; returns the manifest.

    Without ``WORLD_SIZE`` in the environment the layouts run in gloo processes forked by
    `run_local` (one launch per world size). Under torchrun (``WORLD_SIZE`` = W) the
    layouts with W ranks run on the launched processes (NCCL on GPUs), rank 0 also runs the
    single-process reference on its device (the others wait), and the other layouts are
    listed in the manifest as ``skipped`` with the command that runs them; runs of several
    world sizes into the same folder add up (files are per layout). See ``--help``.
    """
    out = Path(out)
    world = _env_world()
    steps = steps or (CHAPTER6_SMOKE_STEPS if smoke else CHAPTER6_STEPS)
    pairs = 1 if smoke else 2  # measured (plain + instrumented) step pairs at the end of the curve
    if steps < 2 * pairs + 2:
        raise ValueError(f"--steps must be at least {2 * pairs + 2}")
    started = time.perf_counter()
    train_cfg = chapter6_train_config(steps, out / "checkpoint" / "run", device)
    model_cfg = chapter6_model_config()
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    cache = str(out / "cache")  # tokenizer and token files of the chapter's corpus
    selected = chapter6_layouts(smoke)
    here = selected if world is None else [p for p in selected if p is not None and p.world_size == world]
    again = f"-m lmkit.experiments chapter6 --out {out}" + (" --smoke" if smoke else "")
    skipped = [] if world is None else [
        {"name": label(p), "world_size": p.world_size,
         "reason": f"needs {p.world_size} processes: torchrun --standalone --nproc_per_node={p.world_size} "
                   + again}
        for p in selected if p is not None and p.world_size != world]
    rank = int(os.environ.get("RANK", "0"))
    talk = rank == 0
    if world is None:
        measured = measure_layouts(model_cfg, train_cfg, here, steps=pairs, warmup=steps - 2 * pairs,
                                   text=CHAPTER6_TEXT, cache_dir=cache, timeout=timeout)
    else:
        if torch.cuda.is_available() and device in ("auto", "cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        warmup = steps - 2 * pairs
        measured = _run_here(model, train, here, pairs, warmup, cache) if here else []
        # The single-process reference runs on rank 0 alone (the others wait), so that its step
        # time is not shared with 7 other processes on a CPU.
        reference = _run_here(model, train, [None], pairs, warmup, cache) if rank == 0 else [{}]
        _barrier()
        measured, here = reference + measured, [None, *here]
    checkpoint = _chapter6_checkpoint(model, train, steps, world, out, timeout, smoke)
    if not talk:
        return {}
    entries = [_measured_entry(r, p) for r, p in zip(measured, here, strict=True)]
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    setting = {"model": model, "train": {k: v for k, v in train.items() if k != "out_dir"}, "steps": steps}
    if previous and any(previous.get(k) != v for k, v in setting.items()):
        log(f"{out}: earlier results used another model, optimisation or number of steps: replaced")
        shutil.rmtree(out / "layouts", ignore_errors=True)
        previous = {}
    (out / "layouts").mkdir(parents=True, exist_ok=True)
    for entry in entries:
        _write_json(out / "layouts" / f"{_slug(entry['name'])}.json", entry)
    runs = [r for r in previous.get("runs", []) if r.get("world_size") != world or r.get("smoke") != smoke]
    device_name = next((r["device"] for e in entries if "ranks" in e for r in e["ranks"]), "cpu")
    run_info = {"mode": "forked gloo processes (run_local)" if world is None else f"torchrun, {world} ranks",
                "world_size": world, "smoke": smoke, "device": device_name, "torch": torch.__version__,
                "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - started,
                "layouts": [e["name"] for e in entries], "skipped": skipped,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    known = {e["name"]: e for e in previous.get("layouts", [])}
    for e in entries:
        known[e["name"]] = {"name": e["name"], "file": f"layouts/{_slug(e['name'])}.json",
                            "world_size": e["world_size"], "engine": e["engine"], "ok": "error" not in e}
    order = [label(p) for p in chapter6_layouts(False)]
    manifest = {
        "version": RESULTS_VERSION, "program": "python -m lmkit.experiments chapter6", **setting,
        "measured_pairs": pairs,
        "layouts": sorted(known.values(), key=lambda e: order.index(e["name"]) if e["name"] in order else 99),
        "runs": [*runs, run_info],
    }
    if checkpoint is not None:
        _write_json(out / "checkpoint.json", checkpoint)
        manifest["checkpoint"] = "checkpoint.json"
    elif "checkpoint" in previous:
        manifest["checkpoint"] = previous["checkpoint"]
    _write_json(manifest_path, manifest)
    if talk:
        log(summary_table(load_results(out)))
    return manifest


def _chapter6_checkpoint(model: dict, train: dict, steps: int, world: int | None, out: Path,
                         timeout: float, smoke: bool = False) -> dict[str, Any] | None:
    """Train half the steps under one layout and save; resume under another, and on 1 process."""
    if world == 1:
        return None
    first, second = chapter6_checkpoint_plan(world, smoke)
    half = steps // 2
    mc, tc = ModelConfig(**model), TrainConfig(**train)
    cache = str(out / "cache")
    if int(os.environ.get("RANK", "0")) == 0:  # a fresh run directory: no checkpoint of an earlier run
        shutil.rmtree(tc.out_dir, ignore_errors=True)
    if world is None:
        saved = layout_losses(mc, tc, first, half, text=CHAPTER6_TEXT, cache_dir=cache, timeout=timeout,
                              save=True)
        moved = layout_losses(mc, tc, second, steps - half, text=CHAPTER6_TEXT, cache_dir=cache,
                              timeout=timeout, resume=saved["checkpoint"])
    else:
        _barrier()
        saved = _train_worker(model, train, dataclasses.asdict(first), CHAPTER6_TEXT, half, cache, save=True)
        moved = _train_worker(model, train, dataclasses.asdict(second), CHAPTER6_TEXT, steps - half, cache,
                              resume=saved["checkpoint"])
    single = _train_worker(model, train, None, CHAPTER6_TEXT, steps - half, cache, resume=saved["checkpoint"])
    return {"steps": steps, "saved_at": half,
            "save": {"name": label(first), "losses": saved["losses"], "checkpoint": saved["checkpoint"]},
            "resumes": [{"name": label(p), "losses": r["losses"], "start_step": r["start_step"]}
                        for p, r in ((second, moved), (None, single))]}


def load_results(folder: str | Path) -> dict[str, Any]:
    """A chapter-6 results folder: ``{"manifest", "layouts": {name: entry}, "checkpoint"}``.

    Raises `FileNotFoundError` with the command that makes one when the folder holds none.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no chapter-6 results (no manifest.json); make them with "
                                f"python -m lmkit.experiments chapter6 --out {folder}")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != RESULTS_VERSION:
        raise ValueError(f"{path} is version {manifest.get('version')} of the results; this lmkit reads "
                         f"version {RESULTS_VERSION}: run the program again")
    layouts = {e["name"]: json.loads((folder / e["file"]).read_text()) for e in manifest["layouts"]}
    checkpoint = None
    if "checkpoint" in manifest:
        checkpoint = json.loads((folder / manifest["checkpoint"]).read_text())
    return {"manifest": manifest, "layouts": layouts, "checkpoint": checkpoint}


def summary_table(results: dict[str, Any]) -> str:
    """One line per layout: ranks, max relative loss difference vs 1 process, step time, bytes, memory."""
    layouts = results["layouts"]
    ref = layouts.get("1 process")
    lines = [f"{'layout':<40} {'ranks':>5} {'max rel. loss diff':>18} {'step ms':>8} {'bytes/step r0':>13} "
             f"{'max MiB/rank':>12}"]
    for name, e in layouts.items():
        if "error" in e:
            lines.append(f"{name:<40} failed: {e['error'][:80]}")
            continue
        diff = max_relative_difference(e["losses"], ref["losses"]) if ref else float("nan")
        r0 = e["ranks"][0]
        sent = sum(c["bytes"] for c in r0["comm"] if c["kind"] != "barrier")
        step_ms = 1e3 * sorted(r0["plain_step_s"])[len(r0["plain_step_s"]) // 2]
        mem = max(r["memory"]["total_bytes"] for r in e["ranks"]) / 2**20
        lines.append(f"{name:<40} {len(e['ranks']):>5} {diff:>18.2e} {step_ms:>8.1f} {sent:>13,} "
                     f"{mem:>12.3f}")
    return "\n".join(lines)


def _smoke_folder(manifest: dict[str, Any]) -> bool:
    """Whether every run into a results folder was a ``--smoke`` run (its layouts are the smoke set)."""
    runs = manifest.get("runs", [])
    return bool(runs) and all(run.get("smoke") for run in runs)


def chapter6_command(world: int, folder: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """The torchrun launch that adds the chapter's layouts of `world` processes to `folder`.

    With the folder's `manifest` it repeats the options of the runs already there (``--smoke``,
    ``--steps``, ``--device``), so that the launch adds up instead of replacing them.
    """
    options = ""
    if manifest:
        smoke = _smoke_folder(manifest)
        options += " --smoke" if smoke else ""
        steps = manifest.get("steps")
        if steps is not None and steps != (CHAPTER6_SMOKE_STEPS if smoke else CHAPTER6_STEPS):
            options += f" --steps {steps}"
        device = manifest.get("train", {}).get("device", "auto")
        options += f" --device {device}" if device != "auto" else ""
    return (f"torchrun --standalone --nproc_per_node={world} -m lmkit.experiments chapter6 --out {folder}"
            + options)


def missing_layouts(results: dict[str, Any]) -> dict[int, list[str]]:
    """The chapter's layouts a results folder (`load_results`) does not hold, by the processes they need.

    The chapter's layouts are `chapter6_layouts`, the smoke set when every run into the folder was
    a ``--smoke`` run; ``1 process`` (the single-process reference, which every launch writes on
    rank 0) counts as a layout of 1 process. Layouts that are present but failed are not missing.
    """
    missing: dict[int, list[str]] = {}
    for layout in chapter6_layouts(_smoke_folder(results["manifest"])):
        if label(layout) not in results["layouts"]:
            missing.setdefault(_world(layout), []).append(label(layout))
    return dict(sorted(missing.items()))


def missing_notice(results: dict[str, Any], folder: str | Path) -> str:
    """One line naming what of the chapter `folder` lacks, by processes needed, and the launches that
    add it into the folder; ``""`` when it holds every layout and the checkpoint experiment."""
    missing = missing_layouts(results)
    no_checkpoint = results.get("checkpoint") is None
    if not missing and not no_checkpoint:
        return ""
    parts = []
    for world, names in missing.items():
        what = f"{world}-process layout{'s' if len(names) > 1 else ''} ({', '.join(names)}"
        if world == 1:
            what += (": the reference every loss comparison is against, so those are skipped; "
                     "any launch writes it")
        parts.append(what + ")")
    worlds = [w for w in missing if w > 1] or list(missing)
    if no_checkpoint:
        parts.append("the checkpoint experiment (a launch of 2, 4 or 8 processes runs it)")
        worlds = worlds or [2]
    launches = [f"`{chapter6_command(w, folder, results['manifest'])}`" for w in worlds]
    add = launches[0] if len(launches) == 1 else ", ".join(launches[:-1]) + " and " + launches[-1]
    return (f"not in {folder}: {', '.join(parts)}: add {add} launch{'es' if len(launches) > 1 else ''} into "
            "the same folder; the parts of the chapter that need them are skipped")


# --------------------------------------------------------------------------- command line

_EPILOG = """\
How it launches:
  without torchrun   forks gloo worker processes itself (lmkit.parallel.launch.run_local),
                     one launch per world size, and runs every layout; this is what the
                     notebook does on a CPU (seconds, not a torchrun start-up per layout).
  under torchrun     (WORLD_SIZE set) runs the layouts whose dp*tp*pp equals the launched
                     world, on the real devices (NCCL on GPUs, gloo on CPUs); rank 0 also runs
                     the single-process reference on its device, and all ranks the checkpoint
                     experiment (below). Layouts of other sizes are listed as skipped in
                     manifest.json with their command: the chapter's layouts have 1, 2, 4 and
                     8 ranks, so on a node of 8 GPUs run it three times into the same --out:
                       torchrun --standalone --nproc_per_node=2 -m lmkit.experiments chapter6 --out runs/ch6
                       torchrun --standalone --nproc_per_node=4 -m lmkit.experiments chapter6 --out runs/ch6
                       torchrun --standalone --nproc_per_node=8 -m lmkit.experiments chapter6 --out runs/ch6
                     Results of runs with other world sizes add up in one folder. Across nodes,
                     --out must be on a filesystem every node sees (the checkpoint experiment
                     resumes from it).

What it writes (JSON, each file replaced atomically):
  OUT/manifest.json        model, optimisation, runs (device, wall time), layouts, skipped ones
  OUT/layouts/NAME.json    per layout: the loss curve, and per rank the last step's collectives
                           (bytes by kind and group), its timeline, memory, step times
  OUT/checkpoint.json      a checkpoint saved under one layout, resumed under another and on 1
                           process; OUT/checkpoint/run holds the checkpoint itself
The notebook notebooks/06_hybrid_parallel_practice.ipynb plots a folder with RESULTS = "OUT".
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """``python -m lmkit.experiments chapter6 ...`` (the book's chapter 6 as one program)."""
    parser = _Parser(prog="python -m lmkit.experiments", description="The book's experiments as programs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ch6 = sub.add_parser("chapter6", help="every layout of chapter 6: loss curves, bytes, timelines, memory",
                         description="Chapter 6 (hybrid parallelism in practice): train the chapter's GPT "
                                     "under every layout of both engines and write the measurements.",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ch6.add_argument("--out", required=True,
                     help="results folder (created; earlier results of the same model, optimisation and "
                          "steps are kept, others replaced)")
    ch6.add_argument("--smoke", action="store_true",
                     help=f"a reduced set of layouts and {CHAPTER6_SMOKE_STEPS} steps (the notebook's SMOKE)")
    ch6.add_argument("--steps", type=int, default=None,
                     help=f"optimizer steps per layout (default {CHAPTER6_STEPS}, {CHAPTER6_SMOKE_STEPS} "
                          "with --smoke)")
    ch6.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ch6.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a forked launch")
    ch6.add_argument("--list", action="store_true", help="print the layouts and their ranks, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lmkit.experiments``; returns the exit status (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise _UsageError(f"python -m lmkit.experiments chapter6: --out {out} is a file, not a folder")
        if args.steps is not None and args.steps < 6:
            raise _UsageError("python -m lmkit.experiments chapter6: --steps must be at least 6")
        if args.device not in ("auto", "cpu", "cuda"):
            raise _UsageError(f"python -m lmkit.experiments chapter6: --device {args.device!r}: use auto, "
                              "cpu or cuda")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise _UsageError("python -m lmkit.experiments chapter6: --device cuda but CUDA is not available "
                              "here; use auto or cpu")
        world = _env_world()
        if world is not None and world not in CHAPTER6_WORLDS:
            raise _UsageError(f"python -m lmkit.experiments chapter6: launched with {world} processes; the "
                              f"chapter's layouts have {', '.join(map(str, CHAPTER6_WORLDS))} ranks "
                              "(torchrun --nproc_per_node=2, 4 or 8)")
        if args.list:
            for p in chapter6_layouts(args.smoke):
                print(f"{label(p):<40} {1 if p is None else p.world_size} rank(s)")
            return 0
        run_chapter6(out, smoke=args.smoke, steps=args.steps, device=args.device, timeout=args.timeout)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmkit.experiments: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the module's own functions under their importable name (lmkit.experiments), not as
    # __main__, so the worker processes can unpickle them.
    from lmkit.experiments import main as _main

    sys.exit(_main())


# --------------------------------------------------------------------------- ring attention, checked
# (context parallelism, the book's chapter 5, section 5.8)


def ring_attention_worker(cases: Sequence[tuple[int, int, str, str]], batch: int = 2, heads: int = 3,
                          head_dim: int = 8, seed: int = 0) -> list[dict]:
    """For `lmkit.parallel.launch.run_local`: ring attention against full causal attention, per case.

    Each case is ``(cp, seq_len, layout, dtype)``; the world is cut into groups of ``cp``
    consecutive ranks (ranks left over sit the case out), so one launch checks several ring sizes
    on groups that are not the world. Every rank draws the same full q, k, v and output gradient,
    computes the reference with ``F.scaled_dot_product_attention(is_causal=True)`` and its
    gradients, then runs `ring_attention` on its own shard. Returns, per case this rank took part
    in, the largest absolute difference of the output and of dq, dk, dv from this rank's part of
    the reference (and the reference's largest magnitude); the forward's work (`ring_attention`'s
    ``stats``); the calls and bytes of the sends and receives forward and backward
    (`lmkit.parallel.instrument.CommCounter`); the bytes the forward saves for backward; and the
    ring's ``events`` as its ``on_event`` callback saw them: ``(phase, what, ring_step, start, end,
    blocks)``.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, me = dist.get_world_size(), dist.get_rank()
    groups = {}
    for cp in sorted({case[0] for case in cases}):  # every rank creates every group, in one order
        for first in range(0, world - cp + 1, cp):
            group = dist.new_group(list(range(first, first + cp)))
            if first <= me < first + cp:
                groups[cp] = group
    return [_check_case(groups[cp], cp, seq_len, layout, dtype, (batch, heads, head_dim), seed)
            for cp, seq_len, layout, dtype in cases if cp in groups]


def _check_case(group, cp: int, seq_len: int, layout: str, dtype: str, dims: tuple[int, int, int],
                seed: int) -> dict:
    rank, (batch, heads, head_dim) = dist.get_rank(group), dims
    g = torch.Generator().manual_seed(seed + seq_len)
    q, k, v, dout = (torch.randn(batch, heads, seq_len, head_dim, generator=g, dtype=getattr(torch, dtype))
                     for _ in range(4))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*full, is_causal=True)
    ref.backward(dout)

    def part(t: Tensor) -> Tensor:
        return shard_sequence(t.detach(), rank, cp, dim=2, layout=layout)

    mine = [part(t).requires_grad_() for t in (q, k, v)]
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    stats: dict[str, int] = {}
    events: list[tuple] = []

    def on_event(phase: str, what: str, ring_step: int, start: float, end: float, blocks: int) -> None:
        events.append((phase, what, ring_step, start, end, blocks))

    with CommCounter() as forward_comm, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ring_attention(*mine, group=group, layout=layout, stats=stats, on_event=on_event)
    with CommCounter() as backward_comm:
        out.backward(part(dout))
    pairs = {"out": (out, ref), "dq": (mine[0].grad, full[0].grad), "dk": (mine[1].grad, full[1].grad),
             "dv": (mine[2].grad, full[2].grad)}
    return {
        "cp": cp, "seq_len": seq_len, "layout": layout, "dtype": dtype, "rank": rank,
        "shape": [batch, heads, seq_len // cp, head_dim], "chunks": list(chunk_ids(rank, cp, layout)),
        "positions": position_ids(seq_len, rank, cp, layout).tolist(),
        "max_diff": {name: (a.detach() - part(b)).abs().max().item() for name, (a, b) in pairs.items()},
        "max_abs": {name: b.detach().abs().max().item() for name, (_, b) in pairs.items()},
        "work": stats, "saved_bytes": sum(saved), "events": events,
        "comm": {"forward": forward_comm.summary(), "backward": backward_comm.summary()},
    }
