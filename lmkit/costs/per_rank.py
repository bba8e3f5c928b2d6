"""What one rank of a layout holds and sends: memory, communication, context parallelism, bubble.

`memory` is the bytes per rank of the worst (or a given) pipeline stage: model states
(`model_states`, exactly as lmkit's engine allocates them, fp32 or mixed precision) and activations
(`activation_bytes_per_layer` times the microbatch-chunks `in_flight`). `communication` is every
collective a rank issues in one optimizer step, as `CommTerm`s with their bytes on the wire
(`wire_bytes`). The ``cp_*`` functions are ring attention's work, memory and messages (context
parallelism), and `bubble_fraction` the pipeline's idle share. Chapter 5 derives every formula; the
tests check them against the engines' measured bytes and memory on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lmkit.costs.layout import (
    MLP_CHOICES,
    CostError,
    Layout,
    Model,
    expert_buckets,
    muon_buckets,
    muon_tensors,
    padded_numel,
    stage_counts,
    stage_experts,
    state_bytes,
    zero_buckets,
)

__all__ = [
    "model_states", "activation_bytes_per_layer", "model_activation_options", "in_flight", "Memory",
    "memory", "OPTIMIZERS", "wire_bytes", "CommTerm", "communication", "CP_LAYOUTS", "cp_attention_work",
    "cp_attention_memory", "cp_communication", "cp_ring_step", "RING_BACKWARD_COMPUTE", "all_to_all_bytes",
    "moe_activation_bytes",
]

#: A ring step's backward compute over its forward's: `lmkit.parallel.context_parallel.RingAttention`
#: runs 2 block matmuls per block pair forward (``Q K^T``, ``P V``) and 5 backward (``Q K^T`` again to
#: recompute ``P``, ``P^T dO``, ``dO V^T``, ``dS K``, ``dS^T Q``), as FlashAttention's backward does.
RING_BACKWARD_COMPUTE = 2.5


# --------------------------------------------------------------------------------- memory


def model_states(numel: float, dp: int = 1, zero: int = 0, precision: str = "mixed",
                 reduce: str = "fp32") -> tuple[float, float, float]:
    """Bytes of (parameters, gradients, optimizer state) per rank for `numel` parameters.

    Mixed precision as lmkit's engine runs it (``train.param_dtype=bfloat16``): 2-byte weights,
    gradients in `reduce` (4 bytes fp32, the default; 2 bytes bf16), and K = 12 bytes of fp32 master
    weights and AdamW moments: 2 + 4 + 12 = 18 bytes per parameter, or Rajbhandari et al. 2020
    (ZeRO), section 3.1 and 5's 2 + 2 + 12 = 16 with ``reduce="bf16"`` (the paper's 16 Psi);
    fp32 training 4 + 4 + 8. ZeRO stage 1 shards the optimizer state (master included) over dp,
    stage 2 also the gradients, stage 3 also the weights. `memory` adds what the engine adds: the
    padding of the buckets and AdamW's step counters.
    """
    w, r, master = state_bytes(precision, reduce)
    return (w * numel / (dp if zero >= 3 else 1), r * numel / (dp if zero >= 2 else 1),
            (master + 8) * numel / (dp if zero >= 1 else 1))


def activation_bytes_per_layer(b: int, s: int, h: int, a: int, tp: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none", act_bytes: int = 2, dropout: bool = False,
                               flash_attention: bool = False, cp: int = 1, *, kv_width: int | None = None,
                               d_ff: int | None = None, mlp: str = "plain",
                               qk_transformed: bool = False) -> float:
    """Bytes one Transformer layer keeps for backward, for a microbatch of `b` sequences of `s` tokens.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4:
    ``s b h (34 + 5 a s / h)`` with 2-byte activations and 1-byte dropout masks; ``s b h (10 + 24/t + 5 a
    s/(h t))`` with tensor parallelism, ``s b h/t (34 + 5 a s / h)`` with sequence parallelism, the ``5 a
    s / h`` term gone under selective recomputation, ``2 s b h`` (the layer's input) under full
    recomputation. Generalised here to `act_bytes` per element, masks only with `dropout` (default False:
    today's models, and every preset, train without it; pass ``dropout=True``, or `Model.dropout`, for
    Korthikanti's GPT-3 figures), and flash attention (no ``a s^2`` matrix; ``4 a s b`` bytes of
    log-sum-exp instead). Context parallelism over `cp` ranks gives each rank ``s / cp`` of the tokens:
    every ``s b h`` term is divided by ``cp``, and so is the score term, whose rows are this rank's
    queries against all ``s`` keys (``a (s/cp) s b``); ring attention (`cp_attention_memory`) keeps none
    of it.

    The tensors counted, per token (``a`` query heads; the defaults are GPT-2's, Korthikanti's):

    - outside the tensor-parallel regions (split over tp only with sequence parallelism): the inputs
      of the two norms and of ``qkv`` and ``fc`` (``4 h``), and two dropout masks;
    - attention (split over tp by heads): the ``qkv`` output that attention reads, ``h + 2 kv_width``
      wide (``kv_width`` = key/value heads x head_dim: grouped-query attention keeps less); when queries
      and keys are rotated or normalised after the projection (`qk_transformed`: rotary positions,
      QK-norm) attention reads new q and k, ``h + kv_width`` more, while v keeps the ``qkv`` output
      alive; the attention output, ``h`` (the input of ``proj``); the scores as above;
    - MLP (split over tp): plain, the ``fc`` output and the activation's, ``2 d_ff`` (GELU's
      ``8 h`` for ``d_ff = 4 h``); SwiGLU (`mlp`), the fused ``[gate | up]`` output, ``silu(gate)`` and
      the product, ``4 d_ff``.

    Not counted: the norms' statistics (one or two numbers per token), the rotary tables, and
    copies an unfused implementation makes: torch's RMSNorm on a CPU also keeps ``x / rms(x)``
    (``h`` per norm), and lmkit's attention copies its output into ``[b, s, h]`` for ``proj`` when q
    is not a view of the ``qkv`` output (with `qk_transformed`). ``tests/test_costs.py`` measures a
    block against this count.
    """
    e, mask, t = act_bytes, (1 if dropout else 0), tp
    sp = t if sequence_parallel else 1
    if cp > 1 and s % cp:
        raise CostError(f"seq_len={s} is not divisible by cp={cp}; use a multiple of cp (2 cp for zigzag)")
    if mlp not in MLP_CHOICES:
        raise CostError(f"mlp={mlp!r} is unknown; use one of {', '.join(MLP_CHOICES)}")
    kv = h if kv_width is None else kv_width
    ff = 4 * h if d_ff is None else d_ff
    sb, local = s // cp * b, s // cp
    if recompute == "full":
        return e * sb * h / sp
    # Outside the tensor-parallel regions (replicated over tp unless sequence-parallel): the two
    # norm inputs, the inputs of qkv and fc, and two dropout masks.
    outside = (4 * e + 2 * mask) * sb * h / sp
    # Inside (split over tp): q, k, v (and new q, k), the attention output (proj input), the MLP's hidden.
    attention = (h + 2 * kv) + ((h + kv) if qk_transformed else 0) + h
    hidden = (4 if mlp == "swiglu" else 2) * ff
    inside = e * sb * (attention + hidden) / t
    if flash_attention:
        scores = 4 * a * local * b / t  # fp32 log-sum-exp per row and head
    elif recompute == "selective":
        scores = 0.0
    else:  # softmax output, its dropout mask and the dropped-out copy
        scores = (e + mask + (e if dropout else 0)) * a * local * s * b / t
    return outside + inside + scores


def model_activation_options(model: Model) -> dict[str, Any]:
    """The keyword arguments of `activation_bytes_per_layer` that `model`'s options set."""
    return {"kv_width": model.kv_width, "d_ff": model.ffn_width, "mlp": model.mlp,
            "qk_transformed": model.pos == "rope" or model.qk_norm}


