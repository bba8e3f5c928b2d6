"""The plan (`lmkit.parallel.plan`) applied with PyTorch's own APIs, for the native engine.

`NativeStage` holds a pipeline stage's GPT modules under their GPT names; `tensor_parallel`
turns the plan's rows into a DTensor ``parallelize_module`` plan (torchtitan's styles for the
GPT's modules, `HeadNorm` for the QK-norm gains); `fused_permutation` orders a fused projection's
rows so that ``ColwiseParallel``'s contiguous chunks are every part's share; `data_parallel` wraps
the stage in FSDP2 or ``replicate``; `global_grad_norm` adds the gradient norms of DTensors on
different meshes. Used by `lmkit.parallel.native`; the book, chapter 6.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import _ComputationType
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import checkpoint

from lmkit.config import V_SCHEDULES, ConfigError, ParallelConfig
from lmkit.costs import layer_split
from lmkit.parallel import plan
from lmkit.parallel.stage import GPTStage

__all__ = ["NativeStage", "SCHEDULE_CLASSES", "stage_indices", "build_native_stages",
           "validate_native_schedule", "forward_only", "sum_tied_embedding_grads", "mixed_precision_policy",
           "fused_permutation", "qkv_permutation", "HeadNorm", "dtensor_plan", "tensor_parallel",
           "data_parallel", "is_dtensor", "layout_key", "global_grad_norm", "quiet_redistribute"]


def fused_permutation(parts: tuple[int, ...], tp: int) -> Tensor:
    """Row order of a fused weight (`plan.fused_parts`: ``[q | k | v]`` with key/value heads,
    ``[gate | up]``) such that tp rank ``r``'s contiguous block is its share of every part,
    ``[q_r | k_r | v_r]`` or ``[gate_r | up_r]`` (the rows `plan.part_shard_rows` gives rank ``r``,
    one rank after the other).

    ``W_sharded = W[perm]`` before ``ColwiseParallel``; ``W = W_sharded[argsort(perm)]`` after.
    """
    return torch.cat([plan.part_shard_rows(parts, r, tp) for r in range(tp)])


def qkv_permutation(d_model: int, tp: int) -> Tensor:
    """`fused_permutation` of GPT-2's ``[q | k | v]`` (as many key/value heads as query heads)."""
    return fused_permutation((d_model,) * 3, tp)


class NativeStage(GPTStage):
    """A `GPTStage` whose blocks are keyed by their layer index, so parameter names *are* the GPT's
    (as in torchtitan); ``forward(h)`` returns h, or logits on the last stage (a vocab-sharded
    DTensor under tensor parallelism), which the pipeline schedule's ``loss_fn`` turns into the loss.
    """

    def _take_blocks(self, model: nn.Module) -> nn.Module:
        return nn.ModuleDict({str(i): model.blocks[i] for i in self.layers})

    def forward(self, h: Tensor) -> Tensor:
        rope = self.rope(h)  # all T positions under SP too: the attention sees the gathered sequence
        if self.is_first:
            h = self._embed(h)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks.values():
            if recompute:
                h = checkpoint(block, h, None, True, None, 0, 0, rope, use_reentrant=False)
            else:
                h = block(h, rope=rope)
        if self.is_last:
            h = self.head(self.ln_f(h))
        return h

    def _embed(self, idx: Tensor) -> Tensor:
        h = self.tok_emb(idx)  # [b, T / tp, d] under sequence parallelism (this rank's positions)
        if not hasattr(self, "pos_emb"):  # rotary positions: the attention turns q and k instead
            return self.drop(h)
        pos = self.pos_emb.weight[: idx.size(1)]
        if self.sequence_parallel:  # pos is a replicated DTensor: keep this rank's rows; the
            pos = pos.redistribute(placements=[Shard(0)]).to_local()  # backward all-gathers them
        return self.drop(h + pos)


# ------------------------------------------------------------------ pipeline schedules and stage placement

