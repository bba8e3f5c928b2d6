"""What a training layout costs, on paper: parameters, FLOPs, memory, communication, bubble, step time.

An analytical model of lmkit's GPT under a ``dp x cp x tp x pp`` layout, in pure Python (it imports
no torch), so that the same file runs in the tests, in `lmkit estimate` and in the browser
(chapter 5's calculator loads it into Pyodide). Chapter 5 derives every formula; the tests
check them against the engines' measured bytes and memory (``tests/test_costs_engine.py``) and
against published figures (``tests/test_costs.py``). Units: bytes, FLOPs, seconds; "GB" is 1e9.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PEAK_FLOPS",
    "lookup_peak_flops",
    "CostError", "Model", "PRESETS", "Layout", "Cluster", "DEVICES", "Memory", "CommTerm", "Candidate",
    "layer_split", "Param", "parameter_table", "stage_params", "num_params", "flops_per_token", "mfu",
    "model_states", "zero_buckets",
    "activation_bytes_per_layer", "in_flight", "memory", "communication", "wire_bytes", "bubble_fraction",
    "step_time", "search", "calculate", "format_bytes",
    "CP_LAYOUTS", "cp_attention_work", "cp_attention_memory", "cp_communication", "cp_ring_step",
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


def _stage_chunks(model: Model, layout: Layout, stage: int) -> list[tuple[range, bool, bool]]:
    """(layers, is_first, is_last) of every chunk pipeline rank `stage` holds."""
    n = layout.pp * layout.virtual_stages
    chunks = layer_split(model.n_layer, n)
    return [(chunks[k * layout.pp + stage], k * layout.pp + stage == 0, k * layout.pp + stage == n - 1)
            for k in range(layout.virtual_stages)]


def stage_params(model: Model, layout: Layout, stage: int) -> list[Param]:
    """The parameter tensors pipeline rank `stage` holds (before the tp split)."""
    out: list[Param] = []
    for layers, first, last in _stage_chunks(model, layout, stage):
        out += parameter_table(model, layers, first=first, last=last, head_copy=last and layout.pp > 1)
    return out


@functools.lru_cache(maxsize=4096)
def _stage_counts(model: Model, pp: int, virtual_stages: int, tp: int, stage: int) -> tuple[int, ...]:
    """(matrix numel, vector numel, tensors, replicated numel, layers, max chunk layers, first, last)
    of pipeline rank `stage` after the tp split; cached, because the search asks again and again."""
    schedule = "interleaved" if virtual_stages > 1 else "1f1b"
    layout = Layout(pp=pp, virtual_stages=virtual_stages, schedule=schedule)
    chunks = _stage_chunks(model, layout, stage)
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
    mats, vecs, _, _, _, _, first, last = _stage_counts(model, layout.pp, layout.virtual_stages, layout.tp,
                                                        stage)
    if layout.zero == 2 and layout.pp > 1 and (first or last):
        emb = model.vocab_size * model.d_model // layout.tp
        return [n for n in (emb, mats - emb, vecs) if n]
    return [n for n in (mats, vecs) if n]


def _padded(buckets: list[int], dp: int) -> int:
    return sum(math.ceil(n / dp) * dp for n in buckets)


# --------------------------------------------------------------------------------- memory


def model_states(numel: float, dp: int = 1, zero: int = 0,
                 precision: str = "mixed") -> tuple[float, float, float]:
    """Bytes of (parameters, gradients, Adam state) per rank for `numel` parameters.

    Rajbhandari et al. 2020 (ZeRO), section 3.1 and 5: mixed precision keeps 2-byte parameters and
    gradients plus K = 12 bytes of fp32 master weights and moments; fp32 training 4 + 4 + 8. ZeRO
    stage 1 shards the optimizer state over dp, stage 2 also the gradients, stage 3 also the weights.
    """
    if precision not in PRECISIONS:
        raise CostError(f"precision={precision!r} is unknown; use 'fp32' or 'mixed'")
    p, g, k = (2, 2, 12) if precision == "mixed" else (4, 4, 8)
    return (p * numel / (dp if zero >= 3 else 1), g * numel / (dp if zero >= 2 else 1),
            k * numel / (dp if zero >= 1 else 1))


def activation_bytes_per_layer(b: int, s: int, h: int, a: int, tp: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none", act_bytes: int = 2, dropout: bool = True,
                               flash_attention: bool = False, cp: int = 1) -> float:
    """Bytes one Transformer layer keeps for backward, for a microbatch of `b` sequences of `s` tokens.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    section 4: ``s b h (34 + 5 a s / h)`` with 2-byte activations and 1-byte dropout masks;
    ``s b h (10 + 24/t + 5 a s/(h t))`` with tensor parallelism, ``s b h/t (34 + 5 a s / h)`` with
    sequence parallelism, the ``5 a s / h`` term gone under selective recomputation, ``2 s b h``
    (the layer's input) under full recomputation. Generalised here to `act_bytes` per element,
    no masks without dropout, and flash attention (no ``a s^2`` matrix; ``4 a s b`` bytes of
    log-sum-exp instead). Context parallelism over `cp` ranks gives each rank ``s / cp`` of the
    tokens: every ``s b h`` term is divided by ``cp``, and so is the score term, whose rows are this
    rank's queries against all ``s`` keys (``a (s/cp) s b``); ring attention (`cp_attention_memory`)
    keeps none of it.
    """
    e, mask, t = act_bytes, (1 if dropout else 0), tp
    sp = t if sequence_parallel else 1
    if cp > 1 and s % cp:
        raise CostError(f"seq_len={s} is not divisible by cp={cp}; use a multiple of cp (2 cp for zigzag)")
    sbh, local = s // cp * b * h, s // cp
    if recompute == "full":
        return e * sbh / sp
    # Outside the tensor-parallel regions (replicated over tp unless sequence-parallel): the two
    # LayerNorm inputs, the inputs of qkv and fc, and two dropout masks.
    outside = (4 * e + 2 * mask) * sbh / sp
    # Inside (split over tp): q, k, v, the attention output (proj input), the GELU input and output.
    inside = (4 * e + 8 * e) * sbh / t
    if flash_attention:
        scores = 4 * a * local * b / t  # fp32 log-sum-exp per row and head
    elif recompute == "selective":
        scores = 0.0
    else:  # softmax output, its dropout mask and the dropped-out copy
        scores = (e + mask + (e if dropout else 0)) * a * local * s * b / t
    return outside + inside + scores


def in_flight(layout: Layout, stage: int) -> int:
    """Most microbatch-chunks whose activations pipeline rank `stage` holds at once.

    GPipe: ``m``; 1F1B: ``min(m, pp - r)``; interleaved 1F1B (Megatron's warm-up of
    ``2 (pp - r - 1) + (v - 1) pp`` forwards, plus one): in units of one chunk's layers. Checked
    against `lmkit.parallel.pipeline.peak_in_flight` of the real schedules.
    """
    pp, m, v, r = layout.pp, layout.microbatches, layout.virtual_stages, stage
    if pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    if layout.schedule == "1f1b":
        return min(m, pp - r)
    if m == pp:
        return m * v
    return min(m * v, 2 * (pp - r - 1) + (v - 1) * pp + 1)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank: model states (exactly as lmkit allocates them in fp32) and activations."""

    params: float
    grads: float
    optimizer: float
    activations: float
    stage: int
    numel: int

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, float]:
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


