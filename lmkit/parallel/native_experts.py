"""Expert parallelism in the native engine, from PyTorch's own pieces (as torchtitan builds it).

The groups are lmkit's (`lmkit.parallel` engine, the book's chapter 5): ep ranks are carved out of the
data-parallel ranks, ``d = i * ep + r`` (``i``: the expert-data-parallel, edp, coordinate; ``r``: the
ep rank), so the device mesh is ``(pp, edp, ep, tp)`` in lmkit's rank order, with ``dp`` the flattened
``edp x ep`` (`expert_meshes`). ep rank ``r`` holds experts ``[r E/ep, (r+1) E/ep)`` of every MoE layer.

=====================  ====================================================================
piece                  native engine
=====================  ====================================================================
expert weights         DTensors on the ``(ep, tp)`` mesh: ``Shard(0)`` over ep, ``Replicate`` over tp
                       (the experts stay whole under tp; each tp rank routes its own sequence chunk,
                       so their gradients are ``Partial`` over tp, summed by FSDP2 or the engine)
expert gradients       FSDP2 ``fully_shard`` (or ``replicate``) of each ``experts`` module over edp
                       with ``set_gradient_divide_factor(dp)``: an expert's gradient already holds the
                       tokens of its whole ep group, so the sum over edp is divided by dp, not by edp
dense parameters       FSDP2 over the flattened ``dp = edp x ep``, as without experts
dispatch               `AllToAllDispatch`: counts all-to-all, then the rows with
                       ``all_to_all_single_autograd`` (its backward is the reverse all-to-all),
                       rows regrouped by local expert, the local experts, the combine all-to-all
global counts          `MeshTokens`: one all-reduce over dp (x tp under sequence parallelism),
                       ``averaged_over = dp``
=====================  ====================================================================

Under tensor parallelism (with sequence parallelism, required) the MoE takes this rank's positions as
a local tensor (``PrepareModuleInput``); the router gate (and a shared expert) are replicated DTensors
fed this rank's rows as ``Shard(0)``, so their gradients come back ``Partial`` over tp, like the
QK-norm gains (`native_plan.HeadNorm`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    PrepareModuleInput,
    parallelize_module,
)

from lmkit.config import ConfigError, ParallelConfig
from lmkit.experts import Experts, MoE, TokenGroup, moe_layers

__all__ = ["expert_meshes", "validate_native_experts", "MeshTokens", "AllToAllDispatch", "ShardedExperts",
           "local_order", "parallelize_experts", "reset_router_biases",
           "skip_metadata_forward"]


def validate_native_experts(pcfg: ParallelConfig, cfg: Any) -> None:
    """The native engine's rules for models with experts and for ``ep``, as one-line `ConfigError`s."""
    n = getattr(cfg, "n_experts", 0)
    if pcfg.ep > 1 and not n:
        raise ConfigError(f"parallel.ep={pcfg.ep} splits experts but the model has none; set model.n_experts "
                          "(divisible by ep) or ep=1")
    if not n:
        return
    if n % pcfg.ep:
        raise ConfigError(f"model.n_experts={n} is not divisible by parallel.ep={pcfg.ep}: every ep rank "
                          "holds E/ep whole experts; choose ep among the divisors of n_experts")
    if pcfg.tp > 1 and not pcfg.sequence_parallel:
        raise ConfigError("experts under tp need sequence_parallel in engine='native' (each tp rank routes "
                          "its own positions to whole experts, as Megatron); add --sequence-parallel")


