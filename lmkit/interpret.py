"""Attention weights of a trained `lmkit.model.GPT`, for attention maps.

The model computes attention with ``F.scaled_dot_product_attention``, which returns only the
weighted sum, never the weights. `attention_weights` recomputes them from the queries and keys
of every layer: forward hooks on each block's fused ``attn.qkv`` projection capture its output
during one ordinary forward pass, and

    A = softmax(Q K^T / sqrt(head_dim) + causal mask)

is evaluated per head. ``A @ V`` equals what the model's attention produced (checked in
``tests/test_interpret.py``), so the maps are the model's own, not an approximation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_weights"]


@torch.no_grad()
def attention_weights(model, idx: Tensor) -> Tensor:
    """Attention probabilities of every layer and head: [n_layer, B, n_head, T, T] for idx [B, T]."""
    if idx.dim() == 1:
        idx = idx[None]
    captured: list[Tensor] = []
    hooks = [block.attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    B, T = idx.shape
    H, hd = model.config.n_head, model.config.head_dim
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    maps = []
    for qkv in captured:
        q, k, _ = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.split(H * hd, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        maps.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
    return torch.stack(maps)