def in_flight(layout: Layout, stage: int) -> int:
    """Most microbatch-chunks whose activations pipeline rank `stage` holds at once.

    GPipe: ``m``; 1F1B and ZB-H1: ``min(m, pp - r)`` (ZB-H1 keeps 1F1B's limit on microbatches
    waiting for their B; the inputs and output gradients its pending W's keep, at most ``pp`` of them,
    are not counted here); interleaved 1F1B (Megatron's warm-up of ``2 (pp - r - 1) + (v - 1) pp``
    forwards, plus one): in units of one chunk's layers. Checked against
    `lmkit.parallel.pipeline.peak_in_flight` of the real schedules.
    """
    pp, m, v, r = layout.pp, layout.microbatches, layout.virtual_stages, stage
    if pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    if layout.schedule in ("1f1b", "zb-h1"):
        return min(m, pp - r)
    if m == pp:
        return m * v
    return min(m * v, 2 * (pp - r - 1) + (v - 1) * pp + 1)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank: model states (exactly as lmkit's engine allocates them; ``optimizer`` holds the
    fp32 master weights of mixed precision besides the moments) and activations."""

    params: float
    grads: float
    optimizer: float
    activations: float
    stage: int
    numel: int
    expert_numel: int = 0  # of `numel`: this rank's E / ep experts of the stage's MoE blocks

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, float]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


def _memory_of_stage(model: Model, layout: Layout, global_batch: int, precision: str, stage: int,
                     flash_attention: bool, optimizer: str, reduce: str) -> Memory:
    mats, vecs, count, *_ = stage_counts(model, layout.pp, layout.virtual_stages, layout.tp, stage, layout.ep)
    held, expert_count, _ = stage_experts(model, layout, stage)
    experts = held
    if layout.zero == 3:  # (ep = 1: the experts are sharded over dp x cp with the rest)
        experts = expert_count = 0
    # the dense parameters (experts below); ZeRO shards them over dp x cp
    numel, dp, zero = mats + vecs - experts, layout.grad_ranks, layout.zero
    count -= expert_count
    muon, muon_count = muon_tensors(model, layout, stage) if optimizer == "muon" else (0, 0)
    w, r, master = state_bytes(precision, reduce)
    if zero < 3 or precision == "fp32":
        # lmkit's engine: weights in w bytes (bf16 under mixed), gradients in r (the reduce dtype), the
        # optimizer's fp32 master copy (mixed only, 4 bytes), AdamW's moments (8 bytes, and a 4-byte
        # step counter per tensor it steps), Muon's momentum (4). Under ZeRO every bucket is padded to
        # a multiple of dp x cp and split into as many chunks; the optimizer steps this rank's chunk of
        # each (master, moments, one counter per AdamW bucket), ZeRO-1 keeps the full flat weight and
        # gradient buffers, ZeRO-2 only this rank's gradient chunks (its shard accumulator). ZeRO-3
        # (FSDP2, fp32) shards the weights too.
        buckets = zero_buckets(model, layout, stage, optimizer, r)
        padded = padded_numel(buckets, dp)
        shard = padded // dp
        if zero == 0:
            p_bytes, g_bytes = w * numel, r * numel
            o_bytes = (master + 8) * numel - 4 * muon + 4 * (count - muon_count)
        else:
            p_bytes = w * (shard if zero >= 3 else padded)
            g_bytes = r * (shard if zero >= 2 else padded)
            n_muon = muon_buckets(model, layout, stage, r) if muon else 0
            muon_shard = padded_numel(buckets[:n_muon], dp) // dp
            o_bytes = (master + 8) * shard - 4 * muon_shard + 4 * (len(buckets) - n_muon)
    else:  # ZeRO-3 in mixed precision (FSDP2's bf16 compute weights): the sharded states of ZeRO
        p_bytes, g_bytes, o_bytes = model_states(numel, dp, zero, precision, reduce)
        if muon:  # Muon's master weight and momentum: 8 bytes per element instead of Adam's 12
            o_bytes -= 4 * muon / dp
    if experts:  # E / ep whole experts per MoE block, their states sharded over dp x cp / ep under ZeRO
        edp, ebuckets = layout.expert_ranks, expert_buckets(model, layout, stage, r)
        if zero == 0:
            p_bytes, g_bytes = p_bytes + w * experts, g_bytes + r * experts
            o_bytes += (master + 8) * experts + 4 * expert_count
        else:
            padded = padded_numel(ebuckets, edp)
            p_bytes += w * padded
            g_bytes += r * (padded // edp if zero >= 2 else padded)
            o_bytes += (master + 8) * (padded // edp) + 4 * len(ebuckets)
    act = _activations(model, layout, global_batch, precision, stage, flash_attention)
    return Memory(float(p_bytes), float(g_bytes), float(o_bytes), act, stage, numel + experts, held)


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


def _activations(model: Model, layout: Layout, global_batch: int, precision: str, stage: int,
                 flash_attention: bool) -> float:
    b = global_batch // (layout.dp * layout.microbatches)  # sequences; a cp rank holds s / cp of each
    s, h, a, t, V, cp = model.seq_len, model.d_model, model.n_head, layout.tp, model.vocab_size, layout.cp
    e = 4 if precision == "fp32" else 2
    sp = t if layout.sequence_parallel else 1
    _, layers, _, last = stage_counts(model, layout.pp, layout.virtual_stages, t, stage)[4:]
    # Ring attention keeps the log-sum-exp, never the scores (it recomputes them blockwise, like flash).
    flash = flash_attention or cp > 1
    options = model_activation_options(model)
    per_layer = activation_bytes_per_layer(b, s, h, a, t, layout.sequence_parallel, layout.recompute, e,
                                           model.dropout, flash, cp, **options)
    moe = stage_experts(model, layout, stage)[2]
    if moe:  # the stage's MoE blocks, averaged over its blocks: k experts (and the shared one) per token
        width = model.moe_top_k * model.expert_width + model.n_shared_experts * model.expert_width
        per_moe = activation_bytes_per_layer(b, s, h, a, t, layout.sequence_parallel, layout.recompute, e,
                                             model.dropout, flash, cp, **{**options, "d_ff": width})
        per_moe += moe_activation_bytes(model, b, s, t, e, cp, layout.recompute)
        stage_layers = stage_counts(model, layout.pp, layout.virtual_stages, t, stage)[4]
        per_layer += moe / stage_layers * (per_moe - per_layer)
    units = in_flight(layout, stage) if layout.pp > 1 else 1
    total = units * layers * per_layer
    if layout.recompute == "full":  # the layer being recomputed holds its full activations once
        total += activation_bytes_per_layer(b, s, h, a, t, layout.sequence_parallel, "none", e, model.dropout,
                                            flash, cp, **options)
    if cp > 1:  # the layer running its ring: K/V and dK/dV blocks in flight (and a score block unless flash)
        ring = cp_attention_memory(b, s, h, a, cp, t, e, kv_width=model.kv_width)
        total += ring["kv_in_flight"] + ring["dkv_in_flight"]
        if not flash_attention:
            total += ring["score_block"]
    if last:  # ln_f input, head input, fp32 log-softmax of the logits (of this rank's s / cp tokens)
        held = 1 if layout.pp == 1 or layout.schedule != "gpipe" else layout.microbatches
        local = s // cp
        total += held * (e * local * b * h / sp + e * local * b * h + 4 * local * b * V / t)
    return float(total)


def memory(model: Model, layout: Layout, global_batch: int, precision: str = "fp32", stage: int | None = None,
           flash_attention: bool = True, optimizer: str = "adamw", reduce: str = "fp32") -> Memory:
    """Bytes per rank on pipeline rank `stage` (default: the rank that needs the most).

    Model states: what lmkit's engine allocates (`model_states` plus the buckets' padding and AdamW's step
    counters) for the layout's tp/pp split of every tensor (embedding and head on the end stages), in
    `precision` with gradients in `reduce` (mixed precision: bf16 weights, fp32 master weights, counted in
    ``optimizer``, and moments; ``reduce="fp32"`` or ``"bf16"`` gradients; ZeRO-3 in mixed precision:
    `model_states`). Activations: `activation_bytes_per_layer` times the layers of a chunk times the
    microbatch-chunks in flight (`in_flight`), plus the head's logits on the last stage. lmkit's ZeRO-2
    keeps only this rank's shard of the gradients, ZeRO's 1/dp (plus padding). Context parallelism: every
    rank holds ``s / cp`` tokens of each sequence (the activation formula with ``s -> s / cp``, no score
    matrix: ring attention keeps the log-sum-exp), plus the K/V and dK/dV blocks in flight of the one
    layer running its ring (`cp_attention_memory`); ZeRO shards over the ``dp x cp`` ranks that average
    the gradients.
