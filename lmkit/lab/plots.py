"""Matplotlib helpers shared by the notebooks: every plot has labelled axes and a title."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

__all__ = ["perplexity_by_order"]


def perplexity_by_order(orders: Sequence[int], train_ppl: Sequence[float], val_ppl: Sequence[float],
                        title: str = "n-gram perplexity by order"):
    """Line plot of train and validation perplexity against the n-gram order (log y axis)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(orders, train_ppl, "o-", label="train")
    ax.plot(orders, val_ppl, "s-", label="validation")
    for n, p in zip(orders, val_ppl, strict=True):
        ax.annotate(f"{p:.0f}", (n, p), textcoords="offset points", xytext=(0, 7), ha="center")
    ax.set_yscale("log")
    ax.set_xticks(list(orders))
    ax.set_xlabel("order n (words of context + 1)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- parallel timelines

__all__ += ["gantt", "TIMELINE_COLOURS", "COMPUTE_LANE"]

#: One colour per event kind of `lmkit.parallel.instrument.Timeline`.
TIMELINE_COLOURS = {
    "forward": "#4C72B0", "backward": "#DD8452", "weight": "#F2C45A", "send": "#55A868", "recv": "#8FD19E",
    "all_reduce": "#C44E52", "all_gather": "#8172B3", "reduce_scatter": "#937860",
    "broadcast": "#DA8BC3", "reduce": "#8C8C8C", "all_to_all": "#CCB974",
    "ring_forward": "#4C72B0", "ring_backward": "#DD8452", "ring_wait": "#C44E52",
    "kv_transfer": "#55A868", "dkv_transfer": "#8172B3",
}
#: Kinds drawn in the upper (compute) part of a rank's row: what the rank itself is doing, including
#: ring attention's waits for a transfer that has not arrived.
COMPUTE_LANE = ("forward", "backward", "weight", "ring_forward", "ring_backward", "ring_wait")


def gantt(timeline, ax=None, step: int | None = None, title: str = "Per-rank timeline of one training step",
          label_microbatches: bool = True, label: str = "microbatch",
          xlabel: str = "time since the step started (ms)", legend: bool = True, fontsize: float = 10):
    """Gantt chart of a step: one row per rank, one colour per event kind.

    `timeline`: a `Timeline`, a list of event dicts (any number of ranks) or the path of a JSON
    lines file (`Timeline.to_jsonl`). `step`: which step (default: the last one present).
    Compute bars (`COMPUTE_LANE`: forward, backward, ring attention's steps and waits) fill the
    upper part of a rank's row, labelled with their `label` field (the microbatch, or e.g.
    ``"ring_step"``); communication (send, recv, collectives, K/V blocks in flight, which may
    overlap computation) is drawn in the lower part. `legend`: a legend outside the axes, on the
    right (pass False and call `timeline_legend` once for a figure of several charts). `fontsize`
    (points, at least 9 for a printed page) sizes the bar labels, ticks and legend. Returns the figure.
    """
    from pathlib import Path

    if isinstance(timeline, (str, Path)):
        from lmkit.parallel.instrument import read_jsonl

        timeline = read_jsonl(timeline)
    events = list(getattr(timeline, "events", timeline))
    if not events:
        raise ValueError("gantt() needs at least one event")
    step = max(e.get("step", 0) for e in events) if step is None else step
    events = [e for e in events if e.get("step", 0) == step]
    ranks = sorted({e["rank"] for e in events})
    row = {r: i for i, r in enumerate(ranks)}
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 0.7 + 0.55 * len(ranks)))
    else:
        fig = ax.figure
    span = max(e["end"] for e in events) - min(e["start"] for e in events) or 1.0
    seen = []
    for e in events:
        kind = e["kind"]
        compute = kind in COMPUTE_LANE
        y, h = (row[e["rank"]] - 0.4, 0.55) if compute else (row[e["rank"]] + 0.18, 0.22)
        start, width = e["start"] * 1e3, max(e["end"] - e["start"], 0.0) * 1e3
        colour = TIMELINE_COLOURS.get(kind, "#BBBBBB")
        ax.broken_barh([(start, width)], (y, h), facecolors=colour, edgecolor="white", linewidth=0.3,
                       label=kind if kind not in seen else None)
        if kind not in seen:
            seen.append(kind)
        if compute and label_microbatches and e.get(label, -1) >= 0 and width > span * 1e3 / 60:
            ax.text(start + width / 2, y + h / 2, str(e[label]), ha="center", va="center",
                    fontsize=fontsize - 1, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks], fontsize=fontsize)
    ax.tick_params(axis="x", labelsize=fontsize)
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlabel(xlabel, fontsize=fontsize)
    ax.set_ylabel("rank", fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 1)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=fontsize, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    if legend:
        fig.tight_layout()
    return fig


