"""Parallel layouts measured: bytes per collective vs the formulas, pipeline idle vs the bubble formula,
step times (lmkit engine, and the native one when it is available).

    LMKIT_DATA=../shared/data .venv/bin/python benchmarks/parallel.py
    .venv/bin/python benchmarks/parallel.py --steps 5 --microbatches 4 8 16 32

One small GPT (4 layers, width 64, 4 heads, context 32, global batch 16, fp32, dropout 0) on
Tiny Shakespeare characters (vocabulary 66, divisible by tp=2) is trained with the real `Trainer`
under each layout, in gloo processes started by `lmkit.parallel.launch.run_local`, and observed
by `lmkit.parallel.instrument` (collectives counted at the c10d dispatcher, per-rank timelines).
Each layout runs ``--warmup`` steps, then ``--steps`` pairs of one plain and one instrumented
step; bytes and timelines come from the last instrumented step, times are medians.

Prints three tables (bytes, idle fraction, step time) and writes every layout's timeline of one
step to ``--timeline`` (JSON: layout name -> events) and a Gantt chart of four of them to
``--gantt``. On a CPU shared by several processes, times (and so idle fractions) are noisy:
``pp4`` puts 4 processes on however many cores the machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmkit import costs
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.lab.layouts import group_label, measure_layouts
from lmkit.parallel.instrument import bubble_formula, idle_fractions, peak_flops
from lmkit.run import prepare_run

ROOT = Path(__file__).resolve().parents[1]


def bytes_table(result: dict, model: costs.Model, batch: int, ranks: list[int]) -> list[list[str]]:
    """Measured bytes per (group, collective) of the given ranks next to `lmkit.costs.communication`.

    Collectives that no term of the cost model covers show up as 'other' rows (UNEXPLAINED).
    """
    pc = ParallelConfig(**result["layout"])
    layout = costs.Layout.from_parallel_config(pc)
    out = []
    for rank in ranks:
        info = result["ranks"][rank]
        got: dict[tuple[str, str], list[float]] = {}
        for r in info["records"]:
            if r["kind"] == "barrier":
                continue
            kind = r["kind"]
            group = "pp" if kind in ("send", "recv") else group_label(r["ranks"], pc)
            entry = got.setdefault((group, kind), [0, 0, 0.0])
            entry[0] += 1
            entry[1] += r["bytes"]
            entry[2] += r["wire_bytes"]
        predicted: dict[tuple[str, str], list] = {}
        for t in costs.communication(model, layout, batch, "fp32", info["coords"]["pp"]):
            group = "pp" if t.group == "embedding" and pc.pp == 2 else t.group
            entry = predicted.setdefault((group, t.kind), [0.0, []])
            entry[0] += t.bytes
            entry[1].append(t.what)
        for key in sorted(set(got) | set(predicted)):
            calls, measured, wire = got.get(key, [0, 0, 0.0])
            formula, what = predicted.get(key, [None, ["other (not in the cost model)"]])
            check = "UNEXPLAINED" if formula is None else ("exact" if measured == formula else "DIFFERS")
            textbook = ""
            if key[0] == "tp" and key[1] in ("all_reduce", "all_gather", "reduce_scatter") and formula:
                # Megatron's 4L activations per step (2 forward + 2 backward per layer)
                four_l = 4 * model.n_layer * 4 * batch * model.seq_len * model.d_model
                act = (4 * model.n_layer + 2) * 4 * batch * model.seq_len * model.d_model
                if measured >= act:
                    textbook = f"{four_l:,} ({act / four_l:.3f}x for the activations)"
            out.append([result["name"], str(rank), key[0], key[1], "; ".join(what), str(calls),
                        f"{measured:,}", "-" if formula is None else f"{formula:,.0f}", check, textbook,
                        f"{wire:,.0f}"])
    return out


def print_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """Print (and return) a Markdown table."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def native_available() -> tuple[bool, str]:
    try:
        import lmkit.parallel.native  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent or broken: both mean "not available"
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="measured (plain + instrumented) step pairs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1"])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--no-native", action="store_true", help="skip the native engine")
    parser.add_argument("--timeline", default="runs/parallel_timeline.json")
    parser.add_argument("--gantt", default="runs/parallel_gantt.png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only-pipeline", action="store_true", help="only the pipeline layouts (idle table)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if "LMKIT_DATA" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["LMKIT_DATA"] = str(ROOT.parent / "shared" / "data")

    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="lmkit-parallel-bench-")
    model_cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                            block_size=args.block_size, dropout=0.0)
    train_cfg = TrainConfig(corpus="tinyshakespeare", tokenizer="char", batch_size=args.batch_size,
                            max_steps=1000,
                            warmup_steps=10, eval_interval=0, seed=1337, device=args.device,
                            out_dir=str(Path(tmp) / "run"))
    run = prepare_run(model_cfg, train_cfg, cache_dir=Path(tmp) / "cache")  # also fills the token cache
    model = costs.Model.from_config(run.model_config)
    dims = {"params": costs.num_params(model), "n_layer": model.n_layer, "d_model": model.d_model,
            "block_size": model.seq_len, "vocab": model.vocab_size, "batch": train_cfg.batch_size}
    print(f"GPT: {dims['params']:,} parameters (P), L={dims['n_layer']}, h={dims['d_model']}, "
          f"s={dims['block_size']}, V={dims['vocab']}, global batch b={dims['batch']}, fp32; "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores\n", flush=True)

    main_layouts = [ParallelConfig(), ParallelConfig(dp=2), ParallelConfig(dp=2, zero=1),
                    ParallelConfig(dp=2, zero=2), ParallelConfig(tp=2),
                    ParallelConfig(tp=2, sequence_parallel=True)]
    if args.only_pipeline:
        main_layouts = []
    pipe_layouts = [ParallelConfig(pp=p, schedule=sch, microbatches=m)
                    for p in args.pp for sch in args.schedules for m in args.microbatches
                    if train_cfg.batch_size % m == 0 and not (sch == "1f1b" and m < p)]
    layouts = main_layouts + pipe_layouts
    results = measure_layouts(model_cfg, train_cfg, layouts, steps=args.steps, warmup=args.warmup,
                              cache_dir=str(Path(tmp) / "cache"))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"{r['name']}: FAILED: {r['error']}")
    ok = {r["name"]: r for r in results if "error" not in r}

    # ---------------------------------------------------------------- bytes vs formula
    rows = []
    bytes_names = [n for n in ok if ok[n]["layout"]["pp"] == 1 and n != "1 process"]
    bytes_names += [n for n in ok if ok[n]["layout"]["pp"] > 1 and ok[n]["layout"]["schedule"] == "1f1b"
                    and ok[n]["layout"]["microbatches"] == min(args.microbatches)]
    for name in bytes_names:
        world = len(ok[name]["ranks"])
        ranks = [0] if ok[name]["layout"]["pp"] == 1 else list(range(world))
        rows += bytes_table(ok[name], model, train_cfg.batch_size, ranks)
    header = ["layout", "rank", "group", "collective", "what (lmkit.costs terms)", "calls", "measured bytes",
              "lmkit.costs (bytes)", "check", "Megatron's 4L (measured/4L)", "wire bytes sent"]
    print_table("Bytes per collective in one step vs lmkit.costs (payload B as in nccl-tests; wire = ring)",
                header, rows)

    # ---------------------------------------------------------------- idle fraction vs formula
    rows = []
    for r in ok.values():
        lay = r["layout"]
        if lay["pp"] == 1:
            continue
        events = [e for rank in r["ranks"] for e in rank["timeline"]]
        idle = idle_fractions(events)
        per_rank = " ".join(f"{idle['idle'][k]:.2f}" for k in sorted(idle["idle"]))
        mean = {k: statistics.mean([e["end"] - e["start"] for e in events if e["kind"] == k] or [0.0])
                for k in ("forward", "backward", "weight")}  # the formula with this run's F, B, W times
        formula = bubble_formula(lay["pp"], lay["microbatches"], 1, lay["schedule"], mean["forward"],
                                 mean["backward"], mean["weight"])
        rows.append([str(lay["pp"]), lay["schedule"], str(lay["microbatches"]), f"{formula:.3f}",
                     f"{idle['mean_idle']:.3f}", per_rank,
                     " ".join(f"{1e3 * mean[k]:.1f}" for k in ("forward", "backward", "weight")),
                     f"{idle['span_s'] * 1e3:.1f}"])
    print_table("Pipeline idle fraction (1 - busy / fill-to-flush span) vs the schedule's bubble "
                "(lmkit.costs.bubble_fraction with the measured F, B, W times)",
                ["pp", "schedule", "m", "formula", "measured (mean)", "per rank", "F B W ms", "span ms"],
                rows)

    # ---------------------------------------------------------------- step times
    native_ok, why = native_available()
    if args.no_native or args.only_pipeline:
        native_ok, why = False, "skipped (--no-native / --only-pipeline)"
    native: dict[str, dict] = {}
    if native_ok:
        native_layouts = [ParallelConfig(engine="native", **kw) for kw in (
            {"dp": 2}, {"dp": 2, "zero": 3}, {"tp": 2}, {"tp": 2, "sequence_parallel": True},
            {"pp": 2, "microbatches": 4}, {"pp": 4, "microbatches": 4})]
        try:
            for r in measure_layouts(model_cfg, train_cfg, native_layouts, steps=args.steps,
                                     warmup=args.warmup, cache_dir=str(Path(tmp) / "cache"), timeout=180):
                native["native " + r["name"]] = r
        except Exception as e:  # noqa: BLE001 - report and go on with the lmkit numbers
            why = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
            native_ok = False
    peak = peak_flops(args.device if args.device != "auto" else None, train_cfg.dtype)

    def time_row(name: str, r: dict) -> list[str]:
        rank0 = r["ranks"][0]
        plain = statistics.median(rank0["plain_step_s"])
        step = statistics.median(rank0["step_s"])
        book = statistics.median(rank0["counter_overhead_s"])
        world = len(r["ranks"])
        tps = rank0["tokens_per_step"] / plain
        util = None if peak is None else costs.mfu(tps, rank0["flops_per_token"], world, peak)
        mem = max(x["memory"]["total_bytes"] for x in r["ranks"])
        return [name, str(world), f"{plain * 1e3:.1f}", f"{step * 1e3:.1f}", f"{book * 1e3:.2f}",
                f"{tps:,.0f}", "n/a (CPU)" if util is None else f"{util:.1%}", f"{mem / 2**20:.2f}"]

    rows = [time_row(name, r) for name, r in ok.items()]
    rows += [time_row(name, r) for name, r in native.items() if "error" not in r]
    rows += [[name, "-", "failed: " + r["error"][:70], "", "", "", "", ""] for name, r in native.items()
             if "error" in r]
    print_table("Step time (median over steps, rank 0): plain, and with the instrumentation on",
                ["layout", "ranks", "step ms", "instrumented ms", "counter bookkeeping ms", "tokens/s", "MFU",
                 "max MiB/rank (p+g+opt)"], rows)
    if not native_ok:
        print(f"native engine not available ({why})\n")
    else:
        rows = []
        for name, r in native.items():
            if "error" in r:
                continue
            for c in r["ranks"][0]["comm"]:
                if c["kind"] != "barrier":
                    rows.append([name, c["kind"], str(c["ranks"]), str(c["calls"]), f"{c['bytes']:,}",
                                 f"{c['wire_bytes']:,.0f}"])
        print_table("native engine: collectives of rank 0 in one step (same counter)",
                    ["layout", "collective", "group", "calls", "bytes", "wire bytes sent"], rows)

    # ---------------------------------------------------------------- timelines and Gantt chart
    timeline = {name: [e for rank in r["ranks"] for e in rank["timeline"]]
                for name, r in {**ok, **native}.items() if "error" not in r}
    path = Path(args.timeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": dims, "layouts": timeline}, indent=None))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmkit.lab.plots import gantt

    m_show = 8 if 8 in args.microbatches else args.microbatches[0]
    wanted = ["dp2", "tp2 sp", f"pp2 gpipe m{m_show}", f"pp2 1f1b m{m_show}", f"pp4 1f1b m{m_show}"]
    shown = [n for n in wanted if n in timeline]
    heights = [max(len(ok[n]["ranks"]), 2) * 0.55 + 0.9 for n in shown]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, name in zip(axes[:, 0], shown, strict=True):
        gantt(timeline[name], ax=ax, title=f"{name}: one training step")
    fig.tight_layout()
    Path(args.gantt).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.gantt, dpi=120)
    print(f"timelines: {path}; Gantt chart: {args.gantt}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
