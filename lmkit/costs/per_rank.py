"""What one rank of a layout holds: model states and activations, the memory of a rank.

`memory` is the bytes per rank of the worst (or a given) pipeline stage: model states
(`model_states`, exactly as lmkit's engine allocates them, fp32 or mixed precision, the experts'
included) and activations (`activation_bytes_per_layer` times the microbatch-chunks `in_flight`).
Chapter 5 derives every formula; the tests check them against the engines' measured memory on
every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmkit.costs.context import cp_attention_memory
from lmkit.costs.experts import expert_buckets, expert_states, moe_activation_bytes, stage_experts
from lmkit.costs.layout import (
    Layout,
    check_optimizer,
    muon_buckets,
    muon_tensors,
    padded_numel,
    stage_counts,
    stage_frozen,
    state_bytes,
    zero_buckets,
)
from lmkit.costs.model import MLP_CHOICES, CostError, Model

__all__ = ["model_states", "activation_bytes_per_layer", "model_activation_options", "in_flight", "Memory",
           "memory"]


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
    if muon:  # (the experts, all of them Muon's, below)
        muon, muon_count = muon - experts, muon_count - expert_count
    w, r, master = state_bytes(precision, reduce)
    if zero < 3 or precision == "fp32":
        # lmkit's engine: weights in w bytes (bf16 under mixed), gradients in r (the reduce dtype), the
        # optimizer's fp32 master copy (mixed only, 4 bytes), AdamW's moments (8 bytes, and a 4-byte
        # step counter per tensor it steps), Muon's momentum (4). Under ZeRO every bucket is padded to
        # a multiple of dp x cp and split into as many chunks; the optimizer steps this rank's chunk of
        # each (master, moments, one counter per AdamW bucket), ZeRO-1 keeps the full flat weight and
        # gradient buffers, ZeRO-2 only this rank's gradient chunks (its shard accumulator). ZeRO-3
        # (FSDP2, fp32) shards the weights too, the experts' with the rest.
        buckets = zero_buckets(model, layout, stage, optimizer, r)
        n_muon = muon_buckets(model, layout, stage, r) if muon else 0
        if zero == 3 and held:
            extra = expert_buckets(model, layout, stage, r)
            buckets = (extra + buckets) if optimizer == "muon" else (buckets + extra)
            n_muon += len(extra) if optimizer == "muon" else 0
        padded = padded_numel(buckets, dp)
        shard = padded // dp
        if zero == 0:
            p_bytes, g_bytes = w * numel, r * numel
            o_bytes = (master + 8) * numel - 4 * muon + 4 * (count - muon_count)
        else:
            p_bytes = w * (shard if zero >= 3 else padded)
            g_bytes = r * (shard if zero >= 2 else padded)
            muon_shard = padded_numel(buckets[:n_muon], dp) // dp
            o_bytes = (master + 8) * shard - 4 * muon_shard + 4 * (len(buckets) - n_muon)
    else:  # ZeRO-3 in mixed precision (FSDP2's bf16 compute weights): the sharded states of ZeRO
        p_bytes, g_bytes, o_bytes = model_states(numel, dp, zero, precision, reduce)
        if muon:  # Muon's master weight and momentum: 8 bytes per element instead of Adam's 12
            o_bytes -= 4 * muon / dp
    if experts:  # E / ep whole experts per MoE block, their states sharded over dp x cp / ep under ZeRO
        p_bytes, g_bytes, o_bytes = (a + b for a, b in zip(
            (p_bytes, g_bytes, o_bytes), expert_states(model, layout, stage, precision, reduce, optimizer),
            strict=True))
    p_bytes += 4 * stage_frozen(model, layout, stage)  # the routers' fp32 balancing biases, no gradient
    act = _activations(model, layout, global_batch, precision, stage, flash_attention)
    return Memory(float(p_bytes), float(g_bytes), float(o_bytes), act, stage, numel + experts, held)


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
    check_optimizer(optimizer, model, layout)
    results = [_memory_of_stage(model, layout, global_batch, precision, r, flash_attention, optimizer,
                                reduce) for r in stages]
    return max(results, key=lambda mem: mem.total)
