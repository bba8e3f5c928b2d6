"""Megatron-style tensor parallelism and sequence parallelism for a `GPTStage`, written by hand.

Column-parallel and row-parallel linears joined by the conjugate operators ``f``/``g``
(Shoeybi et al. 2019), a vocabulary-parallel embedding, tied head and cross-entropy, and sequence
parallelism's reduce-scatter/all-gather (Korthikanti et al. 2022), all on plain
``torch.distributed`` so that reading it is the lesson; layers are sliced from the full model, so a
tensor-parallel run starts from the single-process weights. Explained in the book, chapter 5,
sections 5.4 (tensor parallelism) and 5.5 (sequence parallelism).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.config import ConfigError, ModelConfig
from lmkit.model import CausalSelfAttention

__all__ = [
    "copy_to_tp",
    "reduce_from_tp",
    "scatter_to_sequence",
    "gather_from_sequence",
    "reduce_scatter_to_sequence",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "TPRNGTracker",
    "get_tp_rng_tracker",
    "seed_tp_rng",
    "fork_tp_rng",
    "replicated_rng",
    "RegionDropout",
    "TPCausalSelfAttention",
    "qkv_shard_rows",
    "validate_tp",
    "parallelize_stage",
    "allreduce_sequence_parallel_grads",
    "ShardSpec",
    "shard_spec",
    "gather_full_param",
    "shard_full_param",
]

# torch 2.13 renamed the "into one tensor" collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --------------------------------------------------------------------------- raw collectives


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _check_divisible(x: Tensor, dim: int, size: int, what: str) -> None:
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
    _check_divisible(x, dim, size, "split along the sequence")
    return x.chunk(size, dim)[_group_rank(group)].contiguous()


def _all_gather(x: Tensor, dim: int, group) -> Tensor:
    """Concatenate every rank's `x` along `dim` (the collective works on dim 0: move it there)."""
    size = _group_size(group)
    if size == 1:
        return x
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.size(0), *front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group) -> Tensor:
    """Sum `x` over the group and keep this rank's chunk along `dim`."""
    size = _group_size(group)
    if size == 1:
        return x
    _check_divisible(x, dim, size, "reduce-scatter along the sequence")
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.size(0) // size, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
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


def _tp_input(x: Tensor, group, sequence_parallel: bool) -> Tensor:
    """The operator in front of a column-parallel layer: ``f``, or under SP the all-gather."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)


# --------------------------------------------------------------------------- shard layouts


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over the tensor-parallel group.

    ``dim``: the dimension of the full tensor that is split; ``full_size``: its full length;
    ``index``: the positions along ``dim`` this rank holds, or ``None`` for the plain layout
    "rank r holds contiguous chunk r of tp equal chunks".
    """

    dim: int
    full_size: int
    index: Tensor | None = None


def qkv_shard_rows(n_head: int, head_dim: int, tp_rank: int, tp_size: int) -> Tensor:
    """Rows of the fused ``qkv`` weight ([q | k | v], each n_head x head_dim rows) rank r holds.

    For each of q, k and v: heads ``[r*H/tp, (r+1)*H/tp)``, ``head_dim`` rows each, in order,
    so the local output is again laid out ``[q | k | v]`` with ``H/tp`` heads, and the unchanged
    attention module finds its local head count from the width.
    """
    local = n_head // tp_size
    d = n_head * head_dim
    heads = torch.arange(tp_rank * local * head_dim, (tp_rank + 1) * local * head_dim)
    return torch.cat([part * d + heads for part in range(3)])


def _take(t: Tensor, dim: int, rank: int, size: int, index: Tensor | None) -> Tensor:
    if index is None:
        if t.size(dim) % size != 0:
            raise ConfigError(f"cannot split dimension {dim} of size {t.size(dim)} into tp={size} "
                              "equal shards")
        return t.chunk(size, dim)[rank].contiguous()
    return t.index_select(dim, index.to(t.device)).contiguous()


# --------------------------------------------------------------------------- parallel layers


