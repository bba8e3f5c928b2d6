"""The global gradient norm of data parallelism's buffers, and clipping by it.

A mixin of `lmkit.parallel.data_parallel.DataParallel` (it reads its ``groups``, ``zero``,
``norm_weights``, ``device``, ``dp`` and ``dp_group``): every rank sums the squares of the reduced
gradients it holds (its chunks under ZeRO, all of them without), weighted so that a tensor-parallel
replica counts once, and the sums are added over the ranks that hold different parts. The book,
chapter 5 (ZeRO) and chapter 6.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GradientNorm"]


class GradientNorm:
    """Squared norm, scaling and clipping of `DataParallel`'s reduced gradients."""

    def grad_sq_sum(self) -> Tensor:
        """Sum of ``norm_weights[i] * grad**2`` over the gradients this rank is responsible for,
        summed over the dp group (the same value on every dp rank).

        ZeRO-0: every rank holds all averaged gradients, so the local sum is already the
        group's. ZeRO-1/2: each rank sums its chunks and the sums are all-reduced.
        """
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in self.groups:
            store = g.shard_grad if self.zero == 2 else g.grad
            for i, lo, hi in g.segments:
                weight = self.norm_weights[i]
                if weight:
                    total += weight * torch.linalg.vector_norm(store[lo:hi], dtype=torch.float32) ** 2
        if self.zero and self.dp > 1:
            dist.all_reduce(total, group=self.dp_group)
        return total

    def scale_grads(self, factor: float | Tensor) -> None:
        """Multiply the (averaged) gradients in place; under ZeRO-2 only the own shard."""
        for g in self.groups:
            (g.shard_grad if self.zero == 2 else g.grad).mul_(factor)

    def clip_grad_norm_(self, max_norm: float, extra_groups: Sequence[Any] = ()) -> Tensor:
        """Clip like `torch.nn.utils.clip_grad_norm_` and return the total norm (before clipping).

        The squared norm is summed over the dp group and then over each of `extra_groups`
        (e.g. tp and pp groups; ``None`` entries are skipped, as `Topology` uses None for
        "no group").
        """
        sq = self.grad_sq_sum()
        for group in extra_groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
        self.scale_grads(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm
