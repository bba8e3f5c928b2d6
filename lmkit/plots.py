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
