"""A compute sweep at book scale: IsoFLOP curves and the compute-optimal model size.

Chinchilla's first method (Hoffmann et al. 2022, section 3.2) in miniature: fix a FLOP budget C,
train models of several sizes N on D = C / (6 N) tokens each, fit the final validation loss as a
parabola in log N, and read off the size N*(C) at its minimum; over several budgets the fitted
N* ~ C^a gives the exponent (Chinchilla: a ~ 0.5, so that D* ~ 20 N*; Kaplan et al. 2020: 0.73).

N is the non-embedding parameter count (``GPT.num_params()``, Kaplan's convention); the budget
counts 6 N FLOPs per token and leaves the attention term out, as the scaling-law papers do.

- `tokens_for_budget`: D = C / (6 N);
- `fit_parabola`: least squares loss = a (ln N)^2 + b ln N + c, its minimum;
- `fit_power_law`: y = k x^a by least squares in log-log;
- `train_for_tokens`: one lean AdamW run of an lmkit GPT on a token budget, its final validation loss;
- `compute_sweep`: every (budget, shape) pair; `isoflop_fits`: one parabola per budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmkit.config import ModelConfig
from lmkit.model import build_model

__all__ = ["tokens_for_budget", "fit_parabola", "fit_power_law", "Parabola", "SweepPoint", "IsoFLOPFit",
           "batch_for", "train_for_tokens", "compute_sweep", "isoflop_fits"]


def tokens_for_budget(flops: float, n_params: int) -> float:
    """Training tokens D that a budget of `flops` buys a model of `n_params` at 6 FLOPs per
    parameter and token: D = C / (6 N)."""
    if flops <= 0 or n_params <= 0:
        raise ValueError(f"a budget needs positive flops and parameters, got C={flops}, N={n_params}")
    return flops / (6.0 * n_params)


@dataclass(frozen=True)
class Parabola:
    """``loss = a x^2 + b x + c`` with ``x = ln N``; `n_opt` = exp(-b / 2a), `loss_min` its value."""

    a: float
    b: float
    c: float

    @property
    def x_opt(self) -> float:
        return -self.b / (2.0 * self.a)

    @property
    def n_opt(self) -> float:
        return math.exp(self.x_opt)

    @property
    def loss_min(self) -> float:
        return self.c - self.b**2 / (4.0 * self.a)

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        x = np.log(n)
        return self.a * x**2 + self.b * x + self.c


def fit_parabola(n_params: Sequence[float], losses: Sequence[float]) -> Parabola:
    """Least-squares parabola of `losses` in ln(`n_params`); raises if it opens downwards (no minimum)."""
    x, y = np.log(np.asarray(n_params, dtype=float)), np.asarray(losses, dtype=float)
    if len(x) < 3:
        raise ValueError(f"a parabola needs at least 3 points, got {len(x)}")
    a, b, c = np.polyfit(x, y, 2)
    if a <= 0:
        raise ValueError(f"the fitted parabola opens downwards (a = {a:.3g}): no minimum in ln N")
    return Parabola(float(a), float(b), float(c))


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, k) of ``y = k x^a`` by least squares on ln y = a ln x + ln k."""
    a, ln_k = np.polyfit(np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float)), 1)
    return float(a), float(math.exp(ln_k))


@dataclass(frozen=True)
class SweepPoint:
    """One training run of the sweep."""

    budget: float        # FLOPs, C = 6 N D
    shape: str           # "L x d"
    n_params: int        # non-embedding parameters N
    tokens: int          # D actually trained on (whole steps)
    steps: int
    batch_size: int      # sequences per step
    val_loss: float      # nats per token, after the last step
    seconds: float


@dataclass(frozen=True)
class IsoFLOPFit:
    budget: float
    parabola: Parabola

    @property
    def n_opt(self) -> float:
        return self.parabola.n_opt

    @property
    def tokens_opt(self) -> float:
        return tokens_for_budget(self.budget, self.n_opt)


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_for_tokens(config: ModelConfig, train_ids: torch.Tensor,
                     val_ids: torch.Tensor, tokens: float, *, batch_size: int = 16,
                     lr: float = 3e-3, seed: int = 0,
                     eval_windows: int = 256) -> tuple[float, int, float]:
    """Train a fresh GPT of `config` on about `tokens` tokens of `train_ids`.

    Random windows of ``block_size``; AdamW with a short warm-up and a cosine decay to
    lr/10 over exactly this run's steps. Returns (the final validation loss in nats per
    token on `eval_windows` evenly spaced windows of `val_ids`, steps, seconds).
    """
    T = config.block_size
    steps = max(1, round(tokens / (batch_size * T)))
    torch.manual_seed(seed)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(T + 1)
    warmup = max(1, min(20, steps // 10))
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, len(train_ids) - T - 1, (batch_size,), generator=gen)
        window = train_ids[starts[:, None] + offsets]
        _, loss = model(window[:, :-1], window[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    starts = torch.linspace(0, len(val_ids) - T - 2, eval_windows).long()
    window = val_ids[starts[:, None] + offsets]
    with torch.no_grad():
        logits, _ = model(window[:, :-1], window[:, 1:])
        val = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).item()
    return val, steps, time.perf_counter() - started


def batch_for(tokens: float, block_size: int, steps: int, smallest: int = 2, largest: int = 512) -> int:
    """Sequences per batch so that `tokens` take about `steps` optimizer steps, within
    [`smallest`, `largest`]: a small model's many tokens go in large batches, a large model's few
    tokens still make enough steps to train."""
    return int(min(largest, max(smallest, round(tokens / (block_size * steps)))))


def compute_sweep(shapes: Sequence[ModelConfig], budgets: Sequence[float], train_ids: torch.Tensor,
                  val_ids: torch.Tensor, *, steps: int = 300, smallest_batch: int = 2,
                  largest_batch: int = 512,
                  lr: float = 3e-3, seed: int = 0, min_steps: int = 10,
                  eval_windows: int = 256) -> list[SweepPoint]:
    """Train every shape at every budget on D = C / (6 N) tokens, in batches sized by `batch_for`
    for about `steps` steps; skip pairs with fewer than `min_steps` steps (too few to say anything
    about the model)."""
    points = []
    for budget in budgets:
        for config in shapes:
            n = build_model(config).num_params()
            tokens = tokens_for_budget(budget, n)
            batch_size = batch_for(tokens, config.block_size, steps, smallest_batch, largest_batch)
            if round(tokens / (batch_size * config.block_size)) < min_steps:
                continue
            val, taken, seconds = train_for_tokens(config, train_ids, val_ids, tokens, batch_size=batch_size,
                                                   lr=lr, seed=seed, eval_windows=eval_windows)
            points.append(SweepPoint(budget, f"{config.n_layer} x {config.d_model}", n,
                                     taken * batch_size * config.block_size, taken, batch_size, val,
                                     seconds))
    return points


def isoflop_fits(points: Sequence[SweepPoint]) -> list[IsoFLOPFit]:
    """One parabola in ln N per budget with at least 3 runs and a minimum (budgets whose fit opens
    downwards are left out)."""
    fits = []
    for budget in sorted({p.budget for p in points}):
        runs = [p for p in points if p.budget == budget]
        if len(runs) < 3:
            continue
        try:
            parabola = fit_parabola([p.n_params for p in runs], [p.val_loss for p in runs])
            fits.append(IsoFLOPFit(budget, parabola))
        except ValueError:
            continue
    return fits