#: torch.distributed.pipelining's schedule for each ``parallel.schedule`` the native engine runs. zb-h1 is
#: ``ScheduleInterleavedZeroBubble`` (the ZB-H1 / "ZB1P" schedule of Qi et al. 2024, arXiv:2401.10241) with
#: one stage per rank; torch 2.13 has no ZB-H2 (`validate_native_schedule` refuses it).
SCHEDULE_CLASSES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved": ScheduleInterleaved1F1B,
    "zb-h1": ScheduleInterleavedZeroBubble,
    "zb-v": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


def stage_indices(schedule: str, pp: int, pp_rank: int, virtual_stages: int = 1) -> list[int]:
    """The global stage indices rank `pp_rank` holds, in execution order of its first microbatch.

    Looped placement (gpipe, 1f1b, interleaved, zb-h1): ``r, r + pp, r + 2 pp, ...``; V placement
    (zb-v, dualpipev): ``r`` and ``2 pp - 1 - r``, so the first and the last chunk share rank 0 and a
    microbatch turns around on rank ``pp - 1`` without a send (torch's ``style="v"`` mapping).
    """
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [v * pp + pp_rank for v in range(virtual_stages)]


def build_native_stages(model: nn.Module, pcfg: ParallelConfig, pp_rank: int) -> list[NativeStage]:
    """This rank's `NativeStage`s (`stage_indices`), cut as `lmkit.parallel.stage.build_stages` cuts:
    ``pp * virtual_stages`` chunks of `layer_split`. Under V placement rank 0 holds the embedding
    (stage 0) and the tied head (stage ``2 pp - 1``): the head keeps its own copy, as on another rank,
    and `sum_tied_embedding_grads` adds the two gradients locally."""
    n = pcfg.pp * pcfg.virtual_stages
    chunks = layer_split(model.config.n_layer, n)
    return [NativeStage(model, chunks[i], is_first=i == 0, is_last=i == n - 1, stage_index=i)
            for i in stage_indices(pcfg.schedule, pcfg.pp, pp_rank, pcfg.virtual_stages)]


