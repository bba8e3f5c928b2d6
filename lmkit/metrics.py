"""Tokenizer-independent yardsticks: bits per byte and bits per character of a text.

Per-token perplexity is not comparable across tokenizers: a word model predicts ~10 times fewer
tokens than a character model on the same text, and each of its tokens carries more
information, so its perplexity is larger although it may compress the text better. What every
language model of the book does define is the total negative log-likelihood it assigns to one
fixed validation text (the sum over its tokens, whatever they are). Divided by the size of that
text in UTF-8 bytes (or in characters) and converted from nats to bits, it becomes a figure that
compares an n-gram model over words, a character LSTM and a GPT over byte-level BPE tokens:

    bits per byte = sum_i -ln P(token_i | context) / (ln 2 * len(text.encode("utf-8")))

It is also the compression rate an arithmetic coder driven by the model would reach, in bits
per byte of the original file (8 = no compression). The comparison is fair only when every model
scores the same text *completely*: a word model that maps rare words to ``<unk>`` or drops case
and spacing scores less than the text and looks better than it is (chapter 1 measures and
repairs both).

Typical use, with a model whose evaluation gives the mean loss per token in nats::

    from lmkit.metrics import bits_per_byte
    bpb = bits_per_byte(mean_loss * n_tokens, val_text)
"""

from __future__ import annotations

import math

__all__ = ["LN2", "nats_to_bits", "bits_per_byte", "bits_per_char", "perplexity"]

LN2 = math.log(2.0)


def nats_to_bits(nats: float) -> float:
    """Convert an amount of information from nats (natural log) to bits (log base 2)."""
    return nats / LN2


def _check_total(nll_nats_total: float) -> float:
    value = float(nll_nats_total)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(
            f"nll_nats_total must be a finite, non-negative total negative log-likelihood in nats, "
            f"got {nll_nats_total!r} (pass the sum over tokens, not a probability)"
        )
    return value


def bits_per_byte(nll_nats_total: float, text: str | bytes) -> float:
    """Bits per UTF-8 byte of `text`, given the total NLL (in nats) a model assigns to all of it.

    Args:
        nll_nats_total: sum over every predicted token of ``-ln P(token | context)``, in nats
            (e.g. ``mean_cross_entropy * n_tokens``). It must cover the whole of `text`.
        text: the scored text, as ``str`` (measured in UTF-8 bytes) or as ``bytes``.
    """
    n_bytes = len(text.encode("utf-8")) if isinstance(text, str) else len(text)
    if n_bytes == 0:
        raise ValueError("bits_per_byte needs a non-empty text")
    return nats_to_bits(_check_total(nll_nats_total)) / n_bytes


def bits_per_char(nll_nats_total: float, text: str) -> float:
    """Bits per Unicode character of `text` (for Chinese, one character is three UTF-8 bytes)."""
    if not text:
        raise ValueError("bits_per_char needs a non-empty text")
    return nats_to_bits(_check_total(nll_nats_total)) / len(text)


def perplexity(nll_nats_total: float, n_tokens: int) -> float:
    """exp(mean NLL per token): comparable only between models that share one tokenizer."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    return math.exp(_check_total(nll_nats_total) / n_tokens)
