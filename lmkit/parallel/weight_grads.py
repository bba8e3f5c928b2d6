"""B now, W later: a stage's backward split into the gradient of its input and those of its weights.

A zero-bubble pipeline schedule (`lmkit.parallel.pipeline`, ZB-H1; Qi et al. 2024) sends a stage's
input gradient (B) upstream as soon as it exists and computes the weight gradients (W) later, where
the schedule would otherwise idle. For a linear layer ``y = x W^T + b`` the split is exact and cheap:
B is ``dL/dx = g W`` and W is ``dL/dW = g^T x``, ``dL/db = sum g``, which need only the layer's
input ``x`` and output gradient ``g``. `deferred_weight_grads` makes every ``F.linear`` of a stage a
`DeferredLinear` that keeps these two for later (`WeightGradStore`), without changing the model.
Explained in the book, chapter 5 (zero-bubble pipelines).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Accumulate", "add_to_grad", "WeightGradStore", "DeferredLinear", "deferred_weight_grads"]

#: ``accumulate(param, grad)``: add a deferred weight gradient where backward would have put it
Accumulate = Callable[[Tensor, Tensor], None]


def add_to_grad(param: Tensor, grad: Tensor) -> None:
    """Add `grad` to ``param.grad`` as autograd would (the default `Accumulate`)."""
    param.grad = grad.to(param.dtype) if param.grad is None else param.grad.add_(grad)


class WeightGradStore:
    """The W of each ``(microbatch, chunk)``: the input and the output gradient of every linear layer
    its B went through, kept until the schedule runs that W."""

    def __init__(self, accumulate: Accumulate) -> None:
        self.accumulate, self.key = accumulate, None
        self.pending: dict[tuple[int, int], list[tuple[Tensor, Tensor | None, Tensor, Tensor]]] = {}

    def defer(self, weight: Tensor, bias: Tensor | None, x: Tensor, grad: Tensor) -> None:
        self.pending.setdefault(self.key, []).append((weight, bias, x, grad))

    def run(self, key: tuple[int, int]) -> None:
        """W: ``dL/dW = g^T x`` and ``dL/db = sum g`` of every deferred layer, then the saved tensors die."""
        with torch.no_grad():
            for weight, bias, x, grad in self.pending.pop(key, []):
                g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
                self.accumulate(weight, g2.t() @ x2)
                if bias is not None:
                    self.accumulate(bias, g2.sum(0))

    def held(self) -> int:
        return len(self.pending)


class DeferredLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns the input gradient (B) and stores what the weight gradient
    (W) needs: the input and the output gradient. Under autocast it casts as autocast would (the
    product in bf16; the input gradient back to the input's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, store: WeightGradStore) -> Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        xc, wc = (x.to(dtype), weight.to(dtype)) if dtype is not None else (x, weight)
        bc = bias.to(dtype) if bias is not None and dtype is not None else bias
        with torch.autocast(device, enabled=False):
            out = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.store, ctx.weight, ctx.bias, ctx.x_dtype = store, weight, bias, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc = ctx.saved_tensors
        ctx.store.defer(ctx.weight, ctx.bias, xc, grad)
        return (grad @ wc).to(ctx.x_dtype), None, None, None


class deferred_weight_grads(TorchFunctionMode):  # noqa: N801 (used as a context manager)
    """Within it, every ``F.linear`` whose weight is one of `params` defers its weight gradient to
    `store` (`DeferredLinear`): what lets a zero-bubble schedule run a stage's B now and its W later.
    The matrix products hold nearly all of a block's weight FLOPs; the norms' and embeddings' small
    gradients stay in B. Active around F and B (a recomputed forward under activation checkpointing
    runs inside B)."""

    def __init__(self, store: WeightGradStore, params: set[int]) -> None:
        super().__init__()
        self.store, self.params = store, params

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if id(weight) in self.params:
                return DeferredLinear.apply(x, weight, bias, self.store)
        return func(*args, **kwargs)
