"""lmkit.tasks.classify: padding, the classifier head learns a separable task, naive Bayes, metrics."""

from __future__ import annotations

import numpy as np
import torch

from lmkit.config import ModelConfig
from lmkit.model import build_model
from lmkit.tasks import classify


def test_pad_right_and_mask():
    ids, mask = classify.pad_right([[1, 2, 3], [4]], max_len=2, pad_id=0)
    assert ids.tolist() == [[1, 2], [4, 0]]
    assert mask.tolist() == [[True, True], [True, False]]


def test_padding_does_not_change_the_features():
    torch.manual_seed(0)
    clf = classify.SequenceClassifier(build_model(ModelConfig(vocab_size=20, block_size=16, n_layer=1,
                                                              n_head=2, d_model=16)), 2).eval()
    alone = clf(*classify.pad_right([[3, 4, 5]], 16))
    padded = clf(*classify.pad_right([[3, 4, 5], [1, 2, 3, 4, 5, 6, 7]], 16))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_fine_tuning_learns_which_token_a_text_contains():
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 20, 3)) + [1 + (i % 2)] for i in range(128)]
    labels = [i % 2 for i in range(128)]
    torch.manual_seed(0)
    clf = classify.SequenceClassifier(build_model(ModelConfig(vocab_size=20, block_size=16, n_layer=1,
                                                              n_head=2, d_model=16)), 2)
    history = classify.fit_classifier(clf, rows, labels, epochs=30, batch_size=16, lr=3e-3)
    assert history[-1]["loss"] < history[0]["loss"]
    assert classify.accuracy(labels, classify.predict(clf, rows)) > 0.9


def test_naive_bayes_and_confusion_matrix():
    texts = ["好极了", "很好", "真好", "太差", "很差劲", "差"]
    labels = [1, 1, 1, 0, 0, 0]
    nb = classify.NaiveBayes().fit(texts, labels)
    pred = nb.predict(["非常好", "非常差"])
    assert pred.tolist() == [1, 0]
    m = classify.confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m.tolist() == [[1, 1], [0, 2]]
    assert classify.accuracy([0, 0, 1, 1], [0, 1, 1, 1]) == 0.75
