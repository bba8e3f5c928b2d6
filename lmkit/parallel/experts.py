"""Expert parallelism: the experts of every MoE layer split over ``ep`` ranks, tokens sent to them and
back with all-to-all (the book, chapter 5, "Experts"; chapter 6 runs and checks it).

Groups (`expert_groups`). The ep ranks are carved out of the dp x cp ranks of a pipeline stage and a
tp rank, as Megatron-LM and DeepSeek do: with ``j = dp_rank * cp + cp_rank``, the ep group holds the
ranks of equal ``j // ep`` and the expert-data-parallel (edp) group those of equal ``j % ep``. ep rank
``r`` holds experts ``[r E/ep, (r+1) E/ep)`` of every MoE layer; its replicas over the edp group sum
their gradients (`DataParallel` over the edp group, dividing by dp x cp: each replica's gradient
already holds the tokens of its whole ep group). Under tensor parallelism the experts are whole and
sequence parallelism is required: each tp rank routes its own chunk of the sequence (the router and
the experts are then tp-partial, like the norms, `lmkit.parallel.plan`).

Dispatch (`AllToAllDispatch`), per MoE layer and microbatch, for rows grouped by global expert:

1. counts: every rank tells every other how many rows it sends to each of that rank's experts
   (one all-to-all of ``E`` int64; the sizes of the next message must be known before it is posted);
2. tokens: the rows go to the ranks holding their experts (all-to-all with uneven splits), are
   regrouped by local expert (they arrive grouped by source), run through the local experts;
3. combine: the output rows go back the same way (the inverse all-to-all).

Autograd's backward of an all-to-all is the all-to-all with the splits swapped (`_AllToAll`): the
gradients of the rows travel back to where the rows came from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from lmkit.experts import Experts, moe_layers

__all__ = ["AllToAllDispatch", "GroupTokens", "all_to_all_rows", "expert_slice", "is_expert_param",
           "expert_group_lists", "parallelize_experts", "gather_experts", "validate_experts",
           "expert_traffic"]


def is_expert_param(name: str) -> bool:
    """Whether GPT parameter `name` is a stacked expert matrix (split over ep, reduced over edp)."""
    module, _, leaf = name.rpartition(".")
    return module.endswith("mlp.experts") and leaf in ("fc", "proj")


def expert_slice(n_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """``(first expert, number)`` that ep rank `ep_rank` holds."""
    local = n_experts // ep
    return ep_rank * local, local


def expert_group_lists(dp: int, cp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """The ep groups and the edp groups as lists of ``j = dp_rank * cp + cp_rank`` (see the module
    docstring): ``ep=2, dp*cp=4`` -> ``[[0, 1], [2, 3]]`` and ``[[0, 2], [1, 3]]``."""
    n = dp * cp
    return ([list(range(s, s + ep)) for s in range(0, n, ep)],
            [list(range(r, n, ep)) for r in range(ep)])


class _AllToAll(torch.autograd.Function):
    """Rows ``x`` split ``send`` (rows per rank of `group`) out; ``recv`` rows in per rank.
    Backward: the same with the splits swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    """All-to-all of rows with autograd (uneven splits: ``send[r]`` rows to rank r of `group`)."""
    return _AllToAll.apply(x, send, recv, group)


class AllToAllDispatch:
    """The dispatcher of an MoE layer under expert parallelism (`lmkit.experts.MoE.dispatch`)."""

    def __init__(self, group, ep: int) -> None:
        self.group, self.ep = group, ep
        self.rows_sent = 0  # rows this rank sent to other ranks, dispatch and combine (forward)
        self.calls = 0  # dispatches (one per layer and microbatch forward)

    def __call__(self, rows: Tensor, counts: Tensor, experts: Experts) -> Tensor:
        ep, local = self.ep, experts.fc.size(0)
        me = dist.get_rank(self.group)
        send_counts = counts.view(ep, local).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # 1. counts first
        send = send_counts.sum(1).tolist()
        recv_by_source = recv_counts.tolist()  # [source][local expert]
        recv = [sum(r) for r in recv_by_source]
        arrived = all_to_all_rows(rows, send, recv, self.group)  # 2. tokens, grouped by source
        order = _by_expert(recv_by_source, rows.device)
        per_expert = [sum(r[e] for r in recv_by_source) for e in range(local)]
        done = experts(arrived[order], per_expert)
        out = torch.empty_like(done).index_copy(0, order, done)  # back in arrival order
        self.rows_sent += sum(send) - send[me] + sum(recv) - recv[me]
        self.calls += 1
        return all_to_all_rows(out, recv, send, self.group)  # 3. combine: back to the sources


