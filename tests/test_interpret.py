"""lmkit.tasks.interpret: recomputed attention weights reproduce the model's attention output."""

from __future__ import annotations

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.lab.likelihood import model_nll
from lmkit.model import build_model
from lmkit.tasks.interpret import attention_weights, loss_by_position


def test_weights_times_values_is_the_attention_output():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, block_size=12, n_layer=2, n_head=2, d_model=16)).eval()
    idx = torch.randint(0, 30, (2, 10))
    maps = attention_weights(model, idx)
    assert maps.shape == (2, 2, 2, 10, 10)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 2, 10))
    assert torch.all(maps.triu(1) == 0)  # causal
    qkv_out, attn_in = [], []
    block = model.blocks[1]
    h1 = block.attn.qkv.register_forward_hook(lambda m, i, o: qkv_out.append(o))
    h2 = block.attn.proj.register_forward_hook(lambda m, i, o: attn_in.append(i[0]))
    model(idx)
    h1.remove()
    h2.remove()
    v = qkv_out[0].split(16, dim=-1)[2].view(2, 10, 2, 8).transpose(1, 2)
    out = (maps[1] @ v).transpose(1, 2).reshape(2, 10, 16)
    assert torch.allclose(out, attn_in[0], atol=1e-5)


def test_loss_by_position_averages_to_the_windowed_nll():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, d_model=16))
    lstm = build_model(ModelConfig(vocab_size=30, block_size=8, n_layer=1, d_model=16, arch="lstm"))
    tokens = torch.randint(0, 30, (8 * 5 + 1,)).numpy()  # exactly 5 full windows of 8 predictions
    for m in (model, lstm):
        curve = loss_by_position(m, tokens, batch_size=2)  # batches of 2, 2 and 1 windows
        assert curve.shape == (8,)
        assert abs(curve.mean() - model_nll(m, tokens, n_bytes=100).loss) < 1e-5
    short = tokens[:8]
    with pytest.raises(ValueError, match="full window"):
        loss_by_position(model, short)
