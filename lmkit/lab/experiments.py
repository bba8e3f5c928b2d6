"""The book's experiments as programs: ``python -m lmkit.lab.experiments chapter6 --out DIR``.

Chapter 6 (hybrid parallelism in practice) is one program: `run_chapter6` trains the chapter's
GPT (`CHAPTER6_MODEL` on `CHAPTER6_TEXT`) under every layout of `chapter6_layouts`, on both
engines, with `lmkit.lab.layouts`, moves a checkpoint between layouts, and writes what it
measured into a results folder; `load_results`, `summary_table`, `missing_layouts` and
`missing_notice` read a folder back, and `chapter6_command` is the torchrun launch that adds to
it. The notebook plots such a folder, made here (forked gloo processes) or on a GPU node
(torchrun); ``--help`` says what the program runs in each mode and what it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from lmkit import atomic
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.lab.layouts import (
    collective_dim,
    label,
    layout_losses,
    layout_name,
    max_relative_difference,
    measure_layouts,
    measure_on_rank,
    ranks_of,
    train_on_rank,
    wait_for_all_ranks,
)
from lmkit.options import HelpFormatter, Parser, UsageError, one_line_warnings
from lmkit.tokenizer import CharTokenizer

__all__ = [
    "wrap_command",
    "CHAPTER6_MODEL", "CHAPTER6_TEXT", "CHAPTER6_CP_LAYOUTS", "chapter6_model_config",
    "chapter6_train_config", "chapter6_layouts", "chapter6_checkpoint_plan", "run_chapter6",
    "load_results", "summary_table", "chapter6_command", "missing_layouts", "missing_notice",
    "build_parser", "main",
]


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
PROG = "python -m lmkit.lab.experiments"


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
    keeps one of each kind: ZeRO-1, native ZeRO-3, TP+SP, the four pipeline schedules, the 3-D
    layout and cp2. The native engine's ZB-V (two chunks per rank in a V, which `lmkit.costs` does
    not model) is loss-compared in ``tests/test_native_schedules.py``, not here.
    """
    P, pipe = ParallelConfig, {"microbatches": 4}
    lmkit_layouts = [
        P(dp=2), P(dp=2, zero=1), P(dp=2, zero=2), P(tp=2), P(tp=2, sequence_parallel=True),
        P(pp=2, schedule="gpipe", **pipe), P(pp=2, schedule="1f1b", **pipe),
        P(pp=2, schedule="interleaved", virtual_stages=2, **pipe), P(pp=2, schedule="zb-h1", **pipe),
        P(dp=2, tp=2, pp=2, zero=1, sequence_parallel=True, microbatches=2),
        *CHAPTER6_CP_LAYOUTS,
    ]
    native = [P(engine="native", **kw) for kw in (
        {"dp": 2}, {"dp": 2, "zero": 2}, {"dp": 2, "zero": 3},
        {"tp": 2}, {"tp": 2, "sequence_parallel": True},
        {"pp": 2, "schedule": "gpipe", **pipe}, {"pp": 2, "schedule": "1f1b", **pipe},
        {"pp": 2, "schedule": "interleaved", "virtual_stages": 2, **pipe},
        {"pp": 2, "schedule": "zb-h1", **pipe},
        {"dp": 2, "tp": 2, "pp": 2, "zero": 3, "sequence_parallel": True, "microbatches": 2})]
    if smoke:
        keep = {"dp2 zero1", "native dp2 zero3", "tp2 sp", "pp2 gpipe m4", "pp2 1f1b m4",
                "pp2 interleaved v2 m4", "pp2 zb-h1 m4", "dp2 zero1 x tp2 sp x pp2 1f1b m2", "cp2"}
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


def _slug(name: str) -> str:
    return "-".join(name.replace(" x ", " ").split())


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
        rank["comm"] = [{**c, "dim": collective_dim(c, layout)} for c in rank["comm"]]
        rank["records"] = [{**r, "dim": collective_dim(r, layout)} for r in rank["records"]]
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
    one `measure_on_rank` call, which builds each layout's process groups once."""
    dicts = [dataclasses.asdict(layout) if layout is not None else None for layout in layouts]
    mine = measure_on_rank(model, train, dicts, steps, warmup, CHAPTER6_TEXT, cache_dir)
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
    again = f"-m lmkit.lab.experiments chapter6 --out {out}" + (" --smoke" if smoke else "")
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
        wait_for_all_ranks()
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
        "version": RESULTS_VERSION, "program": "python -m lmkit.lab.experiments chapter6", **setting,
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
        wait_for_all_ranks()
        saved = train_on_rank(model, train, dataclasses.asdict(first), CHAPTER6_TEXT, half, cache, save=True)
        moved = train_on_rank(model, train, dataclasses.asdict(second), CHAPTER6_TEXT, steps - half, cache,
                              resume=saved["checkpoint"])
    single = train_on_rank(model, train, None, CHAPTER6_TEXT, steps - half, cache, resume=saved["checkpoint"])
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
                                f"python -m lmkit.lab.experiments chapter6 --out {folder}")
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


