"""The optimizer of a run, its learning-rate schedule, and its state by parameter name.

`configure_optimizer` builds AdamW with weight decay on matrices only, or `MuonAdamW`;
`lr_multiplier` is the schedule (linear warm-up, then cosine decay to ``min_lr``, chapter 3);
`named_optimizer_state` keys the optimizer state by parameter name, so that a checkpoint resumes
under any layout.

Muon for the blocks' matrices, AdamW for the rest, as one optimizer (chapter 7, "Time to a given
loss"): Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each update of a hidden weight matrix
by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations on the momentum), so every
direction of the matrix moves at the same rate. It is defined for 2-D matrices that map one
hidden representation to another (a mixture of experts' stacked weights are E such matrices, each
orthogonalised alone); the embedding (a lookup table), the tied head, the norms' gains and the
biases keep AdamW. `MuonAdamW` holds both so that a trainer, a learning-rate
scheduler and a checkpoint see one optimizer.

`Muon` is ``torch.optim.Muon``'s algorithm (its Newton-Schulz iteration, coefficients and
learning-rate scaling, called from torch; equal to it bit for bit, ``tests/test_muon.py``) split
in two so that it also runs on shards (chapter 6, "Muon under a layout"). The Newton-Schulz
iteration ``X <- a X + (b X X^T + c (X X^T)^2) X`` mixes every entry of a matrix with every other,
so, unlike AdamW's elementwise update, it cannot run on a tensor-parallel shard or a ZeRO chunk
alone (`shardwise_error` measures how far that lands). The elementwise parts (momentum, Nesterov
mix, weight decay, the final ``p -= lr O``) run on whatever a rank holds; ``directions``, a
callback, turns the updates into the orthogonalised FULL matrices' pieces: here the matrix itself,
in a parallel engine after gathering its shards (`lmkit.parallel.data_parallel.DataParallel`).
``muon_precision="float32"`` runs the iteration in fp32 instead of torch's bf16: the layouts then
reproduce one process to ~1e-7 instead of ~1e-5 (bf16 rounds the last bits of the gradients,
which differ between layouts, into different values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr
from torch.optim._muon import _zeropower_via_newtonschulz as _newton_schulz_bf16

from lmkit.config import ConfigError, TrainConfig

__all__ = [
    "Muon", "Direction", "orthogonalize", "muon_lr_scale", "shardwise_error", "MuonAdamW", "is_muon_matrix",
    "muon_parameter_names", "peak_lrs", "configure_optimizer", "lr_multiplier", "named_optimizer_state",
    "load_named_optimizer_state",
]


# --------------------------------------------------------------------------- Muon


def orthogonalize(update: Tensor, precision: str = "bfloat16") -> Tensor:
    """Muon's Newton-Schulz orthogonalisation of a 2-D update: ``torch.optim.Muon``'s own (bf16,
    its coefficients, 5 steps), or the same iteration in fp32 (``precision="float32"``). A stack of
    matrices (a mixture of experts' ``[E, out, in]`` weights, `lmkit.experts.Experts`) is
    orthogonalised matrix by matrix: each expert's weight is a matrix of its own."""
    if update.dim() == 3:
        return torch.stack([orthogonalize(matrix, precision) for matrix in update])
    coefficients = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    if precision == "bfloat16":
        return _newton_schulz_bf16(update, coefficients, DEFAULT_NS_STEPS, EPS).to(update.dtype)
    a, b, c = coefficients
    x = update.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=EPS)
    for _ in range(DEFAULT_NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Muon's learning-rate factor for a matrix of the FULL `shape` (torch's "original":
    ``sqrt(max(1, rows / columns))``; of a stack of expert matrices, that of one matrix)."""
    return _adjust_lr(1.0, "original", torch.Size(shape[-2:]))


def shardwise_error(matrix: Tensor, shards: Sequence[Tensor], assemble: Callable[[list[Tensor]], Tensor],
                    precision: str = "float32") -> float:
    """Relative Frobenius distance between orthogonalising `matrix` whole and orthogonalising each of
    its `shards` alone (`assemble`-d back into a full matrix): the classic mistake of a
    tensor-parallel or ZeRO Muon that runs Newton-Schulz on what each rank holds."""
    right = orthogonalize(matrix, precision)
    wrong = assemble([orthogonalize(s, precision) for s in shards])
    return float(torch.linalg.matrix_norm(wrong - right) / torch.linalg.matrix_norm(right))


#: A piece of an orthogonalised update for one unit of `Muon`: elements ``[lo, hi)`` of the
#: flattened unit get ``values`` (flat) times ``scale`` (`muon_lr_scale` of the full matrix).
Direction = tuple[int, int, Tensor, float]
Directions = Callable[[list[Tensor]], list[list[Direction]]]


def whole_matrix_directions(precision: str = "bfloat16") -> Directions:
    """`Muon`'s ``directions`` when every unit is a whole matrix: orthogonalise each."""
    def directions(updates: list[Tensor]) -> list[list[Direction]]:
        return [[(0, u.numel(), orthogonalize(u, precision).reshape(-1), muon_lr_scale(u.shape))]
                for u in updates]
    return directions


