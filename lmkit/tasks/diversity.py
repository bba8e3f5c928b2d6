"""Diversity of generated text: distinct-n, the share of n-grams that are new.

Li et al. (2016) measure how repetitive a set of generated texts is by

    distinct-n = (number of distinct n-grams) / (total number of n-grams)

over all the texts together. Greedy decoding loops ("the LORD, the LORD, the LORD") and scores
low; sampling at a high temperature scores close to 1 but produces nonsense, which is why the
book always shows it next to the likelihood of the same text (`lmkit.lab.likelihood`). The units
may be characters (the natural unit for Chinese), words or token ids: any sequence works.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

__all__ = ["ngrams", "distinct_n"]


def ngrams(units: Sequence[Hashable], n: int) -> list[tuple]:
    """The contiguous n-grams of `units`, in order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def distinct_n(texts: Iterable[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams over total n-grams of all `texts` (strings count characters).

    Returns 0.0 when the texts hold no n-gram at all.
    """
    seen: set[tuple] = set()
    total = 0
    for text in texts:
        grams = ngrams(list(text), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0
