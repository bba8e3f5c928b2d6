"""Loss-compare: run the same training under several layouts and put the loss curves side by side.

This is torchtitan's and picotron's proof of correctness for parallelism: with a fixed seed,
fp32 and the same global batch, every layout must reproduce the single-process loss curve (the
book's tests demand agreement to 1e-5 relative for 10 steps). The tests, the hybrid-parallel
chapter and the benchmarks all call `layout_losses`.

Layouts are started with `lmkit.parallel.launch.run_local` (gloo processes forked from a
process that already imported torch); the processes run the real engine through the real
`Trainer`, exactly as ``torchrun -m lmkit.train`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict

__all__ = ["layout_losses", "layout_name", "max_relative_difference"]


def layout_name(p: ParallelConfig) -> str:
    """Short label such as ``dp2 zero1``, ``tp2 sp``, ``pp2 1f1b m4`` or ``1 process``."""
    parts = []
    if p.dp > 1:
        parts.append(f"dp{p.dp}" + (f" zero{p.zero}" if p.zero else ""))
    if p.tp > 1:
        parts.append(f"tp{p.tp}" + (" sp" if p.sequence_parallel else ""))
    if p.pp > 1:
        sched = p.schedule + (f" v{p.virtual_stages}" if p.schedule == "interleaved" else "")
        parts.append(f"pp{p.pp} {sched} m{p.microbatches}")
    return " x ".join(parts) or "1 process"


def _train_worker(model: dict, train: dict, parallel: dict | None, text: str | None, steps: int,
                  cache_dir: str | None, resume: str | None = None, save: bool = False) -> dict[str, Any]:
    from pathlib import Path

    from lmkit.parallel.mesh import init_topology
    from lmkit.train import Trainer, prepare_run

    mc, tc = ModelConfig(**model), TrainConfig(**train)
    pc = ParallelConfig(**parallel) if parallel else None
    topology = init_topology(pc, tc.device) if pc is not None else None
    run = prepare_run(mc, tc, text=text, cache_dir=Path(cache_dir) if cache_dir else None)
    trainer = Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      tokenizer=run.tokenizer, parallel=pc, topology=topology)
    run.model = None
    if resume:
        trainer.resume(resume)
    losses, norms = [], []
    for _ in range(steps):
        stats = trainer.train_step()
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
    saved = str(trainer.save()) if save else None
    val = trainer.evaluate(2)["val_loss"]
    return {"losses": losses, "grad_norms": norms, "val": val, "checkpoint": saved}


def layout_losses(model_cfg: ModelConfig, train_cfg: TrainConfig, parallel_cfg: ParallelConfig | None,
                  steps: int, text: str | None = None, cache_dir: str | None = None,
                  timeout: float = 600.0, resume: str | None = None, save: bool = False) -> dict[str, Any]:
    """Train `steps` optimizer steps under a layout; returns rank 0's losses and gradient norms.

    ``parallel_cfg=None`` is the single-process reference, run in this process. `resume` starts
    from a checkpoint (saved under any layout); `save` writes one into ``train_cfg.out_dir`` at
    the end (its path is returned as ``"checkpoint"``).
    """
    model, train = to_dict(model_cfg), to_dict(train_cfg)
    if parallel_cfg is None:
        return _train_worker(model, train, None, text, steps, cache_dir, resume, save)
    from lmkit.parallel.launch import run_local

    layout = dataclasses.asdict(parallel_cfg)
    results = run_local(parallel_cfg.world_size, _train_worker, model, train, layout, text, steps, cache_dir,
                        resume, save, timeout=timeout)
    first = results[0]
    for rank, other in enumerate(results[1:], start=1):  # every rank reports the same loss
        if other["losses"] != first["losses"]:
            raise AssertionError(f"rank {rank} reports losses {other['losses']} but rank 0 {first['losses']}")
    return first


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """max_i |a_i - b_i| / |b_i| (the loss-compare criterion)."""
    if len(a) != len(b):
        raise ValueError(f"curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))