def _memory_of_stage(model: Model, layout: Layout, global_batch: int, precision: str, stage: int,
                     flash_attention: bool) -> Memory:
    mats, vecs, count, *_ = _stage_counts(model, layout.pp, layout.virtual_stages, layout.tp, stage)
    numel, dp, zero = mats + vecs, layout.grad_ranks, layout.zero  # ZeRO shards over dp x cp
    if precision == "fp32":
        # lmkit's engine: AdamW (4 + 4 + 8 bytes per parameter, and a 4-byte step counter per tensor
        # it steps). Under ZeRO every bucket is padded to a multiple of dp x cp and split into as many
        # chunks;
        # the optimizer steps this rank's chunk of each (one counter per bucket), and ZeRO-2 keeps
        # only the gradients of those chunks.
        buckets = zero_buckets(model, layout, stage)
        padded = _padded(buckets, dp)
        shard = padded // dp
        groups = len(buckets)
        if zero == 0:
            p_bytes, g_bytes, o_bytes = 4 * numel, 4 * numel, 8 * numel + 4 * count
        else:
            p_bytes = 4 * (shard if zero >= 3 else padded)
            g_bytes = 4 * (shard if zero >= 2 else padded)
            o_bytes = 8 * shard + 4 * groups
    else:
        p_bytes, g_bytes, o_bytes = model_states(numel, dp, zero, precision)
    act = _activations(model, layout, global_batch, precision, stage, flash_attention)
    return Memory(float(p_bytes), float(g_bytes), float(o_bytes), act, stage, numel)


def _activations(model: Model, layout: Layout, global_batch: int, precision: str, stage: int,
                 flash_attention: bool) -> float:
    b = global_batch // (layout.dp * layout.microbatches)  # sequences; a cp rank holds s / cp of each
    s, h, a, t, V, cp = model.seq_len, model.d_model, model.n_head, layout.tp, model.vocab_size, layout.cp
    e = 4 if precision == "fp32" else 2
    sp = t if layout.sequence_parallel else 1
    _, layers, _, last = _stage_counts(model, layout.pp, layout.virtual_stages, t, stage)[4:]
    # Ring attention keeps the log-sum-exp, never the scores (it recomputes them blockwise, like flash).
    flash = flash_attention or cp > 1
    per_layer = activation_bytes_per_layer(b, s, h, a, t, layout.sequence_parallel, layout.recompute, e,
                                           model.dropout, flash, cp)
    units = in_flight(layout, stage) if layout.pp > 1 else 1
    total = units * layers * per_layer
    if layout.recompute == "full":  # the layer being recomputed holds its full activations once
        total += activation_bytes_per_layer(b, s, h, a, t, layout.sequence_parallel, "none", e, model.dropout,
                                            flash, cp)
    if cp > 1:  # the layer running its ring: K/V and dK/dV blocks in flight (and a score block unless flash)
        ring = cp_attention_memory(b, s, h, a, cp, t, e)
        total += ring["kv_in_flight"] + ring["dkv_in_flight"]
        if not flash_attention:
            total += ring["score_block"]
    if last:  # ln_f input, head input, fp32 log-softmax of the logits (of this rank's s / cp tokens)
        held = 1 if layout.pp == 1 or layout.schedule != "gpipe" else layout.microbatches
        local = s // cp
        total += held * (e * local * b * h / sp + e * local * b * h + 4 * local * b * V / t)
    return float(total)


