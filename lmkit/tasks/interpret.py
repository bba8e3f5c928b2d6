"""Looking inside a trained model: attention weights, and the loss at each position of the context.

The model computes attention with ``F.scaled_dot_product_attention``, which returns only the
weighted sum, never the weights. `attention_weights` recomputes them from the queries and keys
of every layer: forward hooks on each block's fused ``attn.qkv`` projection capture its output
during one ordinary forward pass, and

    A = softmax(Q K^T / sqrt(head_dim) + causal mask)

is evaluated per head. ``A @ V`` equals what the model's attention produced (checked in
``tests/test_interpret.py``), so the maps are the model's own, not an approximation.

`loss_by_position` measures how a model (GPT or LSTM) uses its context: the mean loss of the
predictions made at position t of a window, i.e. with t tokens of context (chapter 4, section 4.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["attention_weights", "loss_by_position"]


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


@torch.no_grad()
def loss_by_position(model, tokens: Sequence[int] | np.ndarray, block_size: int | None = None,
                     batch_size: int = 16) -> np.ndarray:
    """Mean loss (nats) of the prediction at each position of a window: [block_size].

    `tokens` is cut into the consecutive full windows that `lmkit.lab.likelihood.model_nll` scores
    (a shorter last window is left out, so every position averages the same number of
    predictions); entry ``t`` is the mean cross-entropy of predicting token ``t + 1`` of a window
    from its first ``t + 1`` tokens. A model that uses long context has a curve that keeps
    falling with t; one that relies on the last few tokens flattens early.
    """
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    T = block_size or model.config.block_size
    starts = list(range(0, ids.numel() - 1 - T + 1, T))
    if not starts:
        raise ValueError(f"need more than block_size={T} tokens for one full window, got {ids.numel()}")
    device = next(model.parameters()).device
    total = torch.zeros(T, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            x = torch.stack([ids[s : s + T] for s in group]).to(device)
            y = torch.stack([ids[s + 1 : s + T + 1] for s in group]).to(device)
            logits, _ = model(x)
            losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # [B, T]
            total += losses.sum(0).double().cpu()
    finally:
        model.train(was_training)
    return (total / len(starts)).numpy()