class Muon(torch.optim.Optimizer):
    """``torch.optim.Muon`` (Nesterov, decoupled weight decay, "original" lr scaling) over `units`:
    whole matrices, or the shards and flat chunks a rank holds (each with a ``.grad`` of its shape).

    `directions(updates)` gets the Nesterov updates of all units, in order, and returns per unit the
    `Direction` pieces of the orthogonalised full matrices that fall in it; in a parallel engine it
    gathers shards, so every rank of the group calls `step` together (see the module docstring). A
    DTensor unit (the native engine's) is stepped elementwise as a DTensor; its pieces index its local
    tensor.
    State per unit: ``momentum_buffer``, as torch's, so checkpoints move between layouts.
    """

    def __init__(self, units: Sequence[Tensor], lr: float, weight_decay: float, momentum: float,
                 directions: Directions | None = None) -> None:
        super().__init__(list(units), {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                       "nesterov": True})
        self.directions = directions or whole_matrix_directions()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - see the class docstring
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            units = [u for u in group["params"] if u.grad is not None]
            updates = []
            for unit in units:
                state = self.state[unit]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(unit.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(unit.grad, 1 - mu)
                updates.append(unit.grad.lerp(buf, mu))
            for unit, pieces in zip(units, self.directions(updates), strict=True):
                unit.mul_(1 - lr * wd)
                flat = (unit.to_local() if isinstance(unit, DTensor) else unit).view(-1)
                for lo, hi, values, scale in pieces:
                    flat[lo:hi].add_(values.view_as(flat[lo:hi]), alpha=-lr * scale)


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether Muon optimises parameter `name`: a 2-D weight inside the Transformer blocks
    (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``, a router's ``gate``), or a stack of expert
    matrices (``mlp.experts.fc``/``proj``, [E, out, in]: orthogonalised per expert, `orthogonalize`).
    Embeddings and the head stay on AdamW."""
    stacked = param.dim() == 3 and name.rpartition(".")[0].endswith("mlp.experts")
    return param.requires_grad and (param.dim() == 2 or stacked) and name.startswith("blocks.")


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters Muon optimises (`is_muon_matrix`)."""
    return [name for name, p in model.named_parameters() if is_muon_matrix(name, p)]


class _StateView(Mapping):
    """Read-only view of several optimizers' ``state`` (a ChainMap would not do: looking a key up in
    torch's ``defaultdict`` state creates it)."""

    def __init__(self, *states: Mapping) -> None:
        self.states = states

    def __getitem__(self, key: Any) -> Any:
        for state in self.states:
            if key in state:
                return state[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class MuonAdamW(torch.optim.Optimizer):
    """`Muon` on `muon_parameter_names`, ``torch.optim.AdamW`` on every other
    parameter (weight decay on matrices only, as `configure_optimizer`).

    ``param_groups`` lists Muon's group first, then AdamW's two, so a scheduler scales both
    learning rates (``cfg.muon_lr`` and ``cfg.lr``) by the same schedule. ``state_dict`` numbers
    parameters in that order; ``state`` looks up either optimizer's state. A parallel engine
    combines its own Muon (`lmkit.parallel.muon.LayoutMuon`) with AdamW the same way (`combine`).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> None:
        muon_names = set(muon_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if n in muon_names]
        decay = [p for n, p in named if n not in muon_names and p.dim() >= 2]
        no_decay = [p for n, p in named if n not in muon_names and p.dim() < 2]
        if not muon:
            raise ValueError("optimizer='muon' found no 2-D matrix inside the Transformer blocks")
        muon_opt = Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                        directions=whole_matrix_directions(cfg.muon_precision))
        adamw = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
        self._bind(muon_opt, adamw)

    @classmethod
    def combine(cls, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> MuonAdamW:
        """One optimizer of a Muon and an AdamW built elsewhere (a parallel engine's shards)."""
        self = cls.__new__(cls)
        self._bind(muon, adamw)
        return self

    def _bind(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        # The groups are the sub-optimizers' own dicts: a scheduler setting group["lr"] drives them.
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = _StateView(self.muon.state, self.adamw.state)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102 - see the class docstring
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        m, a = self.muon.state_dict(), self.adamw.state_dict()
        offset = sum(len(g["params"]) for g in m["param_groups"])
        groups = m["param_groups"] + [{**g, "params": [i + offset for i in g["params"]]}
                                      for g in a["param_groups"]]
        return {"state": {**m["state"], **{i + offset: s for i, s in a["state"].items()}},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n_muon = len(self.muon.param_groups)
        groups = state_dict["param_groups"]
        offset = sum(len(g["params"]) for g in groups[:n_muon])
        state = state_dict["state"]
        self.muon.load_state_dict({"param_groups": groups[:n_muon],
                                   "state": {i: s for i, s in state.items() if i < offset}})
        self.adamw.load_state_dict({
            "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups[n_muon:]],
            "state": {i - offset: s for i, s in state.items() if i >= offset}})
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups


# --------------------------------------------------------------------------- the recipe of a run


def configure_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None
                        ) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (``cfg.optimizer="muon"``: `lmkit.optim.MuonAdamW`,
    Muon for the blocks' matrices and this AdamW for the rest; chapter 7, "Time to a given loss").

    Biases and LayerNorm gains (1-D tensors) are not decayed: shrinking them towards zero has
    no regularising meaning, it only fights the normalisation (as in GPT-2 / nanoGPT).
    Embeddings are matrices and are decayed, as nanoGPT does.
    """
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg, fused=(device is not None and device.type == "cuda") or None)
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused or None)


def peak_lrs(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> list[float]:
    """The peak learning rate of each of `optimizer`'s groups: ``cfg.muon_lr`` for Muon's, ``cfg.lr``
    for the others (what a changed schedule restarts from)."""
    n_muon = len(optimizer.muon.param_groups) if isinstance(optimizer, MuonAdamW) else 0
    return [cfg.muon_lr if i < n_muon else cfg.lr for i in range(len(optimizer.param_groups))]


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate of `step` divided by ``cfg.lr``: linear warmup, then cosine to ``min_lr``.

    Warmup: ``lr * (step + 1) / (warmup + 1)``; afterwards the cosine decays from ``lr`` at the
    end of warmup to ``min_lr`` at ``max_steps`` and stays there.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.max_steps:
        return cfg.min_lr / cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr)) / cfg.lr


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter *name* instead of position.

    torch's ``state_dict()`` numbers parameters by their order in the optimizer, which differs
    between layouts (a pipeline stage holds only some parameters, ZeRO holds shards). Keying by
    the model's parameter names makes a checkpoint resumable under any layout.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {names[id(params[i])]: dict(entry) for i, entry in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               named: dict[str, Any]) -> None:
    """Inverse of `named_optimizer_state`."""
    index = {}
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        index[id(p)] = i
    by_name = dict(model.named_parameters())
    unknown = sorted(set(named["state"]) - set(by_name))
    if unknown:
        raise ConfigError(f"the checkpoint's optimizer state has parameters this model lacks: {unknown[:5]}")
    state = {index[id(by_name[n])]: entry for n, entry in named["state"].items()}
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(named["param_groups"]):
        raise ConfigError("the checkpoint's optimizer has a different number of parameter groups")
    pairs = zip(named["param_groups"], current, strict=True)
    groups = [{**saved, "params": cur["params"]} for saved, cur in pairs]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
