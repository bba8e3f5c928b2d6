"""The GPT's initial weights, each a pure function of (seed, name, shape), and meta-device models.

`initial_parameter` draws the initial value of one `lmkit.model.GPT` parameter from its own seed
(`parameter_seed`), so it does not depend on which modules exist or in which order they are
built: every layout of chapter 6 starts from the single-process weights. A parallel engine builds
the GPT on the meta device (shapes, no storage), gives this rank's parameters storage with
`materialize`, and fills its shards from `InitialWeights`, drawing one parameter at a time
(chapter 6, "Construction at scale"); `GPT.reset_parameters` fills a whole model the same way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from lmkit.config import ModelConfig

__all__ = ["parameter_seed", "initial_parameter", "InitialWeights", "materialize"]


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name` of a model seeded with `seed` (sha256: stable across
    processes, unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


_NORMAL, _RESIDUAL = ("tok_emb", "pos_emb", "qkv", "fc", "head", "gate"), ("proj",)  # a weight's module


def initial_parameter(name: str, shape: Sequence[int], config: ModelConfig, seed: int) -> Tensor:
    """The initial value of `GPT` parameter `name` (float32, CPU): a pure function of
    ``(seed, name, shape)``, so it does not depend on which modules exist or in which order they
    are built. Every layout of chapter 6 therefore starts from the single-process weights, and a
    rank can draw one parameter, keep its shard and free the rest (`InitialWeights`).

    GPT-2's initialisation: weights of linears and embeddings ~ N(0, 0.02) (an untied head too,
    drawn from its own seed); the two projections
    that write into the residual stream (``attn.proj``, ``mlp.proj``) ~ N(0, 0.02 / sqrt(2 L)),
    so the residual's variance does not grow with depth; biases 0; LayerNorm gains 1. Experts: the
    router's ``gate`` as a linear, the stacked ``experts.fc``/``proj`` as ``mlp.fc``/``proj``.
    """
    if name == "head.weight" and config.tie_embeddings:
        name = "tok_emb.weight"  # tied: the head *is* the embedding
    module, _, leaf = name.rpartition(".")
    kind = module.rpartition(".")[2]
    if leaf in ("bias", "expert_bias"):  # expert_bias: the router's balancing buffer (lmkit.experts)
        return torch.zeros(tuple(shape), device="cpu")
    if kind == "experts" and leaf in ("fc", "proj"):  # stacked expert matrices, as the dense MLP's
        kind, leaf = leaf, "weight"
    if kind in ("ln1", "ln2", "ln_f", "q_norm", "k_norm") and leaf == "weight":
        return torch.ones(tuple(shape), device="cpu")
    if leaf != "weight" or kind not in _NORMAL + _RESIDUAL:
        raise ValueError(f"{name!r} is not a GPT parameter name (see lmkit.model's docstring)")
    std = 0.02 / math.sqrt(2 * config.n_layer) if kind in _RESIDUAL else 0.02
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    return torch.empty(tuple(shape), device="cpu").normal_(0.0, std, generator=generator)


class InitialWeights(Mapping):
    """A GPT's initial weights by parameter name, each drawn only when looked up.

    What a parallel engine loads into a model built on the meta device: it looks up one name,
    keeps its own shard and drops the full tensor before the next, so no rank ever holds the
    whole model (chapter 6, "Construction at scale").
    """

    def __init__(self, model: nn.Module) -> None:  # a GPT: its config, init_seed, shapes
        self.config, self.seed = model.config, model.init_seed
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()}

    def __getitem__(self, name: str) -> Tensor:
        return initial_parameter(name, self.shapes[name], self.config, self.seed)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta-device parameter of `module` real, uninitialised storage on `device`.

    Unlike ``module.to_empty`` it keeps each Parameter object (swapping its contents), so tied
    weights stay tied and attributes set on parameters (tensor-parallel tags) survive. Values
    are garbage until set (`GPT.reset_parameters`, or an engine loading `InitialWeights`).
    """
    for sub in module.modules():  # buffers (a router's expert_bias) get storage too
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                sub._buffers[name] = torch.empty_like(buf, device=device)
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) in seen or not p.is_meta:
            continue
        seen.add(id(p))
        attrs = dict(p.__dict__)
        torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device=device),
                                                 requires_grad=p.requires_grad))
        p.__dict__.update(attrs)
    return module
