"""The parallelization plan of the GPT: one row per module, read by every parallel mechanism.

Each `Row` says, for one module of `lmkit.model.GPT` (``*`` stands for a block index):

* ``style``: how tensor parallelism treats it (`STYLES`): split by vocabulary rows, by output
  features (column), by output features in whole heads of each of q, k, v (``column_heads``), by
  input features (row), or replicated (a norm, the positions, a dropout, the attention's random
  stream); the style also says which activations are sequence-parallel regions;
* ``place``: where pipeline stages may cut: ``first``-stage modules, ``block`` modules (stages
  cut between blocks), ``last``-stage modules;
* ``tied``: the module whose weight it shares (the head and the token embedding).

Everything else is derived from the rows: the from-scratch layers
(`lmkit.parallel.tensor_parallel.parallelize_stage`), the native engine's DTensor
``parallelize_module`` plan (`lmkit.parallel.native`), each parameter's `ShardSpec` (the
checkpoints' gather and re-shard), how each gradient counts in the global norm (`tp_sharded`:
its square is summed over the tp group; otherwise one tp rank counts it), and which gradients are
partial under sequence parallelism (`sequence_partial`: summed over the tp group after backward).
A new projection is one more row; a fused one (``attn.qkv`` = ``[q | k | v]``, a gated MLP's
``mlp.fc`` = ``[gate | up]``) is split part by part (`fused_parts`), so that every rank holds its
share of each part and the unchanged module finds its local widths. Torchtitan applies such a dict
to an unmodified model; picotron drives its layers from a table alike. The book, chapter 5,
sections 5.4-5.5, and chapter 6.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

__all__ = ["Row", "STYLES", "GPT_PLAN", "ShardSpec", "row_of", "rows_in", "place_modules", "fused_parts",
           "part_shard_rows", "qkv_shard_rows", "shard_spec", "tp_sharded", "sequence_partial", "tp_partial",
           "tied_to", "saved_as"]

STYLES = {
    "vocab": "embedding split by vocabulary rows; the partial lookups summed (SP: reduce-scattered)",
    "column": "linear split by output features; input through f (SP: the sequence all-gathered)",
    "column_heads": "column, rows of each of q, k, v in whole heads; input op applied by its 'heads' module",
    "row": "linear split by input features; partial products summed by g (SP: reduce-scattered); bias "
           "replicated",
    "vocab_head": "column over the vocabulary, tied to the embedding; logits stay sharded for the loss",
    "norm": "replicated; under SP it sees this rank's sequence chunk (gradient partial over tp)",
    "head_norm": "replicated norm over a head's features; each rank normalises its own heads (gradient "
                 "partial over tp)",
    "positions": "replicated; under SP each rank adds its own positions' rows (gradient partial over tp)",
    "dropout": "replicated random stream; under SP (different data per rank) this rank's own stream",
    "heads": "input op (f / SP all-gather) in front; forward in this rank's random stream (its own heads)",
    "experts": "replicated over tp, whole (split over ep instead); under SP it routes this rank's sequence "
               "chunk (gradient partial over tp)",
}


@dataclass(frozen=True)
class Row:
    """One module of the plan (see the module docstring)."""

    module: str
    style: str
    place: str
    tied: str | None = None


GPT_PLAN: tuple[Row, ...] = (
    Row("tok_emb", "vocab", "first"),
    Row("pos_emb", "positions", "first"),
    Row("drop", "dropout", "first"),
    Row("blocks.*.ln1", "norm", "block"),
    Row("blocks.*.attn", "heads", "block"),
    Row("blocks.*.attn.qkv", "column_heads", "block"),
    Row("blocks.*.attn.q_norm", "head_norm", "block"),
    Row("blocks.*.attn.k_norm", "head_norm", "block"),
    Row("blocks.*.attn.proj", "row", "block"),
    Row("blocks.*.attn.resid_drop", "dropout", "block"),
    Row("blocks.*.ln2", "norm", "block"),
    Row("blocks.*.mlp.fc", "column", "block"),
    Row("blocks.*.mlp.proj", "row", "block"),
    Row("blocks.*.mlp.drop", "dropout", "block"),
    Row("blocks.*.mlp.router.gate", "experts", "block"),
    Row("blocks.*.mlp.experts", "experts", "block"),
    Row("blocks.*.mlp.shared.fc", "column", "block"),
    Row("blocks.*.mlp.shared.proj", "row", "block"),
    Row("blocks.*.mlp.shared.drop", "dropout", "block"),
    Row("ln_f", "norm", "last"),
    Row("head", "vocab_head", "last", tied="tok_emb"),
)
assert all(r.style in STYLES and r.place in ("first", "block", "last") for r in GPT_PLAN)

# the dimension of each parameter a style splits (absent: replicated)
_SPLIT_DIMS = {"vocab": {"weight": 0}, "column": {"weight": 0, "bias": 0}, "row": {"weight": 1},
               "column_heads": {"weight": 0, "bias": 0}, "vocab_head": {"weight": 0}}


@lru_cache(maxsize=4)
def _patterns(rows: tuple[Row, ...]) -> tuple[tuple[re.Pattern, Row], ...]:
    return tuple((re.compile(re.escape(r.module).replace(r"\*", r"\d+") + r"\Z"), r) for r in rows)


def row_of(module: str) -> Row | None:
    """The row of a module path (a GPT or stage path: block indices may be local), or None."""
    return next((row for pattern, row in _patterns(GPT_PLAN) if pattern.match(module)), None)


def rows_in(root: nn.Module) -> Iterator[tuple[str, Row]]:
    """``(module path, row)`` for every module of `root` that the plan names, in `root`'s order."""
    for path, _ in root.named_modules():
        row = row_of(path)
        if row is not None:
            yield path, row


