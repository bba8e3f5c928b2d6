"""n-gram models (add-k, interpolated and modified Kneser-Ney): hand-computed probabilities,
normalisation, discount estimates, perplexity, OOV rate and n-gram overlap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmkit.baselines.ngram import (
    EOS,
    UNK,
    AddKLM,
    KneserNeyLM,
    count_of_counts,
    kn_discounts,
    ngram_overlap,
    tokenize_words,
)

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


MODELS = {
    "interpolated": lambda n: KneserNeyLM(order=n),
    "modified": lambda n: KneserNeyLM(order=n, variant="modified"),
    "add-1": lambda n: AddKLM(order=n, k=1.0),
    "add-0.01": lambda n: AddKLM(order=n, k=0.01),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one_and_agree_with_prob(order, kind):
    sentences = tokenize_words("the cat sat on the mat .\nthe dog sat on the log .\na cat saw a dog .\n" * 3
                               + "the cat sat on the dog .\na dog saw the mat .\n")
    lm = MODELS[kind](order).fit(sentences)
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
    with pytest.raises(ValueError, match="variant"):
        KneserNeyLM(order=2, variant="absolute")
    with pytest.raises(ValueError, match="k must"):
        AddKLM(order=2, k=0)


def test_tokenizer_needs_no_downloaded_data():
    assert tokenize_words("In the beginning, God.\n\nAmen!") == [
        ["in", "the", "beginning", ",", "god", "."],
        ["amen", "!"],
    ]


# Padded for a bigram model: "<s> a b </s>" x3, "<s> a c </s>", "<s> b c </s>" x2, so bigram counts
# <s>a=4, ab=3, b</s>=3, ac=1, c</s>=3, <s>b=2, bc=2: counts 1, 2 and 3+ all occur.
TINY2 = [["a", "b"]] * 3 + [["a", "c"]] + [["b", "c"]] * 2


def test_modified_kneser_ney_by_hand():
    lm = KneserNeyLM(order=2, discount=(0.5, 1.0, 1.5), min_count=1, variant="modified").fit(TINY2)
    # Continuation counts N1+(. w): a<-{<s>}=1, b<-{<s>,a}=2, c<-{a,b}=2, </s><-{b,c}=2; total 7.
    # Discounted mass D(1) + 3 D(2) = 3.5, spread uniformly over {</s>, <unk>, a, b, c}.
    p1 = {"a": (0.5 + 0.7) / 7, "b": 1.7 / 7, "c": 1.7 / 7, EOS: 1.7 / 7, UNK: 0.7 / 7}
    assert sum(p1.values()) == pytest.approx(1.0)
    for w, p in p1.items():
        assert lm.prob(w, ["zebra"]) == pytest.approx(p)  # unseen context: the unigram level
    # After "a": c(a b) = 3 gets D3+ = 1.5, c(a c) = 1 gets D1 = 0.5; c(a .) = 4; gamma = 2/4.
    assert lm.prob("b", ["a"]) == pytest.approx((3 - 1.5) / 4 + 2.0 / 4 * p1["b"])
    assert lm.prob("c", ["a"]) == pytest.approx((1 - 0.5) / 4 + 2.0 / 4 * p1["c"])
    # After "b": b</s> = 3 (D3+ = 1.5), bc = 2 (D2 = 1.0); c(b .) = 5; "a" never followed "b".
    assert lm.prob("a", ["b"]) == pytest.approx(2.5 / 5 * p1["a"])
    assert lm.prob(EOS, ["b"]) == pytest.approx(1.5 / 5 + 2.5 / 5 * p1[EOS])
    assert lm.distribution(["a"]).sum() == pytest.approx(1.0, abs=1e-12)
    assert lm.discounts[2] == (0.5, 1.0, 1.5)


def test_discount_estimates_of_chen_and_goodman():
    # n = [10, 5, 3, 2]: Y = 10 / 20 = 0.5
    (d1, d2, d3), note = kn_discounts([10, 5, 3, 2], modified=True)
    assert note is None
    assert (d1, d2, d3) == pytest.approx((1 - 2 * 0.5 * 5 / 10, 2 - 3 * 0.5 * 3 / 5, 3 - 4 * 0.5 * 2 / 3))
    assert kn_discounts([10, 5, 3, 2], modified=False) == ((0.5, 0.5, 0.5), None)
    assert kn_discounts([0, 5, 3, 2], modified=False)[1].startswith("n1=0")
    assert count_of_counts([1, 1, 2, 5, 3, 4, 4]) == [2, 1, 1, 2]


def test_estimated_discounts_need_no_fallback_on_real_text():
    sentences = tokenize_words("the cat sat on the mat .\nthe dog sat on the log .\na cat saw a dog .\n" * 3
                               + "the cat sat on the dog .\na dog saw the mat .\nan owl .\n")
    for order in (1, 2, 3):
        lm = KneserNeyLM(order=order, variant="modified").fit(sentences)
        # min_count=2 turned "an" and "owl" into <unk>, yet the unigram level still sees its singletons
        assert lm.oov_rate([["an", "owl", "."]]) == pytest.approx(2 / 3)
        assert lm.count_of_counts[1][0] > 0
        assert not lm.fallbacks.get(1, "").startswith("n1=0")


def test_add_k_by_hand():
    lm = AddKLM(order=2, k=0.5, min_count=1).fit(TINY2)
    size = 5  # </s>, <unk>, a, b, c
    assert lm.prob("b", ["a"]) == pytest.approx((3 + 0.5) / (4 + 0.5 * size))
    assert lm.prob("a", ["b"]) == pytest.approx(0.5 / (5 + 0.5 * size))
    assert lm.prob("a", ["zebra"]) == pytest.approx(1 / size)


def test_nll_and_ngram_overlap():
    lm = KneserNeyLM(order=2, min_count=1).fit(TINY2)
    nll, count = lm.nll([["a", "b"], []])
    assert count == 4  # a, b, </s> and the </s> of the empty line
    assert nll == pytest.approx(-sum(math.log(p) for p in (
        lm.prob("a"), lm.prob("b", ["a"]), lm.prob(EOS, ["a", "b"]), lm.prob(EOS))))
    train = [["in", "the", "beginning", "god"], ["and", "god", "said"]]
    assert ngram_overlap([["in", "the", "end", "god", "said"]], train, 2) == 2 / 4  # in the, god said
    with pytest.raises(ValueError):
        ngram_overlap([["one"]], train, 2)
