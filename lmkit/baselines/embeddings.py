"""Word embeddings: skip-gram with negative sampling (word2vec), and how to inspect vectors.

Skip-gram (Mikolov et al. 2013) learns two vectors per word, ``v_w`` (the word as centre) and
``u_c`` (the word as context), from the pairs (centre, context) of words at most `window`
apart. Instead of a softmax over the whole vocabulary, *negative sampling* turns each pair into
a binary classification against ``k`` random "noise" words drawn from the unigram distribution
raised to the power 3/4:

    loss = -log sigmoid(u_c . v_w) - sum_{j=1..k} log sigmoid(-u_{n_j} . v_w).

Frequent words ("the", "and", ",") are dropped from the stream with probability
``1 - sqrt(t / f(w))`` (subsampling), which speeds training up and improves the rarer words'
vectors. The ``v`` vectors are the embeddings. Their geometry is inspected with cosine
nearest neighbours, analogies ``a : b :: c : ?`` answered by the word nearest to
``v_b - v_a + v_c``, and a 2-D PCA projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SkipGram", "train_skipgram", "normalize", "nearest", "analogy", "analogy_test", "pca_2d",
           "neighbour_overlap"]


class SkipGram(nn.Module):
    """Centre (``centre``) and context (``context``) embedding tables of one vocabulary."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.centre = nn.Embedding(vocab_size, dim, sparse=True)
        self.context = nn.Embedding(vocab_size, dim, sparse=True)
        nn.init.uniform_(self.centre.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.context.weight)

    def loss(self, centre: torch.Tensor, context: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Mean negative-sampling loss of pairs ``centre[i], context[i]`` with ``negatives[i, :]``."""
        v = self.centre(centre)                                       # [B, d]
        positive = (self.context(context) * v).sum(-1)                # [B]
        negative = torch.bmm(self.context(negatives), v.unsqueeze(-1)).squeeze(-1)  # [B, k]
        return -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()


def _pairs(stream: np.ndarray, window: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # word2vec's dynamic window: for each centre a radius r ~ U{1..window}, then every offset <= r
    radius = rng.integers(1, window + 1, size=len(stream))
    centres, contexts = [], []
    for offset in range(1, window + 1):
        keep = radius[: len(stream) - offset] >= offset
        left, right = stream[: len(stream) - offset], stream[offset:]
        centres += [left[keep], right[radius[offset:] >= offset]]
        contexts += [right[keep], left[radius[offset:] >= offset]]
    return np.concatenate(centres), np.concatenate(contexts)


def train_skipgram(stream: np.ndarray, vocab_size: int, *, dim: int = 64, window: int = 4, negatives: int = 5,
                   epochs: int = 1, batch_size: int = 1024, lr: float = 0.01, subsample: float = 1e-4,
                   exclude: Sequence[int] = (), seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Train skip-gram with negative sampling on a stream of word ids; (centre vectors, mean losses).

    Mini-batches of pairs with a sparse Adam (the embedding tables take sparse gradients, so a
    step touches only the rows of its batch; Adam's per-row scaling keeps frequent words, which
    occur many times in one batch, from taking huge steps), the learning rate falling linearly
    from `lr` to 0.01 `lr`.

    Args:
        stream: word ids in text order (sentence boundaries may be marked by an id in `exclude`).
        exclude: ids never used as centre, context or noise (e.g. ``</s>``, ``<unk>``).
        subsample: the threshold t of frequent-word subsampling (0 disables it).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    counts = np.bincount(stream, minlength=vocab_size).astype(np.float64)
    counts[list(exclude)] = 0.0
    freq = counts / counts.sum()
    noise = counts**0.75 / (counts**0.75).sum()
    model = SkipGram(vocab_size, dim)
    optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=lr)
    losses: list[float] = []
    valid = counts[stream] > 0
    for epoch in range(epochs):
        keep = valid.copy()
        if subsample > 0:
            keep &= rng.random(len(stream)) < np.sqrt(subsample / np.maximum(freq[stream], 1e-12))
        centres, contexts = _pairs(stream[keep], window, rng)
        order = rng.permutation(len(centres))
        centres, contexts = torch.from_numpy(centres[order]), torch.from_numpy(contexts[order])
        noise_ids = torch.from_numpy(rng.choice(vocab_size, size=(len(centres), negatives), p=noise))
        for i in range(0, len(centres), batch_size):
            c, o = centres[i : i + batch_size], contexts[i : i + batch_size]
            done = (epoch + i / len(centres)) / epochs
            for group in optimizer.param_groups:
                group["lr"] = lr * max(1.0 - done, 0.01)
            loss = model.loss(c, o, noise_ids[i : i + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return model.centre.weight.detach().numpy().copy(), losses


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def nearest(vectors: np.ndarray, query: np.ndarray | int, k: int = 5, exclude: Sequence[int] = (),
            allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
    """The `k` ids with the highest cosine similarity to `query` (an id or a vector)."""
    unit = normalize(vectors)
    q = unit[query] if np.isscalar(query) else query / max(np.linalg.norm(query), 1e-12)
    sims = unit @ q
    if allowed is not None:
        sims = np.where(allowed, sims, -np.inf)
    sims[list(exclude) + ([int(query)] if np.isscalar(query) else [])] = -np.inf
    top = np.argsort(-sims)[:k]
    return [(int(i), float(sims[i])) for i in top]


def analogy(vectors: np.ndarray, a: int, b: int, c: int, allowed: np.ndarray | None = None) -> int:
    """The answer to ``a : b :: c : ?``: the id nearest to ``v_b - v_a + v_c`` (3CosAdd), not a, b or c."""
    unit = normalize(vectors)
    return nearest(vectors, unit[b] - unit[a] + unit[c], k=1, exclude=[a, b, c], allowed=allowed)[0][0]


def analogy_test(vectors: np.ndarray, index: Mapping[str, int],
                 questions: Sequence[tuple[str, str, str, str]],
                 allowed: np.ndarray | None = None) -> tuple[int, int, list[tuple[str, ...]]]:
    """(hits, questions asked, (a, b, c, expected, answer) of each) over questions whose 4 words are known."""
    words = {i: w for w, i in index.items()}
    asked, hits = [], 0
    for a, b, c, d in questions:
        if not all(w in index for w in (a, b, c, d)):
            continue
        answer = words[analogy(vectors, index[a], index[b], index[c], allowed)]
        hits += answer == d
        asked.append((a, b, c, d, answer))
    return hits, len(asked), asked


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates on the first two principal components, and the fraction of variance each explains."""
    centred = vectors - vectors.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, (s[:2] ** 2) / (s**2).sum()


def neighbour_overlap(a: np.ndarray, b: np.ndarray, ids: Sequence[int], k: int = 10,
                      allowed: np.ndarray | None = None) -> float:
    """Mean fraction of the `k` nearest neighbours of each id that two embeddings share."""
    shared = []
    for i in ids:
        na = {j for j, _ in nearest(a, i, k, allowed=allowed)}
        nb = {j for j, _ in nearest(b, i, k, allowed=allowed)}
        shared.append(len(na & nb) / k)
    return float(np.mean(shared))