"""
    model.validate()
    layout.validate(model, global_batch)
    state_bytes(precision, reduce)  # refuses an unknown precision or reduce dtype
    stages = range(layout.pp) if stage is None else [stage]
    if stage is not None and not 0 <= stage < layout.pp:
        raise CostError(f"stage {stage} does not exist with pp={layout.pp}")
    if optimizer not in OPTIMIZERS:
        raise CostError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
    results = [_memory_of_stage(model, layout, global_batch, precision, r, flash_attention, optimizer,
                                reduce) for r in stages]
    return max(results, key=lambda mem: mem.total)


# --------------------------------------------------------------------------------- communication


#: The optimizers whose state and communication the model counts (`lmkit.config.TrainConfig.optimizer`).
OPTIMIZERS = ("adamw", "muon")


def wire_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes one rank sends for a collective of payload `nbytes` under ring algorithms (nccl-tests).

    All-reduce ``2 (n-1)/n B``; reduce-scatter, all-gather, reduce, broadcast ``(n-1)/n B``; a send
    ``B``, a receive 0. The same definition as `lmkit.parallel.instrument.wire_bytes`.
    """
    n = group_size
    if kind == "send":
        return float(nbytes)
    if n <= 1 or kind in ("recv", "barrier"):
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if kind in ("gather", "scatter"):
        return (n - 1) / n**2 * nbytes
    return (n - 1) / n * nbytes