def expert_meshes(device_type: str, pcfg: ParallelConfig) -> dict[str, DeviceMesh]:
    """The ``(pp, edp, ep, tp)`` mesh and its slices by name: ``pp``, ``dp`` (``edp x ep`` flattened: the
    dense parameters' FSDP2 mesh), ``tp``, ``edp``, ``ep``, ``ep_tp`` (the expert weights' DTensor mesh),
    ``tokens`` (the ranks holding different tokens: dp, times tp under sequence parallelism). The
    flattened meshes are kept here, not sliced again from the root (torch deprecates that)."""
    ep = pcfg.ep
    root = init_device_mesh(device_type, (pcfg.pp, pcfg.dp // ep, ep, pcfg.tp),
                            mesh_dim_names=("pp", "edp", "ep", "tp"))
    meshes = {"root": root, "pp": root["pp"], "tp": root["tp"], "edp": root["edp"], "ep": root["ep"],
              "ep_tp": root["ep", "tp"], "dp": root["edp", "ep"]._flatten("dp")}
    meshes["dp_tp"] = root["edp", "ep", "tp"]._flatten("dp_tp") if pcfg.tp > 1 else meshes["dp"]
    meshes["tokens"] = meshes["dp_tp"] if pcfg.sequence_parallel else meshes["dp"]
    return meshes


class MeshTokens(TokenGroup):
    """`lmkit.experts.TokenGroup` over a process group: the router's counts summed over the ranks that
    hold different tokens; gradients are averaged over `averaged_over` (dp) ranks."""

    def __init__(self, group: dist.ProcessGroup, averaged_over: int):
        self.group, self.averaged_over = group, averaged_over

    def all_reduce(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


def local_order(recv: Tensor, ep: int) -> Tensor:
    """Row index that regroups received rows, laid out (source rank j, local expert e) with ``recv[j *
    L + e]`` rows each, into (e, j) order: each local expert's rows together, sources in rank order."""
    lengths = recv.view(ep, -1).t().reshape(-1)  # chunk (e, j)
    starts = (torch.cumsum(recv, 0) - recv).view(ep, -1).t().reshape(-1)
    ends = torch.cumsum(lengths, 0)
    offsets = torch.arange(int(lengths.sum()), device=recv.device) - torch.repeat_interleave(ends - lengths,
                                                                                             lengths)
    return torch.repeat_interleave(starts, lengths) + offsets


class AllToAllDispatch:
    """`MoE.dispatch` under expert parallelism (Megatron's all-to-all token dispatcher, torchtitan's
    ``ExpertParallel``): counts first, then the tokens, the local experts, and back.

    1. counts all-to-all: rank j learns how many rows each other rank sends to each of its local experts;
    2. dispatch all-to-all (``all_to_all_single_autograd``) of the rows, split by destination rank;
    3. the received rows regrouped by local expert (`local_order`), through the local experts;
    4. rows back in received order, combine all-to-all (the dispatch reversed).
    In the backward the two token all-to-alls run reversed (autograd); the counts need none.
    """

    def __init__(self, group: dist.ProcessGroup, ep: int):
        self.group, self.ep = group, ep

    def __call__(self, x: Tensor, counts: Tensor, experts: Experts) -> Tensor:
        if self.ep == 1:
            return experts(x, counts.tolist())
        counts = counts.to(torch.int64)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        send_splits = counts.view(self.ep, -1).sum(1).tolist()
        recv_splits = recv.view(self.ep, -1).sum(1).tolist()
        rows = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, self.group)
        order = local_order(recv, self.ep)
        out = experts(rows[order], recv.view(self.ep, -1).sum(0).tolist())
        back = torch.empty_like(out).index_copy(0, order, out)
        return all_to_all_single_autograd(back, send_splits, recv_splits, self.group)


class ShardedExperts(Experts):
    """`lmkit.experts.Experts` whose weights are DTensors on the ``(ep, tp)`` mesh: the forward uses
    this rank's experts (the local shards), their gradient declared ``Partial`` over tp (each tp rank
    routed its own positions). Every local expert runs, with zero rows too, so every rank's experts
    get a gradient (FSDP2 reduces all of them on every rank)."""

    grad_placements: tuple = (Shard(0), Replicate())

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        fc, proj = (w.to_local(grad_placements=self.grad_placements) for w in (self.fc, self.proj))
        outs = [self.act(rows @ fc[e].t()) @ proj[e].t() for e, rows in enumerate(x.split(counts))]
        return torch.cat(outs)


def _replicate_local(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for key, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(key, nn.Parameter(DTensor.from_local(p.detach(), mesh, [Replicate()],
                                                                       run_check=False)))


def _rows_in(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    return tuple(DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for t in inputs)


def _local_out(module: nn.Module, output: Tensor, mesh: DeviceMesh) -> Tensor:
    return output.to_local()


def _tensor_parallel_moe(layer: MoE, path: str, stage: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Under tp + SP: the MoE gets this rank's positions as a local tensor; the router gate is a
    replicated DTensor fed this rank's rows (its gradient ``Partial`` over tp); a shared expert is
    split over tp as the dense MLP by the plan's rows (sequence all-gathered in, reduce-scattered out;
    its gated ``fc`` rows permuted by the engine, `plan.fused_parts`)."""
    local_in = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                  use_local_output=True)
    styles: dict[str, Any] = {path: local_in}  # (a shared expert: the plan's column and row rows)
    for style in styles.values():
        style.src_data_rank = None  # every rank holds the full weights: shard locally
    parallelize_module(stage, tp_mesh, styles)
    distribute_module(layer.router.gate, tp_mesh, _replicate_local, _rows_in, _local_out)


def parallelize_experts(stage: nn.Module, meshes: dict[str, DeviceMesh], pcfg: ParallelConfig,
                        fsdp: bool, mp: MixedPrecisionPolicy | None = None) -> None:
    """Expert parallelism on `stage`'s MoE layers (after tensor parallelism, before FSDP2 of the blocks):
    expert weights sharded over ep (DTensor ``Shard(0)``), FSDP2 (zero 2/3) or ``replicate`` (zero 0) of
    each ``experts`` module over edp with gradient divide factor dp, the all-to-all dispatch and the
    token group. Works on the meta device (each rank keeps its shard's shape only)."""
    ep, tp = pcfg.ep, pcfg.tp
    paths = {id(m): path for path, m in stage.named_modules()}
    for layer in moe_layers(stage):
        layer.tokens = MeshTokens(meshes["tokens"].get_group(), pcfg.dp)
        layer.dispatch = AllToAllDispatch(meshes["ep"].get_group(), ep)
        if tp > 1:
            _tensor_parallel_moe(layer, paths[id(layer)], stage, meshes["tp"])
        experts = layer.experts
        if ep > 1 or tp > 1:
            placements = [Shard(0), Replicate()]
            for key in ("fc", "proj"):
                full = getattr(experts, key).detach()
                sharded = distribute_tensor(full, meshes["ep_tp"], placements, src_data_rank=None)
                setattr(experts, key, nn.Parameter(sharded))
            experts.__class__ = ShardedExperts
            experts.grad_placements = (Shard(0), Partial() if tp > 1 else Replicate())
        if fsdp:
            _expert_data_parallel(experts, meshes["edp"], pcfg, mp)


def _expert_data_parallel(experts: nn.Module, edp_mesh: DeviceMesh, pcfg: ParallelConfig,
                          mp: MixedPrecisionPolicy | None) -> None:
    """FSDP2 over edp for one ``experts`` module, gradients summed over edp and divided by dp.

    gloo has no ``PREMUL_SUM``, FSDP2's reduce-scatter op for a factor other than the mesh size
    ("RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo"), so a sharded reduction over edp > 1 sums
    and divides after (``set_force_sum_reduction_for_comms``). Not with one rank per reduce-scatter
    (``replicate``, or edp = 1): torch 2.13's ``foreach_reduce`` then divides the copy by the factor and
    again after (``_fsdp_collectives.py``: ``reduce_output.copy_(reduce_scatter_input /
    gradient_divide_factor)``, then ``_div_if_needed(reduce_output, postdivide_factor)``): half the
    gradient; without it the single division is right and no ``PREMUL_SUM`` runs."""
    mp = mp or MixedPrecisionPolicy()
    if pcfg.zero == 0:
        replicate(experts, mesh=edp_mesh, mp_policy=mp)
    else:
        fully_shard(experts, mesh=edp_mesh, reshard_after_forward=pcfg.zero == 3, mp_policy=mp)
    experts.set_gradient_divide_factor(float(pcfg.dp))
    if pcfg.zero > 0 and edp_mesh.size() > 1:
        experts.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def reset_router_biases(stage: nn.Module) -> None:
    """The routers' balancing biases at their initial value (0) after ``to_empty`` gave them storage."""
    for layer in moe_layers(stage):
        layer.router.expert_bias.zero_()


def skip_metadata_forward(stages: list[nn.Module]) -> None:
    """Keep the routers' step counts out of torch.distributed.pipelining's metadata inference.

    torch 2.13's schedules run one extra forward of every stage at their first ``step`` (``stage.py``,
    ``_forward_metadata_inference``: ``with torch.enable_grad(): outputs = self._compute_outputs(...)``),
    on the real batch for the first stage and on uninitialised ``torch.empty`` inputs for the others, so
    the MoE layers count its routing into the step's loads (DeepSeek-V3's bias update then moves the
    wrong way: 9e-5 relative loss difference after 4 steps of pp2). A one-shot hook around the first
    forward with gradients of each stage restores the counts it found."""
    for stage in stages:
        layers = moe_layers(stage)
        if not layers:
            continue
        saved: list = []
        handles: list = []

        def before(module: nn.Module, args: tuple, layers=layers, saved=saved) -> None:
            if module.training and torch.is_grad_enabled():
                saved[:] = [[layer.step_counts for layer in layers]]

        def after(module: nn.Module, args: tuple, output: Any, layers=layers, saved=saved,
                  handles=handles) -> None:
            if saved:
                for layer, counts in zip(layers, saved[0], strict=True):
                    layer.step_counts = counts
                for handle in handles:
                    handle.remove()

        handles += [stage.register_forward_pre_hook(before), stage.register_forward_hook(after)]
