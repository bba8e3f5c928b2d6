"""Experiments over parallel layouts: run a layout, compare loss curves, measure a step.

This module sits *above* the trainer (`lmkit.train`): it trains layouts with the real `Trainer`
and observes them with `lmkit.parallel.instrument`; nothing in `lmkit.parallel` imports it. The
notebooks, the benchmarks and the tests call the same functions:

- `layout_losses` trains one layout and returns rank 0's loss curve (the loss-compare of
  torchtitan and picotron: every layout must reproduce the single-process curve, chapter 6);
- `measure_layouts` trains layouts and returns every rank's bytes per collective, timeline,
  memory and step times (``benchmarks/parallel.py``, chapter 6);
- `max_relative_difference` and `layout_name` are the criterion and the labels.

Layouts run in gloo processes forked by `lmkit.parallel.launch.run_local` from a parent that
has imported torch, exactly as ``torchrun -m lmkit train`` would run them, at a fraction of the
start-up cost.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.model import build_model
from lmkit.parallel.instrument import Instrument, memory_report
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import init_topology
from lmkit.train import Trainer, prepare_run, seed_everything

__all__ = ["layout_losses", "layout_name", "max_relative_difference", "measure_layouts"]


def layout_name(p: ParallelConfig | None) -> str:
    """Short label such as ``dp2 zero1``, ``tp2 sp``, ``pp2 1f1b m4`` or ``1 process``.

    The engine is not part of the label; `None` (the plain single-process trainer) is
    ``1 process``, like a layout of one rank.
    """
    if p is None:
        return "1 process"
    parts = []
    if p.dp > 1:
        parts.append(f"dp{p.dp}" + (f" zero{p.zero}" if p.zero else ""))
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
    run = prepare_run(mc, tc, text=text, cache_dir=Path(cache_dir) if cache_dir else None)
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
    """One rank of `measure_layouts`: every layout of `layouts` (same dp x tp x pp) in turn.

    A ``None`` layout is the plain single-process `Trainer` (no engine), run on one process.
    """
    mc, tc = ModelConfig(**model), TrainConfig(**train)
    first = next((lay for lay in layouts if lay is not None), None)
    topology = init_topology(ParallelConfig(**first), tc.device) if first is not None else None
    run = prepare_run(mc, tc, text=text, cache_dir=Path(cache_dir) if cache_dir else None)
    results = []
    for layout in layouts:
        pc = ParallelConfig(**layout) if layout is not None else None
        seed_everything(tc.seed)
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
        inst, plain = Instrument(engine, keep_records=True), []
        for i in range(steps):  # alternate plain and instrumented steps: the overhead, measured
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
            "coords": {"pp": topo.pp_rank, "dp": topo.dp_rank, "tp": topo.tp_rank} if topo else
            {"pp": 0, "dp": 0, "tp": 0},
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


def _shape(layout: ParallelConfig | None) -> tuple[int, int, int]:
    """``(dp, tp, pp)``: layouts of one shape share a launch (and its process groups)."""
    return (1, 1, 1) if layout is None else (layout.dp, layout.tp, layout.pp)


def measure_layouts(model_cfg: ModelConfig, train_cfg: TrainConfig, layouts: Sequence[ParallelConfig | None],
                    steps: int = 2, warmup: int = 1, text: str | None = None, cache_dir: str | None = None,
                    timeout: float = 600.0) -> list[dict[str, Any]]:
    """Train each layout with the real `Trainer`: `warmup` steps, then `steps` pairs of one plain
    and one instrumented step (alternating, so that the instrumentation's cost is measured too).

    Layouts with the same ``dp x tp x pp`` share one `run_local` launch (one process group,
    one `Trainer` after another); ``None`` is the plain single-process trainer (one forked
    process). Returns, per layout, ``{"name", "layout", "ranks": [...]}`` where each rank
    reports ``step_s`` (instrumented steps), ``plain_step_s``, ``comm`` (the last step's
    collectives by kind and group: ``{kind, ranks, calls, bytes, wire_bytes}``), ``records``
    (the last step's collectives, one dict per call), ``timeline`` (its events of the last
    step), ``memory`` (`memory_report`), ``device`` (the GPU's name or "cpu"),
    ``tokens_per_step``, ``flops_per_token`` (the model's, for training) and ``losses`` (all
    ``warmup + 2 steps`` of them); or ``{"name", "layout", "error"}`` if the layout could not
    be built. Chapter 6 of the book plots them.
    """
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    groups: dict[tuple[int, int, int], list[int]] = {}  # (dp, tp, pp) -> indices into layouts
    for index, layout in enumerate(layouts):
        groups.setdefault(_shape(layout), []).append(index)
    out: list[dict[str, Any]] = [{} for _ in layouts]
    for (dp, tp, pp), members in groups.items():
        dicts = [dataclasses.asdict(layouts[i]) if layouts[i] is not None else None for i in members]
        per_rank = run_local(dp * tp * pp, _measure_worker, model, train, dicts, steps, warmup, text,
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