class ColumnParallelLinear(nn.Module):
    """``y_r = x @ W_r^T + b_r``: rank r holds rows ``shard_rows`` of W (output features).

    The input is replicated (without SP it goes through ``f``; with SP each rank holds a
    sequence chunk, all-gathered first); the output stays sharded along the features.
    ``input_op=False`` skips that operator when the caller has already applied it (the
    attention under SP must see the gathered sequence *before* its ``qkv``, see
    `TPCausalSelfAttention`).
    """

    def __init__(self, full: nn.Linear, tp_rank: int, tp_size: int, group, sequence_parallel: bool = False,
                 shard_rows: Tensor | None = None, input_op: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.sequence_parallel = sequence_parallel
        self.input_op = input_op
        self.shard_rows = shard_rows
        self.full_out_features = full.out_features
        self.in_features = full.in_features
        w = _take(full.weight.detach(), 0, tp_rank, tp_size, shard_rows)
        self.out_features = w.size(0)
        self.weight = nn.Parameter(w.clone(), requires_grad=full.weight.requires_grad)
        if full.bias is not None:
            self.bias = nn.Parameter(_take(full.bias.detach(), 0, tp_rank, tp_size, shard_rows).clone())
        else:
            self.register_parameter("bias", None)

    def shard_specs(self) -> dict[str, ShardSpec | None]:
        spec = ShardSpec(0, self.full_out_features, self.shard_rows)
        return {"weight": spec, "bias": spec}

    def forward(self, x: Tensor) -> Tensor:
        if self.input_op:
            x = _tp_input(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(of {self.full_out_features}), tp_rank={self.tp_rank}/{self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """``y = sum_r x_r @ W_r^T + b``: rank r holds columns ``shard_cols`` of W (input features).

    The input is already sharded along the features (the output of a column-parallel layer);
    the partial products are summed by ``g`` (all-reduce), or under SP reduce-scattered into
    this rank's sequence chunk. The bias is replicated and added once, *after* the sum.
    """

    def __init__(self, full: nn.Linear, tp_rank: int, tp_size: int, group, sequence_parallel: bool = False,
                 shard_cols: Tensor | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.sequence_parallel = sequence_parallel
        self.shard_cols = shard_cols
        self.full_in_features = full.in_features
        self.out_features = full.out_features
        w = _take(full.weight.detach(), 1, tp_rank, tp_size, shard_cols)
        self.in_features = w.size(1)
        self.weight = nn.Parameter(w.clone(), requires_grad=full.weight.requires_grad)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    def shard_specs(self) -> dict[str, ShardSpec | None]:
        return {"weight": ShardSpec(1, self.full_in_features, self.shard_cols), "bias": None}

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(y, self.group)
        else:
            y = reduce_from_tp(y, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (of {self.full_in_features}), "
                f"out_features={self.out_features}, "
                f"tp_rank={self.tp_rank}/{self.tp_size}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Rank r holds embedding rows ``[r*V/tp, (r+1)*V/tp)``.

    A token id outside the local range looks up row 0 and is zeroed, so exactly one rank
    contributes each token's vector; summing over the group (``g``) gives the full lookup. Under
    SP the sum is a reduce-scatter, so the output is already this rank's sequence chunk
    ``[b, T/tp, d]`` (half the bytes of the all-reduce, and no split afterwards).
    """

    def __init__(self, full: nn.Embedding, tp_rank: int, tp_size: int, group,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        V = full.num_embeddings
        if V % tp_size != 0:
            raise ConfigError(f"vocab_size={V} is not divisible by tp={tp_size}")
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.sequence_parallel = sequence_parallel
        self.num_embeddings, self.embedding_dim = V, full.embedding_dim
        per_rank = V // tp_size
        self.vocab_start, self.vocab_end = tp_rank * per_rank, (tp_rank + 1) * per_rank
        self.weight = nn.Parameter(full.weight.detach()[self.vocab_start:self.vocab_end].clone())

    def shard_specs(self) -> dict[str, ShardSpec | None]:
        return {"weight": ShardSpec(0, self.num_embeddings, None)}

    def forward(self, idx: Tensor) -> Tensor:
        if self.sequence_parallel:
            _check_divisible(idx, 1, self.tp_size, "sequence-parallel embedding")
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


# --------------------------------------------------------------------------- vocab-parallel loss


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy from logits sharded over the vocabulary (Megatron's algorithm).

    ``loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,t_i - m_i)`` with ``m_i`` the global max; each
    of the three global quantities (max, exp-sum, target logit) is one all-reduce of ``[N]``
    numbers instead of a gather of ``[N, V]`` logits. Backward is local: ``softmax - onehot``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, tp_rank: int, tp_size: int,
                ignore_index: int) -> Tensor:
        in_dtype = logits.dtype
        z = logits.reshape(-1, logits.size(-1)).float()
        t = targets.reshape(-1)
        n_local = z.size(-1)
        start = tp_rank * n_local
        # 1. global max per token (for exp's stability; a constant shift, so no gradient)
        m = z.max(dim=-1).values
        if tp_size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m.unsqueeze(-1)
        # 2. the target's logit, picked by the rank that owns it (0 elsewhere), then summed
        outside = (t < start) | (t >= start + n_local)  # also true for ignore_index (-100)
        local_t = (t - start).masked_fill(outside, 0)
        rows = torch.arange(z.size(0), device=z.device)
        picked = z[rows, local_t].masked_fill(outside, 0.0)
        # 3. the softmax denominator
        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        if tp_size > 1:
            both = torch.stack([picked, sum_exp])  # one all-reduce for the two sums
            dist.all_reduce(both, group=group)
            picked, sum_exp = both[0], both[1]
        valid = t != ignore_index
        count = valid.sum()
        loss = ((torch.log(sum_exp) - picked) * valid).sum() / count
        exp.div_(sum_exp.unsqueeze(-1))  # softmax of the local shard
        ctx.save_for_backward(exp, local_t, outside, valid, count)
        ctx.shape, ctx.in_dtype = logits.shape, in_dtype
        return loss.to(in_dtype) if in_dtype in (torch.float16, torch.bfloat16) else loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        softmax, local_t, outside, valid, count = ctx.saved_tensors
        grad = softmax  # saved only for this; safe to update in place
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_t] -= (~outside).to(grad.dtype)
        grad.mul_((valid.to(grad.dtype) * (grad_loss.float() / count)).unsqueeze(-1))
        return grad.view(ctx.shape).to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: Tensor, targets: Tensor, group, tp_rank: int, tp_size: int,
                                 ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over tokens whose target is not `ignore_index`.

    ``local_logits`` ``[..., V/tp]``: this rank's vocabulary shard (rows ``[r*V/tp, (r+1)*V/tp)``);
    ``targets`` ``[...]``: full token ids, the same on every rank. Equals ``F.cross_entropy`` on
    the full logits (value and gradient); the result is the same on every rank of the group.
    """
    return _VocabParallelCrossEntropy.apply(local_logits, targets, group, tp_rank, tp_size, ignore_index)


# --------------------------------------------------------------------------- dropout RNG


def _cuda_active() -> bool:
    # only a process that already uses CUDA swaps CUDA states (never create a context for it)
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_state(seed: int) -> Tensor:
    gen = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
    return gen.manual_seed(seed).get_state()


def _get_rng_states() -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_active() else None


def _set_rng_states(states: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


class TPRNGTracker:
    """Two random streams: the default one (the same on every tp rank) and a per-tp-rank one.

    Megatron's "model-parallel RNG tracker". Dropout must draw

    - the **same** mask on every tp rank where the ranks hold the same data (the residual stream
      without SP): otherwise the replicas drift apart and the model is no longer one model;
    - **different** masks where ranks hold different data (attention probabilities of different
      heads; any activation under SP): otherwise every shard gets the same pattern and the
      dropout noise is correlated in a way the single-process model's is not.

    The default generator stays in step on all tp ranks because they all seed it alike and
    draw from it identically; `fork` swaps in the per-rank state (seeded from ``(seed,
    tp_rank)``, offset 2718 as in Megatron) and swaps back, keeping the advanced state for the
    next fork. `unfork` temporarily returns to the default stream inside a fork (the residual
    dropout inside the attention module without SP).
    """

    OFFSET = 2718

    def __init__(self) -> None:
        self.states: tuple[Tensor, Tensor | None] | None = None
        self._outer: tuple[Tensor, Tensor | None] | None = None  # default state while forked
        self.seed_value: int | None = None

    @property
    def forked(self) -> bool:
        return self._outer is not None

    def seed(self, seed: int, tp_rank: int) -> None:
        value = seed + self.OFFSET + tp_rank
        cpu = torch.Generator().manual_seed(value).get_state()
        cuda = _cuda_state(value) if _cuda_active() else None
        self.states, self._outer, self.seed_value = (cpu, cuda), None, value

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from this tp rank's own stream inside the block (re-entrant)."""
        if self.forked:
            yield
            return
        if self.states is None:
            raise RuntimeError("the tensor-parallel RNG is not seeded: call seed_tp_rng(seed, tp_rank) "
                               "(parallelize_stage does it)")
        if self.states[1] is None and _cuda_active():  # CUDA came into use after seeding
            self.states = (self.states[0], _cuda_state(self.seed_value))
        self._outer = _get_rng_states()
        _set_rng_states(self.states)
        try:
            yield
        finally:
            self.states = _get_rng_states()
            _set_rng_states(self._outer)
            self._outer = None

    @contextlib.contextmanager
    def unfork(self) -> Iterator[None]:
        """Draw from the default (replicated) stream inside the block, even within a fork."""
        if not self.forked:
            yield
            return
        self.states = _get_rng_states()
        _set_rng_states(self._outer)
        self._outer = None
        try:
            yield
        finally:
            self._outer = _get_rng_states()
            _set_rng_states(self.states)

    def state_dict(self) -> dict:
        return {"states": self.states, "seed_value": self.seed_value}

    def load_state_dict(self, state: dict) -> None:
        self.states, self.seed_value, self._outer = state["states"], state["seed_value"], None


_TRACKER = TPRNGTracker()


def get_tp_rng_tracker() -> TPRNGTracker:
    """The process-wide tracker (one per process, like the default generator it shadows)."""
    return _TRACKER


def seed_tp_rng(seed: int, tp_rank: int) -> None:
    """(Re)seed this rank's tensor-parallel stream from ``(seed, tp_rank)``."""
    _TRACKER.seed(seed, tp_rank)


def fork_tp_rng() -> contextlib.AbstractContextManager:
    """Context manager: dropout inside draws this tp rank's own masks."""
    return _TRACKER.fork()


def replicated_rng() -> contextlib.AbstractContextManager:
    """Context manager: dropout inside draws the masks shared by all tp ranks."""
    return _TRACKER.unfork()


class RegionDropout(nn.Dropout):
    """``nn.Dropout`` that draws from the replicated (``region="replicated"``) or the per-tp-rank
    (``region="tp"``) stream."""

    def __init__(self, p: float, region: str) -> None:
        super().__init__(p)
        if region not in ("replicated", "tp"):
            raise ValueError(f"region must be 'replicated' or 'tp', got {region!r}")
        self.region = region

    def forward(self, x: Tensor) -> Tensor:
        with fork_tp_rng() if self.region == "tp" else replicated_rng():
            return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, region={self.region}"


class TPCausalSelfAttention(CausalSelfAttention):
    """The same attention, with its input operator in front and its forward in this rank's RNG.

    - The input operator (``f``, or under SP the sequence all-gather) is applied here rather
      than inside ``qkv`` (built with ``input_op=False``): the unchanged attention reads the
      sequence length from its input, which under SP must already be the full sequence.
    - Each rank computes different heads, so the attention-probability dropout inside
      ``scaled_dot_product_attention`` must differ between ranks: the forward runs under
      `fork_tp_rng` (the residual dropout escapes it where it must be replicated).

    `parallelize_stage` switches an existing module's class to this one (``attn.__class__ =
    ...``) and sets ``tp_group`` and ``sequence_parallel``; that keeps the module, its
    parameters and its ``state_dict`` names.
    """

    tp_group = None
    sequence_parallel = False

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        x = _tp_input(x, self.tp_group, self.sequence_parallel)
        with fork_tp_rng():
            return super().forward(x, *args, **kwargs)


# --------------------------------------------------------------------------- the stage


def validate_tp(config: ModelConfig, tp: int, sequence_parallel: bool = False) -> None:
    """Raise `ConfigError` if the model cannot be split over `tp` ranks."""
    if tp == 1:
        if sequence_parallel:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
        return
    if config.n_head % tp != 0:
        options = [t for t in range(1, config.n_head + 1) if config.n_head % t == 0]
        raise ConfigError(
            f"model.n_head={config.n_head} is not divisible by parallel.tp={tp}: each tensor-parallel "
            f"rank computes n_head/tp whole attention heads; choose tp among {options} or change n_head")
    if config.vocab_size % tp != 0:
        padded = -(-config.vocab_size // tp) * tp
        raise ConfigError(
            f"model.vocab_size={config.vocab_size} is not divisible by parallel.tp={tp}: the vocab-parallel "
            f"embedding gives every rank vocab_size/tp rows; pad the vocabulary to a multiple of tp "
            f"(e.g. vocab_size={padded}; Megatron pads to a multiple of 128*tp) or choose another tp")
    if sequence_parallel and config.block_size % tp != 0:
        raise ConfigError(
            f"model.block_size={config.block_size} is not divisible by parallel.tp={tp}: sequence "
            f"parallelism gives every rank seq_len/tp positions; use a block_size (and seq_len) that is "
            f"a multiple of {tp}, or turn sequence_parallel off")


def parallelize_stage(stage: nn.Module, topo, sequence_parallel: bool = False, seed: int = 0) -> nn.Module:
    """Shard `stage` (a `GPTStage`) over ``topo.tp_group`` in place and return it.

    Swaps ``attn.qkv`` and ``mlp.fc`` for column-parallel layers (qkv per head inside each of
    q, k, v), ``attn.proj`` and ``mlp.proj`` for row-parallel ones, ``tok_emb`` (first stage)
    for a vocab-parallel embedding and ``head`` (last stage) for a column-parallel layer over
    the vocabulary that shares the embedding shard's Parameter when both are in this stage; the
    loss becomes `vocab_parallel_cross_entropy`. Dropouts draw from the right RNG stream.

    Marks every parameter with ``tp_sharded`` (its gradient norm must be summed over the tp
    group) and ``sequence_parallel_grad`` (its gradient is partial under SP and must go
    through `allreduce_sequence_parallel_grads` after backward). The module names and hence
    the ``state_dict`` keys are unchanged; `gather_full_param` restores full tensors.
    """
    tp, rank, group = topo.tp, topo.tp_rank, topo.tp_group
    cfg = stage.config
    validate_tp(cfg, tp, sequence_parallel)
    stage.tp_rank, stage.tp_size, stage.sequence_parallel = rank, tp, bool(sequence_parallel)
    stage.tp_group = group
    for p in stage.parameters():
        p.tp_sharded, p.sequence_parallel_grad = False, False
    if tp == 1:
        return stage
    sp = bool(sequence_parallel)
    seed_tp_rng(seed, rank)
    hidden_region = "tp" if sp else "replicated"
    head_dim = cfg.d_model // cfg.n_head

    def region_dropout(old: nn.Dropout) -> RegionDropout:
        return RegionDropout(old.p, hidden_region)

    if stage.is_first:
        stage.tok_emb = VocabParallelEmbedding(stage.tok_emb, rank, tp, group, sp)
        stage.drop = region_dropout(stage.drop)
    for block in stage.blocks:
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, CausalSelfAttention):
            raise TypeError(f"expected CausalSelfAttention, got {type(attn).__name__}")
        attn.qkv = ColumnParallelLinear(attn.qkv, rank, tp, group, sp, input_op=False,
                                        shard_rows=qkv_shard_rows(cfg.n_head, head_dim, rank, tp))
        attn.proj = RowParallelLinear(attn.proj, rank, tp, group, sp)  # local heads = contiguous columns
        attn.resid_drop = region_dropout(attn.resid_drop)
        attn.__class__ = TPCausalSelfAttention
        attn.tp_group, attn.sequence_parallel = group, sp
        mlp.fc = ColumnParallelLinear(mlp.fc, rank, tp, group, sp)
        mlp.proj = RowParallelLinear(mlp.proj, rank, tp, group, sp)
        mlp.drop = region_dropout(mlp.drop)
    if stage.is_last:
        head = ColumnParallelLinear(stage.head, rank, tp, group, sp)
        if stage.is_first:  # tied: the head multiplies by the very same shard of the embedding
            head.weight = stage.tok_emb.weight
        stage.head = head
        stage.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=group, tp_rank=rank, tp_size=tp)

    specs: dict[str, ShardSpec | None] = {}
    for mod_name, mod in stage.named_modules():
        if hasattr(mod, "shard_specs"):
            for attr, spec in mod.shard_specs().items():
                specs[f"{mod_name}.{attr}"] = spec
    stage.tp_shard_specs = specs
    for name, p in stage.named_parameters(remove_duplicate=False):
        p.tp_sharded = specs.get(name) is not None
        p.sequence_parallel_grad = False
    if sp:  # replicated parameters that see only this rank's sequence chunk
        for name, p in stage.named_parameters():
            replicated_in_sp = (".ln1." in name or ".ln2." in name or name.startswith("ln_f.")
                                or name == "pos_emb.weight"
                                or (name.endswith("proj.bias") and not p.tp_sharded))
            p.sequence_parallel_grad = replicated_in_sp
    return stage


def allreduce_sequence_parallel_grads(stages: nn.Module | Iterable[nn.Module], topo) -> None:
    """Sum the partial gradients of sequence-parallel-replicated parameters over the tp group.

    Under SP, LayerNorm weights, the position embedding and row-parallel biases are replicated
    but each rank's copy saw only its sequence chunk; the full gradient is the sum. One
    all-reduce of a flat buffer (call after backward, before data-parallel reduction).
    """
    if topo.tp == 1:
        return
    if isinstance(stages, nn.Module):
        stages = [stages]
    grads = [p.grad for s in stages for p in s.parameters()
             if getattr(p, "sequence_parallel_grad", False) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=topo.tp_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------- full <-> local


def shard_spec(stage: nn.Module) -> dict[str, ShardSpec | None]:
    """``{local state_dict name: ShardSpec}`` for the sharded tensors of a parallelized stage
    (names absent or mapped to None are replicated)."""
    return getattr(stage, "tp_shard_specs", {})


def gather_full_param(stage: nn.Module, local_name: str, tensor: Tensor) -> Tensor:
    """The full tensor from every tp rank's shard of `local_name` (a parameter, its gradient or an
    optimizer state of the same shape). Collective over the tp group for sharded names: every tp
    rank must call it with the same names in the same order. Replicated tensors come back as is.
    """
    spec = shard_spec(stage).get(local_name)
    size = getattr(stage, "tp_size", 1)
    if spec is None or size == 1:
        return tensor
    group = stage.tp_group
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    if spec.index is None:
        return torch.cat(parts, dim=spec.dim)
    index = spec.index.to(tensor.device)
    indices = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(indices, index, group=group)
    shape = list(tensor.shape)
    shape[spec.dim] = spec.full_size
    full = tensor.new_empty(shape)
    for idx, part in zip(indices, parts, strict=True):
        full.index_copy_(spec.dim, idx, part)
    return full


def shard_full_param(stage: nn.Module, local_name: str, full_tensor: Tensor) -> Tensor:
    """This rank's shard of a full tensor for `local_name` (no communication)."""
    spec = shard_spec(stage).get(local_name)
    size = getattr(stage, "tp_size", 1)
    if spec is None or size == 1:
        return full_tensor
    if full_tensor.size(spec.dim) != spec.full_size:
        raise ValueError(f"{local_name}: full tensor has {full_tensor.size(spec.dim)} entries along dim "
                         f"{spec.dim}, expected {spec.full_size}")
    return _take(full_tensor, spec.dim, stage.tp_rank, size, spec.index)