def memory(model: Model, layout: Layout, global_batch: int, precision: str = "fp32", stage: int | None = None,
           flash_attention: bool = True) -> Memory:
    """Bytes per rank on pipeline rank `stage` (default: the rank that needs the most).

    Model states: `model_states` with the layout's tp/pp split of every tensor (embedding and head
    on the end stages). Activations: `activation_bytes_per_layer` times the layers of a chunk times
    the microbatch-chunks in flight (`in_flight`), plus the head's logits on the last stage.
    lmkit's ZeRO-2 keeps only this rank's shard of the gradients, ZeRO's 1/dp (plus padding).
    Context parallelism: every rank holds ``s / cp`` tokens of each sequence (the activation
    formula with ``s -> s / cp``, no score matrix: ring attention keeps the log-sum-exp), plus the
    K/V and dK/dV blocks in flight of the one layer running its ring (`cp_attention_memory`); ZeRO
    shards over the ``dp x cp`` ranks that average the gradients.
    """
    model.validate()
    layout.validate(model, global_batch)
    if precision not in PRECISIONS:
        raise CostError(f"precision={precision!r} is unknown; use 'fp32' or 'mixed'")
    stages = range(layout.pp) if stage is None else [stage]
    if stage is not None and not 0 <= stage < layout.pp:
        raise CostError(f"stage {stage} does not exist with pp={layout.pp}")
    results = [_memory_of_stage(model, layout, global_batch, precision, r, flash_attention) for r in stages]
    return max(results, key=lambda mem: mem.total)


# --------------------------------------------------------------------------------- communication


def wire_bytes(kind: str, nbytes: float, group_size: int) -> float:
    """Bytes one rank sends for a collective of payload `nbytes` under ring algorithms (nccl-tests).

    All-reduce ``2 (n-1)/n B``; reduce-scatter, all-gather, reduce, broadcast ``(n-1)/n B``; a send
    ``B``, a receive 0. The same definition as `lmkit.parallel.instrument.wire_bytes`.
    """
    n = group_size
    if kind == "send":
        return float(nbytes)
    if n <= 1 or kind in ("recv", "barrier"):
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if kind in ("gather", "scatter"):
        return (n - 1) / n**2 * nbytes
    return (n - 1) / n * nbytes


@dataclass(frozen=True)
class CommTerm:
    """One kind of collective a rank issues in one optimizer step."""

    group: str  # "dp", "tp", "pp", "cp" or "embedding" (first + last pipeline stage)
    kind: str
    what: str
    calls: int | None  # None where the count depends on bucketing
    bytes: float  # payload as nccl-tests defines it, summed over the calls
    group_size: int
    bookkeeping: bool = False  # a scalar for logging or the global gradient norm, not training data
    hidden_by: str = ""  # compute it can overlap: "backward" (the last microbatch's), "compute", or none

    @property
    def wire_bytes(self) -> float:
        return wire_bytes(self.kind, self.bytes, self.group_size)


