"""The experts on paper: what a rank holds of them, the buckets of their gradients, what they send.

`stage_experts` is what one rank of a pipeline stage holds of the experts (``E / ep`` whole experts of
each MoE block, the same on every tp rank), `expert_buckets` the flat gradient buckets lmkit's engine
reduces over the expert-data-parallel group, `all_to_all_bytes` the bytes one rank sends in the
all-to-alls of one MoE layer, `moe_activation_bytes` what a block with experts keeps for backward
beyond a dense one. `lmkit.costs.per_rank` and `lmkit.costs.collectives` add them to a rank's memory
and communication. Pure Python, like all of `lmkit.costs`.
"""

from __future__ import annotations

import functools

from lmkit.costs.layout import BUCKET_CAP_BYTES, Layout, padded_numel, stage_chunks, stage_params, state_bytes
from lmkit.costs.model import CostError, Model

__all__ = ["stage_experts", "expert_buckets", "expert_states", "all_to_all_bytes", "moe_activation_bytes"]


@functools.lru_cache(maxsize=4096)
def _stage_experts(model: Model, pp: int, virtual_stages: int, stage: int, ep: int) -> tuple[int, int, int]:
    layout = Layout(pp=pp, virtual_stages=virtual_stages,
                    schedule="interleaved" if virtual_stages > 1 else "1f1b")
    chunks = stage_chunks(model, layout, stage)
    params = [p for p in stage_params(model, layout, stage) if p.split == "expert"]
    moe = sum(model.is_moe_block(i) for layers, _, _ in chunks for i in layers)
    return sum(p.local_numel(1, ep) for p in params), len(params), moe


def stage_experts(model: Model, layout: Layout, stage: int) -> tuple[int, int, int]:
    """(expert elements, expert tensors, MoE blocks) on one rank of pipeline rank `stage`: the E / ep
    experts of each MoE block of the stage, whole (the same on every tp rank)."""
    return _stage_experts(model, layout.pp, layout.virtual_stages, stage, layout.ep)


