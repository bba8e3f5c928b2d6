"""Word n-gram language models with interpolated Kneser-Ney smoothing.

Chapter 1 starts here: before neural networks, a language model was a table of counts. An
n-gram model assumes the next word depends only on the previous ``n - 1`` words,

    P(w_i | w_1 .. w_{i-1}) ~= P(w_i | w_{i-n+1} .. w_{i-1}),

and estimates that conditional from counts. Raw relative frequencies give probability 0 to
every n-gram not seen in training, so the perplexity of new text would be infinite; smoothing
moves a little probability mass from seen to unseen events.

We use *interpolated Kneser-Ney* (Kneser & Ney 1995; Chen & Goodman 1998, the best-performing
classic method in their comparison). For the highest order, with discount ``D``:

    P(w | h) = max(c(h w) - D, 0) / c(h)  +  D * N1+(h .) / c(h) * P_lower(w | h')

where ``h'`` drops the oldest word of ``h`` and ``N1+(h .)`` is the number of distinct words
seen after ``h`` (so the mass taken by discounting is exactly what is handed to the lower
order). Lower orders replace counts by *continuation counts* ``N1+(. h w)``: the number of
distinct words that precede ``h w``. A word like "Francisco" is frequent but follows almost
only "San", so it should get little probability in a new context; continuation counts encode
exactly that. The unigram level is interpolated with the uniform distribution over the
vocabulary, so every word (including ``<unk>``) has non-zero probability.

The discount per order is Ney's estimate ``D = n1 / (n1 + 2 n2)`` (``n_r`` = number of n-grams
seen exactly ``r`` times), unless a fixed `discount` is given.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["BOS", "EOS", "UNK", "KneserNeyLM", "tokenize_words"]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def tokenize_words(text: str, lowercase: bool = True) -> list[list[str]]:
    """Split `text` into sentences (non-empty lines) of word and punctuation tokens.

    Uses nltk's data-free ``wordpunct_tokenize`` (``\\w+|[^\\w\\s]+``), which needs no
    downloaded models, so it works offline.
    """
    from nltk.tokenize import wordpunct_tokenize

    sentences = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            sentences.append(wordpunct_tokenize(line.lower() if lowercase else line))
    return sentences


class KneserNeyLM:
    """An interpolated Kneser-Ney n-gram model over words.

    Args:
        order: n, the length of the n-grams (1 = unigram).
        discount: fixed absolute discount in (0, 1); ``None`` estimates one per order.
        min_count: training words seen fewer times become ``<unk>``.
    """

    def __init__(self, order: int, discount: float | None = None, min_count: int = 2) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if discount is not None and not 0.0 < discount < 1.0:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.order = order
        self.fixed_discount = discount
        self.min_count = min_count
        self.vocab: list[str] = []
        self.index: dict[str, int] = {}

    # ----------------------------------------------------------------------------- fitting
    def fit(self, sentences: Iterable[Sequence[str]]) -> KneserNeyLM:
        """Count n-grams of `sentences` (lists of tokens) and precompute the smoothed tables."""
        sentences = [list(s) for s in sentences]
        word_counts = Counter(w for s in sentences for w in s)
        words = sorted(w for w, c in word_counts.items() if c >= self.min_count and w not in (BOS, EOS, UNK))
        self.vocab = [BOS, EOS, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        n = self.order

        # Raw counts of the highest order, over sentences padded with n-1 <s> and one </s>.
        raw: Counter[tuple[int, ...]] = Counter()
        for sentence in sentences:
            ids = self._pad(sentence)
            for i in range(len(ids) - n + 1):
                raw[tuple(ids[i : i + n])] += 1

        # Lower orders use continuation counts: distinct left neighbours of each k-gram.
        counts: dict[int, Counter[tuple[int, ...]]] = {n: raw}
        for k in range(n - 1, 0, -1):
            cont: Counter[tuple[int, ...]] = Counter()
            for gram in counts[k + 1]:
                cont[gram[1:]] += 1
            counts[k] = cont
        counts[1].pop((0,), None)  # <s> is never predicted

        self._discount = {k: self._estimate_discount(counts[k]) for k in counts}
        self._counts = counts
        self._total: dict[int, dict[tuple[int, ...], int]] = {}
        self._types: dict[int, dict[tuple[int, ...], int]] = {}
        self._followers: dict[int, dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]] = {}
        for k in range(2, n + 1):
            grouped: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
            for gram, c in counts[k].items():
                grouped[gram[:-1]].append((gram[-1], c))
            self._total[k] = {h: sum(c for _, c in f) for h, f in grouped.items()}
            self._types[k] = {h: len(f) for h, f in grouped.items()}
            self._followers[k] = {
                h: (np.array([w for w, _ in f]), np.array([c for _, c in f], dtype=np.float64))
                for h, f in grouped.items()
            }

        # Unigram level, interpolated with the uniform distribution over V \ {<s>}.
        d1 = self._discount[1]
        c1 = np.zeros(len(self.vocab))
        for (w,), c in counts[1].items():
            c1[w] = c
        total1 = c1.sum()
        uniform = np.full(len(self.vocab), 1.0 / (len(self.vocab) - 1))
        uniform[0] = 0.0
        self._p1 = np.maximum(c1 - d1, 0.0) / total1 + d1 * np.count_nonzero(c1) / total1 * uniform
        return self

    def _estimate_discount(self, counts: Counter) -> float:
        if self.fixed_discount is not None:
            return self.fixed_discount
        n1 = sum(1 for c in counts.values() if c == 1)
        n2 = sum(1 for c in counts.values() if c == 2)
        if n1 == 0 or n2 == 0:
            return 0.75
        return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)

    def _pad(self, sentence: Sequence[str]) -> list[int]:
        unk = self.index[UNK]
        return [0] * (self.order - 1) + [self.index.get(w, unk) for w in sentence] + [1]

    @property
    def discounts(self) -> dict[int, float]:
        """The absolute discount used at each order (1 = unigram)."""
        return dict(sorted(self._discount.items()))

    # ----------------------------------------------------------------------------- queries
    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        """P(word | the last n-1 words of context); context shorter than n-1 is padded with <s>."""
        if word == BOS:
            return 0.0
        unk = self.index[UNK]
        ids = [0] * (self.order - 1) + [self.index.get(w, unk) for w in context]
        h = tuple(ids[len(ids) - (self.order - 1) :]) if self.order > 1 else ()
        return self._prob(self.order, h, self.index.get(word, unk))

    def _prob(self, k: int, h: tuple[int, ...], w: int) -> float:
        if k == 1:
            return float(self._p1[w])
        lower = self._prob(k - 1, h[1:], w)
        total = self._total[k].get(h)
        if not total:
            return lower
        d = self._discount[k]
        c = self._counts[k].get((*h, w), 0)
        return max(c - d, 0.0) / total + d * self._types[k][h] / total * lower

    def distribution(self, context: Sequence[str] = ()) -> np.ndarray:
        """The whole next-word distribution (indexed like `vocab`), computed with numpy."""
        unk = self.index[UNK]
        ids = [0] * (self.order - 1) + [self.index.get(w, unk) for w in context]
        return self._distribution(ids)

    def _distribution(self, ids: Sequence[int]) -> np.ndarray:
        p = self._p1.copy()
        for k in range(2, self.order + 1):
            h = tuple(ids[len(ids) - (k - 1) :])
            total = self._total[k].get(h)
            if not total:
                continue
            d = self._discount[k]
            followers, counts = self._followers[k][h]
            p *= d * self._types[k][h] / total
            p[followers] += (counts - d) / total
        return p

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        """exp of the mean negative log-likelihood per predicted token (words and </s>)."""
        nll, count = 0.0, 0
        n = self.order
        for sentence in sentences:
            ids = self._pad(sentence)
            for i in range(n - 1, len(ids)):
                h = tuple(ids[i - n + 1 : i])
                nll -= math.log(self._prob(n, h, ids[i]))
                count += 1
        if count == 0:
            raise ValueError("perplexity needs at least one sentence")
        return math.exp(nll / count)

    def sample(self, rng: np.random.Generator, max_words: int = 30) -> list[str]:
        """Draw one sentence word by word from the model (stops at </s> or `max_words`)."""
        ids = [0] * (self.order - 1)
        out: list[str] = []
        for _ in range(max_words):
            w = int(rng.choice(len(self.vocab), p=self._distribution(ids)))
            if w == 1:
                break
            out.append(self.vocab[w])
            ids.append(w)
        return out
