"""lmkit.lab.blocks: the Transformer's parts opened (chapter 2, "Building the network")."""

import dataclasses

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.data import BatchSampler
from lmkit.lab import blocks
from lmkit.model import build_model

CONFIG = ModelConfig(vocab_size=50, block_size=16, n_layer=3, n_head=4, d_model=32)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_by_hand_equals_the_module_and_stores_B_H_T_T_scores(n_kv_head):
    torch.manual_seed(0)
    attn = build_model(dataclasses.replace(CONFIG, n_kv_head=n_kv_head)).blocks[0].attn
    x = torch.randn(2, 10, CONFIG.d_model)
    with torch.no_grad():
        y, scores = blocks.attention_by_hand(attn, x)
        assert torch.allclose(y, attn(x), atol=1e-6)
    assert scores.shape == (2, CONFIG.n_head, 10, 10)


def test_post_norm_keeps_weights_and_normalises_every_block_output():
    torch.manual_seed(0)
    pre = build_model(CONFIG).eval()
    torch.manual_seed(0)
    post = blocks.post_norm(build_model(CONFIG)).eval()
    pairs = zip(pre.state_dict().values(), post.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    idx = torch.randint(0, 50, (2, 12))
    stream = blocks.residual_stream(post, idx)
    assert len(stream) == CONFIG.n_layer + 1
    for t in stream[1:]:                       # LayerNorm with unit gain and zero bias
        assert torch.allclose(t.mean(-1), torch.zeros(2, 12), atol=1e-5)
    assert not torch.allclose(pre(idx)[0], post(idx)[0])
    # cached decoding goes through PostNormBlock.forward too (the hook disables the fast path)
    prompt = idx[:1, :4]
    with torch.no_grad():
        full = post(idx[:1, :5])[0][0, -1]
        cache = post.new_kv_cache(1, 8)
        post(prompt, kv_cache=cache)
        step = post(idx[:1, 4:5], kv_cache=cache)[0][0, -1]
    assert torch.allclose(full, step, atol=1e-5)
    assert not post._forward_hooks and post._forward_pre_hooks


def test_residual_stream_hooks_are_removed_and_scaling_is_undone():
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    proj = model.blocks[0].attn.proj.weight.clone()
    blocks.residual_stream(model, torch.randint(0, 50, (1, 8)))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    blocks.without_residual_scaling(model)
    assert torch.allclose(model.blocks[0].attn.proj.weight, proj * (2 * CONFIG.n_layer) ** 0.5)


def test_train_losses_run_at_a_constant_rate():
    torch.manual_seed(0)
    tokens = np.arange(400, dtype=np.uint16) % 50
    losses = blocks.train_losses(build_model(CONFIG), BatchSampler(tokens, 16, 4, 0), 6, 1e-2)
    assert len(losses) == 6 and losses[-1] < losses[0]
