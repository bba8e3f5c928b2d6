"""A model and a layout on paper: shapes, parameters, FLOPs, the rules of a layout, what each stage holds.

`Model` is lmkit's GPT by its shape (`PRESETS`: GPT-2 124M to GPT-3 175B); `Layout` is a
``dp x cp x tp x pp`` layout with ZeRO stage, sequence parallelism, microbatches, schedule and
recomputation, and `Layout.validate` refuses what the engines refuse, in one line. `parameter_table`
lists every tensor with how tensor parallelism splits it; `stage_params`, `stage_counts` and
`zero_buckets` say what one pipeline rank holds. `flops_per_token` and `mfu` are the FLOPs a token
costs and the share of the devices' peak (`PEAK_FLOPS`) a run reaches. Pure Python, like all of
`lmkit.costs`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GB", "SCHEDULES", "RECOMPUTE", "PRECISIONS", "CostError", "Model", "PRESETS", "layer_split", "Param",
    "parameter_table", "num_params", "flops_per_token", "mfu", "PEAK_FLOPS", "lookup_peak_flops", "Layout",
    "stage_chunks", "stage_params", "stage_counts", "zero_buckets", "padded_numel",
]

GB = 1e9
SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("fp32", "mixed")


class CostError(ValueError):
    """An impossible model, layout or request; the message names the problem and the fix."""


# --------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Model:
    """lmkit's GPT (GPT-2 architecture: learned positions, LayerNorm, 4h GELU MLP, tied head)."""

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    bias: bool = True
    dropout: bool = False
    name: str = ""

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> Model:
        """From an `lmkit.config.ModelConfig` (or anything with the same attributes)."""
        return cls(n_layer=config.n_layer, d_model=config.d_model, n_head=config.n_head,
                   vocab_size=config.vocab_size, seq_len=config.block_size, bias=bool(config.bias),
                   dropout=float(getattr(config, "dropout", 0.0)) > 0, name=name).validate()

    def validate(self) -> Model:
        for f in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CostError(f"model {f} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise CostError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                            "choose n_head dividing d_model")
        return self


#: Models for the calculator and `lmkit estimate`, in lmkit's GPT architecture. Vocabularies are
#: padded to a multiple of 128 (50257 -> 50304, as Megatron and nanoGPT do) so that tp divides them.
PRESETS: dict[str, Model] = {
    "gpt2-124m": Model(12, 768, 12, 50304, 1024, name="GPT-2 124M"),
    "7b": Model(32, 4096, 32, 32000, 2048, name="7B (LLaMA-7B shape)"),
    "13b": Model(40, 5120, 40, 32000, 2048, name="13B (LLaMA-13B shape)"),
    "70b": Model(80, 8192, 64, 32000, 4096, name="70B (LLaMA-70B shape)"),
    "gpt3-175b": Model(96, 12288, 96, 50304, 2048, name="GPT-3 175B"),
}


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


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its name, shape and how tensor parallelism splits it."""

    name: str
    shape: tuple[int, ...]
    split: str  # "column" (output rows), "row" (input columns), "vocab" or "replicated"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, tp: int) -> int:
        return self.numel if self.split == "replicated" else self.numel // tp


def parameter_table(model: Model, layers: range | None = None, first: bool = True, last: bool = True,
                    head_copy: bool = False) -> list[Param]:
    """The parameter tensors of a stage holding `layers` (all by default), in registration order.

    `first` adds the embeddings, `last` the final LayerNorm; `head_copy` the last stage's own
    copy of the tied embedding matrix (when the embedding lives on another pipeline stage).
    """
    h, V, s = model.d_model, model.vocab_size, model.seq_len
    layers = range(model.n_layer) if layers is None else layers
    out: list[Param] = []

    def norm(name: str) -> None:
        out.append(Param(f"{name}.weight", (h,), "replicated"))
        if model.bias:
            out.append(Param(f"{name}.bias", (h,), "replicated"))

    def linear(name: str, n_out: int, n_in: int, split: str) -> None:
        out.append(Param(f"{name}.weight", (n_out, n_in), split))
        if model.bias:  # a column-parallel layer splits its bias too; a row-parallel one replicates it
            out.append(Param(f"{name}.bias", (n_out,), "column" if split == "column" else "replicated"))

    if first:
        out += [Param("tok_emb.weight", (V, h), "vocab"), Param("pos_emb.weight", (s, h), "replicated")]
    for i in layers:
        b = f"blocks.{i}"
        norm(f"{b}.ln1")
        linear(f"{b}.attn.qkv", 3 * h, h, "column")
        linear(f"{b}.attn.proj", h, h, "row")
        norm(f"{b}.ln2")
        linear(f"{b}.mlp.fc", 4 * h, h, "column")
        linear(f"{b}.mlp.proj", h, 4 * h, "row")
    if last:
        norm("ln_f")
        if head_copy:
            out.append(Param("head.weight", (V, h), "vocab"))
    return out


@functools.lru_cache(maxsize=256)  # the search asks for every layout it ranks
def num_params(model: Model, non_embedding: bool = False) -> int:
    """Parameters of the whole model, the tied head counted once (= ``GPT.num_params``)."""
    n = sum(p.numel for p in parameter_table(model))
    if non_embedding:
        n -= (model.vocab_size + model.seq_len) * model.d_model
    return n


def flops_per_token(model: Model, training: bool = True) -> float:
    """``6 N + 12 L h s`` for training, ``2 N + 4 L h s`` forward only (PaLM, appendix B).

    N counts the non-embedding parameters plus the head's V x h matmul; = ``GPT.flops_per_token``.
    """
    n = num_params(model, non_embedding=True) + model.d_model * model.vocab_size
    attn = 4 * model.n_layer * model.d_model * model.seq_len
    return float(6 * n + 3 * attn) if training else float(2 * n + attn)


def mfu(tokens_per_s: float, flops_per_token_: float, n_devices: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (Chowdhery et al. 2022)."""
    if peak_flops <= 0 or n_devices <= 0:
        raise CostError("mfu needs a positive peak FLOP/s and device count")
    return tokens_per_s * flops_per_token_ / (n_devices * peak_flops)


#: Dense peak FLOP/s per GPU (NVIDIA datasheets, no 2:4 sparsity), by dtype. "float32" is plain
#: FP32 (PyTorch's default; TF32 tensor cores run faster when enabled). Patterns are matched
#: against ``torch.cuda.get_device_name()`` in order; the first match wins.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H100.*NVL|H200.*NVL", {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12}),
    (r"H100.*PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12}),
    (r"H100|H200|GH200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    (r"A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    (r"L40S", {"bfloat16": 362e12, "float16": 362e12, "float32": 91.6e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
    (r"\bA10\b", {"bfloat16": 125e12, "float16": 125e12, "float32": 31.2e12}),
    (r"V100.*PCIE", {"float16": 112e12, "float32": 14e12}),
    (r"V100", {"float16": 125e12, "float32": 15.7e12}),
    (r"\bT4\b", {"float16": 65e12, "float32": 8.1e12}),
]


def lookup_peak_flops(device_name: str, dtype: Any = "bfloat16") -> float | None:
    """Peak FLOP/s of the GPU called `device_name` for `dtype` (a name or a torch dtype); None if
    unknown, so that MFU is reported as unknown rather than guessed."""
    key = str(dtype).replace("torch.", "")
    for pattern, table in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return table.get(key)
    return None


# --------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """A parallel layout (the fields of `lmkit.config.ParallelConfig`, plus recomputation).

    ``cp`` is context parallelism: ring attention over ``cp`` ranks with the zigzag split
    (`lmkit.parallel.context_parallel`); for the parameters it is one more data dimension, so
    gradients are averaged and ZeRO shards over the ``dp x cp`` ranks (`grad_ranks`).
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

    @classmethod
    def from_parallel_config(cls, pc: Any, recompute: str = "none") -> Layout:
        return cls(dp=pc.dp, tp=pc.tp, pp=pc.pp, zero=pc.zero, sequence_parallel=bool(pc.sequence_parallel),
                   microbatches=pc.microbatches, schedule=pc.schedule, virtual_stages=pc.virtual_stages,
                   recompute=recompute, cp=getattr(pc, "cp", 1))

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def grad_ranks(self) -> int:
        """Ranks that average each gradient and share its ZeRO shards: ``dp x cp``."""
        return self.dp * self.cp

    @property
    def name(self) -> str:
        parts = [f"dp{self.dp}" + (f" zero{self.zero}" if self.zero else "")] if self.dp > 1 else []
        if self.zero and self.dp == 1:
            parts.append(f"zero{self.zero}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
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
        for f in ("dp", "tp", "pp", "cp", "microbatches", "virtual_stages"):
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
def stage_counts(model: Model, pp: int, virtual_stages: int, tp: int, stage: int) -> tuple[int, ...]:
    """(matrix numel, vector numel, tensors, replicated numel, layers, max chunk layers, first, last)
    of pipeline rank `stage` after the tp split; cached, because the search asks again and again."""
    schedule = "interleaved" if virtual_stages > 1 else "1f1b"
    layout = Layout(pp=pp, virtual_stages=virtual_stages, schedule=schedule)
    chunks = stage_chunks(model, layout, stage)
    params = stage_params(model, layout, stage)
    mats = sum(p.local_numel(tp) for p in params if len(p.shape) >= 2)
    vecs = sum(p.local_numel(tp) for p in params if len(p.shape) < 2)
    replicated = sum(p.numel for p in params if p.split == "replicated")
    layers = [len(c[0]) for c in chunks]
    return (mats, vecs, len(params), replicated, sum(layers), max(layers),
            int(any(c[1] for c in chunks)), int(any(c[2] for c in chunks)))


def zero_buckets(model: Model, layout: Layout, stage: int) -> list[int]:
    """Elements of the flat buckets lmkit's ZeRO shards on pipeline rank `stage`, unpadded.

    One bucket per optimizer group (matrices, vectors), which is what the engine builds while a
    group fits its 25 MiB bucket cap (a larger group has more buckets, each padded: at most
    ``dp - 1`` more elements per bucket than counted here). Under ZeRO-2 with pipelining the tied
    embedding's copy on the first and the last stage is a bucket of its own, so both stages shard
    it alike (chapter 5, section 5.3).
    """
    mats, vecs, _, _, _, _, first, last = stage_counts(model, layout.pp, layout.virtual_stages, layout.tp,
                                                        stage)
    if layout.zero == 2 and layout.pp > 1 and (first or last):
        emb = model.vocab_size * model.d_model // layout.tp
        return [n for n in (emb, mats - emb, vecs) if n]
    return [n for n in (mats, vecs) if n]


def padded_numel(buckets: list[int], dp: int) -> int:
    return sum(math.ceil(n / dp) * dp for n in buckets)
