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
expert parallel      ``lmkit.parallel.experts``: all-to-all    (pp, edp, ep, tp) mesh, ``Shard(0)``
                                                               experts, FSDP2 over edp, all-to-all with
                                                               autograd (`native_experts`)
===================  ========================================  =======================================

Construction (every rank, same order; the book, chapter 6): this rank's stage(s) of the GPT
built with the run's seed, normally on the meta device (`native_plan.NativeStage`: parameter
names *are* the GPT's, as in torchtitan); DTensor tensor parallelism by the styles the rows of
`lmkit.parallel.plan` map to (`native_plan.dtensor_plan`); FSDP2 or ``replicate`` per block and
stage on ``dp``; ``to_empty`` (this rank's shards only), each parameter set to its shard of the
single-process initial value (`lmkit.weights.InitialWeights`); the pipeline schedule; AdamW.

What it takes to reproduce the single process (each was found by the loss-compare tests):

* ``ColwiseParallel`` gives a tp rank *contiguous* rows, so the rows of a fused projection are
  permuted once (`fused_permutation`: rank ``r``'s block is ``[q_r | k_r | v_r]``, its query and
  key/value heads, or a SwiGLU's ``[gate_r | up_r]``); checkpoints and Muon's gathered
  matrices undo the permutation;
* the head and the embedding of a model that ties them are both sharded by vocabulary rows, so on
  one stage they are re-tied into one DTensor Parameter; across stages the head's copy has its
  gradient summed with the embedding's after every backward (an untied head is a matrix like any);
* rotary positions (no ``pos_emb``): every stage computes the tables of all ``T`` positions
  (`GPTStage.rope`; under SP the attention runs on the gathered sequence);
* QK-norm gains are replicated DTensors fed this rank's heads as ``Shard(1)`` (`HeadNorm`), so
  their gradient comes back ``Partial`` over tp and is summed like the SP norms';
* under sequence parallelism ``pos_emb`` is a replicated DTensor whose ``Shard(0)`` slice each
  rank takes (its backward all-gathers the rows' gradients);
* without FSDP2 some gradients come back in another layout than their parameter (``Partial``
  norms under SP): they are redistributed after backward;
* ``clip_grad_norm_`` cannot combine norms of different meshes (torch 2.13; with FSDP2 + TP
  some gradients live on ``dp x tp``, others on ``dp``): `global_grad_norm` adds one
  ``get_total_norm`` per (mesh, placements) group and sums over the pipeline group, and
  ``clip_grads_with_norm_`` clips each group with that one norm.

ZeRO: ``zero=0`` with ``dp > 1`` is ``replicate`` (DDP semantics), ``zero=2``
``fully_shard(reshard_after_forward=False)``, ``zero=3`` ``fully_shard``; FSDP2 has no ZeRO-1.
Accumulation uses ``set_requires_gradient_sync(False)`` (``pp = 1``; schedules manage it
themselves). Mixed precision: ``train.dtype='bfloat16'`` alone is autocast over fp32 parameters;
``param_dtype='bfloat16'`` adds FSDP2's ``MixedPrecisionPolicy`` (`native_plan.mixed_precision_policy`):
fp32 sharded master weights and AdamW moments, transient bf16 gathered copies to compute with,
gradients reduced in ``reduce_dtype``; layouts without dp get it over the size-1 dp mesh, one process
without a process group is refused.

Pipelines: `native_plan.SCHEDULE_CLASSES` maps ``parallel.schedule`` to torch's classes, including
the zero-bubble ones (ZB-H1; ZB-V and DualPipeV with V placement, rank ``r`` holding chunks ``r`` and
``2 pp - 1 - r``: the tied embedding and head both on rank 0, their gradients summed there). torch 2.13
has no ZB-H2, and its zero-bubble schedules give wrong gradients under ``zero=3`` (refused,
`native_plan.validate_native_schedule`); a V schedule evaluates with its forward actions only
(`native_plan.forward_only`).
Experts (`lmkit.experts.MoE`; `native_experts`): ep ranks are carved out of dp (the native engine has no
cp), the mesh becomes ``(pp, edp, ep, tp)`` with ``dp`` its flattened ``edp x ep``; every MoE layer's
routers count over dp (x tp under SP), its expert weights are DTensors sharded over ep, FSDP2'd over edp
with gradient divide factor dp, and its dispatch is the counts-then-tokens all-to-all. Under pipelines the
metadata-inference forward of torch's schedules is kept out of the routers' step counts.
Dropout draws from each rank's own generator (use ``dropout=0`` for bit-level comparisons).

Muon (``train.optimizer='muon'``): `lmkit.optim.Muon` on the blocks' matrices, whatever DTensor
shards (FSDP2's dim-0 chunks over dp, tp's rows or columns) each rank holds: momentum, Nesterov mix,
weight decay and the update run elementwise on the shards, and its ``directions`` callback
(`NativeEngine._muon_directions`) gathers each matrix's update (``full_tensor``), un-permutes its
rows, runs Newton-Schulz on the whole matrix and keeps this rank's shard (``distribute_tensor``):
the single process's update. AdamW takes the rest, as `lmkit.optim.MuonAdamW`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import loss_parallel

from lmkit.checkpoint.sharded import Piece, optimizer_meta, shard_pieces
from lmkit.config import V_SCHEDULES, ConfigError, ParallelConfig, TrainConfig
from lmkit.experts import set_aux_scale
from lmkit.optim import Direction, Muon, MuonAdamW, is_muon_matrix, muon_lr_scale, orthogonalize
from lmkit.parallel import plan
from lmkit.parallel.engine import EngineBase, gather_over_pp, on_meta, validate_layout
from lmkit.parallel.mesh import Topology
from lmkit.parallel.native_experts import (
    expert_meshes,
    parallelize_experts,
    reset_router_biases,
    skip_metadata_forward,
    validate_native_experts,
)
from lmkit.parallel.native_plan import (
    SCHEDULE_CLASSES,
    build_native_stages,
    data_parallel,
    forward_only,
    fused_permutation,
    global_grad_norm,
    is_dtensor,
    layout_key,
    mixed_precision_policy,
    qkv_permutation,
    quiet_redistribute,
    sum_tied_embedding_grads,
    tensor_parallel,
    validate_native_schedule,
)
from lmkit.parallel.pipeline import SCHEDULES as LMKIT_SCHEDULES
from lmkit.parallel.pipeline import allreduce_tied_embedding_grads
from lmkit.parallel.plan import ShardSpec
from lmkit.weights import InitialWeights

__all__ = ["NativeEngine", "native_loss", "qkv_permutation"]


def native_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy; `logits` may be a vocab-sharded DTensor (under ``loss_parallel``)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), ignore_index=-100)


class NativeEngine(EngineBase):
    """`ParallelEngine`'s interface on FSDP2 / DTensor / torch.distributed.pipelining (module docstring)."""

    def __init__(self, model: nn.Module, pcfg: ParallelConfig, tcfg: TrainConfig, topo: Topology) -> None:
        cfg = model.config
        validate_native_layout(pcfg, tcfg, cfg, topo.world_size)
        self.pcfg, self.tcfg, self.topo, self.config = pcfg, tcfg, topo, cfg
        self.device = topo.device
        self.micro_steps = tcfg.grad_accum * pcfg.microbatches
        self.mesh = self._device_mesh()
        tp, sp = pcfg.tp, pcfg.sequence_parallel
        initial = InitialWeights(model) if on_meta(model) else None
        self._perms: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # fused parts -> (perm, inverse)
        if tp > 1 and initial is None:  # rows [q_r | k_r | v_r] contiguous per tp rank (module docstring)
            with torch.no_grad():  # (InitialWeights: permuted by `_shard`)
                for name, p in model.named_parameters():
                    perm = self._permutation(name)
                    if perm is not None:
                        p.copy_(p[perm[0]])
        self.stages = build_native_stages(model, pcfg, topo.pp_rank)
        # FSDP2 on dp (or on the size-1 dp mesh: bf16 compute copies of fp32 masters without dp)
        self.fsdp = pcfg.dp > 1 or tcfg.param_dtype != "float32"
        if self.fsdp and self.mesh is None:
            raise ConfigError(f"train.param_dtype={tcfg.param_dtype!r} is FSDP2's mixed precision in the "
                              "native engine and needs a process group (dp, tp or pp > 1); in one process use"
                              " param_dtype='float32' with dtype='bfloat16' (autocast)")
        mp = mixed_precision_policy(tcfg.param_dtype, tcfg.reduce_dtype)
        for stage in self.stages:
            if initial is None:
                stage.to(self.device)
            if tp > 1:
                tensor_parallel(stage, self.mesh["tp"], sp)
            if cfg.n_experts and self.mesh is not None:  # `native_experts`: before FSDP2 of the blocks
                parallelize_experts(stage, self.mesh, pcfg, self.fsdp, mp)
            if self.fsdp:
                data_parallel(stage, self.mesh["dp"], pcfg.zero, mp)
            if initial is not None:  # DTensors keep their identity (swapped); FSDP2 resets its shards
                stage.to_empty(device=self.device)
                reset_router_biases(stage)
                if stage.is_first and stage.is_last and cfg.tie_embeddings \
                        and stage.head.weight is not stage.tok_emb.weight:
                    stage.head.weight = stage.tok_emb.weight  # plain parameters come back new: re-tie
        self.named_params = self._named_parameters()
        if initial is not None:
            self.load_full_state(initial, None)
        self.optimizer = self._optimizer()
        self.schedule = self._schedule() if pcfg.pp > 1 else None
        if self.schedule is not None and cfg.n_experts:
            skip_metadata_forward(self.stages)
        self._eval_schedule = None

    # ------------------------------------------------------------------ set-up helpers
    def _device_mesh(self):
        """The ``(pp, dp, tp)`` DeviceMesh; its rank order must be lmkit's (tp fastest)."""
        if not dist.is_initialized():
            if self.topo.world_size != 1:
                raise RuntimeError("the native engine needs torch.distributed initialised (init_topology)")
            return None
        p = self.pcfg
        if self.config.n_experts:  # the (pp, edp, ep, tp) mesh and its named slices
            meshes = expert_meshes(self.device.type, p)
            coords = list(meshes["root"].get_coordinate())
            t = self.topo
            expected = [t.pp_rank, t.dp_rank // p.ep, t.dp_rank % p.ep, t.tp_rank]
            if coords != expected:
                raise RuntimeError(f"DeviceMesh coordinates {coords} of rank {self.topo.rank} differ from "
                                   f"lmkit's (pp, edp, ep, tp) = {expected}")
            return meshes
        mesh = init_device_mesh(self.device.type, (p.pp, p.dp, p.tp), mesh_dim_names=("pp", "dp", "tp"))
        coords = list(mesh.get_coordinate())
        expected = [self.topo.pp_rank, self.topo.dp_rank, self.topo.tp_rank]
        if coords != expected:
            raise RuntimeError(f"DeviceMesh coordinates {coords} of rank {self.topo.rank} differ from "
                               f"lmkit's (pp, dp, tp) = {expected}")
        if p.dp > 1 and p.tp > 1:  # 2-D gradients' norms reduce in one all-reduce over dp x tp
            mesh["dp", "tp"]._flatten("dp_tp")
        return mesh

    def _permutation(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(perm, inverse) of the rows of parameter `name` when they are permuted for
        ``ColwiseParallel`` (a fused projection's weight or bias under tp, `fused_permutation`)."""
        parts = plan.fused_parts(name.rpartition(".")[0], self.config) if self.pcfg.tp > 1 else None
        if parts is None:
            return None
        if parts not in self._perms:
            perm = fused_permutation(parts, self.pcfg.tp)
            self._perms[parts] = perm, torch.argsort(perm)
        return self._perms[parts]

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW with `lmkit.optim.configure_optimizer`'s groups and hyper-parameters, or with Muon on
        the blocks' matrices first (`lmkit.optim.MuonAdamW`'s groups; directions `_muon_directions`)."""
        tcfg = self.tcfg
        muon = tcfg.optimizer == "muon"
        self._muon = [(n, p) for n, p in self.named_params if muon and is_muon_matrix(n, p)]
        self._muon_ids = {id(p) for _, p in self._muon}
        rest = [p for _, p in self.named_params if id(p) not in self._muon_ids]
        adamw = torch.optim.AdamW(
            [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
             {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
            lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=1e-8)
        if not self._muon:
            return adamw
        matrices = Muon([p for _, p in self._muon], lr=tcfg.muon_lr, weight_decay=tcfg.weight_decay,
                        momentum=tcfg.muon_momentum, directions=self._muon_directions)
        return MuonAdamW.combine(matrices, adamw)

    def _muon_directions(self, updates: list[Tensor]) -> list[list[Direction]]:
        """Muon's directions of this rank's shards: each matrix's update gathered whole (collective
        over its mesh; every rank of a stage calls it for the same matrices in the same order), its
        rows un-permuted, orthogonalised, and this rank's local piece of the result kept."""
        out = []
        with quiet_redistribute():
            for (name, p), update in zip(self._muon, updates, strict=True):
                full = self._gathered(name, update)
                local = self._shard(name, orthogonalize(full, self.tcfg.muon_precision), p)
                out.append([(0, local.numel(), local.reshape(-1), muon_lr_scale(full.shape))])
        return out

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        named, seen = [], set()
        for stage in self.stages:
            for name, param in stage.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    named.append((name, param))
        return named

    def _schedule(self):
        """torch's schedule of `native_plan.SCHEDULE_CLASSES` over this rank's stage(s): GPipe and 1F1B
        take one stage, the others (interleaved, zb-h1, zb-v, dualpipev) a list."""
        n = self.pcfg.pp * self.pcfg.virtual_stages
        group = self.mesh["pp"].get_group()
        stages = [PipelineStage(s, s.stage_index, n, self.device, group=group) for s in self.stages]
        cls = SCHEDULE_CLASSES[self.pcfg.schedule]
        single = self.pcfg.schedule in ("gpipe", "1f1b")
        return cls(stages[0] if single else stages, self.micro_steps, loss_fn=native_loss)

    @property
    def last_stage_rank(self) -> int:
        """The pipeline rank that holds the last stage (and computes the loss): ``pp - 1``, or 0 under
        V placement, where rank 0 holds chunks 0 and ``2 pp - 1``."""
        return 0 if self.pcfg.schedule in V_SCHEDULES else self.pcfg.pp - 1

    def _loss_context(self) -> contextlib.AbstractContextManager:
        if self.pcfg.tp == 1:
            return contextlib.nullcontext()
        return loss_parallel()

    # ------------------------------------------------------------------ one step
    def forward_backward(self, micro: list[tuple[Tensor, Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         on_event: Callable | None = None) -> float:
        """Gradients of the mean loss over `micro`; returns this rank's mean loss (on every pp rank).

        `on_event` is accepted for interface compatibility and not called: torch's schedules have
        no per-action callback (`lmkit.parallel.instrument` times the stage modules instead).
        """
        self.train(True)
        for s in self.stages:  # torch's schedules divide gradients by the microbatches themselves
            set_aux_scale(s, 1.0 / len(micro) if self.pcfg.pp == 1 else 1.0)
        if self.pcfg.pp == 1:
            stage, total = self.stages[0], 0.0
            for i, (x, y) in enumerate(micro):
                if self.fsdp:  # reduce(-scatter) gradients only after the last microbatch
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
        if self.pcfg.schedule in V_SCHEDULES:  # embedding and head on one rank (`stage_indices`)
            sum_tied_embedding_grads(self.stages)
        else:
            allreduce_tied_embedding_grads(self.stages, self.topo)
        return value

    def _reduce_partial_grads(self) -> None:
        """Give every gradient its parameter's placement (FSDP2 does this itself on its way out).

        Sequence parallelism leaves the LayerNorm gradients ``Partial`` (each tp rank summed over
        its own positions: an all-reduce completes them), and the vocab-parallel embedding's
        gradient comes back in another layout than its ``Shard(0)`` parameter.
        """
        for _, p in self.named_params:
            g = p.grad
            if is_dtensor(g) and tuple(g.placements) != tuple(p.placements):
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
        dist.broadcast(value, group=self.topo.pp_group, group_src=self.last_stage_rank)
        return float(value)

    def clip_and_step(self, max_norm: float, finite_loss: bool = True) -> float:
        """True global gradient norm (before clipping), clipping as clip_grad_norm_, AdamW step.

        As the lmkit engine: no step (gradients dropped) unless `finite_loss` and the norm is finite.
        """
        params = [p for name, p in self.named_params if self.saved_as(name) == name or self.pcfg.pp == 1]
        norm = global_grad_norm(params, self.topo.pp_group if self.pcfg.pp > 1 else None, self.device)
        if not (finite_loss and math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        if max_norm > 0:  # clip_grads_with_norm_ groups tensors by device only: keep meshes apart
            by_layout: dict[Any, list[Tensor]] = {}
            for _, p in self.named_params:
                if p.grad is not None:
                    by_layout.setdefault(layout_key(p.grad), []).append(p)
            for group in by_layout.values():
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm.to(torch.float32))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

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
                if self.pcfg.schedule in V_SCHEDULES:  # torch's eval() of a V schedule fails (forward_only)
                    self._eval_schedule = forward_only(self._eval_schedule)
            value = self._run_pipeline(self._eval_schedule, x, y, autocast, train=False)
        return self.mean_over_dp(value) if split else value

    # ------------------------------------------------------------------ checkpoints
    def _full(self, name: str, tensor: Tensor) -> Tensor:
        """The full (unsharded, unpermuted) CPU tensor of a parameter or optimizer-state tensor."""
        return self._gathered(name, tensor).cpu()

    def _gathered(self, name: str, tensor: Tensor) -> Tensor:
        """The full (unsharded, unpermuted) tensor of parameter `name`'s `tensor`, on this device."""
        t = tensor.detach()
        t = t.full_tensor() if is_dtensor(t) else t.clone()
        perm = self._permutation(name)
        return t if perm is None else t[perm[1]]

    def _shard(self, name: str, full: Tensor, like: Tensor) -> Tensor:
        """This rank's local piece of `full` in the layout of `like` (a parameter)."""
        full = full.to(device=self.device, dtype=like.dtype)
        perm = self._permutation(name)
        if perm is not None:
            full = full[perm[0]]
        if not is_dtensor(like):
            return full
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()

    def sharded_state(self, create: bool = False) -> tuple[list[Piece], dict[str, Any] | None]:
        """This rank's boxes of the layout-independent tensors (weights and AdamW moments by GPT
        name, the qkv rows un-permuted), as views of the DTensors' local shards: what a sharded
        checkpoint saves and loads. Replicas write the same boxes; DCP's planner keeps one."""
        if create:
            for _, p in self.named_params:
                if p.requires_grad and not self.optimizer.state.get(p):  # (a router's bias: no state)
                    self._state_of(p)[p] = ({"momentum_buffer": torch.zeros_like(p)} if self._is_muon(p) else
                                            {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                             "exp_avg_sq": torch.zeros_like(p)})
        pieces = []
        for name, p in self.named_params:
            source = self.saved_as(name)
            write = source == name
            tensors = {"model": p.detach()}
            tensors.update({key: v for key, v in (self.optimizer.state.get(p) or {}).items()
                            if torch.is_tensor(v) and v.dim() > 0})  # AdamW's moments, Muon's momentum
            for key, tensor in tensors.items():
                fqn = f"model.{source}" if key == "model" else f"optim.{source}.{key}"
                pieces += self._pieces(fqn, name, tensor, write)
        return pieces, optimizer_meta(self.optimizer)

    def _is_muon(self, p: Tensor) -> bool:
        return id(p) in self._muon_ids

    def _state_of(self, p: Tensor) -> dict:
        """The state dict of the optimizer that steps `p` (Muon's or AdamW's, under `MuonAdamW`)."""
        if isinstance(self.optimizer, MuonAdamW):
            return self.optimizer.muon.state if self._is_muon(p) else self.optimizer.adamw.state
        return self.optimizer.state

    def _pieces(self, fqn: str, name: str, tensor: Tensor, write: bool) -> list[Piece]:
        local = tensor.to_local() if is_dtensor(tensor) else tensor
        if local.numel() == 0:  # an uneven FSDP2 split can leave a rank without rows
            return []
        shape, offsets = tuple(tensor.shape), (0,) * tensor.dim()
        if is_dtensor(tensor):
            _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh,
                                                               tensor.placements)
        perm = self._permutation(name)
        if perm is not None:  # rows of the permuted layout: map them back
            rows = perm[0][offsets[0]:offsets[0] + local.shape[0]]
            spec = ShardSpec(0, shape[0], rows)
            return shard_pieces(fqn, local.reshape(-1), 0, local.numel(), tuple(local.shape), spec, 0, write)
        return [Piece(fqn, shape, tuple(offsets), local, write)]

    def full_optimizer_state(self) -> dict[str, Any]:
        """AdamW state by parameter name with full tensors (collective); lmkit's checkpoint format."""
        state = {}
        with quiet_redistribute():
            for name, p in self.named_params:
                entry = self.optimizer.state.get(p)
                if self.saved_as(name) != name or not entry:
                    continue
                state[name] = {k: (self._full(name, v) if torch.is_tensor(v) and v.dim() > 0 else
                                   v.detach().clone().cpu() if torch.is_tensor(v) else v)
                               for k, v in entry.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"state": gather_over_pp(state, self.topo), "param_groups": groups}

    def load_full_state(self, weights: dict[str, Tensor], optimizer: dict[str, Any] | None) -> None:
        """Load full (layout-independent) weights and optimizer state into this rank's shards."""
        with torch.no_grad():
            for name, p in self.named_params:
                local = p.to_local() if is_dtensor(p) else p
                local.copy_(self._shard(name, weights[self.saved_as(name)], p))
        if optimizer is None:
            return
        saved = optimizer["param_groups"]
        if len(saved) != len(self.optimizer.param_groups):
            raise ConfigError(f"the checkpoint's optimizer has {len(saved)} parameter groups, this one "
                              f"{len(self.optimizer.param_groups)} (Muon's with optimizer='muon', decay, no "
                              "decay): resume with the run's train.optimizer")
        for group, hyper in zip(self.optimizer.param_groups, saved, strict=True):
            group.update({k: v for k, v in hyper.items() if k != "params"})
        for name, p in self.named_params:
            entry = optimizer["state"].get(self.saved_as(name))
            if entry is None:
                continue
            new: dict[str, Any] = {}
            for k, v in entry.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    t = torch.zeros_like(p.detach())
                    (t.to_local() if is_dtensor(t) else t).copy_(self._shard(name, v, p))
                    new[k] = t
                else:
                    new[k] = v.detach().clone().float() if torch.is_tensor(v) else v
            self._state_of(p)[p] = new


def validate_native_layout(pcfg: ParallelConfig, tcfg: TrainConfig, cfg, world_size: int | None) -> None:
    """`validate_layout`'s rules and the native engine's own (`validate_native_schedule`). A schedule
    only this engine runs (zb-h1, zb-v, dualpipev) is checked by the shared rules as GPipe (the one
    without microbatch rules of its own), then by torch's requirements."""
    if pcfg.engine != "native":
        raise ConfigError(f"NativeEngine needs parallel.engine='native', got {pcfg.engine!r}")
    pcfg.validate()  # the schedule's name among them, before the shared checks see a stand-in
    shared = pcfg
    if pcfg.schedule not in LMKIT_SCHEDULES:
        shared = dataclasses.replace(pcfg, schedule="gpipe", virtual_stages=1)
    validate_layout(shared, tcfg, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.block_size, world_size,
                    cfg.dropout, cfg.kv_heads, cfg.ffn_width)
    if pcfg.pp > 1:
        validate_native_schedule(pcfg, cfg.n_layer, tcfg.grad_accum * pcfg.microbatches)
    validate_native_experts(pcfg, cfg)


def _item(loss: Tensor) -> float:
    loss = loss.detach()
    if is_dtensor(loss):
        loss = loss.full_tensor()
    return float(loss.float())