def communication(model: Model, layout: Layout, global_batch: int, precision: str = "fp32",
                  stage: int = 0) -> list[CommTerm]:
    """The collectives pipeline rank `stage` issues per optimizer step, term by term.

    Data parallel: the gradient all-reduce (ZeRO-1: plus an all-gather of the updated parameters;
    ZeRO-2: one reduce-scatter per bucket and microbatch instead of the all-reduce; ZeRO-3: two
    parameter all-gathers, forward and backward) -- Rajbhandari et al. 2020, section 7. Tensor parallel:
    ``2`` all-reduces of the ``b s h`` activation per layer forward and ``2`` backward (Shoeybi et al.
    2019) *plus* the vocab-parallel embedding's forward and the head's input gradient: ``4 L + 2`` on
    one stage; sequence parallel turns each into an all-gather and a reduce-scatter (Korthikanti et al.
    2022).
    Pipeline: one activation forward and one gradient backward per microbatch and boundary.
    Context parallelism: the ring's K/V and dK/dV blocks (`cp_communication`) for this stage's layers
    and microbatches; the "dp" terms run over the ``dp x cp`` ranks that average the gradients, and
    tensor- and pipeline-parallel messages carry this rank's ``s / cp`` tokens. Full recomputation
    runs every layer's forward, and its ring, a second time.
    """
    layout.validate(model, global_batch)
    if not 0 <= stage < layout.pp:
        raise CostError(f"stage {stage} does not exist with pp={layout.pp}")
    e = 4 if precision == "fp32" else 2
    tp, pp, m, v, cp = layout.tp, layout.pp, layout.microbatches, layout.virtual_stages, layout.cp
    b = global_batch // (layout.dp * m)
    dp = layout.grad_ranks  # the gradient group: dp x cp
    s, h, V = model.seq_len // cp, model.d_model, model.vocab_size  # s: the tokens of a sequence on this rank
    mats, vecs, _, replicated, layers, _, first, last = _stage_counts(model, pp, v, tp, stage)
    numel = mats + vecs
    buckets = zero_buckets(model, layout, stage)
    padded = _padded(buckets, dp)
    terms: list[CommTerm] = []
    if dp > 1:
        if layout.zero == 3:
            # FSDP2 gathers again for every microbatch's forward and backward (it reshards after each).
            # An upper bound inside a pipeline, where back-to-back passes of one stage reuse a gather
            # (chapter 6 measures 0.8 of it for dp2 x tp2 x pp2 with 2 microbatches).
            terms.append(CommTerm("dp", "all_gather", "parameters gathered for forward and again for "
                                  "backward, every microbatch", None, 2 * m * e * numel, dp,
                                  hidden_by="compute"))  # prefetched while the previous layer computes
            terms.append(CommTerm("dp", "reduce_scatter", "gradients reduced to their shard", None,
                                  e * numel, dp, hidden_by="backward"))
        elif layout.zero == 2:
            # one reduce-scatter per bucket and backward pass: the padded bucket in, the rank's chunk
            # out, accumulated in the shard over the microbatches (an upper bound with interleaved
            # stages, whose buckets may wait for more than one backward)
            terms.append(CommTerm("dp", "reduce_scatter", "gradient buckets reduce-scattered into the "
                                  "shards, every microbatch", m * len(buckets), m * e * padded, dp,
                                  hidden_by="backward"))
        else:
            terms.append(CommTerm("dp", "all_reduce", "gradient all-reduce (buckets)", None, e * numel, dp,
                                  hidden_by="backward"))
        if layout.zero in (1, 2):
            terms.append(CommTerm("dp", "all_gather", "updated parameter shards all-gathered", None,
                                  e * padded, dp))
        if layout.zero == 2:
            terms.append(CommTerm("dp", "all_reduce", "gradient norm^2 over dp", 1, 4, dp, True))
        terms.append(CommTerm("dp", "all_reduce", "loss mean over dp (fp64)", 1, 8, dp, True))
    if tp > 1:
        calls = m * (4 * layers + int(first) + int(last))
        act = e * b * s * h
        if layout.sequence_parallel:
            for kind in ("all_gather", "reduce_scatter"):
                terms.append(CommTerm("tp", kind, "activations: 2 per layer forward + 2 backward, "
                                      "embedding, head", calls, calls * act, tp))
            # ZeRO-2 sums them on the dp shards after the reduce-scatter: about 1/dp of them
            share = math.ceil(replicated / dp) if layout.zero == 2 else replicated
            terms.append(CommTerm("tp", "all_reduce", "sequence-parallel replicated gradients (norms, "
                                  "positions, row biases)", 1, 4 * share, tp))
        else:
            terms.append(CommTerm("tp", "all_reduce", "activations: 2 per layer forward + 2 backward, "
                                  "embedding forward, head backward", calls, calls * act, tp))
        if last:
            terms.append(CommTerm("tp", "all_reduce", "vocab-parallel cross-entropy: max", m,
                                  m * 4 * b * s, tp))
            terms.append(CommTerm("tp", "all_reduce", "vocab-parallel cross-entropy: exp-sum, target logit",
                                  m, m * 8 * b * s, tp))
        terms.append(CommTerm("tp", "all_reduce", "gradient norm^2 over tp (fp64)", 1, 8, tp, True))
    if pp > 1:
        n_chunks = pp * v
        index = [k * pp + stage for k in range(v)]
        act = e * b * (s // tp if layout.sequence_parallel else s) * h
        sends = m * (sum(1 for i in index if i != n_chunks - 1) + sum(1 for i in index if i != 0))
        terms.append(CommTerm("pp", "send", "activations forward, gradients backward, 1 per microbatch "
                              "and boundary", sends, sends * act, pp))
        terms.append(CommTerm("pp", "recv", "the mirror image of the sends", sends, sends * act, pp))
        if first or last:  # ZeRO-2: on the dp shard of the embedding's own bucket
            emb = V * h // tp
            emb = math.ceil(emb / dp) if layout.zero == 2 else emb
            terms.append(CommTerm("embedding", "all_reduce", "tied embedding gradients, first + last stage",
                                  1, 4 * emb, 2))
        terms.append(CommTerm("pp", "all_reduce", "gradient norm^2 over pp (fp64)", 1, 8, pp, True))
        terms.append(CommTerm("pp", "broadcast", "loss from the last stage (fp64)", 1, 8, pp, True))
    if cp > 1:
        ring = cp_communication(b, model.seq_len, h, cp, tp, layers, m, e)
        terms += ring
        if layout.recompute == "full":  # the recomputed forward runs its ring again
            terms += [dataclasses.replace(t, what=t.what.replace("forward", "forward again (recomputation)"))
                      for t in ring if "forward" in t.what]
    return terms


# --------------------------------------------------------------------------------- context parallelism
# lmkit.parallel.context_parallel: ring attention over cp ranks, zigzag ("head-tail") or contiguous
# causal sharding. Per layer and microbatch, for this rank's s/cp tokens and h/t of the width (its heads).

CP_LAYOUTS = ("zigzag", "contiguous")


def _cp_chunks(s: int, cp: int, layout: str) -> tuple[int, int]:
    """(chunks of the sequence, tokens per chunk), validated."""
    if layout not in CP_LAYOUTS:
        raise CostError(f"context-parallel layout {layout!r} is unknown; use one of {CP_LAYOUTS}")
    n = 2 * cp if layout == "zigzag" else cp
    if cp < 1 or s % n:
        raise CostError(f"seq_len={s} is not divisible by {n} ({layout} sharding over cp={cp}); "
                        f"use a multiple of {n}")
    return n, s // n


def cp_attention_work(s: int, cp: int, layout: str = "zigzag") -> list[dict[str, int]]:
    """Per rank: score blocks, score entries and unmasked (causal) entries of one head's forward.

    Rank ``r`` holds chunks ``r`` and ``2 cp - 1 - r`` (zigzag) or chunk ``r`` (contiguous) of ``C``
    tokens. Its queries of chunk ``i`` meet keys of chunk ``j <= i``: a full ``C x C`` block below
    the diagonal, a triangle of ``C (C+1)/2`` on it. Zigzag: ``2 cp + 1`` blocks and
    ``(2 cp - 1) C^2 + C (C + 1)`` unmasked entries on every rank; contiguous: ``r + 1`` blocks and
    ``r C^2 + C (C+1)/2``, growing with the rank.
    """
    n, c = _cp_chunks(s, cp, layout)
    out = []
    for r in range(cp):
        mine = (r, n - 1 - r) if layout == "zigzag" else (r,)
        blocks = [(i, j) for i in mine for src in range(cp)
                  for j in ((src, n - 1 - src) if layout == "zigzag" else (src,)) if j <= i]
        diagonal = sum(1 for i, j in blocks if i == j)
        out.append({"blocks": len(blocks), "scores": len(blocks) * c * c,
                    "unmasked": (len(blocks) - diagonal) * c * c + diagonal * c * (c + 1) // 2})
    return out


def cp_attention_memory(b: int, s: int, h: int, a: int, cp: int, tp: int = 1, act_bytes: int = 4,
                        layout: str = "zigzag") -> dict[str, float]:
    """Bytes one rank's ring attention holds, against the score matrix of attention without it.

    - ``saved``: what the forward keeps for backward: q, k, v (``act_bytes``) and the output and
      log-sum-exp in the accumulation precision (``max(act_bytes, 4)``): linear in ``s / cp``;
    - ``kv_in_flight``: the K/V block computed on plus the one arriving (2 blocks of ``2 b (s/cp) h/t``);
    - ``dkv_in_flight``: in backward, the dK/dV accumulator computed into plus the one arriving (2 blocks
      in the accumulation precision);
    - ``score_block``: the largest score block alive at once (one chunk pair, fp32 or wider);
    - ``scores_full``: the ``a s^2 b / t`` score matrix one rank would hold without context parallelism.
    """
    n, c = _cp_chunks(s, cp, layout)
    acc = max(act_bytes, 4)
    local, width = s // cp, h // tp
    return {"saved": (3 * act_bytes + acc) * b * local * width + acc * b * (a // tp) * local,
            "kv_in_flight": 2 * 2 * b * local * width * act_bytes,
            "dkv_in_flight": 2 * 2 * b * local * width * acc,
            "score_block": acc * b * (a // tp) * c * c,
            "scores_full": act_bytes * b * (a // tp) * s * s}


def cp_communication(b: int, s: int, h: int, cp: int, tp: int = 1, layers: int = 1, microbatches: int = 1,
                     act_bytes: int = 4) -> list[CommTerm]:
    """The sends (and mirrored receives) of ring attention for `layers` layers and `microbatches`.

    A K/V block is ``2 b (s/cp) (h/t) e`` bytes (its heads under tensor parallelism). Forward: ``cp - 1``
    ring steps pass it on. Backward: the blocks go round again (``cp - 1`` sends; the alternative,
    keeping all ``cp`` blocks from the forward, would cost ``cp`` times the K/V memory), and the dK/dV
    accumulators, in the accumulation precision ``max(e, 4)``, make ``cp`` hops, the last one home.
    """
    if cp == 1:
        return []
    _cp_chunks(s, cp, "contiguous")
    e, acc, n = act_bytes, max(act_bytes, 4), layers * microbatches
    block, grad_block = 2 * b * (s // cp) * (h // tp) * e, 2 * b * (s // cp) * (h // tp) * acc
    terms = []
    for kind in ("send", "recv"):
        terms += [CommTerm("cp", kind, "K/V blocks forward: cp - 1 ring steps per layer", n * (cp - 1),
                           n * (cp - 1) * block, cp, hidden_by="compute"),
                  CommTerm("cp", kind, "K/V blocks again in backward: cp - 1 steps", n * (cp - 1),
                           n * (cp - 1) * block, cp, hidden_by="compute"),
                  CommTerm("cp", kind, "dK/dV accumulators in backward: cp hops, the last one home", n * cp,
                           n * cp * grad_block, cp, hidden_by="compute")]
    return terms


def cp_ring_step(b: int, s: int, h: int, cp: int, peak_flops: float, bandwidth: float, tp: int = 1,
                 act_bytes: int = 2, layout: str = "zigzag") -> dict[str, float]:
    """Seconds of one forward ring step (a K/V block that is not the rank's own): compute and transfer.

    Zigzag: two ``C x C`` blocks (``C = s / 2cp``) of ``QK^T`` and ``PV``, ``4 b C^2 h/t`` FLOPs each
    (a contiguous rank below the diagonal: one ``(s/cp)^2`` block, twice as much); the transfer is one
    K/V block, ``2 b (s/cp) (h/t) e`` bytes at `bandwidth` bytes/s. The transfer hides behind the
    compute when ``compute_s >= comm_s``: for zigzag when ``s / cp >= e F / beta`` tokens per rank.
    """
    _, c = _cp_chunks(s, cp, layout)
    width = h // tp
    block_pairs = 2 if layout == "zigzag" else 1
    flops = block_pairs * 4 * b * c * c * width
    comm = 2 * b * (s // cp) * width * act_bytes
    return {"flops": float(flops), "compute_s": flops / peak_flops, "bytes": float(comm),
            "comm_s": comm / bandwidth}


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a pipeline step: ``(p-1) / (v m + p - 1)`` (GPipe, 1F1B: ``v = 1``).

    Huang et al. 2019 (GPipe); Narayanan et al. 2021, section 2.2 (interleaved).
    """
    if min(pp, microbatches, virtual_stages) < 1:
        raise CostError("pp, microbatches and virtual_stages must be >= 1")
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


# --------------------------------------------------------------------------------- step time, search


@dataclass(frozen=True)
class Cluster:
    """Devices and links: memory in GB (1e9 bytes), peak in FLOP/s, bandwidths in GB/s per device."""

    devices: int
    device_memory_gb: float
    peak_flops: float
    devices_per_node: int = 8
    intra_node_gbps: float = 450.0  # NVLink 4 (H100 SXM), one direction
    inter_node_gbps: float = 50.0  # one 400 Gb/s InfiniBand NIC per GPU
    name: str = ""

    def validate(self) -> Cluster:
        if self.devices < 1 or self.devices_per_node < 1:
            raise CostError("a cluster needs at least one device and one device per node")
        if min(self.device_memory_gb, self.peak_flops, self.intra_node_gbps, self.inter_node_gbps) <= 0:
            raise CostError("device memory, peak FLOP/s and bandwidths must be positive")
        return self


#: Devices for `lmkit estimate --device`: (memory GB, dense bf16 peak FLOP/s, intra-node GB/s,
#: inter-node GB/s), from the vendors' datasheets (no sparsity).
DEVICES: dict[str, tuple[float, float, float, float]] = {
    "h100": (80, 989e12, 450, 50),
    "h200": (141, 989e12, 450, 50),
    "a100-80gb": (80, 312e12, 300, 25),
    "a100-40gb": (40, 312e12, 300, 25),
    "l4": (24, 121e12, 32, 12.5),
}


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its memory and estimated step time (seconds) by component."""

    layout: Layout
    memory: Memory
    compute_s: float
    bubble_s: float
    tp_s: float
    pp_s: float
    dp_exposed_s: float
    tokens_per_step: int
    cp_exposed_s: float = 0.0  # the ring's transfers that its block computations do not hide

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_s + self.pp_s + self.dp_exposed_s + self.cp_exposed_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def _bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s of a group whose ranks lie within `span` consecutive devices."""
    gbps = cluster.intra_node_gbps if span <= cluster.devices_per_node else cluster.inter_node_gbps
    return gbps * GB


def step_time(model: Model, layout: Layout, global_batch: int, cluster: Cluster, precision: str = "mixed",
              efficiency: float = 0.5, flash_attention: bool = True) -> Candidate:
    """Estimated step time: compute at `efficiency` of peak, bubble, exposed communication.

    Compute: training FLOPs (plus one forward under full recomputation, the attention scores under
    selective) over ``devices x peak x efficiency``; bubble: ``compute x bubble / (1 - bubble)``;
    tensor- and pipeline-parallel traffic is on the critical path; the data-parallel gradient
    reduction overlaps the last microbatch's backward (2/3 of its compute) and ZeRO-3's parameter
    gathers the whole step's compute, only the rest is exposed; ZeRO-1/2's all-gather of the updated
    parameters follows the optimizer step and is exposed (as in lmkit's engine). Context parallelism
    adds no FLOPs (the attention of a sequence is split, not repeated) and its ring hides behind
    the block computations step by step (`_ring_exposed_s`). Ranks are ordered tp fastest, then cp,
    then dp, then pp: a group is on NVLink when it spans at most one node.
    """
    mem = memory(model, layout, global_batch, precision, flash_attention=flash_attention)
    tokens = global_batch * model.seq_len
    flops = flops_per_token(model) * tokens
    if layout.recompute == "full":
        flops += flops_per_token(model, training=False) * tokens
    elif layout.recompute == "selective" and not flash_attention:
        flops += 4 * model.n_layer * model.d_model * model.seq_len * tokens
    compute = flops / (layout.world_size * cluster.peak_flops * efficiency)
    bubble = bubble_fraction(layout.pp, layout.microbatches, layout.virtual_stages) if layout.pp > 1 else 0.0
    bubble_s = compute * bubble / (1 - bubble)
    tp_s = pp_s = dp_s = 0.0
    hidden = {"backward": [0.0, compute * 2 / 3 / layout.microbatches], "compute": [0.0, compute]}
    # The busiest rank sets the pace: an end stage (embedding, head) or an inner one (both directions).
    loads = {r: communication(model, layout, global_batch, precision, r) for r in {0, min(1, layout.pp - 1),
                                                                                   layout.pp - 1}}
    worst = max(loads, key=lambda r: sum(t.wire_bytes for t in loads[r]))
    for term in loads[worst]:
        if term.group == "tp":
            tp_s += term.wire_bytes / _bandwidth(cluster, layout.tp)
        elif term.group in ("pp", "embedding"):
            pp_s += term.wire_bytes / _bandwidth(cluster, layout.world_size)
        elif term.group == "dp":  # the gradient group, dp x cp: the ranks of tp x cp x dp consecutive devices
            seconds = term.wire_bytes / _bandwidth(cluster, layout.tp * layout.cp * layout.dp)
            if term.hidden_by:
                hidden[term.hidden_by][0] += seconds
            else:
                dp_s += seconds
    dp_s += sum(max(0.0, busy - window) for busy, window in hidden.values())
    cp_s = _ring_exposed_s(model, layout, global_batch, cluster, precision, efficiency, worst)
    return Candidate(layout, mem, compute, bubble_s, tp_s, pp_s, dp_s, tokens, cp_s)


def _ring_exposed_s(model: Model, layout: Layout, global_batch: int, cluster: Cluster, precision: str,
                    efficiency: float, stage: int) -> float:
    """Seconds per step of ring attention's transfers that the block computations leave exposed.

    Per layer and microbatch, as `lmkit.parallel.context_parallel.RingAttention` runs: a forward ring
    step computes two ``C x C`` blocks in ``f`` seconds (`cp_ring_step`) while the next K/V block
    (``k`` seconds) is in transit, exposing ``max(0, k - f)``, ``cp - 1`` times. A backward step
    computes for ``2 f`` (backward is twice the forward's FLOPs) while the K/V block and the dK/dV
    accumulator of the previous step (``g`` seconds, fp32) travel: ``max(0, k - 2f)`` for the first,
    ``max(0, k + g - 2f)`` for the ``cp - 2`` middle ones, ``max(0, g - 2f)`` for the last, and the
    accumulator's final hop home, ``g``, after all compute. Full recomputation repeats the forward.
    The ring's neighbours are tp ranks apart in a group of ``tp x cp`` consecutive devices.
    """
    cp = layout.cp
    if cp == 1:
        return 0.0
    e = 4 if precision == "fp32" else 2
    b, s, h, t = global_batch // (layout.dp * layout.microbatches), model.seq_len, model.d_model, layout.tp
    beta = _bandwidth(cluster, t * cp)
    step = cp_ring_step(b, s, h, cp, cluster.peak_flops * efficiency, beta, t, e)
    f, k = step["compute_s"], step["comm_s"]
    g = k * max(e, 4) / e
    forward = (cp - 1) * max(0.0, k - f)
    backward = (max(0.0, k - 2 * f) + (cp - 2) * max(0.0, k + g - 2 * f) + max(0.0, g - 2 * f) + g)
    if layout.recompute == "full":
        forward *= 2
    layers = _stage_counts(model, layout.pp, layout.virtual_stages, t, stage)[4]
    return layers * layout.microbatches * (forward + backward)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(model: Model, global_batch: int, cluster: Cluster, precision: str = "mixed",
           efficiency: float = 0.5, zero_stages: tuple[int, ...] = (0, 1, 2, 3), top: int | None = None,
           flash_attention: bool = True) -> list[Candidate]:
    """Every dp x cp x tp x pp layout (with zero, sp, recomputation, microbatches, schedule) that fits.

    Ranked by `step_time`. Raises `CostError` when nothing fits, saying by how much the layout
    that needs the least memory misses. Context parallelism (``cp`` dividing the devices, the
    sequence a multiple of ``2 cp``) is enumerated where it can win: with flash attention, a cp
    layout whose batch would also split over ``dp x cp`` data-parallel ranks is left out, since
    that layout holds the same tokens per rank with the same model states and sends no ring.
    """
    model.validate()
    cluster.validate()
    if not isinstance(global_batch, int) or global_batch <= 0:
        raise CostError(f"the global batch must be a positive number of sequences, got {global_batch!r}")
    fits, best_miss = [], None
    for tp, pp, cp in itertools.product(_divisors(cluster.devices), repeat=3):
        if (cluster.devices % (tp * pp * cp) or model.n_head % tp or model.vocab_size % tp
                or pp > model.n_layer or (cp > 1 and (model.seq_len % (2 * cp) or model.dropout))):
            continue
        dp = cluster.devices // (tp * pp * cp)
        if global_batch % dp:
            continue
        per_dp = global_batch // dp
        micro = [m for m in _divisors(per_dp) if m >= pp] if pp > 1 else _divisors(per_dp)
        if cp > 1 and flash_attention:  # dominated by dp x cp data-parallel ranks where the batch splits
            micro = [m for m in micro if global_batch % (dp * cp * m)]
        # Under flash attention nothing is left for selective recomputation to drop (no s x s matrix).
        recomputes = [r for r in RECOMPUTE if not (flash_attention and r == "selective")]
        local = model.seq_len // cp
        for m, zero, sp, rc in itertools.product(micro, zero_stages, (False, True), recomputes):
            if (sp and tp == 1) or (zero and dp == 1) or (sp and local % tp) or (cp > 1 and zero == 3):
                continue
            schedules = [("1f1b", 1)]
            if pp > 1 and m % pp == 0 and model.n_layer >= 2 * pp:
                schedules.append(("interleaved", 2))
            for schedule, v in schedules:
                layout = Layout(dp, tp, pp, zero, sp, m, schedule, v, rc, cp)
                try:
                    cand = step_time(model, layout, global_batch, cluster, precision, efficiency,
                                     flash_attention)
                except CostError:
                    continue
                need = cand.memory.total
                if need <= cluster.device_memory_gb * GB:
                    fits.append(cand)
                elif best_miss is None or need < best_miss[0]:
                    best_miss = (need, layout)
    if not fits:
        if best_miss is None:
            raise CostError(f"no dp x cp x tp x pp layout of {cluster.devices} devices suits this model and "
                            f"a global batch of {global_batch}; check that heads, vocabulary and batch "
                            "divide")
        need, layout = best_miss
        raise CostError(
            f"{model.name or 'the model'} fits on no layout of {cluster.devices} "
            f"device{'s' if cluster.devices > 1 else ''} of "
            f"{cluster.device_memory_gb:g} GB: the leanest ({layout.name}) needs {need / GB:.1f} GB per "
            f"device, {need / GB - cluster.device_memory_gb:.1f} GB too many; add devices or memory")
    fits.sort(key=lambda c: (round(c.step_s, 9), c.memory.total))  # equal times: the leaner first
    return fits[:top] if top else fits


# --------------------------------------------------------------------------------- the calculator


def format_bytes(n: float) -> str:
    """Bytes in decimal units, 3 significant digits: ``1.23 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(float(f"{n:.3g}")) >= size:  # round first: 999.7 MB is "1 GB", not "1e+03 MB"
            return f"{float(f'{n / size:.3g}'):g} {unit}"
    return f"{n:.0f} B"


_LAYOUT_FIELDS = {f.name: f.type for f in dataclasses.fields(Layout)}


def calculate(inputs: dict[str, Any]) -> dict[str, Any]:
    """The calculator's one entry point (JSON in, JSON out): the page and the tests call it alike.

    `inputs`: ``preset`` (a key of `PRESETS`) or ``model`` (the fields of `Model`), the fields of
    `Layout` (``cp`` included), ``global_batch``, ``precision`` and ``device_memory_gb``. Returns
    memory per rank of the worst stage (bytes), whether it fits, bytes each rank sends per step by
    group (``dp``: the gradients' dp x cp group; ``cp``: ring attention's K/V and dK/dV blocks;
    ``total``), the bubble and the parameter count; or ``{"error": "<one line>"}``.
    """
    try:
        if inputs.get("preset"):
            if inputs["preset"] not in PRESETS:
                raise CostError(f"unknown preset {inputs['preset']!r}; use one of {', '.join(PRESETS)}")
            model = PRESETS[inputs["preset"]]
        else:
            spec = dict(inputs.get("model") or {})
            unknown = sorted(set(spec) - {f.name for f in dataclasses.fields(Model)})
            if unknown:
                raise CostError(f"unknown model field(s) {unknown}")
            model = Model(**{k: (int(v) if k not in ("bias", "dropout", "name") else v)
                             for k, v in spec.items()}).validate()
        values = {k: inputs[k] for k in _LAYOUT_FIELDS if k in inputs}
        for k in ("dp", "tp", "pp", "cp", "zero", "microbatches", "virtual_stages"):
            if k in values:
                values[k] = int(values[k])
        if "sequence_parallel" in values:
            values["sequence_parallel"] = bool(values["sequence_parallel"])
        layout = Layout(**values)
        global_batch = int(inputs.get("global_batch", layout.dp * layout.microbatches))
        precision = inputs.get("precision", "mixed")
        device_gb = float(inputs.get("device_memory_gb", 80))
        mem = memory(model, layout, global_batch, precision)
        sent: dict[str, float] = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "cp": 0.0}
        for term in communication(model, layout, global_batch, precision, mem.stage):
            sent["pp" if term.group == "embedding" else term.group] += term.wire_bytes
        sent["total"] = sent["dp"] + sent["tp"] + sent["pp"] + sent["cp"]
        bubble = bubble_fraction(layout.pp, layout.microbatches, layout.virtual_stages)
        return {"model": model.name or "custom", "num_params": num_params(model), "layout": layout.name,
                "stage": mem.stage, "memory": mem.as_dict(), "device_memory": device_gb * GB,
                "fits": mem.total <= device_gb * GB, "communication": sent, "bubble": bubble, "error": None}
    except (CostError, TypeError, ValueError) as e:
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}

