"""lmkit.tasks.datasets: the offline labelled and parallel data sets are what they claim to be."""

from __future__ import annotations

import opencc

from lmkit.tasks import datasets


def test_sentiment_reviews_are_labelled_deduplicated_and_disjoint():
    split = datasets.sentiment_reviews()
    assert split.labels == ("negative", "positive")
    assert len(split.train_texts) > 10_000 and len(split.test_texts) > 2_000
    assert set(split.train_labels.tolist()) == {0, 1}
    assert 0.4 < split.train_labels.mean() < 0.6
    train, test = set(split.train_texts), set(split.test_texts)
    assert not train & test, "a review is in both train and test"
    assert len(train) == len(split.train_texts)
    small = datasets.sentiment_reviews(max_rows=100)
    assert len(small.train_texts) + len(small.test_texts) == 100
    assert small.test_labels.sum() + small.train_labels.sum() == 50


def test_tang_pairs_are_traditional_and_simplified():
    train, test = datasets.tang_t2s_pairs()
    assert len(train) > 40_000 and len(test) > 4_000
    convert = opencc.OpenCC("t2s").convert
    for source, target in train[:50] + test[:50]:
        assert convert(source) == target and len(source) == len(target)
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert sum(s != t for s, t in test) > 0.8 * len(test)
