"""How well a model predicts a text: total negative log-likelihood, perplexity, bits per byte.

Per-token perplexity depends on the tokenizer (a model with a larger vocabulary predicts fewer,
harder tokens), so the book compares models of different tokenizers, and n-gram tables, by
**bits per byte** of one fixed validation text::

    bits per byte = (sum over the text of -log2 P(token | context)) / (UTF-8 bytes of the text)

It is the length, in bits per byte, of the text compressed by an arithmetic coder driven by the
model, so it is comparable whatever the model splits the text into, as long as every byte is
paid for. `model_nll` scores a token array with a GPT or an LSTM in windows; `ngram_nll` scores
a text with a character-level `lmkit.baselines.ngram.KneserNeyLM` (one sentence per line, the newline
predicted as ``</s>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lmkit.metrics import nats_to_bits

__all__ = ["Score", "model_nll", "ngram_nll", "char_sentences", "continuation_nll"]


@dataclass(frozen=True)
class Score:
    """Total negative log-likelihood (nats) of `tokens` predictions over a text of `n_bytes`."""

    nats: float
    tokens: int
    n_bytes: int

    @property
    def loss(self) -> float:
        """Mean nats per predicted token (the cross-entropy the trainer reports)."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Bits per UTF-8 byte of the scored text (one definition: `lmkit.metrics`)."""
        if self.n_bytes <= 0:
            raise ValueError(f"n_bytes must be positive, got {self.n_bytes}")
        return nats_to_bits(self.nats) / self.n_bytes


@torch.no_grad()
def model_nll(model: nn.Module, tokens: Sequence[int] | np.ndarray, n_bytes: int,
              block_size: int | None = None, batch_size: int = 16) -> Score:
    """Score every token of `tokens` after the first with `model` (a GPT or an LSTM).

    The array is cut into consecutive windows of ``block_size`` predictions; each window sees
    only its own tokens as context, so the first tokens of a window are predicted from a short
    context (a slight overestimate of the loss compared with a sliding window). `n_bytes` is
    the UTF-8 length of the text the tokens encode, for bits per byte.
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if ids.numel() < 2:
        raise ValueError("need at least two tokens to score a prediction")
    T = block_size or model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = ids.numel() - 1  # predictions to make
    full = list(range(0, n - n % T, T))  # windows of exactly T predictions
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    if n % T:
        batches.append([n - n % T])  # the shorter last window
    nats, count = 0.0, 0
    try:
        for group in batches:
            span = min(T, n - group[0])
            x = torch.stack([ids[s : s + span] for s in group]).to(device)
            y = torch.stack([ids[s + 1 : s + span + 1] for s in group]).to(device)
            logits, _ = model(x)
            nats += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                    reduction="sum").item()
            count += y.numel()
    finally:
        model.train(was_training)
    return Score(nats, count, n_bytes)


def char_sentences(text: str) -> list[list[str]]:
    """One sentence of characters per line; blank lines kept (they cost one ``</s>``)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the final newline ends the last line, it does not open a new one
    return [list(line) for line in lines]


def ngram_nll(lm, text: str) -> Score:
    """Score `text` with a character-level Kneser-Ney model fitted on `char_sentences`.

    Every character and every newline (as ``</s>``) is predicted. A character never seen in
    training is scored as ``<unk>``, whose probability is shared by all unseen characters, so
    the n-gram pays slightly less than a byte-level model for rare characters.
    """
    sentences = char_sentences(text)
    count = sum(len(s) + 1 for s in sentences)
    ppl = lm.perplexity(sentences)
    return Score(math.log(ppl) * count, count, len(text.encode("utf-8")))


@torch.no_grad()
def continuation_nll(model: nn.Module, prompt: Sequence[int], continuation: Sequence[int]) -> float:
    """Mean nats per token of `continuation` after `prompt` under the model's own distribution.

    This is the likelihood of a generated text at temperature 1, whatever sampling rule produced
    it: low for greedy text (always the likeliest token), higher for diverse samples.
    """
    if not continuation:
        raise ValueError("the continuation is empty")
    T = model.config.block_size
    ids = list(prompt) + list(continuation)
    ids = ids[-(T + 1):]
    n_new = min(len(continuation), len(ids) - 1)
    device = next(model.parameters()).device
    x = torch.tensor([ids[:-1]], device=device)
    y = torch.tensor([ids[1:]], device=device)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(x)
    finally:
        model.train(was_training)
    losses = F.cross_entropy(logits[0].float(), y[0], reduction="none")
    return losses[-n_new:].mean().item()
