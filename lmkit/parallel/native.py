"""The same layouts with PyTorch's own parallel APIs: the production path.

`NativeEngine` runs exactly the layouts of `lmkit.parallel.engine.ParallelEngine` (``dp x tp x
pp``, same rank order, same global batch, same loss curve) but delegates every parallel
mechanism to PyTorch, the way torchtitan (Liang et al. 2024, "TorchTitan: One-stop PyTorch
native solution for production ready LLM pre-training", github.com/pytorch/torchtitan) does.
Both engines expose one interface, so `lmkit.train.Trainer` drives either, and their
checkpoints are interchangeable.

===================  ========================================  =======================================
dimension            lmkit engine (from scratch)               native engine (this module)
===================  ========================================  =======================================
process groups       ``init_topology``: new_group per dim      ``init_device_mesh``: (pp, dp, tp)
data parallel        bucketed all-reduce, no_sync              FSDP2 ``replicate`` (zero=0)
ZeRO                 1 (optimizer state), 2 (+ gradients)      FSDP2 ``fully_shard``: 2, 3 (+ params)
tensor parallel      Column/RowParallelLinear (f/g operators)  ``ColwiseParallel``/``RowwiseParallel``
sequence parallel    all-gather / reduce-scatter operators     ``SequenceParallel``, ``Shard(1)``
vocab-parallel loss  ``vocab_parallel_cross_entropy``          ``loss_parallel()`` on DTensor logits
pipeline             send/recv: GPipe, 1F1B, interleaved       ``torch.distributed.pipelining``
tied embedding (pp)  gradient all-reduce, first + last stage   the same, on DTensor local shards
gradient norm        weighted squares, tp/pp all-reduce        per-mesh ``get_total_norm`` (below)
===================  ========================================  =======================================

Construction (every rank, same order): the Trainer hands over the GPT built with the run's seed,
normally on the meta device; this rank keeps its pipeline stage(s) (`NativeStage`: the GPT's
own modules, blocks in a ``ModuleDict`` keyed by their layer index, so parameter names *are* the
GPT's names, as in torchtitan); tensor parallelism shards them with DTensor on the ``tp`` mesh
dimension; FSDP2 (or ``replicate``) wraps every block and the stage on the ``dp`` dimension
(with tp: a 2-D ``dp x tp`` layout); a meta model is then materialised (``to_empty``: this rank's shards only)
and each parameter set to its shard of the single-process initial value, drawn one parameter at
a time (`lmkit.model.InitialWeights`), as torchtitan initialises after parallelising; the
pipeline schedule wraps the stages; AdamW optimizes the DTensors.

What it takes to reproduce the single process (each was found by the loss-compare tests):

* the fused ``attn.qkv`` weight is laid out ``[q | k | v]``; ``ColwiseParallel`` gives each tp
  rank a *contiguous* block of rows, so the rows are permuted once (`qkv_permutation`) such that
  rank ``r``'s block is ``[q_r | k_r | v_r]`` (its own heads of each). The attention infers its
  local head count from the output width, so the GPT module is unchanged; checkpoints undo the
  permutation;
* the head is tied to the embedding: both are sharded by vocabulary rows (``RowwiseParallel``
  on the embedding, ``ColwiseParallel`` on the head, as torchtitan does), which is the same
  placement, so on a single stage they are re-tied into one DTensor Parameter; across pipeline
  stages the last stage keeps a copy whose gradient is summed with the embedding's (local
  shards, all-reduce over the first and last stage) after every backward;
* under sequence parallelism each tp rank adds the position embeddings of its own positions
  only, so ``pos_emb`` becomes a replicated DTensor whose ``Shard(0)`` slice is taken in the
  forward (its backward all-gathers the rows); a plain parameter would miss the other ranks'
  positions' gradients;
* without FSDP2, DTensor leaves some gradients in another layout than their parameter
  (``Partial`` LayerNorm gradients under sequence parallelism, a ``Replicate`` embedding
  gradient): they are redistributed to the parameter's placement after backward (FSDP2 does
  this itself before its reduce-scatter);
* gradient clipping over mixed meshes: with FSDP2 + TP some gradients live on the 2-D
  ``dp x tp`` mesh, others (LayerNorms without sequence parallelism) on ``dp`` alone, and
  ``torch.nn.utils.clip_grad_norm_`` cannot combine norms of different meshes (torch 2.13).
  `global_grad_norm` takes one ``get_total_norm`` per (mesh, placements) group, makes each a
  full tensor, adds the squares, sums over the pipeline group (each stage holds different
  parameters; the head copy is not counted twice) and ``clip_grads_with_norm_`` clips each
  group with that one global norm.

ZeRO levels: ``zero=0`` with ``dp > 1`` is FSDP2-based ``replicate`` (DDP semantics: full
parameters and optimizer state on every rank, gradients all-reduced); ``zero=2`` is
``fully_shard(reshard_after_forward=False)`` (gradients and optimizer state sharded, gathered
parameters kept from forward to backward); ``zero=3`` is ``fully_shard`` (parameters re-gathered
for backward too). FSDP2 has no ZeRO-1 (``zero=1`` is the lmkit engine's). Gradient
accumulation uses ``set_requires_gradient_sync(False)`` on all but the last microbatch
(``pp = 1``); pipeline schedules manage it themselves. With ``train.dtype='bfloat16'`` FSDP2
gathers bf16 parameters and reduces fp32 gradients (``MixedPrecisionPolicy``). Dropout draws
from each rank's own generator (the from-scratch engine manages tp RNG streams; use
``dropout=0`` for bit-level comparisons either way).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils.checkpoint import checkpoint

from lmkit.checkpoint import Piece
from lmkit.config import ConfigError, ParallelConfig, TrainConfig
from lmkit.model import InitialWeights
from lmkit.parallel.engine import _pieces, on_meta
from lmkit.parallel.mesh import Topology
from lmkit.parallel.stage import layer_split
from lmkit.parallel.tensor_parallel import ShardSpec

__all__ = ["NativeEngine", "NativeStage", "build_native_stages", "qkv_permutation", "global_grad_norm",
           "native_loss"]

QKV_NAMES = ("attn.qkv.weight", "attn.qkv.bias")


def native_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy; `logits` may be a vocab-sharded DTensor (under ``loss_parallel``)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), ignore_index=-100)


def qkv_permutation(d_model: int, tp: int) -> Tensor:
    """Row order of the fused qkv weight such that tp rank ``r``'s contiguous block is ``[q_r|k_r|v_r]``.

    ``W_sharded = W[perm]`` before ``ColwiseParallel``; ``W = W_sharded[argsort(perm)]`` after.
    """
    chunk = d_model // tp
    return torch.cat([torch.arange(j * d_model + r * chunk, j * d_model + (r + 1) * chunk)
                      for r in range(tp) for j in range(3)])


class NativeStage(nn.Module):
    """The GPT modules of one pipeline stage, under their GPT names (forward: tokens or h -> h or logits).

    The first stage embeds token ids; the last returns logits (a vocab-sharded DTensor under
    tensor parallelism) and the pipeline schedule's ``loss_fn`` turns them into the loss.
    """

    def __init__(self, model: nn.Module, layers: range, is_first: bool, is_last: bool, stage_index: int = 0):
        super().__init__()
        self.config = model.config
        self.stage_index, self.is_first, self.is_last = stage_index, is_first, is_last
        self.sequence_parallel = False  # set by tensor parallelism
        self.activation_checkpointing = False
        if is_first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if is_last:
            self.ln_f, self.head = model.ln_f, model.head
            if not is_first:  # the tied head on another stage: its own copy, gradients summed
                self.head.weight = nn.Parameter(model.tok_emb.weight.detach().clone())

    def forward(self, h: Tensor) -> Tensor:
        if self.is_first:
            pos = self.pos_emb.weight[: h.size(1)]
            h = self.tok_emb(h)  # [b, T / tp, d] under sequence parallelism (this rank's positions)
            if self.sequence_parallel:  # pos is a replicated DTensor: keep this rank's rows; the
                from torch.distributed.tensor import Shard  # backward all-gathers their gradients

                pos = pos.redistribute(placements=[Shard(0)]).to_local()
            h = self.drop(h + pos)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks.values():
            h = checkpoint(block, h, use_reentrant=False) if recompute else block(h)
        if self.is_last:
            h = self.head(self.ln_f(h))
        return h


def build_native_stages(model: nn.Module, pp: int, pp_rank: int,
                        virtual_stages: int = 1) -> list[NativeStage]:
    """This pipeline rank's stages: chunks ``pp_rank, pp_rank + pp, ...`` of ``pp * virtual_stages``
    (the same split and round-robin assignment as `lmkit.parallel.stage.build_stages`)."""
    n = pp * virtual_stages
    chunks = layer_split(model.config.n_layer, n)
    return [NativeStage(model, chunks[i], i == 0, i == n - 1, stage_index=i)
            for i in (v * pp + pp_rank for v in range(virtual_stages))]


def _tensor_parallel(stage: NativeStage, tp_mesh, sequence_parallel: bool) -> None:
    """DTensor TP (+SP) plan of torchtitan's Llama, for GPT-2 module names."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1) if sequence_parallel else Replicate()  # layout of activations between blocks
    plan: dict[str, Any] = {}
    if stage.is_first:  # vocab-parallel embedding: partial sums reduced (or reduce-scattered under SP)
        plan["tok_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    for i in stage.blocks:
        p = f"blocks.{i}"
        plan[f"{p}.attn.qkv"] = ColwiseParallel(input_layouts=seq)  # all-gather of the sequence under SP
        plan[f"{p}.attn.proj"] = RowwiseParallel(output_layouts=seq)  # all-reduce / reduce-scatter
        plan[f"{p}.mlp.fc"] = ColwiseParallel(input_layouts=seq)
        plan[f"{p}.mlp.proj"] = RowwiseParallel(output_layouts=seq)
        if sequence_parallel:
            plan[f"{p}.ln1"] = SequenceParallel()
            plan[f"{p}.ln2"] = SequenceParallel()
    if stage.is_last:
        if sequence_parallel:
            plan["ln_f"] = SequenceParallel()
        # logits stay sharded by vocabulary (a DTensor) for loss_parallel: never gathered
        plan["head"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    for style in plan.values():
        style.src_data_rank = None  # every rank holds the same full weights: shard locally, no scatter
    parallelize_module(stage, tp_mesh, plan)
    if stage.is_first and sequence_parallel:  # positions are split over tp ranks: a replicated DTensor
        from torch.distributed.tensor import DTensor, distribute_module

        def replicate(name: str, module: nn.Module, mesh) -> None:
            for key, p in list(module.named_parameters(recurse=False)):
                local = DTensor.from_local(p.detach(), mesh, [Replicate()], run_check=False)
                module.register_parameter(key, nn.Parameter(local))

        distribute_module(stage.pos_emb, tp_mesh, replicate)
    if stage.is_first and stage.is_last:
        stage.head.weight = stage.tok_emb.weight  # re-tie: both Shard(0) by vocabulary on the tp mesh
    stage.sequence_parallel = bool(sequence_parallel)


def _data_parallel(stage: NativeStage, dp_mesh, zero: int, dtype: str) -> None:
    """FSDP2 per block and on the stage (zero 2/3), or FSDP2-based ``replicate`` (zero 0)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dtype == "bfloat16" else MixedPrecisionPolicy())
    if zero == 0:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for block in stage.blocks.values():
            replicate(block, mesh=dp_mesh, mp_policy=mp)
        replicate(stage, mesh=dp_mesh, mp_policy=mp)
        return
    reshard = zero == 3  # zero=2: keep the gathered parameters from forward to backward
    for block in stage.blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _layout_key(t: Tensor) -> Any:
    """(mesh, placements) of a DTensor, None for a plain tensor: tensors with one key combine."""
    return (t.device_mesh, tuple(t.placements)) if _is_dtensor(t) else None


@contextlib.contextmanager
def _quiet_redistribute():
    """Silence DTensor's "2 sequential all_gather operations" notice while gathering checkpoints:
    an FSDP2 x TP parameter is sharded on dim 0 by both, so its full tensor takes two gathers."""
    import logging

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
        g = p.grad
        if g is None:
            continue
        groups.setdefault(_layout_key(g), []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        sq += norm.detach().to(sq.device, torch.float64) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


class NativeEngine:
    """`ParallelEngine`'s interface on FSDP2 / DTensor / torch.distributed.pipelining (module docstring)."""

    def __init__(self, model: nn.Module, pcfg: ParallelConfig, tcfg: TrainConfig, topo: Topology) -> None:
        from lmkit.parallel.engine import validate_layout

        cfg = model.config
        validate_layout(pcfg, tcfg, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.block_size, topo.world_size)
        if pcfg.engine != "native":
            raise ConfigError(f"NativeEngine needs parallel.engine='native', got {pcfg.engine!r}")
        self.pcfg, self.tcfg, self.topo, self.config = pcfg, tcfg, topo, cfg
        self.device = topo.device
        self.micro_steps = tcfg.grad_accum * pcfg.microbatches
        self.mesh = self._device_mesh()
        tp, sp = pcfg.tp, pcfg.sequence_parallel
        initial = InitialWeights(model) if on_meta(model) else None
        if tp > 1:
            perm = qkv_permutation(cfg.d_model, tp)
            self._perm, self._inv = perm, torch.argsort(perm)
            with torch.no_grad():  # rows [q_r | k_r | v_r] contiguous per tp rank (module docstring)
                for block in model.blocks if initial is None else ():  # (InitialWeights: by `_shard`)
                    for p in (block.attn.qkv.weight, block.attn.qkv.bias):
                        if p is not None:
                            p.copy_(p[perm])
        self.stages = build_native_stages(model, pcfg.pp, topo.pp_rank, pcfg.virtual_stages)
        for stage in self.stages:
            if initial is None:
                stage.to(self.device)
            if tp > 1:
                _tensor_parallel(stage, self.mesh["tp"], sp)
            if pcfg.dp > 1:
                _data_parallel(stage, self.mesh["dp"], pcfg.zero, tcfg.dtype)
            if initial is not None:  # DTensors keep their identity (swapped); FSDP2 resets its shards
                stage.to_empty(device=self.device)
                if stage.is_first and stage.is_last and stage.head.weight is not stage.tok_emb.weight:
                    stage.head.weight = stage.tok_emb.weight  # plain parameters come back new: re-tie
        self.named_params = self._named_parameters()
        if initial is not None:
            self.load_full_state(initial, None)
        decay = [p for _, p in self.named_params if p.dim() >= 2]
        no_decay = [p for _, p in self.named_params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(  # same groups and hyper-parameters as lmkit.train
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8)
        self.schedule = self._schedule() if pcfg.pp > 1 else None
        self._eval_schedule = None

    # ------------------------------------------------------------------ set-up helpers
    def _device_mesh(self):
        """The ``(pp, dp, tp)`` DeviceMesh; its rank order must be lmkit's (tp fastest)."""
        if not dist.is_initialized():
            if self.topo.world_size != 1:
                raise RuntimeError("the native engine needs torch.distributed initialised (init_topology)")
            return None
        from torch.distributed.device_mesh import init_device_mesh

        p = self.pcfg
        mesh = init_device_mesh(self.device.type, (p.pp, p.dp, p.tp), mesh_dim_names=("pp", "dp", "tp"))
        coords = list(mesh.get_coordinate())
        expected = [self.topo.pp_rank, self.topo.dp_rank, self.topo.tp_rank]
        if coords != expected:
            raise RuntimeError(f"DeviceMesh coordinates {coords} of rank {self.topo.rank} differ from "
                               f"lmkit's (pp, dp, tp) = {expected}")
        if p.dp > 1 and p.tp > 1:  # 2-D gradients' norms reduce in one all-reduce over dp x tp
            mesh["dp", "tp"]._flatten("dp_tp")
        return mesh

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named, seen = [], set()
        for stage in self.stages:
            for name, param in stage.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    named.append((name, param))
        return named

    def _schedule(self):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        n = self.pcfg.pp * self.pcfg.virtual_stages
        group = self.mesh["pp"].get_group()
        stages = [PipelineStage(s, s.stage_index, n, self.device, group=group) for s in self.stages]
        if self.pcfg.schedule == "interleaved":
            return ScheduleInterleaved1F1B(stages, self.micro_steps, loss_fn=native_loss)
        cls = ScheduleGPipe if self.pcfg.schedule == "gpipe" else Schedule1F1B
        return cls(stages[0], self.micro_steps, loss_fn=native_loss)

    def _loss_context(self) -> contextlib.AbstractContextManager:
        if self.pcfg.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for stage in self.stages:
            stage.activation_checkpointing = bool(enabled)

    def train(self, mode: bool = True) -> None:
        for stage in self.stages:
            stage.train(mode)

    # ------------------------------------------------------------------ one step
    def microbatches(self, sampler, step: int) -> list[tuple[Tensor, Tensor]]:
        """This data-parallel rank's microbatches of the global batch of `step`."""
        return [sampler.batch(step, rank=self.topo.dp_rank, world=self.pcfg.dp, micro=i,
                              micro_steps=self.micro_steps, device=self.device)
                for i in range(self.micro_steps)]

    def forward_backward(self, micro: list[tuple[Tensor, Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         on_event: Callable | None = None) -> float:
        """Gradients of the mean loss over `micro`; returns this rank's mean loss (on every pp rank).

        `on_event` is accepted for interface compatibility and not called: torch's schedules have
        no per-action callback (`lmkit.parallel.instrument` times the stage modules instead).
        """
        self.train(True)
        if self.pcfg.pp == 1:
            stage, total = self.stages[0], 0.0
            for i, (x, y) in enumerate(micro):
                if self.pcfg.dp > 1:  # reduce(-scatter) gradients only after the last microbatch
                    stage.set_requires_gradient_sync(i == len(micro) - 1)
                with self._loss_context():
                    with autocast():
                        loss = native_loss(stage(x), y)
                    (loss / len(micro)).backward()
                total += _item(loss)
            self._reduce_partial_grads()
            return total / len(micro)
        x = torch.cat([m[0] for m in micro])
        y = torch.cat([m[1] for m in micro])
        value = self._run_pipeline(self.schedule, x, y, autocast, train=True)
        self._reduce_partial_grads()
        self._sum_tied_embedding_grads()
        return value

    def _reduce_partial_grads(self) -> None:
        """Give every gradient its parameter's placement (FSDP2 does this itself on its way out).

        Sequence parallelism leaves the LayerNorm gradients ``Partial`` (each tp rank summed over
        its own positions: an all-reduce completes them), and the vocab-parallel embedding's
        gradient comes back in another layout than its ``Shard(0)`` parameter.
        """
        for _, p in self.named_params:
            g = p.grad
            if _is_dtensor(g) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(g.device_mesh, p.placements)

    def _run_pipeline(self, schedule, x: Tensor, y: Tensor, autocast, train: bool) -> float:
        """One schedule step (or forward-only eval) over `x`; the mean loss, broadcast from the last stage."""
        losses: list[Tensor] = []
        args = (x,) if any(s.is_first for s in self.stages) else ()
        run = schedule.step if train else schedule.eval
        kwargs = {"return_outputs": False} if train else {}
        with self._loss_context(), autocast():
            run(*args, target=y, losses=losses, **kwargs)
        value = torch.zeros((), dtype=torch.float64, device=self.device)  # NCCL needs device tensors
        if any(s.is_last for s in self.stages):
            value += sum(_item(loss) for loss in losses) / len(losses)
        dist.broadcast(value, group=self.topo.pp_group, group_src=self.pcfg.pp - 1)
        return float(value)

    def _sum_tied_embedding_grads(self) -> None:
        """Sum the gradients of the embedding (first stage) and the head's copy (last stage)."""
        for stage in self.stages:
            param = stage.tok_emb.weight if stage.is_first else stage.head.weight if stage.is_last else None
            if param is None or param.grad is None:
                continue
            grad = param.grad.to_local() if _is_dtensor(param.grad) else param.grad
            dist.all_reduce(grad, group=self.topo.embedding_group)

    def clip_and_step(self, max_norm: float, finite_loss: bool = True) -> float:
        """True global gradient norm (before clipping), clipping as clip_grad_norm_, AdamW step.

        As the lmkit engine: no step (gradients dropped) unless `finite_loss` and the norm is finite.
        """
        params = [p for name, p in self.named_params if name != "head.weight" or self.pcfg.pp == 1]
        norm = global_grad_norm(params, self.topo.pp_group if self.pcfg.pp > 1 else None, self.device)
        if not (finite_loss and math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        if max_norm > 0:  # clip_grads_with_norm_ groups tensors by device only: keep meshes apart
            by_layout: dict[Any, list[Tensor]] = {}
            for _, p in self.named_params:
                if p.grad is not None:
                    by_layout.setdefault(_layout_key(p.grad), []).append(p)
            for group in by_layout.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm.to(torch.float32))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def mean_over_dp(self, value: float) -> float:
        """The global-batch mean of a per-rank mean (every dp rank has equally many tokens)."""
        if self.pcfg.dp == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.topo.dp_group)
        return float(t) / self.pcfg.dp

    @torch.no_grad()
    def eval_loss(self, x: Tensor, y: Tensor,
                  autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
        """Loss of one global validation batch: each dp rank takes its share, the mean is shared."""
        self.train(False)
        dp, r = self.pcfg.dp, self.topo.dp_rank
        split = x.size(0) % (dp * (self.micro_steps if self.pcfg.pp > 1 else 1)) == 0
        if split:
            b = x.size(0) // dp
            x, y = x[r * b : (r + 1) * b], y[r * b : (r + 1) * b]
        elif self.pcfg.pp > 1:
            raise ValueError(f"a pipelined evaluation needs a batch divisible by dp x microbatches "
                             f"({dp} x {self.micro_steps}); got {x.size(0)}")
        if self.pcfg.pp == 1:
            with self._loss_context(), autocast():
                value = _item(native_loss(self.stages[0](x), y))
        else:
            if self._eval_schedule is None:  # its own stages: never switches the training schedule's mode
                self._eval_schedule = self._schedule()
            value = self._run_pipeline(self._eval_schedule, x, y, autocast, train=False)
        return self.mean_over_dp(value) if split else value

    # ------------------------------------------------------------------ checkpoints
    def _full(self, name: str, tensor: Tensor) -> Tensor:
        """The full (unsharded, unpermuted) CPU tensor of a parameter or optimizer-state tensor."""
        t = tensor.detach()
        t = t.full_tensor() if _is_dtensor(t) else t.clone()
        if self.pcfg.tp > 1 and name.endswith(QKV_NAMES):
            t = t[self._inv]
        return t.cpu()

    def _shard(self, name: str, full: Tensor, like: Tensor) -> Tensor:
        """This rank's local piece of `full` in the layout of `like` (a parameter)."""
        full = full.to(device=self.device, dtype=like.dtype)
        if self.pcfg.tp > 1 and name.endswith(QKV_NAMES):
            full = full[self._perm]
        if not _is_dtensor(like):
            return full
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()

    def _gather_pp(self, local: dict[str, Any]) -> dict[str, Any]:
        if self.pcfg.pp == 1:
            return local
        parts: list[Any] = [None] * self.pcfg.pp
        dist.all_gather_object(parts, local, group=self.topo.pp_group)
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part)
        return merged

    def sharded_state(self, create: bool = False) -> tuple[list[Piece], dict[str, Any] | None]:
        """This rank's boxes of the layout-independent tensors (weights and AdamW moments by GPT
        name, the qkv rows un-permuted), as views of the DTensors' local shards: what a sharded
        checkpoint saves and loads. Replicas write the same boxes; DCP's planner keeps one."""
        if create:
            for _, p in self.named_params:
                if not self.optimizer.state.get(p):
                    self.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                               "exp_avg_sq": torch.zeros_like(p)}
        pieces = []
        for name, p in self.named_params:
            source = "tok_emb.weight" if name == "head.weight" else name
            write = name != "head.weight"
            tensors = {"model": p.detach()}
            tensors.update({key: self.optimizer.state[p][key] for key in ("exp_avg", "exp_avg_sq")
                            if self.optimizer.state.get(p)})
            for key, tensor in tensors.items():
                fqn = f"model.{source}" if key == "model" else f"optim.{source}.{key}"
                pieces += self._pieces(fqn, name, tensor, write)
        meta = None
        steps = [float(st["step"]) for st in self.optimizer.state.values() if st]
        if steps:
            meta = {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                     for g in self.optimizer.param_groups], "step": steps[0]}
        return pieces, meta

    def _pieces(self, fqn: str, name: str, tensor: Tensor, write: bool) -> list[Piece]:
        local = tensor.to_local() if _is_dtensor(tensor) else tensor
        if local.numel() == 0:  # an uneven FSDP2 split can leave a rank without rows
            return []
        shape, offsets = tuple(tensor.shape), (0,) * tensor.dim()
        if _is_dtensor(tensor):
            _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                               tensor.placements)
        if self.pcfg.tp > 1 and name.endswith(QKV_NAMES):  # rows of the permuted layout: map them back
            rows = self._perm[offsets[0]:offsets[0] + local.shape[0]]
            spec = ShardSpec(0, shape[0], rows)
            return _pieces(fqn, local.reshape(-1), 0, local.numel(), tuple(local.shape), spec, 0, write)
        return [Piece(fqn, shape, tuple(offsets), local, write)]

    def load_optimizer_meta(self, meta: dict[str, Any]) -> None:
        """The hyper-parameters and the step count of a sharded checkpoint (moments already loaded)."""
        for group, saved in zip(self.optimizer.param_groups, meta["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for st in self.optimizer.state.values():
            if st:
                st["step"] = torch.tensor(float(meta["step"]))

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full weights by `GPT` parameter name (collective: every rank calls it)."""
        with _quiet_redistribute():
            local = {name: self._full(name, p) for name, p in self.named_params if name != "head.weight"}
        full = self._gather_pp(local)
        full["head.weight"] = full["tok_emb.weight"]
        return full

    def full_optimizer_state(self) -> dict[str, Any]:
        """AdamW state by parameter name with full tensors (collective); lmkit's checkpoint format."""
        state = {}
        with _quiet_redistribute():
            for name, p in self.named_params:
                entry = self.optimizer.state.get(p)
                if name == "head.weight" or not entry:
                    continue
                state[name] = {k: (self._full(name, v) if torch.is_tensor(v) and v.dim() > 0 else
                                   v.detach().clone().cpu() if torch.is_tensor(v) else v)
                               for k, v in entry.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"state": self._gather_pp(state), "param_groups": groups}

    def load_full_state(self, weights: dict[str, Tensor], optimizer: dict[str, Any] | None) -> None:
        """Load full (layout-independent) weights and optimizer state into this rank's shards."""
        def source(name: str) -> str:
            return "tok_emb.weight" if name == "head.weight" else name

        with torch.no_grad():
            for name, p in self.named_params:
                local = p.to_local() if _is_dtensor(p) else p
                local.copy_(self._shard(name, weights[source(name)], p))
        if optimizer is None:
            return
        saved = optimizer["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise ConfigError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this one "
                              f"{len(self.optimizer.param_groups)} (decay, no decay)")
        for group, hyper in zip(self.optimizer.param_groups, saved, strict=True):
            group.update({k: v for k, v in hyper.items() if k != "params"})
        for name, p in self.named_params:
            entry = optimizer["state"].get(source(name))
            if entry is None:
                continue
            new: dict[str, Any] = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    t = torch.zeros_like(p.detach())
                    (t.to_local() if _is_dtensor(t) else t).copy_(self._shard(name, v, p))
                    new[k] = t
                else:
                    new[k] = v.detach().clone().float() if torch.is_tensor(v) else v
            self.optimizer.state[p] = new


def _item(loss: Tensor) -> float:
    loss = loss.detach()
    if _is_dtensor(loss):
        loss = loss.full_tensor()
    return float(loss.float())

