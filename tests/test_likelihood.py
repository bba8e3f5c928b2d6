"""lmkit.lab.likelihood: window scoring equals one full forward, bits per byte, n-gram scoring."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lmkit.baselines import ngram
from lmkit.config import ModelConfig
from lmkit.lab import likelihood
from lmkit.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()


def test_model_nll_equals_manual_windows(model):
    tokens = torch.randint(0, 50, (16 * 3 + 6,)).tolist()  # three full windows and a short one
    score = likelihood.model_nll(model, tokens, n_bytes=100, batch_size=2)
    expected, count = 0.0, 0
    for s in range(0, len(tokens) - 1, 16):
        x = torch.tensor([tokens[s : s + 16]])[:, : len(tokens) - 1 - s]
        y = torch.tensor([tokens[s + 1 : s + 17]])
        logits, _ = model(x)
        expected += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += y.numel()
    assert score.tokens == count == len(tokens) - 1
    assert score.nats == pytest.approx(expected, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(expected / math.log(2) / 100, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(expected / count), rel=1e-5)


def test_uniform_model_costs_log2_vocab_bits_per_token():
    assert likelihood.Score(math.log(256) * 10, 10, 10).bits_per_byte == pytest.approx(8.0)
    with pytest.raises(ValueError):
        _ = likelihood.Score(1.0, 1, 0).bits_per_byte


def test_ngram_nll_counts_every_character_and_newline():
    text = "ab\nba\n\nab\n"
    assert likelihood.char_sentences(text) == [["a", "b"], ["b", "a"], [], ["a", "b"]]
    lm = ngram.KneserNeyLM(2, min_count=1).fit(likelihood.char_sentences(text))
    score = likelihood.ngram_nll(lm, text)
    assert score.tokens == len(text)  # 6 letters + 4 newlines
    assert score.n_bytes == len(text.encode())
    assert 0 < score.bits_per_byte < 8


def test_continuation_nll_is_the_mean_loss_of_the_new_tokens(model):
    prompt, new = [1, 2, 3], [4, 5]
    logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    expected = F.cross_entropy(logits[0, -2:], torch.tensor([4, 5])).item()
    assert likelihood.continuation_nll(model, prompt, new) == pytest.approx(expected, rel=1e-5)
