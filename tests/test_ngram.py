"""Kneser-Ney n-gram model: hand-computed probabilities, normalisation, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmkit.ngram import EOS, UNK, KneserNeyLM, tokenize_words

# Three sentences. Padded for a bigram model: "<s> a b </s>", "<s> a c </s>", "<s> b c </s>".
TINY = [["a", "b"], ["a", "c"], ["b", "c"]]


def test_bigram_probabilities_match_hand_computation():
    lm = KneserNeyLM(order=2, discount=0.5, min_count=1).fit(TINY)
    # Continuation counts N1+(. w): a<-{<s>}=1, b<-{<s>,a}=2, c<-{a,b}=2, </s><-{b,c}=2.
    # Total 7 over 4 word types; uniform over V\{<s>} = {</s>,<unk>,a,b,c} is 1/5.
    p1 = {w: (max(c - 0.5, 0) + 0.5 * 4 / 5) / 7 for w, c in {"a": 1, "b": 2, "c": 2, EOS: 2, UNK: 0}.items()}
    assert p1["a"] == pytest.approx(0.9 / 7)
    # P(c | a): c(a c)=1, c(a .)=2 with 2 distinct followers.
    assert lm.prob("c", ["a"]) == pytest.approx((1 - 0.5) / 2 + 0.5 * 2 / 2 * p1["c"])
    assert lm.prob("c", ["a"]) == pytest.approx(0.25 + 0.5 * 1.9 / 7)
    # P(a | b): unseen bigram, all mass from the lower order: 0.5*2/2 * 0.9/7.
    assert lm.prob("a", ["b"]) == pytest.approx(0.45 / 7)
    # An unseen word is <unk>, and an unseen context backs off to the unigram level.
    assert lm.prob("zebra", ["a"]) == pytest.approx(0.5 * 2 / 2 * p1[UNK])
    assert lm.prob("a", ["zebra"]) == pytest.approx(p1["a"])
    assert lm.prob("<s>", ["a"]) == 0.0


def test_unigram_model_uses_raw_counts():
    lm = KneserNeyLM(order=1, discount=0.5, min_count=1).fit(TINY)
    # Raw counts a=2, b=2, c=2, </s>=3; total 9 over 4 types.
    assert lm.prob("a") == pytest.approx((2 - 0.5) / 9 + 0.5 * 4 / 9 / 5)
    assert lm.prob(EOS) == pytest.approx((3 - 0.5) / 9 + 0.5 * 4 / 9 / 5)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one_and_agree_with_prob(order):
    sentences = tokenize_words("the cat sat on the mat .\nthe dog sat on the log .\na cat saw a dog .\n" * 3)
    lm = KneserNeyLM(order=order).fit(sentences)
    for context in ([], ["the"], ["sat", "on", "the"], ["never", "seen", "words"]):
        dist = lm.distribution(context)
        assert dist.sum() == pytest.approx(1.0, abs=1e-12)
        assert dist[0] == 0.0  # <s>
        for word in ("cat", "mat", EOS, UNK):
            assert dist[lm.index[word]] == pytest.approx(lm.prob(word, context))


def test_perplexity_is_exp_mean_nll_and_context_helps():
    sentences = tokenize_words("a b c d\n" * 20)
    uni = KneserNeyLM(order=1, min_count=1).fit(sentences)
    tri = KneserNeyLM(order=3, min_count=1).fit(sentences)
    expected = math.exp(-np.mean([math.log(uni.prob(w)) for w in ["a", "b", "c", "d", EOS]]))
    assert uni.perplexity([["a", "b", "c", "d"]]) == pytest.approx(expected)
    assert tri.perplexity([["a", "b", "c", "d"]]) < 1.5 < uni.perplexity([["a", "b", "c", "d"]])


def test_sampling_is_seeded_and_uses_the_vocabulary():
    lm = KneserNeyLM(order=2, min_count=1).fit(TINY * 5)
    a = [lm.sample(np.random.default_rng(3)) for _ in range(5)]
    b = [lm.sample(np.random.default_rng(3)) for _ in range(5)]
    assert a == b
    assert all(w in lm.vocab for s in a for w in s)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        KneserNeyLM(order=0)
    with pytest.raises(ValueError, match="discount"):
        KneserNeyLM(order=2, discount=1.5)


def test_tokenizer_needs_no_downloaded_data():
    assert tokenize_words("In the beginning, God.\n\nAmen!") == [
        ["in", "the", "beginning", ",", "god", "."],
        ["amen", "!"],
    ]
