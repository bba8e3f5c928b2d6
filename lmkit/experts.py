"""Mixture of experts: a router sends each token to k of E expert MLPs (chapter 5, "Experts").

`MoE` replaces a block's MLP when ``ModelConfig.n_experts > 0`` (every ``moe_every``-th block). Per
token ``x``: the `Router` scores the experts (softmax over them, as Mixtral, or a sigmoid per expert,
as DeepSeek-V3), picks the k best and weights their outputs by the chosen scores renormalised to sum
to 1 (with k = 1 the raw score, as the Switch Transformer, so that the router still learns)::

    y = sum_{e in topk(x)} w_e(x) * expert_e(x)  (+ shared(x) with shared experts)

Only k of E experts run per token: the parameters grow E-fold, the FLOPs per token k-fold. Names::

    blocks[i].mlp.router.gate       Linear(d, E), no bias   (router.expert_bias: [E], no gradient)
    blocks[i].mlp.experts.fc        [E, width_in, d]  (SwiGLU: [gate | up] rows, as the dense mlp.fc)
    blocks[i].mlp.experts.proj      [E, d, width]
    blocks[i].mlp.shared            a dense `lmkit.model.MLP` of n_shared_experts * moe_d_ff (optional)

Balance. Without help a router collapses onto a few experts. The load-balancing loss (Switch, GShard)
``aux = E * sum_i f_i P_i`` (f_i: share of the token-expert assignments that went to expert i, counted,
no gradient; P_i: mean routing probability of expert i) is smallest when both are uniform; it enters
the gradient with weight ``moe_aux_coef`` through `_AttachAux` (the gradient of the block's output,
unchanged, plus that of the aux term), so a pipeline stage needs no second loss. DeepSeek-V3's
auxiliary-loss-free balance (``moe_bias_rate``) adds a bias per expert to the scores *for the choice
only*; after each step `update_router_biases` moves it toward the mean load.

Counts are global. The f_i (and the reported aux) are summed over the ranks that hold different tokens
of the batch (`TokenGroup`, set by the parallel engine; one process: itself), so every layout routes,
balances and learns exactly as one process does (chapter 6 checks it to 1e-5).

Routing is dropless by default: every token reaches its k experts however uneven the load.
``moe_capacity = c > 0`` caps an expert at ``ceil(c * tokens * k / E)`` of this rank's tokens (in
token order) and drops the rest (their share of y is 0); `MoE.stats` reports the dropped fraction.
The experts' computation goes through a dispatcher: `run_local_experts` here, the all-to-all of
`lmkit.parallel.experts` under expert parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.config import ModelConfig

__all__ = ["MoE", "Router", "Experts", "TokenGroup", "run_local_experts", "moe_layers", "set_aux_scale",
           "update_router_biases", "expert_counts", "inactive_expert_parameters"]


class TokenGroup:
    """The ranks whose tokens make up one batch (one process here): `all_reduce` sums a tensor over
    them; `averaged_over` is how many ranks the engine averages gradients over (the local aux term
    is scaled so that, after that average, its gradient is the one-process gradient)."""

    averaged_over = 1

    def all_reduce(self, t: Tensor) -> Tensor:
        return t


class _AttachAux(torch.autograd.Function):
    """Identity on ``y`` forward; backward also gives ``aux`` the gradient 1, so that ``aux``'s own
    gradient joins the model's (Megatron's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, y: Tensor, aux: Tensor) -> Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class Router(nn.Module):
    """Scores of E experts per token and the top-k choice (see the module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind, self.k, self.n_experts = config.moe_router, config.moe_top_k, config.n_experts
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)
        # a weight that no gradient moves (`update_router_biases` does): checkpointed, loaded and
        # replicated by the engines like any other parameter, ignored by the optimizers
        self.expert_bias = nn.Parameter(torch.zeros(config.n_experts), requires_grad=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For tokens ``x`` [N, d]: weights [N, k] (fp32), chosen experts [N, k] and the per-token
        routing probabilities [N, E] the balancing loss averages (softmax; sigmoid: normalised)."""
        logits = self.gate(x).float()
        scores = logits.softmax(-1) if self.kind == "softmax" else logits.sigmoid()
        chosen = (scores.detach() + self.expert_bias).topk(self.k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        probs = scores if self.kind == "softmax" else scores / scores.sum(-1, keepdim=True)
        return weights, chosen, probs


class Experts(nn.Module):
    """E expert MLPs as stacked weights (E may be this rank's share under expert parallelism)."""

    def __init__(self, config: ModelConfig, n_experts: int):
        super().__init__()
        width, d = config.expert_width, config.d_model
        self.gated = config.mlp == "swiglu"
        self.activation = config.activation
        self.fc = nn.Parameter(torch.empty(n_experts, 2 * width if self.gated else width, d))
        self.proj = nn.Parameter(torch.empty(n_experts, d, width))

    def act(self, h: Tensor) -> Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate="tanh") if self.activation == "gelu" else F.relu(h).square()

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """Rows of ``x`` grouped by expert, ``counts[e]`` rows for local expert ``e``, through their
        expert each (a loop of matrix products: what a grouped GEMM does in one kernel)."""
        outs = [self.act(rows @ self.fc[e].t()) @ self.proj[e].t()
                for e, rows in enumerate(x.split(counts)) if counts[e]]
        return torch.cat(outs) if outs else x.new_zeros((0, x.size(-1)))


