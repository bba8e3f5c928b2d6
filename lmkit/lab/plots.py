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
    "forward": "#4C72B0", "backward": "#DD8452", "send": "#55A868", "recv": "#8FD19E",
    "all_reduce": "#C44E52", "all_gather": "#8172B3", "reduce_scatter": "#937860",
    "broadcast": "#DA8BC3", "reduce": "#8C8C8C", "all_to_all": "#CCB974",
    "ring_forward": "#4C72B0", "ring_backward": "#DD8452", "ring_wait": "#C44E52",
    "kv_transfer": "#55A868", "dkv_transfer": "#8172B3",
}
#: Kinds drawn in the upper (compute) part of a rank's row: what the rank itself is doing, including
#: ring attention's waits for a transfer that has not arrived.
COMPUTE_LANE = ("forward", "backward", "ring_forward", "ring_backward", "ring_wait")


def gantt(timeline, ax=None, step: int | None = None, title: str = "Per-rank timeline of one training step",
          label_microbatches: bool = True, label: str = "microbatch",
          xlabel: str = "time since the step started (ms)"):
    """Gantt chart of a step: one row per rank, one colour per event kind.

    `timeline`: a `Timeline`, a list of event dicts (any number of ranks) or the path of a JSON
    lines file (`Timeline.to_jsonl`). `step`: which step (default: the last one present).
    Compute bars (`COMPUTE_LANE`: forward, backward, ring attention's steps and waits) fill the
    upper part of a rank's row, labelled with their `label` field (the microbatch, or e.g.
    ``"ring_step"``); communication (send, recv, collectives, K/V blocks in flight, which may
    overlap computation) is drawn in the lower part. Returns the figure.
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
                    fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rank")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
