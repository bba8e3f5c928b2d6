"""A layout on paper: its rules, the training's precision, what each pipeline stage holds.

`Layout` is a ``dp x cp x tp x pp`` layout (experts: ``ep`` inside ``dp x cp``) with ZeRO stage,
sequence parallelism, microbatches, schedule and recomputation, and `Layout.validate` refuses what the
engines refuse, in one line. `state_bytes` is what an element costs in a precision; `layer_split` the
pipeline's cut; `stage_params` and `stage_counts` what one pipeline rank holds; `zero_buckets` the
gradient buckets lmkit's engine cuts them into (and `muon_tensors` the matrices Muon steps). Pure
Python, like all of `lmkit.costs`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from lmkit.costs.model import CostError, Model, Param, divisors, parameter_table, tp_choices, tp_widths

__all__ = [
    "SCHEDULES", "RECOMPUTE", "PRECISIONS", "REDUCE_DTYPES", "OPTIMIZERS", "BUCKET_CAP_BYTES",
    "check_optimizer", "state_bytes", "layer_split", "Layout", "stage_chunks", "stage_params", "stage_counts",
    "stage_frozen", "zero_buckets", "padded_numel", "muon_params", "muon_tensors", "muon_buckets",
]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("fp32", "mixed")
#: dtypes in which mixed precision accumulates and reduces gradients (`lmkit.config.TrainConfig.reduce_dtype`)
REDUCE_DTYPES = ("fp32", "bf16")
#: the engine's gradient bucket cap, in bytes (`lmkit.parallel.data_parallel.DataParallel`, 25 MiB as DDP)
BUCKET_CAP_BYTES = 25 * 2**20
#: The optimizers whose state and communication the model counts (`lmkit.config.TrainConfig.optimizer`).
OPTIMIZERS = ("adamw", "muon")


def check_optimizer(optimizer: str, model: Model, layout: Layout) -> None:
    """Refuse an optimizer the cost model does not know, or Muon where lmkit's engine refuses it:
    with experts split over ep > 1 ranks (their matrices would need Muon over the edp group)."""
    if optimizer not in OPTIMIZERS:
        raise CostError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
    if optimizer == "muon" and model.n_experts and layout.ep > 1:
        raise CostError(f"optimizer='muon' with ep={layout.ep}: lmkit's engine runs Muon on the experts with "
                        "ep=1 only; use adamw, or ep=1")


def state_bytes(precision: str, reduce: str = "fp32") -> tuple[int, int, int]:
    """(weight, gradient, master weight) bytes per element of lmkit's engine.

    ``"fp32"``: 4-byte weights and gradients, no master copy. ``"mixed"`` (``train.param_dtype=
    bfloat16``): bf16 weights the model computes with, gradients accumulated and reduced in `reduce`
    (``"fp32"``, 4 bytes, the default; ``"bf16"``, 2) and fp32 master weights the optimizer steps.
    AdamW's two moments are fp32 in both (8 bytes), Muon's momentum 4.
    """
    if precision not in PRECISIONS:
        raise CostError(f"precision={precision!r} is unknown; use 'fp32' or 'mixed'")
    if reduce not in REDUCE_DTYPES:
        raise CostError(f"reduce={reduce!r} is unknown; use 'fp32' or 'bf16' (the gradients' dtype)")
    if precision == "fp32":
        if reduce != "fp32":
            raise CostError("reduce='bf16' applies to mixed precision (bf16 weights with fp32 masters); "
                            "use precision='mixed', or reduce='fp32'")
        return 4, 4, 0
    return 2, (4 if reduce == "fp32" else 2), 4


def layer_split(n_layer: int, n_stages: int) -> list[range]:
    """Contiguous, balanced chunks of ``range(n_layer)`` (earlier chunks get the remainder).

    The one definition of the pipeline cut: `lmkit.parallel.stage` builds its stages from it.
    """
    if n_stages > n_layer:
        raise CostError(
            f"{n_stages} pipeline stages (pp x virtual_stages) but only {n_layer} layers; every stage "
            "needs at least one block: lower pp or virtual_stages, or add layers")
    base, extra = divmod(n_layer, n_stages)
    chunks, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        chunks.append(range(start, start + size))
        start += size
    return chunks


# --------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """A parallel layout (the fields of `lmkit.config.ParallelConfig`, plus recomputation).

    ``cp`` is context parallelism: ring attention over ``cp`` ranks with the zigzag split
    (`lmkit.parallel.context_parallel`); for the parameters it is one more data dimension, so
    gradients are averaged and ZeRO shards over the ``dp x cp`` ranks (`grad_ranks`).

    ``ep`` is expert parallelism, carved out of ``dp x cp``: with ``j = d cp + c`` the ep group of a
    rank is the ``ep`` consecutive ``j`` (same pipeline and tensor rank), each holding ``E / ep``
    experts of every MoE block; the ranks holding the same experts form the expert-data-parallel
    group of ``dp x cp / ep`` ranks (`expert_ranks`), over which expert gradients are reduced and
    ZeRO shards their states.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    cp: int = 1
    ep: int = 1

    @classmethod
    def from_parallel_config(cls, pc: Any, recompute: str = "none") -> Layout:
        return cls(dp=pc.dp, tp=pc.tp, pp=pc.pp, zero=pc.zero, sequence_parallel=bool(pc.sequence_parallel),
                   microbatches=pc.microbatches, schedule=pc.schedule, virtual_stages=pc.virtual_stages,
                   recompute=recompute, cp=getattr(pc, "cp", 1), ep=getattr(pc, "ep", 1))

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def grad_ranks(self) -> int:
        """Ranks that average each gradient and share its ZeRO shards: ``dp x cp``."""
        return self.dp * self.cp

    @property
    def expert_ranks(self) -> int:
        """The expert-data-parallel group: ranks holding the same experts, ``dp x cp / ep``."""
        return self.dp * self.cp // self.ep

    @property
    def name(self) -> str:
        parts = [f"dp{self.dp}" + (f" zero{self.zero}" if self.zero else "")] if self.dp > 1 else []
        if self.zero and self.dp == 1:
            parts.append(f"zero{self.zero}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:  # inside dp x cp, not a factor of its own: "dp8 zero1 (ep8)"
            parts[-1] += f" (ep{self.ep})"
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + (" sp" if self.sequence_parallel else ""))
        if self.pp > 1:
            v = f" v{self.virtual_stages}" if self.schedule == "interleaved" else ""
            parts.append(f"pp{self.pp} {self.schedule}{v}")
        parts.append(f"m{self.microbatches}")
        if self.recompute != "none":
            parts.append(f"recompute {self.recompute}")
        return " x ".join(parts)

    def validate(self, model: Model, global_batch: int) -> Layout:
        """The rules of `lmkit.parallel.engine.validate_layout`, as one-line `CostError`s."""
        for f in ("dp", "tp", "pp", "cp", "ep", "microbatches", "virtual_stages"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CostError(f"{f} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise CostError(f"zero={self.zero!r} is unknown; use 0, 1, 2 or 3")
        if self.schedule not in SCHEDULES:
            raise CostError(f"schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.recompute not in RECOMPUTE:
            raise CostError(f"recompute={self.recompute!r} is unknown; use one of {', '.join(RECOMPUTE)}")
        if self.sequence_parallel and self.tp == 1:
            raise CostError("sequence parallelism needs tp > 1")
        if model.n_head % self.tp:
            raise CostError(f"n_head={model.n_head} is not divisible by tp={self.tp}; "
                            "attention heads are split over tensor-parallel ranks")
        if model.kv_heads % self.tp:
            raise CostError(f"n_kv_head={model.kv_heads} is not divisible by tp={self.tp}; the key/value "
                            "heads are split over tensor-parallel ranks: choose tp among "
                            f"{', '.join(map(str, tp_choices(model)))}")
        for name, width in tp_widths(model):
            if width % self.tp:
                raise CostError(f"the {name}{width} is not divisible by tp={self.tp}; its hidden "
                                "features are split over tensor-parallel ranks: choose tp among "
                                f"{', '.join(map(str, tp_choices(model)))}")
        if self.ep > 1 and not model.n_experts:
            raise CostError(f"ep={self.ep} splits experts, but the model has none; set n_experts or ep=1")
        if (self.dp * self.cp) % self.ep:
            raise CostError(f"ep={self.ep} does not divide dp x cp = {self.dp * self.cp}: the expert-"
                            f"parallel ranks are carved out of dp x cp; choose ep among "
                            f"{', '.join(map(str, divisors(self.dp * self.cp)))}")
        if model.n_experts % self.ep:
            raise CostError(f"ep={self.ep} does not divide n_experts={model.n_experts} (each ep rank holds "
                            f"E / ep whole experts); choose ep among "
                            f"{', '.join(map(str, divisors(model.n_experts)))}")
        if model.n_experts and self.tp > 1 and not self.sequence_parallel:
            raise CostError(f"experts with tp={self.tp} need sequence parallelism (each tp rank routes its "
                            "own chunk of the sequence, the experts whole on every tp rank); set "
                            "sequence_parallel=True")
        if model.n_experts and self.ep > 1 and self.zero == 3:
            raise CostError(f"ep={self.ep} with zero=3: expert parallelism runs in the lmkit engine, which "
                            "shards expert states with ZeRO-1 and ZeRO-2; use zero 0, 1 or 2, or ep=1")
        if model.vocab_size % self.tp:
            raise CostError(f"the vocabulary ({model.vocab_size}) is not divisible by tp={self.tp}; "
                            "pad it to a multiple of tp")
        if self.sequence_parallel and model.seq_len % self.tp:
            raise CostError(f"seq_len={model.seq_len} is not divisible by tp={self.tp} (sequence parallel)")
        if self.cp > 1:
            if model.seq_len % (2 * self.cp):
                raise CostError(
                    f"sequence length {model.seq_len} is not divisible by {2 * self.cp} (zigzag context "
                    f"parallelism with cp={self.cp} cuts it into 2 cp chunks, two per rank); use a sequence "
                    f"length that is a multiple of {2 * self.cp}")
            if model.dropout:
                raise CostError(f"cp={self.cp}: ring attention has no attention dropout but the model has "
                                "dropout; set dropout=0 or cp=1")
            if self.zero == 3:
                raise CostError(f"cp={self.cp} with zero=3: context parallelism runs in the lmkit engine, "
                                "which implements ZeRO-1 and ZeRO-2; use zero 0, 1 or 2, or cp=1")
            if self.sequence_parallel and (model.seq_len // self.cp) % self.tp:
                multiple = math.lcm(2 * self.cp, self.cp * self.tp)
                raise CostError(f"seq_len / cp = {model.seq_len // self.cp} tokens per context-parallel rank "
                                f"are not divisible by tp={self.tp} (sequence parallel splits them); use a "
                                f"sequence length that is a multiple of {multiple}")
        if self.schedule == "interleaved" and (self.pp < 2 or self.virtual_stages < 2):
            raise CostError("the interleaved schedule needs pp >= 2 and virtual_stages >= 2")
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise CostError(f"virtual_stages={self.virtual_stages} needs schedule='interleaved'")
        if self.pp * self.virtual_stages > model.n_layer:
            raise CostError(f"pp x virtual_stages = {self.pp * self.virtual_stages} stages but only "
                            f"{model.n_layer} layers; every stage needs at least one block")
        m = self.microbatches
        if self.pp > 1 and self.schedule != "gpipe" and m < self.pp:
            raise CostError(f"schedule {self.schedule!r} needs microbatches >= pp (got {m} < {self.pp})")
        if self.pp > 1 and self.schedule == "interleaved" and m % self.pp:
            raise CostError(f"the interleaved schedule needs microbatches divisible by pp "
                            f"(got {m}, pp={self.pp})")
        if not isinstance(global_batch, int) or global_batch <= 0:
            raise CostError(f"the global batch must be a positive number of sequences, got {global_batch!r}")
        if global_batch % (self.dp * m):
            raise CostError(f"global batch {global_batch} is not divisible by dp x microbatches = "
                            f"{self.dp} x {m}; every microbatch needs a whole number of sequences")
        return self


def stage_chunks(model: Model, layout: Layout, stage: int) -> list[tuple[range, bool, bool]]:
    """(layers, is_first, is_last) of every chunk pipeline rank `stage` holds."""
    n = layout.pp * layout.virtual_stages
    chunks = layer_split(model.n_layer, n)
    return [(chunks[k * layout.pp + stage], k * layout.pp + stage == 0, k * layout.pp + stage == n - 1)
            for k in range(layout.virtual_stages)]


def stage_params(model: Model, layout: Layout, stage: int) -> list[Param]:
    """The parameter tensors pipeline rank `stage` holds (before the tp split)."""
    out: list[Param] = []
    for layers, first, last in stage_chunks(model, layout, stage):
        out += parameter_table(model, layers, first=first, last=last, head_copy=last and layout.pp > 1)
    return out


@functools.lru_cache(maxsize=4096)
def stage_counts(model: Model, pp: int, virtual_stages: int, tp: int, stage: int,
                 ep: int = 1) -> tuple[int, ...]:
    """(matrix numel, vector numel, tensors, replicated numel, layers, max chunk layers, first, last)
    of pipeline rank `stage` after the tp split (and the ep split of the experts, whose E / ep are
    among the matrices); the tensors with gradients only (`stage_frozen`: the others); cached,
    because the search asks again and again."""
    schedule = "interleaved" if virtual_stages > 1 else "1f1b"
    layout = Layout(pp=pp, virtual_stages=virtual_stages, schedule=schedule)
    chunks = stage_chunks(model, layout, stage)
    params = [p for p in stage_params(model, layout, stage) if p.trainable]
    mats = sum(p.local_numel(tp, ep) for p in params if len(p.shape) >= 2)
    vecs = sum(p.local_numel(tp, ep) for p in params if len(p.shape) < 2)
    replicated = sum(p.numel for p in params if p.split == "replicated")
    layers = [len(c[0]) for c in chunks]
    return (mats, vecs, len(params), replicated, sum(layers), max(layers),
            int(any(c[1] for c in chunks)), int(any(c[2] for c in chunks)))


def stage_frozen(model: Model, layout: Layout, stage: int) -> int:
    """Elements of the tensors without gradient pipeline rank `stage` holds (`Param.trainable`: the
    routers' ``expert_bias``, E per MoE block): fp32, whole on every rank of the stage (no tp, ep or
    ZeRO split), with neither gradient nor optimizer state."""
    if not model.n_experts:  # (only routers have such tensors)
        return 0
    return sum(p.numel for p in stage_params(model, layout, stage) if not p.trainable)


def muon_params(model: Model, layout: Layout, stage: int) -> list[Param]:
    """The tensors Muon steps on pipeline rank `stage` (`lmkit.optim.is_muon_matrix`): the blocks' 2-D
    weights with gradients (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``, a router's ``gate``)
    and the stacked expert weights (``mlp.experts.fc``/``proj``, ``[E, out, in]``), whose E / ep
    matrices on a rank it orthogonalises one by one."""
    return [p for p in stage_params(model, layout, stage) if p.trainable and p.name.startswith("blocks.")
            and (len(p.shape) == 2 or p.split == "expert")]


def muon_tensors(model: Model, layout: Layout, stage: int) -> tuple[int, int]:
    """(elements, tensors) of the tensors Muon steps on pipeline rank `stage` after the tp split (and
    the ep split of the experts: E / ep of each stack), `muon_params`."""
    mats = muon_params(model, layout, stage)
    return sum(p.local_numel(layout.tp, layout.ep) for p in mats), len(mats)


def zero_buckets(model: Model, layout: Layout, stage: int, optimizer: str = "adamw",
                 grad_bytes: int = 4) -> list[int]:
    """Elements of the flat gradient buckets lmkit's engine builds on pipeline rank `stage`, unpadded.

    As `lmkit.parallel.buckets.bucket_layout`: one flat buffer per optimizer group (with
    ``optimizer="muon"`` Muon's matrices first, a group of their own; then the matrices, then the
    vectors), each holding its parameters in reverse registration order, cut greedily into buckets
    of whole parameters of at most `BUCKET_CAP_BYTES` / `grad_bytes` elements (the gradient
    buffer's element size: 4 in fp32 and with an fp32 reduce, 2 with a bf16 reduce); a larger
    parameter gets a bucket of its own. Expert tensors are not here (`expert_buckets`: they are
    reduced over another group). Under ZeRO every bucket is padded to a multiple of dp x cp
    (`padded_numel`). Under ZeRO-2 with pipelining a tied embedding's copy on the first and the
    last stage is a bucket of its own, so both stages shard it alike (chapter 5, section 5.3).
    In the engine's order: Muon's buckets, then the matrices', then the vectors'.
    """
    return [n for _, n in _buckets(model, layout.pp, layout.virtual_stages, layout.tp, stage,
                                   layout.zero == 2 and layout.pp > 1 and model.tie_embeddings,
                                   optimizer == "muon", BUCKET_CAP_BYTES // grad_bytes)]


@functools.lru_cache(maxsize=4096)  # the search asks for every layout it ranks
def _buckets(model: Model, pp: int, virtual_stages: int, tp: int, stage: int, isolate: bool, muon: bool,
             cap: int) -> tuple[tuple[int, int], ...]:
    """((group, elements), ...) of every bucket; group 0 is Muon's when `muon`."""
    layout = Layout(pp=pp, virtual_stages=virtual_stages, tp=tp,
                    schedule="interleaved" if virtual_stages > 1 else "1f1b")
    params = [p for p in stage_params(model, layout, stage) if p.split != "expert" and p.trainable]
    leading = [p for p in params if muon and len(p.shape) == 2 and p.name.startswith("blocks.")]
    rest = [p for p in params if not any(p is q for q in leading)]
    groups = ([leading] if leading else []) + [[p for p in rest if len(p.shape) >= 2],
                                               [p for p in rest if len(p.shape) < 2]]
    isolated = {"tok_emb.weight", "head.weight"} if isolate else set()
    out: list[tuple[int, int]] = []
    for gi, members in enumerate(groups):
        runs: list[list[Param]] = []
        for p in reversed(members):
            n = p.local_numel(tp)
            if (not runs or p.name in isolated or runs[-1][0].name in isolated
                    or sum(q.local_numel(tp) for q in runs[-1]) + n > cap):
                runs.append([p])
            else:
                runs[-1].append(p)
        out += [(gi, sum(q.local_numel(tp) for q in run)) for run in runs]
    return tuple(out)


def muon_buckets(model: Model, layout: Layout, stage: int, grad_bytes: int = 4) -> int:
    """How many of `zero_buckets` (the first ones) hold Muon's matrices (``optimizer="muon"``)."""
    buckets = _buckets(model, layout.pp, layout.virtual_stages, layout.tp, stage,
                       layout.zero == 2 and layout.pp > 1 and model.tie_embeddings, True,
                       BUCKET_CAP_BYTES // grad_bytes)
    return sum(1 for g, _ in buckets if g == 0) if muon_tensors(model, layout, stage)[0] else 0


def padded_numel(buckets: list[int], dp: int) -> int:
    return sum(math.ceil(n / dp) * dp for n in buckets)