__all__ += ["timeline_legend", "rank_groups"]


def timeline_legend(fig, kinds, fontsize: float = 10, ncol: int | None = None):
    """One legend for a figure of `gantt` charts drawn with ``legend=False``: an entry per event
    kind in `kinds`, in one row below the charts (call after ``tight_layout``, which it adjusts)."""
    import math

    from matplotlib.patches import Patch

    handles = [Patch(facecolor=TIMELINE_COLOURS.get(k, "#BBBBBB"), label=k.replace("_", " ")) for k in kinds]
    ncol = ncol or len(handles)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=fontsize,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    rows = math.ceil(len(handles) / ncol)  # each row of entries takes about 2.2 font heights
    bottom = min(0.4, (0.1 + rows * 2.2 * fontsize / 72) / fig.get_figheight())
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


#: Colours of the groups of one dimension (up to 8 groups; more repeat).
GROUP_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974")


def rank_groups(layout, groups: dict[str, list[list[int]]], dims=("tp", "dp", "pp"), fontsize: float = 10):
    """How the ranks of `layout` fall into the groups of each dimension: one panel per dimension of
    `dims`, every rank a square at (pipeline stage, data-parallel row, tensor/context column), coloured
    by its group of that dimension (`groups`: `lmkit.lab.layouts.layout_groups`). Returns the figure."""
    from lmkit.parallel.mesh import coords_of, cp_rank_of

    width = layout.cp * layout.tp  # columns of one stage: cp blocks of tp ranks
    fig, axes = plt.subplots(1, len(dims), figsize=(min(9.0, 3.0 * len(dims)), 0.9 + 0.75 * layout.dp),
                             squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        member = {r: k for k, g in enumerate(groups[dim]) for r in g}
        for r in range(layout.world_size):
            pp, dp, tp = coords_of(r, layout.dp, layout.tp, layout.cp)
            x = pp * (width + 0.6) + cp_rank_of(r, layout.tp, layout.cp) * layout.tp + tp
            colour = GROUP_COLOURS[member[r] % len(GROUP_COLOURS)]
            ax.add_patch(plt.Rectangle((x + 0.05, dp + 0.05), 0.9, 0.9, facecolor=colour, edgecolor="white"))
            ax.text(x + 0.5, dp + 0.5, str(r), ha="center", va="center", color="white", fontsize=fontsize + 1,
                    fontweight="bold")
        for stage in range(layout.pp):
            ax.text(stage * (width + 0.6) + width / 2, -0.15, f"stage {stage}", ha="center", va="bottom",
                    fontsize=fontsize)
        ax.set_xlim(-0.1, layout.pp * (width + 0.6) - 0.5)
        ax.set_ylim(layout.dp + 0.1, -0.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([d + 0.5 for d in range(layout.dp)])
        ax.set_yticklabels([f"dp {d}" for d in range(layout.dp)], fontsize=fontsize)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        ax.tick_params(length=0)
        ax.set_title(f"{len(groups[dim])} {dim} groups of {len(groups[dim][0])}", fontsize=fontsize + 1)
    fig.tight_layout()
    return fig