@dataclass(frozen=True)
class CommTerm:
    """One kind of collective a rank issues in one optimizer step."""

    group: str  # "dp", "tp", "pp", "cp", "ep", "edp", "router" or "embedding" (first + last pipeline stage)
    kind: str
    what: str
    calls: int | None  # None where the count depends on bucketing
    bytes: float  # payload as nccl-tests defines it, summed over the calls
    group_size: int
    bookkeeping: bool = False  # a scalar for logging or the global gradient norm, not training data
    hidden_by: str = ""  # compute it can overlap: "backward" (the last microbatch's), "compute", or none

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.bytes, self.group_size)


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


def _gradient_reduction(group: str, zero: int, m: int, buckets: list[int], padded: int, numel: int, r: int,
                        w: int, size: int, whose: str = "") -> list[CommTerm]:
    """ZeRO-0/1/2's reduction of the gradient `buckets` over `size` ranks (`padded`: their elements
    padded to a multiple of `size`) and, under ZeRO-1/2, the all-gather of the updated chunks."""
    if zero == 2:
        # one reduce-scatter per bucket and backward pass: the padded bucket in, the rank's chunk
        # out, accumulated in the shard over the microbatches (an upper bound with interleaved
        # stages, whose buckets may wait for more than one backward)
        terms = [CommTerm(group, "reduce_scatter", f"{whose}gradient buckets reduce-scattered into the "
                          "shards, every microbatch", m * len(buckets), m * r * padded, size,
                          hidden_by="backward")]
    elif zero == 1:
        # the distributed optimizer: one reduce-scatter per bucket at the synchronisation, the
        # padded bucket of the full gradient buffer in, this rank's chunk out
        terms = [CommTerm(group, "reduce_scatter", f"{whose}gradient buckets reduce-scattered into the "
                          "chunks, once per step", len(buckets), r * padded, size, hidden_by="backward")]
    else:
        terms = [CommTerm(group, "all_reduce", f"{whose}gradient all-reduce, one per bucket", len(buckets),
                          r * numel, size, hidden_by="backward")]
    if zero in (1, 2):
        terms.append(CommTerm(group, "all_gather", f"updated {whose}parameter chunks all-gathered, one per "
                              "bucket", len(buckets), w * padded, size))
    return terms