def validate_native_schedule(pcfg: ParallelConfig, n_layer: int, microbatches: int) -> None:
    """What torch 2.13's schedules need beyond `lmkit.parallel.pipeline.validate_pipeline`'s rules
    (found in their constructors), as one-line `ConfigError`s before any process communicates."""
    s, pp, m = pcfg.schedule, pcfg.pp, microbatches
    if s not in ("zb-h1", *V_SCHEDULES):
        return
    if pp < 2:
        raise ConfigError(f"parallel.schedule={s!r} needs pp >= 2, got pp={pp}")
    stages = pp * pcfg.virtual_stages
    if n_layer < stages:
        raise ConfigError(f"pp={pp} x virtual_stages={pcfg.virtual_stages} = {stages} pipeline stages but "
                          f"model.n_layer={n_layer}; every stage needs at least one block: lower pp or add "
                          "layers")
    if pcfg.zero == 3:  # measured: 2e-2 relative loss difference after 4 steps, no error (zero=2: 1e-7)
        raise ConfigError(f"parallel.schedule={s!r} with zero=3 gives wrong gradients in torch 2.13: FSDP2 "
                          "reshards the parameters after each forward, between a microbatch's input- and "
                          "weight-gradient steps; use zero=2 (parameters kept until backward) or "
                          "schedule='1f1b'")
    if s == "zb-h1" and m % max(1, m // pp):
        rounds = max(1, m // pp)
        raise ConfigError(f"parallel.schedule='zb-h1': torch's ScheduleInterleavedZeroBubble needs "
                          f"microbatches={m} divisible by microbatches // pp = {rounds} (its rounds); use a "
                          f"multiple of pp={pp} microbatches")
    if s == "dualpipev" and m < stages:
        raise ConfigError(f"parallel.schedule='dualpipev' needs at least as many microbatches as stages "
                          f"(2 pp = {stages}), got microbatches={m}; use microbatches >= {stages}")


def forward_only(schedule) -> Any:
    """`schedule` (a V schedule, `_PipelineScheduleRuntime`) without its backward actions and their
    sends and receives: what its ``eval()`` needs. torch 2.13's ``eval()`` keeps the backward actions
    and skips their work, but between two stages on one rank (V placement's turn on rank ``pp - 1``)
    it still hands the input gradient over (``schedules.py``, ``_perform_action``:
    ``stage.get_local_bwd_output``), which raises ``AssertionError: can't steal_bwd_input if this
    stage doesn't have backward``. (Re-lowering the forward actions alone is refused by torch's
    ``_validate_schedule``, which demands every microbatch's backward.)"""
    backward = {_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_INPUT,
                _ComputationType.BACKWARD_WEIGHT, _ComputationType.SEND_B, _ComputationType.RECV_B,
                _ComputationType.REDUCE_GRAD}
    for rank, actions in schedule.pipeline_order_with_comms.items():
        kept = []
        for a in actions:
            for sub in (a.sub_actions or (a,)):  # DualPipeV's overlapped forward + backward pairs
                if sub.computation_type not in backward:
                    kept.append(sub)
        schedule.pipeline_order_with_comms[rank] = kept
    return schedule


def sum_tied_embedding_grads(stages: list[NativeStage]) -> None:
    """Under V placement the embedding (stage 0) and the head's copy of it (the last stage) are on one
    rank: give both the sum of their gradients, the gradient of the one tied matrix (what
    `lmkit.parallel.pipeline.allreduce_tied_embedding_grads` does across ranks, here without a
    collective; FSDP2 shards both copies alike, so their local shards add)."""
    first = next((s for s in stages if s.is_first), None)
    last = next((s for s in stages if s.tied_embedding_copy() is not None), None)
    if first is None or last is None:
        return
    emb, head = first.tok_emb.weight, last.head.weight
    grads = [p.grad for p in (emb, head) if p.grad is not None]
    if not grads:
        return
    total = grads[0] if len(grads) == 1 else grads[0] + grads[1]
    emb.grad, head.grad = total, total.clone()


class HeadNorm(ParallelStyle):
    """QK-norm (a ``head_norm`` row) under tensor parallelism: the gains replicated DTensors, the
    input (this rank's heads, ``[b, heads / tp, T, head_dim]``) seen as ``Shard(1)`` of all heads, so
    DTensor makes the gains' gradient ``Partial`` over tp (each rank saw its own heads only); it is
    summed where the SP norms' is (`NativeEngine._reduce_partial_grads`, or FSDP2). The output is
    this rank's local tensor again."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate, _heads_in, _local_out)


def _heads_in(module: nn.Module, inputs: tuple, mesh) -> tuple:
    return tuple(DTensor.from_local(t, mesh, [Shard(1)], run_check=False) for t in inputs)


def _local_out(module: nn.Module, output: Tensor, mesh) -> Tensor:
    return output.to_local()


def _style(style: str, sequence_parallel: bool) -> ParallelStyle | None:
    """The DTensor style of a plan style (None: nothing to parallelize; see `tensor_parallel`)."""
    seq = Shard(1) if sequence_parallel else Replicate()  # layout of activations between blocks
    if style == "vocab":  # partial lookups reduced (or reduce-scattered under SP)
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if style in ("column", "column_heads"):  # all-gather of the sequence under SP
        return ColwiseParallel(input_layouts=seq)  # (fused qkv, fc: rows permuted, `fused_permutation`)
    if style == "row":  # all-reduce / reduce-scatter
        return RowwiseParallel(output_layouts=seq)
    if style == "vocab_head":  # logits stay sharded by vocabulary (a DTensor) for loss_parallel
        return ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if style == "norm" and sequence_parallel:
        return SequenceParallel()
    if style == "head_norm":
        return HeadNorm()
    return None


def dtensor_plan(stage: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """``{module path: DTensor style}`` for `stage`, one entry per plan row that shards something."""
    styles = {}
    for path, row in plan.rows_in(stage):
        style = _style(row.style, sequence_parallel)
        if style is not None:
            style.src_data_rank = None  # every rank holds the same full weights: shard locally, no scatter
            styles[path] = style
    return styles


def _replicate(name: str, module: nn.Module, mesh) -> None:
    for key, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(DTensor.from_local(p.detach(), mesh, [Replicate()],
                                                                       run_check=False)))


def tensor_parallel(stage: NativeStage, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `stage` with DTensor by `dtensor_plan`; under SP the plan's ``positions`` become a
    replicated DTensor (each tp rank takes its rows in the forward); tied weights (a model that
    ties its embeddings) re-tied."""
    parallelize_module(stage, tp_mesh, dtensor_plan(stage, sequence_parallel))
    for path, row in plan.rows_in(stage):
        module = stage.get_submodule(path)
        if row.style == "positions" and sequence_parallel:
            distribute_module(module, tp_mesh, _replicate)
        partner = plan.tied_to(row, stage.config.tie_embeddings)
        if partner is not None and hasattr(stage, partner):  # both Shard(0) by vocabulary on the tp mesh
            module.weight = stage.get_submodule(partner).weight
    stage.sequence_parallel = bool(sequence_parallel)
    stage.tp_rank, stage.tp_size = tp_mesh.get_local_rank(), tp_mesh.size()  # (rotary tables under SP)


def mixed_precision_policy(param_dtype: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for ``train.param_dtype`` / ``reduce_dtype``: with ``param_dtype='bfloat16'`` the
    sharded fp32 parameters stay the master weights (the optimizer steps them, its moments fp32) and
    each forward/backward gathers a transient bf16 copy to compute with; gradients are reduced in
    `reduce_dtype` and land in fp32 on the shards. ``'float32'``: fp32 parameters (autocast, when on,
    casts matmul inputs itself)."""
    if param_dtype == "float32":
        return MixedPrecisionPolicy()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    return MixedPrecisionPolicy(param_dtype=dtypes[param_dtype], reduce_dtype=dtypes[reduce_dtype])


def data_parallel(stage: NativeStage, dp_mesh, zero: int, mp: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2 per block and on the stage (zero 2/3), or FSDP2-based ``replicate`` (zero 0), with the
    mixed-precision policy `mp` (`mixed_precision_policy`). A size-1 `dp_mesh` is allowed: it gives
    tp-only and pp-only layouts FSDP2's bf16 parameters with fp32 masters (no gradient traffic)."""
    mp = mp or MixedPrecisionPolicy()
    # weights no gradient moves (a router's balancing bias, `lmkit.experts`) stay plain tensors, the
    # same on every rank, which the trainer updates in place
    frozen = {p for p in stage.parameters() if not p.requires_grad} or None
    if zero == 0:
        for block in stage.blocks.values():
            replicate(block, mesh=dp_mesh, mp_policy=mp, ignored_params=frozen)
        replicate(stage, mesh=dp_mesh, mp_policy=mp, ignored_params=frozen)
        return
    reshard = zero == 3  # zero=2: keep the gathered parameters from forward to backward
    for block in stage.blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=frozen)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp, ignored_params=frozen)


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def layout_key(t: Tensor) -> Any:
    """(mesh, placements) of a DTensor, None for a plain tensor: tensors with one key combine."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


@contextlib.contextmanager
def quiet_redistribute() -> Iterator[None]:
    """Silence DTensor's "2 sequential all_gather operations" notice while gathering checkpoints:
    an FSDP2 x TP parameter is sharded on dim 0 by both, so its full tensor takes two gathers."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def global_grad_norm(params: list[Tensor], pp_group=None, device: torch.device | str = "cpu") -> Tensor:
    """The true global L2 norm of the gradients of `params` (this stage's, each counted once).

    Gradients are grouped by their DTensor mesh and placements (plain tensors in their own group:
    identical on every rank that holds them), one ``get_total_norm`` per group made a full tensor,
    squares added, and summed over the pipeline group when there is one.
    """
    groups: dict[Any, list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(layout_key(p.grad), []).append(p.grad)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if is_dtensor(norm):
            norm = norm.full_tensor()
        sq += norm.detach().to(sq.device, torch.float64) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()
