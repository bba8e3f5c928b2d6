"""Muon for the blocks' matrices, AdamW for the rest, as one optimizer (chapter 7, "Time to a given loss").

Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each update of a hidden weight matrix
by its nearest semi-orthogonal matrix (a few Newton-Schulz iterations on the momentum), so every
direction of the matrix moves at the same rate. It is defined for 2-D matrices that map one
hidden representation to another; the embedding (a lookup table), the tied head, the norms'
gains and the biases keep AdamW. `MuonAdamW` holds both so that a trainer, a learning-rate
scheduler and a checkpoint see one optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmkit.config import TrainConfig

__all__ = ["MuonAdamW", "muon_parameter_names"]


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters Muon optimises: the 2-D weights inside the Transformer blocks
    (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``). Embeddings and the head stay on AdamW."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("blocks.")]


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on `muon_parameter_names`, ``torch.optim.AdamW`` on every other
    parameter (weight decay on matrices only, as `lmkit.train.configure_optimizer`).

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
