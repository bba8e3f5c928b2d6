"""Skip-gram with negative sampling and the tools that inspect vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkit.baselines import embeddings as emb


def test_loss_is_the_negative_sampling_objective():
    torch.manual_seed(0)
    model = emb.SkipGram(6, 4)
    torch.nn.init.normal_(model.context.weight)
    c, o, n = torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([[5, 0], [1, 3]])
    v, u = model.centre.weight, model.context.weight
    by_hand = -np.mean([(F.logsigmoid(u[o[i]] @ v[c[i]]) + F.logsigmoid(-(u[n[i]] @ v[c[i]])).sum()).item()
                        for i in range(2)])
    assert model.loss(c, o, n).item() == pytest.approx(by_hand, rel=1e-6)


def test_skipgram_learns_which_words_share_contexts():
    # two "topics": words 3-5 occur together, words 6-8 occur together; 1 separates sentences
    rng = np.random.default_rng(0)
    stream = []
    for _ in range(1500):
        stream += list(rng.choice([3, 4, 5] if rng.random() < 0.5 else [6, 7, 8], size=4)) + [1]
    vectors, losses = emb.train_skipgram(np.array(stream), 9, dim=8, window=2, epochs=3, subsample=0,
                                         exclude=[0, 1, 2], batch_size=256, lr=0.02)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    allowed = np.zeros(9, dtype=bool)
    allowed[3:] = True
    assert {i for i, _ in emb.nearest(vectors, 3, k=2, allowed=allowed)} == {4, 5}
    assert {i for i, _ in emb.nearest(vectors, 7, k=2, allowed=allowed)} == {6, 8}


def test_nearest_analogy_pca_and_overlap_by_hand():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.9], [-1.0, 0.0]])
    near = emb.nearest(vectors, 2, k=2)
    assert near[0][0] == 3 and near[0][1] == pytest.approx(vectors[3] @ [1, 1] / np.linalg.norm(vectors[3])
                                                           / np.sqrt(2))
    # 0 : 2 :: 4 : ?  ->  unit(2) - unit(0) + unit(4) points to (-1.29, 0.71): nearest is 1 (not 0, 2, 4)
    assert emb.analogy(vectors, 0, 2, 4) == 1
    hits, asked, _ = emb.analogy_test(vectors, {"a": 0, "b": 2, "c": 4, "d": 1}, [("a", "b", "c", "d"),
                                                                                    ("a", "b", "c", "x")])
    assert (hits, asked) == (1, 1)
    coords, explained = emb.pca_2d(vectors)
    assert coords.shape == (5, 2) and explained.sum() == pytest.approx(1.0)
    assert emb.neighbour_overlap(vectors, vectors, [0, 1, 2], k=2) == 1.0