def place_modules(place: str) -> list[str]:
    """The top-level GPT modules of the ``first`` or the ``last`` pipeline stage."""
    return [r.module for r in GPT_PLAN if r.place == place]


def _param_row(name: str) -> tuple[Row | None, str]:
    module, _, attr = name.rpartition(".")
    return row_of(module), attr


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over the tensor-parallel group.

    ``dim``: the dimension of the full tensor that is split; ``full_size``: its full length;
    ``index``: the positions along ``dim`` this rank holds, or ``None`` for the plain layout
    "rank r holds contiguous chunk r of tp equal chunks"; ``parts``: a fused tensor's part widths
    (`fused_parts`), from which every rank's ``index`` follows (`rows_of`).
    """

    dim: int
    full_size: int
    index: Tensor | None = None
    parts: tuple[int, ...] | None = None

    def rows_of(self, tp_rank: int, tp: int) -> Tensor | None:
        """The ``index`` of tp rank `tp_rank` (None: contiguous chunks), known without asking it."""
        return None if self.parts is None else part_shard_rows(self.parts, tp_rank, tp)


def fused_parts(module: str, config) -> tuple[int, ...] | None:
    """The output widths of the parts a fused projection concatenates, or None for a plain one:
    ``attn.qkv`` -> (H hd, KV hd, KV hd) for q, k and v; a gated MLP's ``mlp.fc`` -> (d_ff, d_ff) for
    the gate and the up projection. (`config`: a `lmkit.config.ModelConfig`.)"""
    leaf = module.rpartition(".")[2] if module.startswith("blocks.") else ""
    if leaf == "qkv":
        return (config.n_head * config.head_dim,) + (config.kv_heads * config.head_dim,) * 2
    if leaf == "fc" and config.mlp == "swiglu":  # a shared expert (mlp.shared.fc) has a width of its own
        shared = module.endswith(".shared.fc")
        return (config.n_shared_experts * config.expert_width if shared else config.ffn_width,) * 2
    return None


def part_shard_rows(parts: tuple[int, ...], tp_rank: int, tp_size: int) -> Tensor:
    """Rows of a fused weight (parts of ``parts[i]`` rows, one after the other) rank r holds: chunk
    ``r`` of ``tp`` of every part, in order. The local output is then laid out like the full one
    (``[q_r | k_r | v_r]``, ``[gate_r | up_r]``), each part ``tp`` times narrower."""
    rows, offset = [], 0
    for size in parts:
        chunk = size // tp_size
        rows.append(torch.arange(offset + tp_rank * chunk, offset + (tp_rank + 1) * chunk))
        offset += size
    return torch.cat(rows)


def qkv_shard_rows(n_head: int, head_dim: int, tp_rank: int, tp_size: int, n_kv_head: int | None = None
                   ) -> Tensor:
    """Rows of the fused ``qkv`` weight ([q | k | v]: n_head, n_kv_head and n_kv_head heads of
    head_dim rows) rank r holds: query heads ``[r H/tp, (r+1) H/tp)`` and key and value heads
    ``[r KV/tp, (r+1) KV/tp)``, so it keeps whole heads and every query head's key/value head."""
    kv = n_head if n_kv_head is None else n_kv_head
    return part_shard_rows((n_head * head_dim, kv * head_dim, kv * head_dim), tp_rank, tp_size)


