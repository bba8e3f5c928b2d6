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
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.experiments import measure_layouts
from lmkit.parallel.instrument import bubble_formula, idle_fractions, mfu, peak_flops
from lmkit.train import prepare_run

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One term of a formula: the collectives of `kind` whose per-call size passes `match`."""

    what: str
    kind: str
    match: Callable[[int], bool]
    formula: str
    bytes: int
    calls: int | None = None
    textbook: int | None = None  # the simple textbook number, where it differs from the exact one


def _any(_n: int) -> bool:
    return True


def _eq(value: int) -> Callable[[int], bool]:
    return lambda n: n == value


def formula_rows(layout, rank: int, dims: dict) -> list[Row]:
    """The collectives one rank issues in one step, term by term (fp32: 4 bytes per element)."""
    L, h, s, V, b = dims["n_layer"], dims["d_model"], dims["block_size"], dims["vocab"], dims["batch"]
    P, Ppad = dims["params"], dims["params_padded"]
    rows: list[Row] = []
    if layout.pp == 1 and layout.tp == 1 and layout.dp > 1:
        if layout.zero == 2:
            rows.append(Row("gradients reduced to their owner (a reduce-scatter)", "reduce", _any,
                            "4 P", 4 * P, textbook=4 * P))
            rows.append(Row("gradient norm^2 over dp (fp32)", "all_reduce", _eq(4), "4", 4, 1))
        else:
            rows.append(Row("gradient all-reduce (buckets)", "all_reduce", lambda n: n > 8, "4 P", 4 * P,
                            textbook=4 * P))
        if layout.zero:
            rows.append(Row("updated parameters all-gathered", "all_gather", _any, "4 P (padded to dp)",
                            4 * Ppad, 2))
        rows.append(Row("loss mean over dp (fp64)", "all_reduce", _eq(8), "8", 8, 1))
    elif layout.tp > 1 and layout.pp == 1 and layout.dp == 1:
        A = 4 * b * s * h
        if layout.sequence_parallel:
            for kind in ("all_gather", "reduce_scatter"):
                rows.append(Row(f"activations: {kind} (2 per block fwd + 2 bwd, embedding, head)", kind,
                                _eq(A), "(4L+2) 4bsh", (4 * L + 2) * A, 4 * L + 2, textbook=4 * L * A))
            rows.append(Row("SP-replicated grads (LayerNorms, pos-emb, row biases)", "all_reduce",
                            _eq(4 * dims["sp_grads"]), "4 (6Lh + 2h + sh)", 4 * dims["sp_grads"], 1))
        else:
            rows.append(Row("activations: 2 per block fwd + 2 bwd, embedding fwd, head bwd", "all_reduce",
                            _eq(A), "(4L+2) 4bsh", (4 * L + 2) * A, 4 * L + 2, textbook=4 * L * A))
        rows.append(Row("vocab-parallel CE: max", "all_reduce", _eq(4 * b * s), "4 bs", 4 * b * s, 1))
        rows.append(Row("vocab-parallel CE: exp-sum, target logit", "all_reduce", _eq(8 * b * s), "8 bs",
                        8 * b * s, 1))
        rows.append(Row("gradient norm^2 over tp (fp64)", "all_reduce", _eq(8), "8", 8, 1))
    elif layout.pp > 1 and layout.tp == 1 and layout.dp == 1:
        p, m = layout.pp, layout.microbatches
        act = 4 * (b // m) * s * h
        ends = int(rank == 0) + int(rank == p - 1)
        n = 2 * m - ends * m  # rank 0 sends activations, the last rank gradients, the others both
        what = {0: "activations", p - 1: "gradients"}.get(rank, "activations and gradients")
        rows.append(Row(f"send: {what}, 1 per microbatch per boundary", "send", _any,
                        f"{n // m} m 4(b/m)sh", n * act, n))
        rows.append(Row("recv (the mirror image)", "recv", _any, f"{n // m} m 4(b/m)sh", n * act, n))
        if ends:
            rows.append(Row("tied embedding grads, first + last stage", "all_reduce", _eq(4 * V * h), "4 Vh",
                            4 * V * h, 1))
        rows.append(Row("gradient norm^2 over pp (fp64)", "all_reduce", _eq(8), "8", 8, 1))
        rows.append(Row("loss broadcast from the last stage (fp64)", "broadcast", _eq(8), "8", 8, 1))
    return rows


def bytes_table(result: dict, dims: dict, ranks: list[int]) -> list[list[str]]:
    """Measured vs formula for the given ranks; unmatched collectives show up as 'other'."""
    layout = ParallelConfig(**result["layout"])
    out = []
    for rank in ranks:
        records = [dict(r, used=False) for r in result["ranks"][rank]["records"] if r["kind"] != "barrier"]
        rows = formula_rows(layout, rank, dims)
        for row in rows:
            hit = [r for r in records if not r["used"] and r["kind"] == row.kind and row.match(r["bytes"])]
            for r in hit:
                r["used"] = True
            got, wire = sum(r["bytes"] for r in hit), sum(r["wire_bytes"] for r in hit)
            same = got == row.bytes and (row.calls is None or len(hit) == row.calls)
            exact = "exact" if same else "DIFFERS"
            textbook = ""
            if row.textbook is not None:
                textbook = f"{row.textbook:,} ({got / row.textbook:.3f}x)"
            out.append([result["name"], str(rank), row.kind, row.what, str(len(hit)), f"{got:,}",
                        f"{row.formula} = {row.bytes:,}", exact, textbook, f"{wire:,.0f}"])
        for kind in sorted({r["kind"] for r in records if not r["used"]}):
            left = [r for r in records if not r["used"] and r["kind"] == kind]
            out.append([result["name"], str(rank), kind, "other (not in the formula)", str(len(left)),
                        f"{sum(r['bytes'] for r in left):,}", "-", "UNEXPLAINED", "",
                        f"{sum(r['wire_bytes'] for r in left):,.0f}"])
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


def model_dims(model, batch: int) -> dict:
    """Sizes the formulas need, read off the full single-process model."""
    cfg = model.config
    params = list(model.parameters())  # the tied head counted once
    decay = sum(p.numel() for p in params if p.dim() >= 2)
    no_decay = sum(p.numel() for p in params if p.dim() < 2)
    pad = sum(math.ceil(n / 2) * 2 for n in (decay, no_decay))  # ZeRO shards each group over dp=2
    sp = sum(p.numel() for n, p in model.named_parameters()
             if ".ln1." in n or ".ln2." in n or n.startswith("ln_f.") or n == "pos_emb.weight"
             or n.endswith("attn.proj.bias") or n.endswith("mlp.proj.bias"))
    return {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "block_size": cfg.block_size,
            "vocab": cfg.vocab_size, "batch": batch, "params": decay + no_decay, "params_padded": pad,
            "sp_grads": sp}


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
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
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
    dims = model_dims(run.model, train_cfg.batch_size)
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
        rows += bytes_table(ok[name], dims, ranks)
    header = ["layout", "rank", "collective", "what", "calls", "measured bytes", "formula (bytes)", "check",
              "textbook (measured/textbook)", "wire bytes sent"]
    print_table("Bytes per collective in one step (payload B as in nccl-tests; wire = ring formulas)",
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
        rows.append([str(lay["pp"]), lay["schedule"], str(lay["microbatches"]),
                     f"{bubble_formula(lay['pp'], lay['microbatches']):.3f}", f"{idle['mean_idle']:.3f}",
                     per_rank, f"{idle['span_s'] * 1e3:.1f}"])
    print_table("Pipeline idle fraction (1 - busy / fill-to-flush span) vs (p-1)/(m+p-1)",
                ["pp", "schedule", "m", "formula", "measured (mean)", "per rank", "span ms"], rows)

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
        util = mfu(tps, rank0["flops_per_token"], world, peak)
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

    from lmkit.plots import gantt

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
