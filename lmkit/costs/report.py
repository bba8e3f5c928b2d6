"""``lmkit estimate``'s report: the ranked layouts as rows and as the printed table (chapter 5).

`estimate_rows` turns `search`'s candidates into plain rows (what ``--json`` prints) and
`estimate_lines` into the header line, the table and its notes; for a model with experts they add
the active parameters, the expert parameters each rank holds and the bytes of its all-to-alls.
Pure Python, like all of `lmkit.costs`.
"""

from __future__ import annotations

from typing import Any

from lmkit.costs.calculator import SELECTIVE_UNDER_FLASH, format_bytes
from lmkit.costs.experts import all_to_all_bytes
from lmkit.costs.model import GB, Model, active_params, flops_per_token, mfu, num_params
from lmkit.costs.search import Candidate, Cluster

__all__ = ["estimate_rows", "estimate_lines", "routed_tokens"]


def routed_tokens(model: Model, candidate: Candidate) -> int:
    """Tokens one rank routes per MoE layer and microbatch: ``b s / cp``, over tp under sequence
    parallelism (each tp rank routes its own chunk)."""
    layout = candidate.layout
    b = candidate.tokens_per_step // model.seq_len // (layout.dp * layout.microbatches)
    return b * model.seq_len // layout.cp // (layout.tp if layout.sequence_parallel else 1)


def estimate_rows(found: list[Candidate], model: Model, cluster: Cluster, precision: str = "mixed",
                  imbalance: float = 1.0) -> list[dict[str, Any]]:
    """One row per candidate: memory (GB), step time by component (s), tokens/s, MFU; with experts
    also the expert parameters per rank and the all-to-all bytes per MoE layer and microbatch."""
    flops = flops_per_token(model)
    rows = []
    for c in found:
        row = {"layout": c.layout.name, "gb_per_device": c.memory.total / GB,
               "states_gb": c.memory.model_states / GB, "activations_gb": c.memory.activations / GB,
               "step_s": c.step_s, "compute_s": c.compute_s, "bubble_s": c.bubble_s,
               "comm_s": c.tp_s + c.pp_s + c.dp_exposed_s + c.cp_exposed_s + c.ep_s,
               "tokens_per_s": c.tokens_per_s,
               "mfu": mfu(c.tokens_per_s, flops, cluster.devices, cluster.peak_flops)}
        if model.n_experts:
            a2a = all_to_all_bytes(model, c.layout, routed_tokens(model, c), imbalance,
                                   4 if precision == "fp32" else 2)
            row.update({"ep": c.layout.ep, "expert_params_per_rank": c.memory.expert_numel,
                        "all_to_all_bytes": a2a["total"], "ep_s": c.ep_s})
        rows.append(row)
    return rows


def estimate_lines(rows: list[dict[str, Any]], model: Model, cluster: Cluster, global_batch: int,
                   precision: str, reduce: str, efficiency: float, fit: int,
                   imbalance: float = 1.0) -> list[str]:
    """The header line, the table of `rows` (``fit`` layouts fit in all) and its notes, as printed."""
    out = [f"{model.name or 'model'}: {num_params(model) / 1e9:.2f}B parameters, {cluster.devices} x "
           f"{cluster.name} ({cluster.device_memory_gb:g} GB, {cluster.peak_flops / 1e12:g} TFLOP/s), "
           f"global batch {global_batch} x {model.seq_len} tokens, {precision} precision"
           f"{f' ({reduce} gradients)' if precision == 'mixed' else ''}, "
           f"compute at {efficiency:.0%} of peak; {fit:,} layouts fit, the {len(rows)} fastest:"]
    experts = bool(model.n_experts)
    header = ["layout", "GB/device", "states", "activ.", "step s", "compute", "bubble", "comm", "tokens/s",
              "MFU"] + (["experts/rank", "all-to-all"] if experts else [])
    table = [[r["layout"], f"{r['gb_per_device']:.1f}", f"{r['states_gb']:.1f}", f"{r['activations_gb']:.1f}",
              f"{r['step_s']:.2f}", f"{r['compute_s']:.2f}", f"{r['bubble_s']:.2f}", f"{r['comm_s']:.2f}",
              f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}"]
             + ([f"{r['expert_params_per_rank'] / 1e9:.2f}B", format_bytes(r["all_to_all_bytes"])]
                if experts else []) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    for line in [header, ["-" * w for w in widths], *table]:
        out.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                             for i, (x, w) in enumerate(zip(line, widths, strict=True))))
    if experts:
        out.append(f"(experts: {model.n_experts} of width {model.expert_width}, top-{model.moe_top_k}, in "
                   f"{model.moe_blocks} of {model.n_layer} blocks: {active_params(model) / 1e9:.2f}B active "
                   "parameters; experts/rank: the expert parameters one rank holds;")
        out.append(" all-to-all: bytes one rank sends per MoE layer and microbatch, dispatch + combine, "
                   f"forward + backward, at load imbalance {imbalance:g})")
    out.append(f"(flash attention; {SELECTIVE_UNDER_FLASH}, so no layout lists it)")
    return out
