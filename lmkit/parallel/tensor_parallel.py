"""Megatron-style tensor parallelism and sequence parallelism for a `GPTStage`, written by hand.

Column-parallel and row-parallel linears joined by the conjugate operators ``f``/``g``
(Shoeybi et al. 2019), a vocabulary-parallel embedding, tied head and cross-entropy, and sequence
parallelism's reduce-scatter/all-gather (Korthikanti et al. 2022), all on plain
``torch.distributed`` so that reading it is the lesson. Which module becomes which layer is
`lmkit.parallel.plan`'s table; the operators are in `lmkit.parallel.comm`, the random streams in
`lmkit.parallel.tp_rng`. Layers are sliced from the full model (on the meta device: shapes only),
so a tensor-parallel run starts from the single-process weights. Explained in the book, chapter 5,
sections 5.4 (tensor parallelism) and 5.5 (sequence parallelism).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.config import ConfigError, ModelConfig
from lmkit.parallel import plan
from lmkit.parallel.comm import (
    check_divisible,
    reduce_from_tp,
    reduce_scatter_to_sequence,
    tp_input,
)
from lmkit.parallel.plan import ShardSpec
from lmkit.parallel.tp_rng import RegionDropout, run_in_tp_rng, seed_tp_rng

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "vocab_parallel_cross_entropy",
    "validate_tp",
    "parallelize_stage",
    "allreduce_tp_partial_grads",
    "shard_spec",
    "gather_full_param",
    "shard_full_param",
]


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
    ``input_op=False`` skips that operator when the enclosing module applies it (the attention
    under SP must see the gathered sequence *before* its ``qkv``: the plan's ``heads`` style).
    """

    def __init__(self, full: nn.Linear, tp_rank: int, tp_size: int, group, sequence_parallel: bool = False,
                 shard_rows: Tensor | None = None, input_op: bool = True, parts: tuple[int, ...] | None = None
                 ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.sequence_parallel = sequence_parallel
        self.input_op = input_op
        self.shard_rows, self.parts = shard_rows, parts
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
        spec = ShardSpec(0, self.full_out_features, self.shard_rows, self.parts)
        return {"weight": spec, "bias": spec}

    def forward(self, x: Tensor) -> Tensor:
        if self.input_op:
            x = tp_input(x, self.group, self.sequence_parallel)
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
            check_divisible(idx, 1, self.tp_size, "sequence-parallel embedding")
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.group)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


_SHARDED = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


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
    if config.kv_heads % tp != 0:
        options = [t for t in range(1, config.kv_heads + 1) if config.kv_heads % t == 0]
        raise ConfigError(
            f"model.n_kv_head={config.kv_heads} is not divisible by parallel.tp={tp}: each tensor-parallel "
            f"rank keeps whole key/value heads with the query heads that share them; choose tp among "
            f"{options} or change n_kv_head")
    if config.ffn_width % tp != 0:
        raise ConfigError(
            f"the MLP's hidden width {config.ffn_width} is not divisible by parallel.tp={tp}: each rank "
            f"computes d_ff/tp of its features; choose d_ff a multiple of {tp} or another tp")
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


def _parallel_module(style: str, path: str, old: nn.Module, stage: nn.Module, sp: bool) -> nn.Module:
    """The module that replaces `old` under tensor parallelism (`old` itself where nothing changes)."""
    rank, tp, group = stage.tp_rank, stage.tp_size, stage.tp_group
    if style == "vocab":
        return VocabParallelEmbedding(old, rank, tp, group, sp)
    if style in ("column", "column_heads", "vocab_head"):
        spec = plan.shard_spec(f"{path}.weight", old.weight.shape, rank, tp, stage.config)
        return ColumnParallelLinear(old, rank, tp, group, sp, shard_rows=spec.index,
                                    input_op=style != "column_heads", parts=spec.parts)
    if style == "row":
        return RowParallelLinear(old, rank, tp, group, sp)
    if style == "dropout":
        return RegionDropout(old.p, "tp" if sp else "replicated")
    if style == "heads":  # every rank its own heads: the input op in front, the forward in its stream
        old.register_forward_pre_hook(lambda _m, args: (tp_input(args[0], group, sp), *args[1:]))
        run_in_tp_rng(old)
    return old  # norm, head_norm, positions: replicated (partial gradients: `allreduce_tp_partial_grads`)


def parallelize_stage(stage: nn.Module, topo, sequence_parallel: bool = False, seed: int = 0) -> nn.Module:
    """Shard `stage` (a `GPTStage`) over ``topo.tp_group`` in place, row by row of `plan.GPT_PLAN`,
    and return it.

    Column- and row-parallel linears, the vocab-parallel embedding, the head as a column-parallel
    layer over the vocabulary (sharing the embedding shard's Parameter when both are in this
    stage, the loss then `vocab_parallel_cross_entropy`), dropouts in the right random stream and
    the attention's input operator and stream (forward hooks). The module names and hence the
    ``state_dict`` keys are unchanged; `gather_full_param` restores full tensors.
    """
    tp, rank, group = topo.tp, topo.tp_rank, topo.tp_group
    validate_tp(stage.config, tp, sequence_parallel)
    sp = bool(sequence_parallel)
    stage.tp_rank, stage.tp_size, stage.sequence_parallel, stage.tp_group = rank, tp, sp, group
    stage.tp_shard_specs = {}
    if tp == 1:
        return stage
    seed_tp_rng(seed, rank)
    for path, row in list(plan.rows_in(stage)):
        old = stage.get_submodule(path)
        new = _parallel_module(row.style, path, old, stage, sp)
        if new is not old:
            stage.set_submodule(path, new)
        partner = plan.tied_to(row, stage.config.tie_embeddings)
        if partner is not None and hasattr(stage, partner):  # tied inside this stage: one Parameter
            new.weight = stage.get_submodule(partner).weight
    if stage.is_last:
        stage.loss_fn = functools.partial(vocab_parallel_cross_entropy, group=group, tp_rank=rank, tp_size=tp)
    stage.tp_shard_specs = {f"{name}.{attr}": spec for name, mod in stage.named_modules()
                            if isinstance(mod, _SHARDED) for attr, spec in mod.shard_specs().items()}
    return stage


def allreduce_tp_partial_grads(stages: nn.Module | Iterable[nn.Module], topo) -> None:
    """Sum the partial gradients of replicated parameters over the tp group (`plan.tp_partial`).

    The per-head norms (QK-norm) are replicated but each rank normalised only its own heads; under
    SP, the norms' weights, the position embedding and row-parallel biases are replicated but each
    rank's copy saw only its sequence chunk (`plan.sequence_partial`). The full gradient is the sum.
    One all-reduce of a flat buffer (call after backward, before data-parallel reduction); nothing
    when no parameter is partial.
    """
    if topo.tp == 1:
        return
    if isinstance(stages, nn.Module):
        stages = [stages]
    grads = [p.grad for s in stages for name, p in s.named_parameters()
             if plan.tp_partial(name, s.sequence_parallel) and p.grad is not None]
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
    if spec.parts is not None:  # every rank's rows follow from the part widths: nothing more to send
        indices = [spec.rows_of(r, size).to(tensor.device) for r in range(size)]
    else:
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