def run_local_experts(x: Tensor, counts: Tensor, experts: Experts) -> Tensor:
    """The one-process dispatcher: every expert is here; rows stay where they are."""
    return experts(x, counts.tolist())


class MoE(nn.Module):
    """A mixture-of-experts MLP: `Router`, `Experts` and an optional shared expert."""

    def __init__(self, config: ModelConfig, shared: nn.Module | None = None):
        super().__init__()
        self.n_experts, self.k = config.n_experts, config.moe_top_k
        self.aux_coef, self.bias_rate = config.moe_aux_coef, config.moe_bias_rate
        self.capacity = config.moe_capacity
        self.router = Router(config)
        self.experts = Experts(config, config.n_experts)
        if shared is not None:
            self.shared = shared
        self.tokens = TokenGroup()
        self.dispatch: Callable[[Tensor, Tensor, Experts], Tensor] = run_local_experts
        self.aux_scale = 1.0  # the trainer's 1 / micro-steps (`set_aux_scale`)
        self.step_counts: Tensor | None = None  # global assignments per expert since the last bias update
        self.stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape, d = x.shape, x.size(-1)
        h = x.reshape(-1, d)
        weights, chosen, probs = self.router(h)
        flat = chosen.flatten()  # assignment j = token j // k, its (j % k)-th expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        local_sums = probs.sum(0)
        total = self.tokens.all_reduce(torch.cat([counts.float(), local_sums.detach()]))
        global_counts, global_sums = total[: self.n_experts], total[self.n_experts:]
        n_tokens = global_counts.sum() / self.k  # tokens of the whole batch
        share = global_counts / (n_tokens * self.k)  # f_i
        order = flat.argsort(stable=True)  # assignments grouped by expert, token order inside
        kept = counts
        if self.capacity > 0:
            cap = math.ceil(self.capacity * h.size(0) * self.k / self.n_experts)
            starts = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
            keep = rank_in_expert < cap
            order, kept = order[keep], counts.clamp(max=cap)
        sent = h[order // self.k]
        if torch.is_autocast_enabled(h.device.type):  # tokens travel in the compute dtype (bf16: 2 bytes)
            sent = sent.to(torch.get_autocast_dtype(h.device.type))
        rows = self.dispatch(sent, kept, self.experts)
        y = torch.zeros(flat.numel(), d, dtype=rows.dtype, device=rows.device).index_copy(0, order, rows)
        y = (y.view(-1, self.k, d) * weights.unsqueeze(-1).to(rows.dtype)).sum(1)
        if self.training and torch.is_grad_enabled():
            if self.aux_coef > 0:
                # the gradient of E sum f_i P_i: P_i = global_sums / n_tokens, of which this rank holds
                # local_sums; the engine averages gradients over `averaged_over` ranks
                aux = self.n_experts * (share * local_sums).sum() / (n_tokens / self.tokens.averaged_over)
                y = _AttachAux.apply(y, aux * (self.aux_coef * self.aux_scale))
            with torch.no_grad():
                previous = self.step_counts
                self.step_counts = global_counts if previous is None else previous + global_counts
        self.stats = {"counts": global_counts.detach(),
                      "aux": (self.n_experts * (share * global_sums).sum() / n_tokens).detach(),
                      "dropped": 1 - kept.sum() / counts.sum()}
        y = y.view(shape).to(x.dtype)
        return y + self.shared(x) if hasattr(self, "shared") else y


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of `model` (any wrapper: a pipeline stage, a compiled model)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_scale(model: nn.Module, scale: float) -> None:
    """The factor by which the trainer scales each micro-step's loss (1 / micro-steps); the balancing
    loss's gradient is scaled alike."""
    for layer in moe_layers(model):
        layer.aux_scale = scale


@torch.no_grad()
def update_router_biases(model: nn.Module) -> None:
    """After an optimizer step: DeepSeek-V3's auxiliary-loss-free balance, ``b_i += u * sign(mean
    load - load_i)`` over the step's global loads (the same on every rank), then start counting anew."""
    for layer in moe_layers(model):
        if layer.bias_rate > 0 and layer.step_counts is not None:
            load = layer.step_counts
            layer.router.expert_bias += layer.bias_rate * torch.sign(load.mean() - load)
        layer.step_counts = None


def expert_counts(model: nn.Module) -> list[list[int]]:
    """Tokens (assignments) per expert of each MoE layer in the last forward, over the whole batch."""
    return [[int(c) for c in layer.stats["counts"].tolist()] for layer in moe_layers(model) if layer.stats]


def inactive_expert_parameters(config: ModelConfig) -> int:
    """Expert parameters a token does *not* use: (E - k) experts of every MoE block (subtract from
    the total for the active parameters behind 6N FLOPs)."""
    if not config.n_experts:
        return 0
    width = config.expert_width
    per_expert = ((3 if config.mlp == "swiglu" else 2) * width) * config.d_model
    n_moe = sum(config.is_moe_block(i) for i in range(config.n_layer))
    return n_moe * (config.n_experts - config.moe_top_k) * per_expert
