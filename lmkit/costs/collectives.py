"""What one rank sends in a step: every collective, with its bytes on the wire.

`communication` is every collective a rank of a layout issues in one optimizer step, as `CommTerm`s
with their payload and their bytes on the wire (`wire_bytes`, nccl-tests' ring definitions): data
parallelism and ZeRO, tensor and sequence parallelism, the pipeline, Muon, the experts (all-to-alls,
router counts, expert gradients) and context parallelism's ring (`cp_communication`). Chapter 5
derives every formula; the tests check them against the engines' measured bytes on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from lmkit.costs.context import cp_chunks
from lmkit.costs.experts import all_to_all_bytes, expert_buckets, stage_experts
from lmkit.costs.layout import (
    Layout,
    check_optimizer,
    muon_buckets,
    muon_params,
    muon_tensors,
    padded_numel,
    stage_counts,
    state_bytes,
    zero_buckets,
)
from lmkit.costs.model import CostError, Model

__all__ = ["wire_bytes", "CommTerm", "communication", "cp_communication"]


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
                  stage: int, imbalance: float, optimizer: str) -> list[CommTerm]:
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
        if layout.zero in (1, 2) and optimizer == "muon":  # (ep = 1) every expert bucket is Muon's
            terms.append(CommTerm("edp", "all_gather", "Muon: the Nesterov updates of the expert buckets, "
                                  "whole matrices for Newton-Schulz", len(buckets), 4 * padded, edp))
        if layout.zero in (1, 2):
            terms.append(CommTerm("edp", "all_reduce", "expert gradient norm^2 over edp (of the chunks)", 1,
                                  4, edp, True))
    if ep > 1:  # the experts' share of the squared norm, summed over the ep ranks holding the others
        terms.append(CommTerm("ep", "all_reduce", "expert gradient norm^2 over ep (fp64)", 1, 8, ep, True))
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
    the Nesterov updates of the Muon buckets are all-gathered over dp x cp, and under tp every split
    Muon matrix's shards over tp, in fp32 (the updates of the fp32 master weights); with experts
    (ep = 1 only, as the engine) also the expert buckets' updates over their edp group.

    Experts (``n_experts > 0``, lmkit's engine as the expert-parallel spec describes it): per MoE
    layer and microbatch the all-to-alls of `all_to_all_bytes` over the ep group (``ep`` consecutive
    ``dp x cp`` ranks; `imbalance` is its phi), the router's all-reduce of ``2 E`` fp32 global counts
    over the ranks holding different tokens (``dp x cp``, ``x tp`` under sequence parallelism), the
    expert gradients reduced over the expert-data-parallel group (``dp x cp / ep``; the dense
    gradients' rule of ZeRO 0/1/2 on `expert_buckets`, with its norm^2 all-reduce over edp under
    ZeRO), the experts' norm^2 summed over ep (fp64), and under tp the experts' gradients, partial
    over tp, all-reduced like the sequence-parallel norms. Under sequence parallelism a block whose
    MoE has no shared expert runs no tensor-parallel collective around its MLP (each tp rank routes
    its own tokens): its attention's all-gather and reduce-scatter only.
    """
    w, r, _ = state_bytes(precision, reduce)
    layout.validate(model, global_batch)
    check_optimizer(optimizer, model, layout)
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
    muon = muon_tensors(model, layout, stage)[0] if optimizer == "muon" else 0
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
        split = [p for p in muon_params(model, layout, stage) if p.split not in ("replicated", "expert")
                 ] if optimizer == "muon" else []
        if split:  # (a router's gate and the experts are whole on every tp rank)
            terms.append(CommTerm("tp", "all_gather", "Muon: every split matrix's shards, whole for "
                                  "Newton-Schulz", len(split), 4 * tp * sum(p.local_numel(tp) for p in split),
                                  tp))
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
        terms += _expert_terms(model, layout, b, s, e, r, w, m, stage, imbalance, optimizer)
    if cp > 1:
        ring = cp_communication(b, model.seq_len, h, cp, tp, layers, m, e, kv_width=model.kv_width)
        terms += ring
        if layout.recompute == "full":  # the recomputed forward runs its ring again
            terms += [dataclasses.replace(t, what=t.what.replace("forward", "forward again (recomputation)"))
                      for t in ring if "forward" in t.what]
    return terms


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
    cp_chunks(s, cp, "contiguous")
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
