"""Bits per byte / per character: hand-computed values and argument checks."""

from __future__ import annotations

import math

import pytest

from lmkit.metrics import bits_per_byte, bits_per_char, nats_to_bits, perplexity


def test_uniform_byte_model_is_eight_bits_per_byte():
    text = "hello, world"
    nll = len(text) * math.log(256)  # a uniform guess over 256 byte values for every byte
    assert bits_per_byte(nll, text) == pytest.approx(8.0)
    assert bits_per_byte(nll, text.encode()) == pytest.approx(8.0)


def test_chinese_counts_utf8_bytes_and_characters():
    text = "我喜欢编程"  # 5 characters, 15 UTF-8 bytes
    nll = 5 * math.log(2) * 12  # 12 bits per character
    assert bits_per_char(nll, text) == pytest.approx(12.0)
    assert bits_per_byte(nll, text) == pytest.approx(4.0)


def test_perplexity_and_units():
    assert nats_to_bits(math.log(8)) == pytest.approx(3.0)
    assert perplexity(3 * math.log(5), 3) == pytest.approx(5.0)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_bad_totals(bad):
    with pytest.raises(ValueError, match="nll_nats_total"):
        bits_per_byte(bad, "abc")


def test_empty_inputs():
    with pytest.raises(ValueError):
        bits_per_byte(1.0, "")
    with pytest.raises(ValueError):
        bits_per_char(1.0, "")
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
