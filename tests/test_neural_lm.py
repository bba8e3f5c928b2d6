"""Bengio's MLP LM: windows, the GPT-compatible interface, training and exact stream scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkit.baselines.neural_lm import BengioLM, stream_nll, train_on_stream, word_stream
from lmkit.config import ModelConfig
from lmkit.model import GPT


def test_word_stream_matches_the_ngram_tokens():
    index = {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}
    ids = word_stream([["a", "b"], [], ["zebra"]], index)
    assert ids.tolist() == [1, 3, 4, 1, 1, 2, 1]  # </s> first, then each line and its </s>


def test_bengio_sees_exactly_its_window():
    torch.manual_seed(0)
    model = BengioLM(vocab_size=7, context=2, d_embed=3, d_hidden=5, pad_id=1).eval()
    idx = torch.tensor([[3, 4, 5, 6]])
    logits, _ = model(idx)
    assert logits.shape == (1, 4, 7)
    # position 2 depends on idx[1], idx[2] only: changing idx[0] or idx[3] leaves it unchanged
    for changed in ([[0, 4, 5, 6]], [[3, 4, 5, 0]]):
        assert torch.allclose(model(torch.tensor(changed))[0][0, 2], logits[0, 2])
    # by hand: the first position's window is [pad, idx[0]]
    x = torch.cat([model.tok_emb.weight[1], model.tok_emb.weight[3]])
    by_hand = model.out(torch.tanh(model.hidden(x)))
    assert torch.allclose(by_hand, logits[0, 0], atol=1e-6)


@pytest.mark.parametrize("kind", ["bengio", "gpt"])
def test_training_lowers_the_loss_and_stream_nll_is_exact(kind):
    torch.manual_seed(0)
    pattern = np.array([1, 3, 4, 5, 6] * 200)
    model = (BengioLM(8, context=3, d_embed=8, d_hidden=16) if kind == "bengio"
             else GPT(ModelConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, d_model=16)))
    losses = train_on_stream(model, pattern, block_size=16, batch_size=8, steps=60, lr=1e-2)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    ids = pattern[:37]
    nll, n = stream_nll(model, ids, block_size=16, batch_size=2)
    assert n == len(ids) - 1
    with torch.no_grad():  # the same windows, scored one by one
        expected = 0.0
        for s in range(0, n, 16):
            x = torch.tensor(ids[s : min(s + 16, n)])[None]
            y = torch.tensor(ids[s + 1 : min(s + 16, n) + 1])
            expected += F.cross_entropy(model(x)[0][0], y, reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)
    assert math.exp(nll / n) < 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="context"):
        BengioLM(5, context=0)
    with pytest.raises(ValueError, match="fewer than"):
        train_on_stream(BengioLM(5), np.arange(5) % 5, block_size=8, batch_size=2, steps=1)
