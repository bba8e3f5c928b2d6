"""lmkit.interpret: recomputed attention weights reproduce the model's attention output."""

from __future__ import annotations

import torch

from lmkit.config import ModelConfig
from lmkit.interpret import attention_weights
from lmkit.model import build_model


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
