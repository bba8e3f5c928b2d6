"""lmkit.tasks.diversity: distinct-n on hand-counted examples."""

from __future__ import annotations

import pytest

from lmkit.tasks.diversity import distinct_n, ngrams


def test_ngrams():
    assert ngrams("abcd", 2) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert ngrams("a", 2) == []
    with pytest.raises(ValueError):
        ngrams("ab", 0)


def test_distinct_n_over_a_set_of_texts():
    assert distinct_n(["aaaa"], 1) == 0.25
    assert distinct_n(["abab", "ab"], 2) == pytest.approx(2 / 4)  # ab, ba, ab | ab
    assert distinct_n([[1, 2, 3], [4, 5]], 1) == 1.0
    assert distinct_n(["a"], 3) == 0.0
