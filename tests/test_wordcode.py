"""WordCoder: lossless split, spelling and spacing costs that are proper code lengths."""

from __future__ import annotations

import math

import pytest

from lmkit.baselines.ngram import KneserNeyLM, tokenize_words
from lmkit.baselines.wordcode import WordCoder

TRAIN = "In the beginning, God created.\nAnd God said: let there be light.\n\nAnd there was light ; amen\n"


def test_split_reconstructs_lines_and_matches_the_tokenizer():
    for line in TRAIN.splitlines() + ["  two  spaces , and tabs\there.  "]:
        tokens, gaps = WordCoder.split(line)
        assert len(gaps) == len(tokens) + 1
        assert "".join(g + t for g, t in zip(gaps, tokens, strict=False)) + gaps[-1] == line
        assert tokens == (tokenize_words(line, lowercase=False, keep_blank=True) or [[]])[0]


def test_costs_are_code_lengths():
    lm = KneserNeyLM(order=2, min_count=2).fit(tokenize_words(TRAIN, lowercase=False))
    coder = WordCoder(TRAIN, lm.vocab, speller_order=2)
    # the spelling cost is the speller's NLL of the characters and </s> (+ 8 bits per unseen byte)
    assert set("beginning") <= set(coder.speller.index)
    assert coder.spelling_nats("beginning") == pytest.approx(coder.speller.nll([list("beginning")])[0])
    assert coder.spelling_nats("G\u00e9") > coder.spelling_nats("Ge")  # an unseen character costs more
    # gap probabilities of one context, with the escape, sum to one
    context = ("word", "word")
    seen = coder._strings[context]
    total = sum(math.exp(-coder.gap_nats(context, g)) for g in seen)
    escape = 0.5 / (coder._context_totals[context] + 0.5 * (len(seen) + 1))
    assert total + escape == pytest.approx(1.0)
    val = "And God said , light .\nZebra light\n"
    words_nats, _ = lm.nll(tokenize_words(val, lowercase=False, keep_blank=True))
    cost = coder.cost(words_nats, val)
    assert cost.n_oov == sum(w not in lm.index for s in tokenize_words(val, lowercase=False) for w in s)
    assert cost.spelling_nats > 0 and cost.spacing_nats > 0
    assert cost.bits_per_byte > cost.words_only_bits_per_byte
    assert cost.bits_per_byte == pytest.approx(cost.total_nats / math.log(2) / len(val.encode()))


def test_full_vocabulary_spells_like_singletons():
    lm = KneserNeyLM(order=1, min_count=1).fit(tokenize_words(TRAIN, lowercase=False))
    coder = WordCoder(TRAIN, lm.vocab)
    assert coder.spelling_nats("Zebra") > 0
