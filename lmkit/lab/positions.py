"""Position information of a Transformer's input, written from the formulas (chapter 1).

Attention compares every query with every key and is blind to order: permute the tokens
and each output moves with its token, unchanged. A model learns order only from what
positions add:

- a learned table of vectors, one per position, added to the token embeddings (GPT-2,
  ``lmkit.model.GPT`` with ``pos="learned"``);
- `sinusoidal`: the fixed sines and cosines of Vaswani et al. (2017), added the same
  way;
- `rotate`: rotary embeddings (RoPE, Su et al. 2021), which turn each query and key by
  an angle proportional to its position, written with complex numbers so that it
  checks ``lmkit.model.apply_rope`` (the same rotation, with cos and sin tables).

`score_grid` gives the attention score of one fixed (query, key) content placed at every
pair of positions; `offset_spread` says how far such a grid is from depending on the
offset alone. Lines stay within 88 characters: chapter 1 prints these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sinusoidal", "rotate", "score_grid", "offset_spread"]


def sinusoidal(n_positions: int, d: int, base: float = 10000.0) -> Tensor:
    """[n_positions, d]: PE[p, 2i] = sin(p w_i), PE[p, 2i+1] = cos(p w_i), where
    w_i = base^(-2i/d)."""
    if d % 2:
        raise ValueError(f"sines and cosines come in pairs: d must be even, got {d}")
    p = torch.arange(n_positions, dtype=torch.float64)[:, None]
    angles = p * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [T, d/2]
    pe = torch.empty(n_positions, d, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = angles.sin(), angles.cos()
    return pe.float()


def rotate(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding of ``x`` [..., T, hd] at integer `positions` [T].

    Features j and j + hd/2 form z_j = x_j + i x_{j+hd/2}; at position p, z_j is
    multiplied by e^{i p theta_j}, theta_j = base^(-2j/hd). A query turned by angle a
    and a key turned by b score Re(q conj(k) e^{i(a-b)}): a function of a - b alone.
    """
    hd = x.shape[-1]
    if hd % 2:
        raise ValueError(f"rotary turns pairs of features: hd must be even, got {hd}")
    half = hd // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    angle = positions.double()[:, None] * theta  # [T, hd/2]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def score_grid(x_q: Tensor, x_k: Tensor, w_q: Tensor, w_k: Tensor, n_positions: int, *,
               table: Tensor | None = None, rotary: bool = False,
               base: float = 10000.0) -> Tensor:
    """[n_positions, n_positions] scores: query content `x_q` at position m (row), key
    content `x_k` at position n (column), through one head's `w_q`, `w_k` [d_head, d].

    With `table` [n_positions, d] the position vectors are added to the contents first
    (learned or sinusoidal positions); with ``rotary=True`` the projected query and key
    are rotated instead.
    """
    if (table is None) == (not rotary):
        raise ValueError("give either an additive position table or rotary=True")
    n = torch.arange(n_positions)
    if rotary:
        q = rotate((w_q @ x_q).expand(n_positions, -1), n, base)
        k = rotate((w_k @ x_k).expand(n_positions, -1), n, base)
    else:
        q, k = (x_q + table) @ w_q.T, (x_k + table) @ w_k.T
    return q @ k.T / math.sqrt(q.shape[-1])


def offset_spread(grid: Tensor) -> float:
    """Largest range (max - min) of a square grid along one of its diagonals (one offset
    n - m): zero exactly when the score depends on the offset alone."""
    size = grid.shape[0]
    diagonals = (grid.diagonal(o) for o in range(1 - size, size))
    return max(float(d.max() - d.min()) for d in diagonals)