def expert_buckets(model: Model, layout: Layout, stage: int, grad_bytes: int = 4) -> list[int]:
    """Elements of the flat gradient buckets of the expert parameters of pipeline rank `stage`
    (reduced over the expert-data-parallel group, not over dp x cp): the rule of `zero_buckets` for
    the tensors `zero_buckets` leaves out, E / ep experts each; padded to a multiple of
    ``dp x cp / ep`` under ZeRO."""
    return list(_expert_buckets(model, layout.pp, layout.virtual_stages, stage, layout.ep,
                                BUCKET_CAP_BYTES // grad_bytes))


@functools.lru_cache(maxsize=4096)
def _expert_buckets(model: Model, pp: int, virtual_stages: int, stage: int, ep: int,
                    cap: int) -> tuple[int, ...]:
    layout = Layout(pp=pp, virtual_stages=virtual_stages,
                    schedule="interleaved" if virtual_stages > 1 else "1f1b")
    runs: list[int] = []
    for p in reversed([p for p in stage_params(model, layout, stage) if p.split == "expert"]):
        n = p.local_numel(1, ep)
        if not runs or runs[-1] + n > cap:
            runs.append(n)
        else:
            runs[-1] += n
    return tuple(runs)


def expert_states(model: Model, layout: Layout, stage: int, precision: str = "fp32", reduce: str = "fp32",
                  optimizer: str = "adamw") -> tuple[int, int, int]:
    """Bytes of (parameters, gradients, optimizer state) of the experts one rank of pipeline rank
    `stage` holds (ZeRO 0, 1, 2; under ZeRO-3, ep = 1, they are sharded with the rest).

    lmkit's engine keeps them in a data-parallel instance of their own over the expert-data-parallel
    group (``edp = dp x cp / ep``) with the dense rule: weights in the compute dtype, gradients in
    the reduce dtype, fp32 masters under mixed precision; AdamW's moments and a step counter per
    tensor (ZeRO: per bucket), or, with ``optimizer="muon"``, Muon's momentum only (every stacked
    expert tensor is Muon's: E / ep matrices orthogonalised one by one). ZeRO-1/2 pad every
    `expert_buckets` bucket to a multiple of edp and shard over it; a group of one replica
    (``ep = dp x cp``) is not sharded (the engine runs it without ZeRO).
    """
    held, count, _ = stage_experts(model, layout, stage)
    w, r, master = state_bytes(precision, reduce)
    muon = optimizer == "muon"
    moments, counters = (4, 0) if muon else (8, 4)
    edp = layout.expert_ranks
    zero = layout.zero if edp > 1 else 0
    if zero == 0:
        return w * held, r * held, (master + moments) * held + counters * count
    buckets = expert_buckets(model, layout, stage, r)
    padded = padded_numel(buckets, edp)
    return (w * padded, r * (padded // edp if zero >= 2 else padded),
            (master + moments) * (padded // edp) + counters * len(buckets))


def all_to_all_bytes(model: Model, layout: Layout, tokens: int, imbalance: float = 1.0,
                     dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes one rank *sends to other ranks* in the all-to-alls of one MoE layer and one microbatch.

    `tokens` is N, the tokens this rank routes (``b s / cp``, over ``tp`` under sequence parallelism),
    k = ``moe_top_k``, d = ``d_model``, b = `dtype_bytes` (the compute dtype: 2 bf16, 4 fp32), phi =
    `imbalance` (the rank's ``(R_out + R_in) / (2 N k (ep-1)/ep)``: 1 under uniform routing, where
    each of a token's k assignments leaves the rank with probability ``(ep-1)/ep``):

    - ``counts``: the forward's int64 counts, E / ep to each of the ep - 1 others: ``(ep-1) (E/ep) 8``;
    - ``dispatch``: the token rows to their experts forward (R_out) and, in backward, the gradients of
      the rows this rank received (R_in): ``2 N k d b (ep-1)/ep phi``;
    - ``combine``: the expert outputs back forward (R_in) and their gradients out in backward (R_out):
      the same;
    - ``total``: ``counts + 4 N k d b (ep-1)/ep phi``.

    With ep = 1 nothing leaves the rank. `communication` multiplies these by the MoE blocks of a stage
    and the microbatches; the engine's measured bytes are checked against them.
    """
    ep, E = layout.ep, model.n_experts
    if not E:
        raise CostError("all-to-all bytes need experts; the model has n_experts=0")
    if ep < 1 or E % ep:
        raise CostError(f"ep={ep} does not divide n_experts={E}; choose ep among "
                        f"{', '.join(str(d) for d in range(1, E + 1) if E % d == 0)}")
    if imbalance < 0 or tokens < 0:
        raise CostError("tokens and the imbalance factor must be >= 0")
    share = (ep - 1) / ep
    counts = float((ep - 1) * (E // ep) * 8)
    rows = 2 * tokens * model.moe_top_k * model.d_model * dtype_bytes * share * imbalance
    return {"counts": counts, "dispatch": rows, "combine": rows, "total": counts + 2 * rows}


def moe_activation_bytes(model: Model, b: int, s: int, tp: int = 1, act_bytes: int = 2, cp: int = 1,
                         recompute: str = "none") -> float:
    """Bytes a block with experts keeps for backward *beyond* a dense block whose MLP has the width of
    the ``k`` experts a token runs plus the shared expert's (`activation_bytes_per_layer` with
    ``d_ff = k w + shared``, which counts the experts' hidden features, k per token): the ``k`` rows
    of each token dispatched to its experts and the ``k`` output rows the combine weights, ``2 k d``
    per token in ``act_bytes``, and the router's fp32 logits and probabilities, ``8 E``. Under
    sequence parallelism every tp rank routes its own ``s / (cp tp)`` tokens (divided by `tp`); none
    of it under full recomputation. An estimate: the engine's copies (the padded zeros of the
    combine, the index tensors) are not counted."""
    if not model.n_experts or recompute == "full":
        return 0.0
    tokens = b * s / cp / tp
    return tokens * (2 * model.moe_top_k * model.d_model * act_bytes + 8 * model.n_experts)
