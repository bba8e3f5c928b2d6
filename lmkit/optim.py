"""The optimizer of a run, its learning-rate schedule, and its state by parameter name.

`configure_optimizer` builds AdamW with weight decay on matrices only, or `MuonAdamW`;
`lr_multiplier` is the schedule (linear warm-up, then cosine decay to ``min_lr``, chapter 3);
`named_optimizer_state` keys the optimizer state by parameter name, so that a checkpoint resumes
under any layout.

Muon for the blocks' matrices, AdamW for the rest, as one optimizer (chapter 7, "Time to a given
loss"): Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each update of a hidden weight matrix
by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations on the momentum), so every
direction of the matrix moves at the same rate. It is defined for 2-D matrices that map one
hidden representation to another; the embedding (a lookup table), the tied head, the norms'
gains and the biases keep AdamW. `MuonAdamW` holds both so that a trainer, a learning-rate
scheduler and a checkpoint see one optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmkit.config import ConfigError, TrainConfig

__all__ = [
    "MuonAdamW", "muon_parameter_names", "configure_optimizer", "lr_multiplier", "named_optimizer_state",
    "load_named_optimizer_state",
]


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters Muon optimises: the 2-D weights inside the Transformer blocks
    (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``). Embeddings and the head stay on AdamW."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on `muon_parameter_names`, ``torch.optim.AdamW`` on every other
    parameter (weight decay on matrices only, as `configure_optimizer`).

    ``param_groups`` lists Muon's group first, then AdamW's two, so a scheduler scales both
    learning rates (``cfg.muon_lr`` and ``cfg.lr``) by the same schedule. ``state_dict`` numbers
    parameters in that order.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> None:
        muon_names = set(muon_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if n in muon_names]
        decay = [p for n, p in named if n not in muon_names and p.dim() >= 2]
        no_decay = [p for n, p in named if n not in muon_names and p.dim() < 2]
        if not muon:
            raise ValueError("optimizer='muon' found no 2-D matrix inside the Transformer blocks")
        self.muon = torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay,
                                     momentum=cfg.muon_momentum, adjust_lr_fn="original")
        self.adamw = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
        # The groups are the sub-optimizers' own dicts: a scheduler setting group["lr"] drives them.
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

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