def shard_spec(name: str, full_shape: tuple[int, ...] | torch.Size, tp_rank: int, tp: int,
               config) -> ShardSpec | None:
    """The split of parameter `name` (of full shape `full_shape`) on tp rank `tp_rank`, or None
    when it is replicated (or ``tp == 1``); `config` is the model's `ModelConfig`."""
    row, attr = _param_row(name)
    dim = _SPLIT_DIMS.get(row.style, {}).get(attr) if row is not None and tp > 1 else None
    if dim is None:
        return None
    parts = fused_parts(name.rpartition(".")[0], config) if dim == 0 else None
    index = part_shard_rows(parts, tp_rank, tp) if parts is not None else None
    return ShardSpec(dim, int(full_shape[dim]), index, parts)


def tp_sharded(name: str) -> bool:
    """Whether parameter `name` holds a different part on every tp rank (its gradient's square is
    summed over the tp group; a replicated one is counted by one tp rank)."""
    row, attr = _param_row(name)
    return row is not None and attr in _SPLIT_DIMS.get(row.style, {})


def tied_to(row: Row, tie_embeddings: bool = True) -> str | None:
    """The module whose weight `row`'s module shares: its ``tied`` partner when the model ties its
    embeddings (`ModelConfig.tie_embeddings`), else None (the head has a matrix of its own)."""
    return row.tied if tie_embeddings else None


def saved_as(name: str, tie_embeddings: bool = True) -> str:
    """The GPT name under which parameter `name`'s values are kept: a tied module's weight is its
    partner's (``head.weight`` -> ``tok_emb.weight``: one tensor in checkpoints and in the norm);
    every name is its own when the model does not tie its embeddings."""
    row, attr = _param_row(name)
    partner = tied_to(row, tie_embeddings) if row is not None else None
    return f"{partner}.{attr}" if partner is not None and attr == "weight" else name


def tp_partial(name: str, sequence_parallel: bool) -> bool:
    """Whether the gradient of the replicated parameter `name` is partial over the tp group after
    backward and must be summed over it: the per-head norms always (each rank saw its own heads),
    and under sequence parallelism the `sequence_partial` ones (each rank saw its sequence chunk)."""
    row, _ = _param_row(name)
    return (row is not None and row.style == "head_norm") or (sequence_parallel and sequence_partial(name))


def sequence_partial(name: str) -> bool:
    """Whether, under sequence parallelism, the gradient of the replicated parameter `name` covers
    only this rank's sequence chunk (summed over the tp group after backward): norms, the
    positions and the row-parallel biases (added after the reduce-scatter)."""
    row, attr = _param_row(name)
    return row is not None and (row.style in ("norm", "positions", "experts")
                                or (row.style == "row" and attr == "bias"))