def wrap_command(command: str | Sequence[str], width: int = 88, indent: str = "    ") -> str:
    """A shell command as lines of at most `width` characters, joined by `` \\`` continuations (so
    that it still pastes into a shell), words never broken; for pages whose text column is narrow."""
    split = command.split() if isinstance(command, str) else list(command)
    words: list[str] = []  # a flag and its value stay on one line
    for word in split:
        if words and words[-1].startswith("--") and "=" not in words[-1] and " " not in words[-1] \
                and not word.startswith("-"):
            words[-1] += " " + word
        else:
            words.append(word)
    lines: list[str] = []
    for word in words:
        prefix = indent if lines else ""
        if lines and len(lines[-1]) + 1 + len(word) + 2 <= width:
            lines[-1] += " " + word
        else:
            lines.append(prefix + word)
    return " \\\n".join(lines)


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
    return (f"torchrun --standalone --nproc_per_node={world} -m lmkit.lab.experiments chapter6 --out {folder}"
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
            missing.setdefault(ranks_of(layout), []).append(label(layout))
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
  under torchrun     (WORLD_SIZE set) runs the layouts whose dp*cp*tp*pp equals the launched
                     world, on the real devices (NCCL on GPUs, gloo on CPUs); rank 0 also runs
                     the single-process reference on its device, and all ranks the checkpoint
                     experiment (below). Layouts of other sizes are listed as skipped in
                     manifest.json with their command: the chapter's layouts have 1, 2, 4 and
                     8 ranks, so on a node of 8 GPUs run it three times into the same --out,
                     with N = 2, 4 and 8:
                       torchrun --standalone --nproc_per_node=N -m lmkit.lab.experiments chapter6 --out OUT
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


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (`lmkit.options.HelpFormatter`); the description and the epilog as written."""


def build_parser() -> argparse.ArgumentParser:
    """``python -m lmkit.lab.experiments chapter6 ...`` (the book's chapter 6 as one program)."""
    parser = Parser(prog=PROG, description="The book's experiments as programs; each command's --help "
                                           "says what it runs and writes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    ch6 = sub.add_parser("chapter6", help="every layout of chapter 6: loss curves, bytes, timelines, memory",
                         description="Chapter 6 (hybrid parallelism in practice): train the chapter's GPT\n"
                                     "under every layout of both engines and write the measurements.",
                         epilog=_EPILOG, formatter_class=_Formatter)
    ch6.add_argument("--out", required=True,
                     help="results folder (created; earlier results of the same model, optimisation and "
                          "steps are kept, others replaced)")
    ch6.add_argument("--smoke", action="store_true",
                     help=f"a reduced set of layouts and {CHAPTER6_SMOKE_STEPS} steps (the notebook's SMOKE)")
    ch6.add_argument("--steps", type=int, default=None,
                     help=f"optimizer steps per layout (default: {CHAPTER6_STEPS}, {CHAPTER6_SMOKE_STEPS} "
                          "with --smoke)")
    ch6.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ch6.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a forked launch")
    ch6.add_argument("--list", action="store_true", help="print the layouts and their ranks, run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lmkit.lab.experiments``; returns the exit status (2 for bad input)."""
    try:
        with one_line_warnings():
            return _run(build_parser().parse_args(argv))
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    """``chapter6``: its options checked (one line each), then the layouts listed or run."""
    out, what = Path(args.out), f"{PROG} chapter6"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what}: --out {out} is a file, not a folder")
    if args.steps is not None and args.steps < 6:
        raise UsageError(f"{what}: --steps must be at least 6")
    if args.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"{what}: --device {args.device!r}: use auto, cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{what}: --device cuda but CUDA is not available here; use auto or cpu")
    world = _env_world()
    if world is not None and world not in CHAPTER6_WORLDS:
        worlds = ", ".join(map(str, CHAPTER6_WORLDS))
        raise UsageError(f"{what}: launched with {world} processes; the chapter's layouts have {worlds} "
                         "ranks (torchrun --nproc_per_node=2, 4 or 8)")
    if args.list:
        for p in chapter6_layouts(args.smoke):
            print(f"{label(p):<40} {1 if p is None else p.world_size} rank(s)")
        return 0
    run_chapter6(out, smoke=args.smoke, steps=args.steps, device=args.device, timeout=args.timeout)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the ranks run functions of lmkit.lab.layouts, importable by name
    sys.exit(main())