def _expert_terms(model: Model, layout: Layout, b: int, s: int, e: int, r: int, w: int, m: int,
                  stage: int, imbalance: float) -> list[CommTerm]:
    """The collectives of the experts (`communication`): all-to-alls, router counts, expert gradients."""
    experts, _, moe = stage_experts(model, layout, stage)
    if not moe:
        return []
    tp, ep, edp, E = layout.tp, layout.ep, layout.expert_ranks, model.n_experts
    sp = tp if layout.sequence_parallel else 1
    terms: list[CommTerm] = []
    n = m * moe  # MoE layers run per step on this rank
    again = layout.recompute == "full"  # the recomputed forward routes and sends again
    if ep > 1:
        # CommTerm.bytes is the payload as nccl-tests counts it (the rows this rank holds, its own
        # share included); wire_bytes, (ep-1)/ep of it, is what `all_to_all_bytes` gives
        a2a = all_to_all_bytes(model, layout, b * s // sp, imbalance, e)
        full = ep / (ep - 1)
        terms.append(CommTerm("ep", "all_to_all", "expert counts (int64) before every dispatch", n,
                              n * full * a2a["counts"], ep))
        terms.append(CommTerm("ep", "all_to_all", "dispatch: token rows to their experts (forward), their "
                              "gradients back (backward)", 2 * n, n * full * a2a["dispatch"], ep))
        terms.append(CommTerm("ep", "all_to_all", "combine: expert outputs back (forward), their gradients "
                              "out (backward)", 2 * n, n * full * a2a["combine"], ep))
        if again:
            terms.append(CommTerm("ep", "all_to_all", "counts, dispatch and combine forward again "
                                  "(recomputation)", 3 * n,
                                  n * full * (a2a["counts"] + (a2a["dispatch"] + a2a["combine"]) / 2), ep))
    holders = layout.grad_ranks * sp  # the ranks holding different tokens of the batch
    if holders > 1:
        calls = n * (2 if again else 1)
        terms.append(CommTerm("router", "all_reduce", "router: global expert counts and probability sums "
                              "(2 E fp32) per MoE layer", calls, calls * 8 * E, holders))
    if edp > 1:  # over the dp x cp / ep ranks holding the same experts
        buckets = expert_buckets(model, layout, stage, r)
        padded = padded_numel(buckets, edp)
        terms += _gradient_reduction("edp", layout.zero, m, buckets, padded, experts, r, w, edp, "expert ")
    if tp > 1:  # whole experts on every tp rank, each routing its own tokens: partial gradients
        share = math.ceil(experts / edp) if layout.zero == 2 else experts
        terms.append(CommTerm("tp", "all_reduce", "expert gradients, partial over tp (each rank routed its "
                              "own tokens)", 1, r * share, tp))
    return terms


def communication(model: Model, layout: Layout, global_batch: int, precision: str = "fp32",
                  stage: int = 0, optimizer: str = "adamw", reduce: str = "fp32",
                  imbalance: float = 1.0) -> list[CommTerm]:
    """The collectives pipeline rank `stage` issues per optimizer step, term by term.

    Data parallel (Rajbhandari et al. 2020, section 7; Megatron-LM's distributed optimizer):
    ZeRO-0 all-reduces the gradient buckets; ZeRO-1 accumulates the gradients in the full flat
    buffer and, at the synchronisation, reduce-scatters each padded bucket into this rank's chunk
    (one reduce-scatter per bucket and optimizer step), then all-gathers the updated parameter
    chunks after the step: reduce-scatter + all-gather send what the all-reduce sends, ``2 Psi``
    per rank; ZeRO-2 reduce-scatters every bucket after *every* microbatch's backward into the
    shard accumulator (``m`` times) before the same all-gather; ZeRO-3 (FSDP2) gathers the
    parameters for every forward and backward and reduce-scatters the gradients. Under ZeRO-1/2
    the squared gradient norm is summed over this rank's chunks and all-reduced over dp (one fp32
    scalar). Gradients travel in the reduce dtype (fp32 in fp32 training; `reduce` under mixed
    precision: 4 or 2 bytes), the parameter all-gathers in the weights' dtype (2 bytes: bf16 under
    mixed precision). Tensor parallel: ``2`` all-reduces of the ``b s h`` activation per layer
    forward and ``2`` backward (Shoeybi et al. 2019) *plus* the vocab-parallel embedding's forward and
    the head's input gradient: ``4 L + 2`` on one stage; sequence parallel turns each into an
    all-gather and a reduce-scatter (Korthikanti et al. 2022). The replicated gradients that tensor
    or pipeline parallelism leaves partial (sequence-parallel norms, QK-norm gains, a tied embedding
    on two stages) are all-reduced over their group in the gradients' dtype: under ZeRO-0/1 the full
    gradients (before the dp reduction), under ZeRO-2 this rank's shard of them.
    Pipeline: one activation forward and one gradient backward per microbatch and boundary.
    Context parallelism: the ring's K/V and dK/dV blocks (`cp_communication`) for this stage's layers
    and microbatches; the "dp" terms run over the ``dp x cp`` ranks that average the gradients, and
    tensor- and pipeline-parallel messages carry this rank's ``s / cp`` tokens. Full recomputation
    (activation checkpointing of every block) runs every layer's forward a second time in backward,
    and with it the forward's communication: the ring, and the tensor-parallel all-reduces (2 per
    layer and microbatch; under sequence parallelism its 2 all-gathers and 2 reduce-scatters).
    Muon (``optimizer="muon"``, `lmkit.optim.Muon`): Newton-Schulz needs whole matrices, so under ZeRO
    the Nesterov updates of the Muon buckets are all-gathered over dp x cp, and under tp every Muon
    matrix's shards over tp, in fp32 (the updates of the fp32 master weights).

    Experts (``n_experts > 0``, lmkit's engine as the expert-parallel spec describes it): per MoE
    layer and microbatch the all-to-alls of `all_to_all_bytes` over the ep group (``ep`` consecutive
    ``dp x cp`` ranks; `imbalance` is its phi), the router's all-reduce of ``2 E`` fp32 global counts
    over the ranks holding different tokens (``dp x cp``, ``x tp`` under sequence parallelism), the
    expert gradients reduced over the expert-data-parallel group (``dp x cp / ep``; the dense
    gradients' rule of ZeRO 0/1/2 on `expert_buckets`), and under tp the experts' gradients, partial
    over tp, all-reduced like the sequence-parallel norms. Under sequence parallelism a block whose
    MoE has no shared expert runs no tensor-parallel collective around its MLP (each tp rank routes
    its own tokens): its attention's all-gather and reduce-scatter only.
    """
    if optimizer not in OPTIMIZERS:
        raise CostError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
    w, r, _ = state_bytes(precision, reduce)
    layout.validate(model, global_batch)
    if not 0 <= stage < layout.pp:
        raise CostError(f"stage {stage} does not exist with pp={layout.pp}")
    e = 4 if precision == "fp32" else 2  # activations
    tp, pp, m, v, cp = layout.tp, layout.pp, layout.microbatches, layout.virtual_stages, layout.cp
    b = global_batch // (layout.dp * m)
    dp = layout.grad_ranks  # the gradient group: dp x cp
    s, h, V = model.seq_len // cp, model.d_model, model.vocab_size  # s: the tokens of a sequence on this rank
    mats, vecs, _, replicated, layers, _, first, last = stage_counts(model, pp, v, tp, stage, layout.ep)
    experts, _, moe = stage_experts(model, layout, stage)
    numel = mats + vecs - (0 if layout.zero == 3 else experts)  # the dense parameters (ZeRO-3: all)
    buckets = zero_buckets(model, layout, stage, optimizer, r)
    padded = padded_numel(buckets, dp)
    muon, muon_count = muon_tensors(model, layout, stage) if optimizer == "muon" else (0, 0)
    terms: list[CommTerm] = []
    if dp > 1:
        if layout.zero == 3:
            # FSDP2 gathers again for every microbatch's forward and backward (it reshards after each).
            # An upper bound inside a pipeline, where back-to-back passes of one stage reuse a gather
            # (chapter 6 measures 0.8 of it for dp2 x tp2 x pp2 with 2 microbatches).
            terms.append(CommTerm("dp", "all_gather", "parameters gathered for forward and again for "
                                  "backward, every microbatch", None, 2 * m * w * numel, dp,
                                  hidden_by="compute"))  # prefetched while the previous layer computes
            terms.append(CommTerm("dp", "reduce_scatter", "gradients reduced to their shard", None,
                                  r * numel, dp, hidden_by="backward"))
        else:
            terms += _gradient_reduction("dp", layout.zero, m, buckets, padded, numel, r, w, dp)
        if layout.zero in (1, 2) and muon:
            n_muon = muon_buckets(model, layout, stage, r)
            terms.append(CommTerm("dp", "all_gather", "Muon: the Nesterov updates of its buckets, whole "
                                  "matrices for Newton-Schulz", n_muon,
                                  4 * padded_numel(buckets[:n_muon], dp), dp))
        if layout.zero in (1, 2):
            terms.append(CommTerm("dp", "all_reduce", "gradient norm^2 over dp (of the chunks)", 1, 4, dp,
                                  True))
        terms.append(CommTerm("dp", "all_reduce", "loss mean over dp (fp64)", 1, 8, dp, True))
    if tp > 1:
        # tensor-parallel regions per layer: attention and the MLP (an MoE without a shared expert: none)
        regions = 2 * layers - (0 if model.n_shared_experts else moe)
        calls = m * (2 * regions + int(first) + int(last))
        again = m * regions if layout.recompute == "full" else 0  # the recomputed forwards
        act = e * b * s * h
        if layout.sequence_parallel:
            for kind in ("all_gather", "reduce_scatter"):
                terms.append(CommTerm("tp", kind, "activations: 2 per layer forward + 2 backward, "
                                      "embedding, head", calls, calls * act, tp))
                if again:
                    terms.append(CommTerm("tp", kind, "activations: 2 per layer forward again "
                                          "(recomputation)", again, again * act, tp))
            # ZeRO-2 sums them on the dp shards after the reduce-scatter: about 1/dp of them
            share = math.ceil(replicated / dp) if layout.zero == 2 else replicated
            terms.append(CommTerm("tp", "all_reduce", "sequence-parallel replicated gradients (norms, "
                                  "positions, row biases)", 1, r * share, tp))
        else:
            terms.append(CommTerm("tp", "all_reduce", "activations: 2 per layer forward + 2 backward, "
                                  "embedding forward, head backward", calls, calls * act, tp))
            if again:
                terms.append(CommTerm("tp", "all_reduce", "activations: 2 per layer forward again "
                                      "(recomputation)", again, again * act, tp))
            if model.qk_norm:  # (under SP they join the replicated gradients' all-reduce above)
                qk = 2 * layers * (h // model.n_head)
                share = math.ceil(qk / dp) if layout.zero == 2 else qk
                terms.append(CommTerm("tp", "all_reduce", "QK-norm gains' gradients (each rank normalised "
                                      "its own heads)", 1, r * share, tp))
        if last:
            terms.append(CommTerm("tp", "all_reduce", "vocab-parallel cross-entropy: max", m,
                                  m * 4 * b * s, tp))
            terms.append(CommTerm("tp", "all_reduce", "vocab-parallel cross-entropy: exp-sum, target logit",
                                  m, m * 8 * b * s, tp))
        if muon:
            terms.append(CommTerm("tp", "all_gather", "Muon: every matrix's shards, whole for Newton-Schulz",
                                  muon_count, 4 * muon * tp, tp))
        terms.append(CommTerm("tp", "all_reduce", "gradient norm^2 over tp (fp64)", 1, 8, tp, True))
    if pp > 1:
        n_chunks = pp * v
        index = [k * pp + stage for k in range(v)]
        act = e * b * (s // tp if layout.sequence_parallel else s) * h
        sends = m * (sum(1 for i in index if i != n_chunks - 1) + sum(1 for i in index if i != 0))
        terms.append(CommTerm("pp", "send", "activations forward, gradients backward, 1 per microbatch "
                              "and boundary", sends, sends * act, pp))
        terms.append(CommTerm("pp", "recv", "the mirror image of the sends", sends, sends * act, pp))
        if (first or last) and model.tie_embeddings:  # ZeRO-2: the dp shard of the embedding's own bucket
            emb = V * h // tp
            emb = math.ceil(emb / dp) if layout.zero == 2 else emb
            terms.append(CommTerm("embedding", "all_reduce", "tied embedding gradients, first + last stage",
                                  1, r * emb, 2))
        terms.append(CommTerm("pp", "all_reduce", "gradient norm^2 over pp (fp64)", 1, 8, pp, True))
        terms.append(CommTerm("pp", "broadcast", "loss from the last stage (fp64)", 1, 8, pp, True))
    if model.n_experts:
        terms += _expert_terms(model, layout, b, s, e, r, w, m, stage, imbalance)
    if cp > 1:
        ring = cp_communication(b, model.seq_len, h, cp, tp, layers, m, e, kv_width=model.kv_width)
        terms += ring
        if layout.recompute == "full":  # the recomputed forward runs its ring again
            terms += [dataclasses.replace(t, what=t.what.replace("forward", "forward again (recomputation)"))
                      for t in ring if "forward" in t.what]
    return terms


# --------------------------------------------------------------------------------- context parallelism
# lmkit.parallel.context_parallel: ring attention over cp ranks, zigzag ("head-tail") or contiguous
# causal sharding. Per layer and microbatch, for this rank's s/cp tokens and h/t of the width (its heads).

CP_LAYOUTS = ("zigzag", "contiguous")


def _cp_chunks(s: int, cp: int, layout: str) -> tuple[int, int]:
    """(chunks of the sequence, tokens per chunk), validated."""
    if layout not in CP_LAYOUTS:
        raise CostError(f"context-parallel layout {layout!r} is unknown; use one of {CP_LAYOUTS}")
    n = 2 * cp if layout == "zigzag" else cp
    if cp < 1 or s % n:
        raise CostError(f"seq_len={s} is not divisible by {n} ({layout} sharding over cp={cp}); "
                        f"use a multiple of {n}")
    return n, s // n


def cp_attention_work(s: int, cp: int, layout: str = "zigzag") -> list[dict[str, int]]:
    """Per rank: score blocks, score entries and unmasked (causal) entries of one head's forward.

    Rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (zigzag) or chunk ``r`` (contiguous) of ``C``
    tokens. Its queries of chunk ``i`` meet keys of chunk ``j <= i``: a full ``C x C`` block below
    the diagonal, a triangle of ``C (C+1)/2`` on it. Zigzag: ``2 cp + 1`` blocks and
    ``(2 cp - 1) C^2 + C (C + 1)`` unmasked entries on every rank; contiguous: ``r + 1`` blocks and
    ``r C^2 + C (C+1)/2``, growing with the rank.
    """
    n, c = _cp_chunks(s, cp, layout)
    out = []
    for r in range(cp):
        mine = (r, n - 1 - r) if layout == "zigzag" else (r,)
        blocks = [(i, j) for i in mine for src in range(cp)
                  for j in ((src, n - 1 - src) if layout == "zigzag" else (src,)) if j <= i]
        diagonal = sum(1 for i, j in blocks if i == j)
        out.append({"blocks": len(blocks), "scores": len(blocks) * c * c,
                    "unmasked": (len(blocks) - diagonal) * c * c + diagonal * c * (c + 1) // 2})
    return out


def cp_attention_memory(b: int, s: int, h: int, a: int, cp: int, tp: int = 1, act_bytes: int = 4,
                        layout: str = "zigzag", *, kv_width: int | None = None) -> dict[str, float]:
    """Bytes one rank's ring attention holds, against the score matrix of attention without it.

    ``kv_width`` is the keys' (and the values') width, key/value heads x head_dim (default `h`:
    as many key/value heads as the ``a`` query heads; grouped-query attention has fewer).

    - ``saved``: what the forward keeps for backward: q (``h``), k and v (``kv_width`` each) in
      ``act_bytes``, and the output (``h``) and log-sum-exp in the accumulation precision
      (``max(act_bytes, 4)``): linear in ``s / cp``;
    - ``kv_in_flight``: the K/V block computed on plus the one arriving (2 blocks of
      ``2 b (s/cp) kv_width/t``);
    - ``dkv_in_flight``: in backward, the dK/dV accumulator computed into plus the one arriving (2 blocks
      in the accumulation precision);
    - ``score_block``: the largest score block alive at once (one chunk pair, fp32 or wider);
    - ``scores_full``: the ``a s^2 b / t`` score matrix one rank would hold without context parallelism.
    """
    n, c = _cp_chunks(s, cp, layout)
    acc = max(act_bytes, 4)
    kv = h if kv_width is None else kv_width
    local, width, kv_local = s // cp, h // tp, kv // tp
    return {"saved": (act_bytes * (width + 2 * kv_local) + acc * width) * b * local
                     + acc * b * (a // tp) * local,
            "kv_in_flight": 2 * 2 * b * local * kv_local * act_bytes,
            "dkv_in_flight": 2 * 2 * b * local * kv_local * acc,
            "score_block": acc * b * (a // tp) * c * c,
            "scores_full": act_bytes * b * (a // tp) * s * s}


def cp_communication(b: int, s: int, h: int, cp: int, tp: int = 1, layers: int = 1, microbatches: int = 1,
                     act_bytes: int = 4, *, kv_width: int | None = None) -> list[CommTerm]:
    """The sends (and mirrored receives) of ring attention for `layers` layers and `microbatches`.

    Only keys and values travel: a K/V block is ``[2, b, KV/t, s/cp, hd]``, ``2 b (s/cp) (kv_width/t) e``
    bytes, ``kv_width`` = key/value heads x head_dim (default `h`, multi-head attention; grouped-query
    attention sends ``n_head / n_kv_head`` times less). Forward: ``cp - 1`` ring steps pass it on.
    Backward: the blocks go round again (``cp - 1`` sends; the alternative, keeping all ``cp`` blocks
    from the forward, would cost ``cp`` times the K/V memory), and the dK/dV accumulators, of the same
    shape in the accumulation precision ``max(e, 4)``, make ``cp`` hops, the last one home.
    """
    if cp == 1:
        return []
    _cp_chunks(s, cp, "contiguous")
    e, acc, n = act_bytes, max(act_bytes, 4), layers * microbatches
    kv = (h if kv_width is None else kv_width) // tp
    block, grad_block = 2 * b * (s // cp) * kv * e, 2 * b * (s // cp) * kv * acc
    terms = []
    for kind in ("send", "recv"):
        terms += [CommTerm("cp", kind, "K/V blocks forward: cp - 1 ring steps per layer", n * (cp - 1),
                           n * (cp - 1) * block, cp, hidden_by="compute"),
                  CommTerm("cp", kind, "K/V blocks again in backward: cp - 1 steps", n * (cp - 1),
                           n * (cp - 1) * block, cp, hidden_by="compute"),
                  CommTerm("cp", kind, "dK/dV accumulators in backward: cp hops, the last one home", n * cp,
                           n * cp * grad_block, cp, hidden_by="compute")]
    return terms


def cp_ring_step(b: int, s: int, h: int, cp: int, peak_flops: float, bandwidth: float, tp: int = 1,
                 act_bytes: int = 2, layout: str = "zigzag", *,
                 kv_width: int | None = None) -> dict[str, float]:
    """Seconds of one forward ring step (a K/V block that is not the rank's own): compute and transfer.

    Zigzag: two ``C x C`` blocks (``C = s / 2cp``) of ``QK^T`` and ``PV``, ``4 b C^2 h/t`` FLOPs each
    (every query head computes; a contiguous rank below the diagonal: one ``(s/cp)^2`` block, twice
    as much); the transfer is one K/V block, ``2 b (s/cp) (kv_width/t) e`` bytes at `bandwidth`
    bytes/s (``kv_width`` default `h`). The transfer hides behind the compute when
    ``compute_s >= comm_s``: for zigzag when ``s / cp >= (kv_width / h) e F / beta`` tokens per rank
    (``hide_tokens``), so grouped-query attention hides its ring at ``n_head / n_kv_head`` times
    shorter chunks. Backward (`lmkit.parallel.context_parallel.RingAttention.backward`): a step's
    compute, `RING_BACKWARD_COMPUTE` = 2.5 times the forward's (5 block matmuls against 2), runs while
    the next K/V block and the previous step's dK/dV accumulator travel, the latter in the
    accumulation precision ``max(e, 4)``: it hides when ``2.5 compute_s >= comm_s (1 + max(e, 4) /
    e)``, at ``hide_tokens_backward`` = ``(1 + max(e, 4) / e) / 2.5`` times ``hide_tokens`` per rank:
    1.2x in bf16, 0.8x in fp32 (as `_ring_exposed_s`).
    """
    _, c = _cp_chunks(s, cp, layout)
    width, kv = h // tp, (h if kv_width is None else kv_width) // tp
    block_pairs = 2 if layout == "zigzag" else 1
    flops = block_pairs * 4 * b * c * c * width
    comm = 2 * b * (s // cp) * kv * act_bytes
    hide = (s // cp) * (comm / bandwidth) / (flops / peak_flops)  # tokens per rank where f = k
    return {"flops": float(flops), "compute_s": flops / peak_flops, "bytes": float(comm),
            "comm_s": comm / bandwidth, "hide_tokens": hide,
            "hide_tokens_backward": hide * (1 + max(act_bytes, 4) / act_bytes) / RING_BACKWARD_COMPUTE}