def _by_expert(counts: list[list[int]], device: torch.device) -> Tensor:
    """The permutation that regroups rows arriving as [source][expert] blocks into [expert][source]."""
    starts, offset = [], 0
    for row in counts:
        starts.append([])
        for c in row:
            starts[-1].append(offset)
            offset += c
    index = [torch.arange(starts[s][e], starts[s][e] + counts[s][e]) for e in range(len(counts[0]))
             for s in range(len(counts))]
    return torch.cat(index).to(device) if index else torch.zeros(0, dtype=torch.long, device=device)


class GroupTokens:
    """`lmkit.experts.TokenGroup` over a process group: the router's counts summed over the ranks
    that hold different tokens of the batch; gradients averaged over `averaged_over` ranks."""

    def __init__(self, group, averaged_over: int) -> None:
        self.group, self.averaged_over = group, averaged_over

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.group is None or dist.get_world_size(self.group) == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


def parallelize_experts(stage: nn.Module, ep_group, ep: int, ep_rank: int, tokens: GroupTokens) -> None:
    """Keep this ep rank's experts of every MoE layer of `stage` (meta or real weights: sliced along
    the expert dimension) and install the all-to-all dispatch and the token group."""
    for layer in moe_layers(stage):
        first, local = expert_slice(layer.n_experts, ep, ep_rank)
        if ep > 1:
            for leaf in ("fc", "proj"):
                full = getattr(layer.experts, leaf)
                part = nn.Parameter(full.detach()[first:first + local].clone() if not full.is_meta
                                    else full.detach()[first:first + local], requires_grad=full.requires_grad)
                setattr(layer.experts, leaf, part)
            layer.dispatch = AllToAllDispatch(ep_group, ep)
        layer.tokens = tokens


def gather_experts(tensor: Tensor, group, ep: int) -> Tensor:
    """Every expert of a stacked expert tensor (this ep rank's part `tensor`), in expert order
    (collective over the ep group)."""
    if ep == 1:
        return tensor.clone()
    parts = [torch.empty_like(tensor) for _ in range(ep)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def validate_experts(config: ModelConfig, pcfg: ParallelConfig, tcfg: TrainConfig) -> None:
    """The layouts that cannot exist with (or without) experts, each refused in one line."""
    if pcfg.ep > 1 and not config.n_experts:
        raise ConfigError(f"parallel.ep={pcfg.ep} splits experts but the model has none; set "
                          "model.n_experts (a multiple of ep) or ep=1")
    if config.n_experts % pcfg.ep:
        raise ConfigError(f"model.n_experts={config.n_experts} is not divisible by parallel.ep={pcfg.ep}: "
                          f"every ep rank holds n_experts/ep whole experts; choose ep among "
                          f"{[d for d in range(1, config.n_experts + 1) if config.n_experts % d == 0]}")
    if config.n_experts and pcfg.tp > 1 and not pcfg.sequence_parallel:
        raise ConfigError(f"parallel.tp={pcfg.tp} with experts needs sequence_parallel (--sp): the experts "
                          "stay whole and each tp rank routes its own chunk of the sequence (as Megatron-LM)")
    if pcfg.ep > 1 and tcfg.optimizer == "muon":
        raise ConfigError("train.optimizer='muon' with parallel.ep > 1 is not implemented in the lmkit "
                          "engine (the experts' matrices would need Muon over their edp group); use adamw "
                          "or ep=1")


def expert_traffic(modules: list[nn.Module], reset: bool = False) -> dict[str, int]:
    """Rows this rank sent to other ep ranks (dispatch + combine, forward) and dispatches, summed over
    the MoE layers of `modules` since the last reset: what the all-to-all bytes are checked against
    (`lmkit.costs.all_to_all_bytes`, chapter 6). `reset` zeroes the counts after reading them."""
    rows = calls = 0
    for module in modules:
        for layer in moe_layers(module):
            if isinstance(layer.dispatch, AllToAllDispatch):
                rows, calls = rows + layer.dispatch.rows_sent, calls + layer.dispatch.calls
                if reset:
                    layer.dispatch.rows_sent = layer.dispatch.calls = 0
    return {"rows_sent": rows, "calls": calls}
