"""A pipeline stage of a GPT: the slice of the network one process (or virtual stage) runs.

Every parallel layout runs its model as stages. With ``pp = 1`` there is one stage holding the
whole network, and its forward is exactly `GPT.forward`'s training path; with ``pp > 1`` the
blocks are cut into contiguous chunks:

    stage 0:       tok_emb + pos_emb -> dropout -> blocks[0 : k]
    stage s:       blocks[...]
    stage last:    blocks[... : n_layer] -> ln_f -> head -> cross-entropy

The stage takes its modules *from the GPT built with the run's seed* (on the meta device when
the engine is to materialise only this rank's part, see `lmkit.parallel.engine`), so every
layout starts from the same weights as the single-process run. That is what lets the tests
demand the same loss curve to 1e-5. The tied head lives on the last stage. When that is a different stage from
the embedding, it gets its own copy of the embedding matrix, and the two copies' gradients are
summed over the embedding group after every backward (Megatron does the same).

Which modules go to the first and the last stage is the plan's ``place`` (`lmkit.parallel.plan`).
Tensor parallelism (`lmkit.parallel.tensor_parallel.parallelize_stage`) swaps the stage's
modules for sharded ones and sets `loss_fn`; the stage code below is the same for every layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmkit.costs import layer_split  # the one definition of the cut, shared with the cost model
from lmkit.model import rope_tables
from lmkit.parallel.plan import GPT_PLAN, place_modules, tied_to

__all__ = ["GPTStage", "layer_split", "build_stages", "cross_entropy_loss", "take_stage_modules"]


def take_stage_modules(stage: nn.Module, model: nn.Module, place: str) -> None:
    """Give `stage` the plan's modules of `model` for `place` (``first`` or ``last``, `plan.Row.place`).

    A tied module on a stage without its partner (the head on a last stage that is not the first)
    gets its own copy of the shared weight, kept equal by summing the two copies' gradients.
    """
    for name in place_modules(place):
        if hasattr(model, name):  # (a model without learned positions has no pos_emb)
            setattr(stage, name, getattr(model, name))
    for row in GPT_PLAN:
        partner = tied_to(row, model.config.tie_embeddings)
        if row.place == place and partner is not None and not hasattr(stage, partner):
            stage.get_submodule(row.module).weight = nn.Parameter(
                model.get_submodule(partner).weight.detach().clone())


def cross_entropy_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (what `GPT.forward` computes)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPTStage(nn.Module):
    """Blocks ``layers`` of `model`, plus the embedding (first stage) and the head (last stage).

    ``forward(inp, targets)``: the first stage takes token ids ``[b, T]``, later stages take the
    previous stage's activation; the last stage returns the mean loss of the microbatch, the
    others their output activation.

    Attributes set by tensor parallelism: ``tp_rank``, ``tp_size``, ``sequence_parallel``
    (activations between blocks are then ``[b, T / tp, d]``, this rank's slice of the sequence),
    and ``loss_fn``; by context parallelism: ``cp_size`` and ``cp_positions(T, device)`` (the
    positions of this rank's ``T / cp`` tokens: inputs and activations are ``[b, T / cp, ...]``).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], is_first: bool, is_last: bool,
                 stage_index: int = 0) -> None:
        super().__init__()
        self.config = model.config
        self.layers = list(layers)
        self.is_first, self.is_last = is_first, is_last
        self.stage_index = stage_index
        self.tp_rank, self.tp_size, self.sequence_parallel = 0, 1, False
        self.cp_size, self.cp_positions = 1, None  # context parallelism: `parallelize_context` sets both
        self.loss_fn = cross_entropy_loss
        self.activation_checkpointing = False
        if is_first:
            take_stage_modules(self, model, "first")
        self.blocks = self._take_blocks(model)
        if is_last:
            take_stage_modules(self, model, "last")

    def _take_blocks(self, model: nn.Module) -> nn.Module:
        return nn.ModuleList(model.blocks[i] for i in self.layers)

    def positions(self, n: int, device: torch.device) -> Tensor:
        """The positions of this rank's `n` tokens (the sequence's T / cp; its chunks under context
        parallelism): what the position table or the rotary angles are taken for."""
        T = n * self.cp_size
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        if self.cp_positions is None:
            return torch.arange(T, device=device)
        return self.cp_positions(T, device=device)

    def embed(self, idx: Tensor) -> Tensor:
        if not hasattr(self, "pos_emb"):  # rotary positions: the attention turns q and k instead
            return self.drop(self.tok_emb(idx))
        n = idx.size(1)  # this rank's tokens
        if self.cp_positions is None:
            pos = self.pos_emb.weight[:n * self.cp_size]
        else:  # the positions of this rank's chunks of the sequence
            pos = self.pos_emb(self.positions(n, idx.device))
        if self.sequence_parallel:  # this rank holds positions [r*n/tp, (r+1)*n/tp) of its n
            chunk = n // self.tp_size
            pos = pos[self.tp_rank * chunk : (self.tp_rank + 1) * chunk]
        return self.drop(self.tok_emb(idx) + pos)

    def rope(self, inp: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos and sin of the rotary angles of the tokens every attention of this stage sees (None with
        learned positions): all of this rank's T / cp tokens, also under sequence parallelism, whose
        attention runs on the gathered sequence."""
        if self.config.pos != "rope":
            return None
        n = inp.size(1) if self.is_first or not self.sequence_parallel else inp.size(1) * self.tp_size
        return rope_tables(self.positions(n, inp.device), self.config.head_dim, self.config.rope_theta)

    def forward(self, inp: Tensor, targets: Tensor | None = None) -> Tensor:
        rope = self.rope(inp)
        x = self.embed(inp) if self.is_first else inp
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, None, True, None, 0, 0, rope, use_reentrant=False)
            else:
                x = block(x, rope=rope)
        if not self.is_last:
            return x
        if targets is None:
            raise ValueError("the last pipeline stage needs targets to compute the loss")
        return self.loss_fn(self.head(self.ln_f(x)), targets)

    def original_name(self, local_name: str) -> str:
        """Map a parameter name of this stage to its name in the full `GPT` state_dict."""
        if local_name.startswith("blocks."):
            _, index, rest = local_name.split(".", 2)
            return f"blocks.{self.layers[int(index)]}.{rest}"
        return local_name

    def tied_embedding_copy(self) -> Tensor | None:
        """The head's separate copy of the tied embedding on a last stage that is not the first."""
        tied = self.is_last and not self.is_first and self.config.tie_embeddings
        return self.head.weight if tied else None


def build_stages(model: nn.Module, pp: int, pp_rank: int, virtual_stages: int = 1,
                 stage_class: type[nn.Module] | None = None) -> list:
    """The stages this pipeline rank runs, in execution order (`GPTStage`, or `stage_class`: the
    native engine's `NativeStage`, built with the same arguments).

    With ``v = virtual_stages`` the network is cut into ``pp * v`` chunks and rank ``r`` runs
    chunks ``r, r + pp, r + 2 pp, ...`` (the interleaved schedule's round-robin assignment of
    Narayanan et al. 2021), so each microbatch visits every rank ``v`` times.
    """
    n = pp * virtual_stages
    chunks = layer_split(model.config.n_layer, n)
    return [(stage_class or GPTStage)(model, chunks[i], is_first=i == 0, is_last=i == n - 1, stage_index=i)
            for i in (v * pp + pp_rank for v in range(virtual_stages))]


def activation_shape(batch: int, seq: int, d_model: int, tp_size: int = 1,
                     sequence_parallel: bool = False) -> torch.Size:
    """Shape of the tensor a stage sends to the next one."""
    return torch.Size((batch, seq // tp_size if sequence_parallel else seq, d_model))
