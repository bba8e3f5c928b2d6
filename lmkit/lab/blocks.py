"""The Transformer's parts opened one at a time (chapter 2, "Building the network").

Tools that look inside lmkit's `GPT` without changing `lmkit.model`:

* `attention_by_hand` - a block's causal self-attention with its score matrix made explicit
  (``[B, H, T, T]``: the tensor whose size grows as T squared);
* `PostNormBlock` / `post_norm` - the original Transformer's post-norm block, to compare with
  lmkit's pre-norm `Block` on the same weights;
* `without_residual_scaling` - GPT-2's initialisation minus its 1/sqrt(2L) on the projections
  that write into the residual stream;
* `residual_stream` - the residual stream after every block, read with forward hooks;
* `train_losses` - a short training run at a constant learning rate (no warm-up, no clipping),
  the setting in which the two norm placements differ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.model import GPT, Block, CausalSelfAttention

__all__ = ["attention_by_hand", "PostNormBlock", "post_norm", "without_residual_scaling",
           "residual_stream", "train_losses"]


def attention_by_hand(attn: CausalSelfAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """(output, scores) of `attn` on ``x`` [B, T, d], the scores materialised.

    The arithmetic of ``attn(x)`` (learned positions: no rotary tables), written out:
    ``softmax(q k^T / sqrt(hd) + causal mask) v``, then the output projection.
    With grouped-query attention each key/value head is repeated for the query
    heads it serves.
    """
    B, T, _ = x.shape
    q, k, v = attn.split_heads(attn.qkv(x))   # q [B, H, T, hd]; k, v [B, H_kv, T, hd]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = k.repeat_interleave(attn.group, dim=1)   # one k/v head per `group` queries
    v = v.repeat_interleave(attn.group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)   # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, -1)   # heads side by side
    return attn.proj(y), scores


class PostNormBlock(Block):
    """Post-norm residual block (Vaswani et al., 2017): normalise AFTER adding each sublayer,
    ``x = ln1(x + attn(x))``, then ``ln2(x + mlp(x))``. Same modules as `Block`."""

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = True,
                cache=None, layer: int = 0, start: int = 0, rope=None) -> Tensor:
        x = self.ln1(x + self.attn(x, mask, is_causal, cache, layer, start, rope))
        return self.ln2(x + self.mlp(x))


def _no_op(module: nn.Module, args: tuple) -> None:
    return None


def post_norm(model: GPT) -> GPT:
    """Turn every block of `model` into a `PostNormBlock`, in place (same weights and names).

    A (no-op) forward pre-hook on the model keeps cached decoding on the modules' own forward
    methods: `GPT._decode_plan` falls back to them whenever a hook is present.
    """
    for block in model.blocks:
        block.__class__ = PostNormBlock
    model.register_forward_pre_hook(_no_op)
    return model


@torch.no_grad()
def without_residual_scaling(model: GPT) -> GPT:
    """Undo GPT-2's 1/sqrt(2L) on ``attn.proj`` and ``mlp.proj``, in place: their weights become
    N(0, 0.02) like every other matrix (`lmkit.weights.initial_parameter` draws them scaled)."""
    factor = math.sqrt(2 * model.config.n_layer)
    for block in model.blocks:
        block.attn.proj.weight.mul_(factor)
        block.mlp.proj.weight.mul_(factor)
    return model


@torch.no_grad()
def residual_stream(model: GPT, idx: Tensor) -> list[Tensor]:
    """The residual stream of `model` on token ids `idx`: the input of the first block,
    then the output of every block ([B, T, d] each, L + 1 tensors), read with hooks."""
    seen: list[Tensor] = []
    first = model.blocks[0]
    hooks = [first.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))]
    hooks += [block.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
              for block in model.blocks]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def train_losses(model: nn.Module, sampler, steps: int, lr: float) -> list[float]:
    """Training losses of `steps` AdamW steps at a constant `lr`: no warm-up, no clipping, no
    weight decay (the batch of step s is ``sampler.batch(s)``). A non-finite loss is recorded and
    training goes on."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        x, y = sampler.batch(step)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
