"""Word n-gram language models: add-k, interpolated Kneser-Ney and modified Kneser-Ney.

Chapter 1 starts here: before neural networks, a language model was a table of counts. An
n-gram model assumes the next word depends only on the previous ``n - 1`` words,

    P(w_i | w_1 .. w_{i-1}) ~= P(w_i | w_{i-n+1} .. w_{i-1}),

and estimates that conditional from counts. Raw relative frequencies give probability 0 to
every n-gram not seen in training, so the perplexity of new text would be infinite; smoothing
moves a little probability mass from seen to unseen events.

`AddKLM` adds ``k`` to every count: ``P(w | h) = (c(h w) + k) / (c(h) + k |V|)``.

`KneserNeyLM` is Kneser-Ney smoothing (Kneser & Ney 1995) in its interpolated form, and with
``variant="modified"`` the *modified* Kneser-Ney of Chen & Goodman (1998), the winner of their
comparison. At the highest order, with a discount ``D(c)`` that depends on the count ``c``:

    P(w | h) = max(c(h w) - D(c(h w)), 0) / c(h)  +  gamma(h) * P_lower(w | h')
    gamma(h) = sum_{w: c(h w) > 0} D(c(h w)) / c(h)

where ``h'`` drops the oldest word of ``h``, ``c(h) = sum_w c(h w)``. ``gamma(h)`` is exactly
the mass taken away by discounting, so the distribution sums to one. Interpolated KN uses one
discount ``D`` for every count, so ``gamma(h) = D * N1+(h .) / c(h)`` with ``N1+(h .)`` the
number of distinct words seen after ``h``; modified KN uses three, ``D1``, ``D2`` and ``D3+``,
for n-grams seen once, twice and three or more times.

Lower orders replace counts by *continuation counts* ``N1+(. h w)``, the number of distinct
words seen before ``h w``; their normaliser is ``N1+(. h .) = sum_w N1+(. h w)``, the number of
distinct (left word, h, right word) triples. A word like "Francisco" is frequent but follows
almost only "San", so it should get little probability in a new context; continuation counts
encode exactly that. The unigram level is interpolated with the uniform distribution over the
vocabulary, so every word (including ``<unk>``) has non-zero probability.

Discounts are estimated per order from the count-of-counts ``n_r`` (the number of distinct
n-grams seen exactly ``r`` times at that order, in the counts that order uses):

    Y = n1 / (n1 + 2 n2)                        interpolated KN: D = Y
    D1 = 1 - 2 Y n2 / n1,  D2 = 2 - 3 Y n3 / n2,  D3+ = 3 - 4 Y n4 / n3     (modified KN)

For the unigram model (order 1) the raw counts are taken *after* rare words became ``<unk>``,
which removes every singleton (``n1 = 0``); its count-of-counts are therefore taken from the
word counts before that mapping. Only when a (tiny) corpus really lacks n-grams seen once or
twice (or three and four times, for modified KN) does an order fall back to the constant 0.75;
`fallbacks` says which orders did and why.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "BOS",
    "EOS",
    "UNK",
    "AddKLM",
    "KneserNeyLM",
    "count_of_counts",
    "kn_discounts",
    "ngram_overlap",
    "tokenize_words",
]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNT = 0.75


def tokenize_words(text: str, lowercase: bool = True, keep_blank: bool = False) -> list[list[str]]:
    """Split `text` into sentences (lines) of word and punctuation tokens.

    Uses nltk's data-free ``wordpunct_tokenize`` (``\\w+|[^\\w\\s]+``), which needs no
    downloaded models, so it works offline. Blank lines are dropped unless `keep_blank`
    (then each is an empty sentence, so a model scores every line of the text).
    """
    from nltk.tokenize import wordpunct_tokenize

    sentences = []
    for line in text.splitlines():
        line = line.strip()
        if line or keep_blank:
            sentences.append(wordpunct_tokenize(line.lower() if lowercase else line))
    return sentences


def count_of_counts(counts: Iterable[int], up_to: int = 4) -> list[int]:
    """``[n_1, ..., n_up_to]``: how many distinct events were seen exactly r times."""
    hist = Counter(c for c in counts if 0 < c <= up_to)
    return [hist.get(r, 0) for r in range(1, up_to + 1)]


def kn_discounts(n: Sequence[int], modified: bool) -> tuple[tuple[float, float, float], str | None]:
    """Discounts ``(D1, D2, D3+)`` from count-of-counts ``n = [n1, n2, n3, n4]``, and a fallback note.

    Interpolated KN returns ``(Y, Y, Y)`` with ``Y = n1 / (n1 + 2 n2)`` (kept in [0.05, 0.95]);
    modified KN returns Chen & Goodman's three estimates (each kept in [0.05, r]).
    """
    n1, n2, n3, n4 = (list(n) + [0, 0, 0, 0])[:4]
    if n1 == 0 or n2 == 0:
        d = FALLBACK_DISCOUNT
        return (d, d, d), f"n1={n1}, n2={n2}: no estimate, D={d}"
    y = n1 / (n1 + 2 * n2)
    if not modified:
        d = min(max(y, 0.05), 0.95)
        return (d, d, d), None
    if n3 == 0 or n4 == 0:
        return (y, y, y), f"n3={n3}, n4={n4}: modified estimates need them, D1=D2=D3+=Y={y:.3f}"
    d1 = 1 - 2 * y * n2 / n1
    d2 = 2 - 3 * y * n3 / n2
    d3 = 3 - 4 * y * n4 / n3
    return (min(max(d1, 0.05), 1.0), min(max(d2, 0.05), 2.0), min(max(d3, 0.05), 3.0)), None


def ngram_overlap(sentences: Iterable[Sequence[str]], reference: Iterable[Sequence[str]], n: int) -> float:
    """Fraction of the word n-grams of `sentences` that occur verbatim in `reference`.

    Applied to sampled sentences with the training text as reference it measures memorisation;
    applied to held-out sentences it gives the baseline of ordinary reuse of phrases.
    """
    seen = {tuple(s[i : i + n]) for s in reference for i in range(len(s) - n + 1)}
    grams = [tuple(s[i : i + n]) for s in sentences for i in range(len(s) - n + 1)]
    if not grams:
        raise ValueError(f"no {n}-grams in the sentences (all shorter than {n} words)")
    return sum(g in seen for g in grams) / len(grams)


class _CountLM:
    """What every count-based model shares: vocabulary, padding, scoring and sampling."""

    def __init__(self, order: int, min_count: int) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.order = order
        self.min_count = min_count
        self.vocab: list[str] = []
        self.index: dict[str, int] = {}

    def _build_vocab(self, sentences: list[list[str]]) -> Counter:
        word_counts = Counter(w for s in sentences for w in s)
        words = sorted(w for w, c in word_counts.items() if c >= self.min_count and w not in (BOS, EOS, UNK))
        self.vocab = [BOS, EOS, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        return word_counts

    def _raw_counts(self, sentences: list[list[str]]) -> Counter:
        n = self.order
        raw: Counter[tuple[int, ...]] = Counter()
        for sentence in sentences:
            ids = self._pad(sentence)
            for i in range(len(ids) - n + 1):
                raw[tuple(ids[i : i + n])] += 1
        return raw

    def _pad(self, sentence: Sequence[str]) -> list[int]:
        unk = self.index[UNK]
        return [0] * (self.order - 1) + [self.index.get(w, unk) for w in sentence] + [1]

    def _context_ids(self, context: Sequence[str]) -> list[int]:
        unk = self.index[UNK]
        return [0] * (self.order - 1) + [self.index.get(w, unk) for w in context]

    # ----------------------------------------------------------------------------- queries
    def prob(self, word: str, context: Sequence[str] = ()) -> float:
        """P(word | the last n-1 words of context); context shorter than n-1 is padded with <s>."""
        if word == BOS:
            return 0.0
        ids = self._context_ids(context)
        h = tuple(ids[len(ids) - (self.order - 1) :]) if self.order > 1 else ()
        return self._prob(self.order, h, self.index.get(word, self.index[UNK]))

    def distribution(self, context: Sequence[str] = ()) -> np.ndarray:
        """The whole next-word distribution (indexed like `vocab`), computed with numpy."""
        return self._distribution(self._context_ids(context))

    def nll(self, sentences: Iterable[Sequence[str]]) -> tuple[float, int]:
        """Total negative log-likelihood (nats) of every predicted token (words and </s>); their number."""
        nll, count = 0.0, 0
        n = self.order
        for sentence in sentences:
            ids = self._pad(sentence)
            for i in range(n - 1, len(ids)):
                nll -= math.log(self._prob(n, tuple(ids[i - n + 1 : i]), ids[i]))
                count += 1
        return nll, count

    def perplexity(self, sentences: Iterable[Sequence[str]]) -> float:
        """exp of the mean negative log-likelihood per predicted token (words and </s>)."""
        nll, count = self.nll(sentences)
        if count == 0:
            raise ValueError("perplexity needs at least one sentence")
        return math.exp(nll / count)

    def oov_rate(self, sentences: Iterable[Sequence[str]]) -> float:
        """Fraction of the words of `sentences` (</s> not counted) outside the vocabulary (-> <unk>)."""
        words = [w for s in sentences for w in s]
        if not words:
            raise ValueError("oov_rate needs at least one word")
        return sum(w not in self.index or w in (BOS, EOS, UNK) for w in words) / len(words)

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

    def _prob(self, k: int, h: tuple[int, ...], w: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _distribution(self, ids: Sequence[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class AddKLM(_CountLM):
    """Add-k (Lidstone) smoothing of the n-gram counts: ``(c(h w) + k) / (c(h) + k |V|)``.

    ``|V|`` counts every word the model can predict (the vocabulary with ``</s>`` and ``<unk>``,
    without ``<s>``). ``k = 1`` is Laplace's add-one. An unseen history gets the uniform
    distribution. There is no back-off: every unseen continuation gets the same mass.
    """

    def __init__(self, order: int, k: float = 1.0, min_count: int = 2) -> None:
        super().__init__(order, min_count)
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k}")
        self.k = float(k)

    def fit(self, sentences: Iterable[Sequence[str]]) -> AddKLM:
        sentences = [list(s) for s in sentences]
        self._build_vocab(sentences)
        raw = self._raw_counts(sentences)
        self._counts = raw
        grouped: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for gram, c in raw.items():
            grouped[gram[:-1]].append((gram[-1], c))
        self._total = {h: sum(c for _, c in f) for h, f in grouped.items()}
        self._followers = {
            h: (np.array([w for w, _ in f]), np.array([c for _, c in f], dtype=np.float64))
            for h, f in grouped.items()
        }
        return self

    def _prob(self, k: int, h: tuple[int, ...], w: int) -> float:
        if w == 0:
            return 0.0
        size = len(self.vocab) - 1
        return (self._counts.get((*h, w), 0) + self.k) / (self._total.get(h, 0) + self.k * size)

    def _distribution(self, ids: Sequence[int]) -> np.ndarray:
        h = tuple(ids[len(ids) - (self.order - 1) :]) if self.order > 1 else ()
        size = len(self.vocab) - 1
        denominator = self._total.get(h, 0) + self.k * size
        p = np.full(len(self.vocab), self.k / denominator)
        p[0] = 0.0
        if h in self._followers:
            followers, counts = self._followers[h]
            p[followers] += counts / denominator
        return p


class KneserNeyLM(_CountLM):
    """A Kneser-Ney n-gram model over words (see the module docstring for the formulas).

    Args:
        order: n, the length of the n-grams (1 = unigram).
        discount: a fixed absolute discount in (0, 1) for every count (or a triple
            ``(D1, D2, D3+)``); ``None`` estimates them per order from count-of-counts.
        min_count: training words seen fewer times become ``<unk>``.
        variant: ``"interpolated"`` (one discount per order) or ``"modified"`` (Chen &
            Goodman's three discounts per order, for counts 1, 2 and 3+).
    """

    VARIANTS = ("interpolated", "modified")

    def __init__(self, order: int, discount: float | Sequence[float] | None = None, min_count: int = 2,
                 variant: str = "interpolated") -> None:
        super().__init__(order, min_count)
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if discount is not None:
            triple = (discount,) * 3 if np.isscalar(discount) else tuple(discount)
            if len(triple) != 3 or not all(0.0 < d < r + 1 for r, d in enumerate(triple)) or triple[0] >= 1.0:
                raise ValueError(f"discount must be in (0, 1) or a triple D1<1, D2<2, D3+<3; got {discount}")
            discount = tuple(float(d) for d in triple)
        self.fixed_discount = discount
        self.variant = variant
        self.fallbacks: dict[int, str] = {}

    # ----------------------------------------------------------------------------- fitting
    def fit(self, sentences: Iterable[Sequence[str]]) -> KneserNeyLM:
        """Count n-grams of `sentences` (lists of tokens) and precompute the smoothed tables."""
        sentences = [list(s) for s in sentences]
        word_counts = self._build_vocab(sentences)
        n = self.order

        # Raw counts of the highest order, over sentences padded with n-1 <s> and one </s>.
        counts: dict[int, Counter[tuple[int, ...]]] = {n: self._raw_counts(sentences)}
        # Lower orders use continuation counts: distinct left neighbours of each k-gram.
        for k in range(n - 1, 0, -1):
            cont: Counter[tuple[int, ...]] = Counter()
            for gram in counts[k + 1]:
                cont[gram[1:]] += 1
            counts[k] = cont
        counts[1].pop((0,), None)  # <s> is never predicted

        self.fallbacks = {}
        self._discount: dict[int, np.ndarray] = {}
        self.count_of_counts: dict[int, list[int]] = {}
        for k in counts:
            if n == 1:  # raw unigram counts: the singletons became <unk>; use the counts before that
                stats = [*word_counts.values(), len(sentences)]  # words and </s>
            else:
                stats = counts[k].values()
            self.count_of_counts[k] = count_of_counts(stats)
            if self.fixed_discount is not None:
                triple = self.fixed_discount
            else:
                triple, note = kn_discounts(self.count_of_counts[k], self.variant == "modified")
                if note:
                    self.fallbacks[k] = note
            # index by count: D[0] = 0 (unseen), D[1], D[2], D[3] (3 and more)
            self._discount[k] = np.array([0.0, *triple])
        self._counts = counts
        self._total: dict[int, dict[tuple[int, ...], float]] = {}
        self._gamma: dict[int, dict[tuple[int, ...], float]] = {}
        self._followers: dict[int, dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]] = {}
        for k in range(2, n + 1):
            grouped: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
            for gram, c in counts[k].items():
                grouped[gram[:-1]].append((gram[-1], c))
            table = self._discount[k]
            self._total[k], self._gamma[k], self._followers[k] = {}, {}, {}
            for h, f in grouped.items():
                w = np.array([w for w, _ in f])
                c = np.array([c for _, c in f], dtype=np.float64)
                d = table[np.minimum(c, 3).astype(int)]
                self._total[k][h] = c.sum()
                self._gamma[k][h] = d.sum()  # numerator of gamma(h): the discounted mass
                self._followers[k][h] = (w, np.maximum(c - d, 0.0))

        # Unigram level, interpolated with the uniform distribution over V \ {<s>}.
        c1 = np.zeros(len(self.vocab))
        for (w,), c in counts[1].items():
            c1[w] = c
        d1 = self._discount[1][np.minimum(c1, 3).astype(int)]
        total1 = c1.sum()
        uniform = np.full(len(self.vocab), 1.0 / (len(self.vocab) - 1))
        uniform[0] = 0.0
        self._p1 = np.maximum(c1 - d1, 0.0) / total1 + d1.sum() / total1 * uniform
        return self

    @property
    def discounts(self) -> dict[int, tuple[float, float, float]]:
        """``(D1, D2, D3+)`` used at each order (1 = unigram); interpolated KN has three equal ones."""
        return {k: tuple(float(x) for x in d[1:]) for k, d in sorted(self._discount.items())}

    # ----------------------------------------------------------------------------- queries
    def _prob(self, k: int, h: tuple[int, ...], w: int) -> float:
        if k == 1:
            return float(self._p1[w])
        lower = self._prob(k - 1, h[1:], w)
        total = self._total[k].get(h)
        if not total:
            return lower
        c = self._counts[k].get((*h, w), 0)
        d = self._discount[k][min(c, 3)]
        return max(c - d, 0.0) / total + self._gamma[k][h] / total * lower

    def _distribution(self, ids: Sequence[int]) -> np.ndarray:
        p = self._p1.copy()
        for k in range(2, self.order + 1):
            h = tuple(ids[len(ids) - (k - 1) :])
            total = self._total[k].get(h)
            if not total:
                continue
            followers, discounted = self._followers[k][h]
            p *= self._gamma[k][h] / total
            p[followers] += discounted / total
        return p
