"""The communication operators of tensor and sequence parallelism, apart from the layers using them.

Raw collectives on a process group (a no-op on a group of one), and the autograd pairs
(forward collective, backward collective) of Megatron-LM (Shoeybi et al. 2019): ``f`` / ``g``
around a tensor-parallel region, and sequence parallelism's scatter / all-gather /
reduce-scatter along the sequence (Korthikanti et al. 2022). Explained in the book, chapter 5,
sections 5.4 and 5.5; the layers are in `lmkit.parallel.tensor_parallel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lmkit.config import ConfigError

__all__ = ["all_gather_single", "reduce_scatter_single", "copy_to_tp", "reduce_from_tp",
           "scatter_to_sequence", "gather_from_sequence", "reduce_scatter_to_sequence", "tp_input",
           "check_divisible"]

# torch 2.13 renamed the "into one tensor" collectives; keep working on older releases.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def check_divisible(x: Tensor, dim: int, size: int, what: str) -> None:
    if x.size(dim) % size != 0:
        raise ConfigError(
            f"{what}: dimension {dim} of a tensor of shape {tuple(x.shape)} has {x.size(dim)} entries, "
            f"not divisible by the tensor-parallel size tp={size}. Under sequence parallelism the "
            f"sequence length must be a multiple of tp: use a seq_len/block_size divisible by {size}"
        )


def _all_reduce(x: Tensor, group) -> Tensor:
    if _group_size(group) == 1:
        return x
    x = x.contiguous().clone()  # never modify a tensor autograd may have saved
    dist.all_reduce(x, group=group)
    return x


def _split(x: Tensor, dim: int, group) -> Tensor:
    """This rank's chunk of `x` along `dim` (no communication)."""
    size = _group_size(group)
    if size == 1:
        return x
    check_divisible(x, dim, size, "split along the sequence")
    return x.chunk(size, dim)[_group_rank(group)].contiguous()


def _all_gather(x: Tensor, dim: int, group) -> Tensor:
    """Concatenate every rank's `x` along `dim` (the collective works on dim 0: move it there)."""
    size = _group_size(group)
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.size(0), *front.shape[1:]))
    all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group) -> Tensor:
    """Sum `x` over the group and keep this rank's chunk along `dim`."""
    size = _group_size(group)
    if size == 1:
        return x
    check_divisible(x, dim, size, "reduce-scatter along the sequence")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.size(0) // size, *front.shape[1:]))
    reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


# --------------------------------------------------------------------------- autograd operators
#
# Each operator is a pair (forward collective, backward collective) that are adjoint to each
# other: the backward of "everyone gets the sum" is "everyone gets the sum of the gradients"
# only when the forward's inputs were partial sums, etc. Getting a pair wrong gives gradients
# that are off by a factor tp or silently partial, which is exactly what the tests check.


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce backward (the input is replicated; each rank's use of it
    produces a partial gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (sum the partial products), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's sequence chunk forward; all-gather the chunks' gradients backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, 1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """SP's f: all-gather the sequence forward; reduce-scatter backward (every rank's use of the
    full sequence produces a partial gradient for every position; each keeps its chunk's sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter(grad, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """SP's g: sum the partial products and keep this rank's sequence chunk; all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, 1, ctx.group), None


def copy_to_tp(x: Tensor, group) -> Tensor:
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    """Megatron's ``g``: all-reduce forward, identity backward."""
    return _ReduceFromTP.apply(x, group)


def scatter_to_sequence(x: Tensor, group) -> Tensor:
    """``[b, T, ...] -> [b, T/tp, ...]`` (this rank's chunk); backward all-gathers."""
    return _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: Tensor, group) -> Tensor:
    """``[b, T/tp, ...] -> [b, T, ...]`` by all-gather; backward reduce-scatters."""
    return _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: Tensor, group) -> Tensor:
    """Partial ``[b, T, ...]`` on every rank -> summed ``[b, T/tp, ...]`` chunk; backward all-gathers."""
    return _ReduceScatterToSequence.apply(x, group)


def tp_input(x: Tensor, group, sequence_parallel: bool) -> Tensor:
    """The operator in front of a column-parallel layer: ``f``, or under SP the all-gather."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)
