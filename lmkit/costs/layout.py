"""A model and a layout on paper: shapes, parameters, FLOPs, the rules of a layout, what each stage holds.

`Model` is lmkit's GPT by its shape and options (`PRESETS`: GPT-2 124M, Llama 2 and 3, GPT-3 175B);
`Layout` is a ``dp x cp x tp x pp`` layout with ZeRO stage, sequence parallelism, microbatches,
schedule and recomputation, and `Layout.validate` refuses what the engines refuse, in one line.
`parameter_table` lists every tensor with how tensor parallelism splits it; `stage_params`, `stage_counts` and
`zero_buckets` say what one pipeline rank holds. `flops_per_token` and `mfu` are the FLOPs a token
costs and the share of the devices' peak (`PEAK_FLOPS`) a run reaches; `kv_cache_bytes` what decoding
keeps per token. Pure Python, like all of `lmkit.costs`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GB", "SCHEDULES", "RECOMPUTE", "PRECISIONS", "MLP_CHOICES", "POS_CHOICES", "NORM_CHOICES", "CostError",
    "swiglu_width", "Model", "PRESETS", "layer_split", "Param", "parameter_table", "num_params",
    "flops_per_token", "kv_cache_bytes", "mfu", "PEAK_FLOPS", "lookup_peak_flops", "Layout", "tp_choices",
    "stage_chunks", "stage_params", "stage_counts", "zero_buckets", "padded_numel", "muon_tensors",
    "REDUCE_DTYPES", "BUCKET_CAP_BYTES", "state_bytes", "muon_buckets", "active_params", "inactive_params",
    "stage_experts", "expert_buckets",
]

GB = 1e9
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("fp32", "mixed")
#: dtypes in which mixed precision accumulates and reduces gradients (`lmkit.config.TrainConfig.reduce_dtype`)
REDUCE_DTYPES = ("fp32", "bf16")
#: the engine's gradient bucket cap, in bytes (`lmkit.parallel.data_parallel.DataParallel`, 25 MiB as DDP)
BUCKET_CAP_BYTES = 25 * 2**20


class CostError(ValueError):
    """An impossible model, layout or request; the message names the problem and the fix."""


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


# --------------------------------------------------------------------------------- the model


#: The choices of the model options, as `lmkit.config.ModelConfig` names them (repeated here: this
#: package imports nothing from lmkit outside it, so that it runs in the browser).
MLP_CHOICES = ("plain", "swiglu")
POS_CHOICES = ("learned", "rope")
NORM_CHOICES = ("layer", "rms")


def swiglu_width(d_model: int, multiple: int = 32) -> int:
    """Default hidden width of a SwiGLU MLP, = `lmkit.config.swiglu_width`: 8/3 d_model rounded up
    to a multiple of `multiple` (the three matrices then hold about as many parameters as a plain
    MLP's two of 4 d_model)."""
    return -(-8 * d_model // (3 * multiple)) * multiple


@dataclass(frozen=True)
class Model:
    """lmkit's GPT by its shape and options; the defaults are GPT-2's network.

    GPT-2: learned positions, LayerNorm, a plain 4h MLP, as many key/value heads as query heads, the
    head tied to the token embedding. The options are those of `lmkit.config.ModelConfig`, with its
    conventions: ``n_kv_head`` key/value heads (grouped-query attention; 0 = ``n_head``), ``mlp``
    ``"plain"`` or ``"swiglu"`` (a fused ``[gate | up]`` projection) of hidden width ``d_ff``
    (0 = 4 d_model plain, `swiglu_width` gated), ``tie_embeddings``, ``pos`` (``"rope"``: no position
    table), ``norm`` (``"rms"``: weight only), ``qk_norm`` (a head_dim gain for q and one for k) and
    ``bias``. `from_config` reads them off a ModelConfig; ``PRESETS`` holds published models.

    Experts (`lmkit.experts.MoE`, chapter 5 "Experts"), with ModelConfig's names and defaults:
    ``n_experts`` routed experts (0 = dense) in every ``moe_every``-th block (blocks ``i`` with
    ``(i + 1) % moe_every == 0``), each token sent to ``moe_top_k`` of them; an expert is an MLP of the
    model's kind of hidden width ``moe_d_ff`` (0 = the dense MLP's `ffn_width`) *without biases*; the
    router is ``Linear(d, E)`` without bias; ``n_shared_experts`` shared experts are one dense MLP of
    width ``n_shared_experts x expert_width`` (with the model's bias setting) every token passes.
    """

    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    bias: bool = True
    dropout: bool = False
    name: str = ""
    n_kv_head: int = 0
    mlp: str = "plain"
    d_ff: int = 0
    tie_embeddings: bool = True
    pos: str = "learned"
    norm: str = "layer"
    qk_norm: bool = False
    n_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1
    moe_d_ff: int = 0
    n_shared_experts: int = 0

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> Model:
        """From an `lmkit.config.ModelConfig` (or anything with the same attributes; options it
        lacks take GPT-2's values)."""
        get = functools.partial(getattr, config)
        return cls(n_layer=config.n_layer, d_model=config.d_model, n_head=config.n_head,
                   vocab_size=config.vocab_size, seq_len=config.block_size, bias=bool(config.bias),
                   dropout=float(get("dropout", 0.0)) > 0, name=name, n_kv_head=int(get("n_kv_head", 0)),
                   mlp=get("mlp", "plain"), d_ff=int(get("d_ff", 0)),
                   tie_embeddings=bool(get("tie_embeddings", True)), pos=get("pos", "learned"),
                   norm=get("norm", "layer"), qk_norm=bool(get("qk_norm", False)),
                   n_experts=int(get("n_experts", 0)), moe_top_k=int(get("moe_top_k", 2)),
                   moe_every=int(get("moe_every", 1)), moe_d_ff=int(get("moe_d_ff", 0)),
                   n_shared_experts=int(get("n_shared_experts", 0))).validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block: `n_kv_head`, or `n_head` (multi-head attention) when 0."""
        return self.n_kv_head or self.n_head

    @property
    def kv_width(self) -> int:
        """Features of the keys (and of the values) of one token: ``kv_heads x head_dim``."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_width(self) -> int:
        """Hidden width of the MLP: `d_ff`, or its default for the MLP kind."""
        if self.d_ff:
            return self.d_ff
        return swiglu_width(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model

    @property
    def expert_width(self) -> int:
        """Hidden width of one expert: `moe_d_ff`, or the dense MLP's (`ffn_width`)."""
        return self.moe_d_ff or self.ffn_width

    def is_moe_block(self, i: int) -> bool:
        """Whether block `i` holds experts (= `lmkit.config.ModelConfig.is_moe_block`)."""
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_blocks(self) -> int:
        """How many blocks hold experts."""
        return sum(self.is_moe_block(i) for i in range(self.n_layer))

    @property
    def expert_numel(self) -> int:
        """Parameters of one expert: ``3 d w`` gated (fused ``[gate | up]`` and ``proj``), ``2 d w`` plain."""
        return (3 if self.mlp == "swiglu" else 2) * self.expert_width * self.d_model

    def validate(self) -> Model:
        for f in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CostError(f"model {f} must be a positive integer, got {value!r}")
        for f in ("n_kv_head", "d_ff", "n_experts", "moe_d_ff", "n_shared_experts"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CostError(f"model {f} must be an integer >= 0 (0 = the default), got {value!r}")
        for f, choices in (("mlp", MLP_CHOICES), ("pos", POS_CHOICES), ("norm", NORM_CHOICES)):
            if getattr(self, f) not in choices:
                raise CostError(f"model {f}={getattr(self, f)!r} is unknown; use one of {', '.join(choices)}")
        if self.d_model % self.n_head:
            raise CostError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                            "choose n_head dividing d_model")
        if self.n_head % self.kv_heads:
            raise CostError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head} (each "
                            f"key/value head serves n_head / n_kv_head query heads); choose n_kv_head among "
                            f"{', '.join(map(str, _divisors(self.n_head)))}")
        if self.n_experts:
            if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.n_experts:
                raise CostError(f"model moe_top_k={self.moe_top_k!r} must be in [1, n_experts="
                                f"{self.n_experts}]")
            if not isinstance(self.moe_every, int) or not 1 <= self.moe_every <= self.n_layer:
                raise CostError(f"model moe_every={self.moe_every!r} must be in [1, n_layer={self.n_layer}] "
                                "(some block must hold experts)")
        if self.pos == "rope" and self.head_dim % 2:
            raise CostError(f"pos='rope' turns pairs of a head's features: head_dim = d_model / n_head = "
                            f"{self.head_dim} must be even; change d_model or n_head")
        return self


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


#: Models for the calculator and `lmkit estimate`, with their published shapes. GPT-2's vocabulary is
#: padded to a multiple of 128 (50257 -> 50304, as Megatron and nanoGPT do) so that tp divides it.
#: Llama 2 (Touvron et al. 2023, table 1 and the released configurations) and Llama 3 (Dubey et al.
#: 2024, table 3): rotary positions, RMSNorm, SwiGLU, no biases, an output matrix of its own;
#: Llama 3 uses grouped-query attention with 8 key/value heads.
_LLAMA = {"bias": False, "mlp": "swiglu", "tie_embeddings": False, "pos": "rope", "norm": "rms"}
PRESETS: dict[str, Model] = {
    "gpt2-124m": Model(12, 768, 12, 50304, 1024, name="GPT-2 124M"),
    "llama2-7b": Model(32, 4096, 32, 32000, 4096, name="Llama 2 7B", n_kv_head=32, d_ff=11008, **_LLAMA),
    "llama2-13b": Model(40, 5120, 40, 32000, 4096, name="Llama 2 13B", n_kv_head=40, d_ff=13824, **_LLAMA),
    "llama3-8b": Model(32, 4096, 32, 128256, 8192, name="Llama 3 8B", n_kv_head=8, d_ff=14336, **_LLAMA),
    "llama3-70b": Model(80, 8192, 64, 128256, 8192, name="Llama 3 70B", n_kv_head=8, d_ff=28672, **_LLAMA),
    "gpt3-175b": Model(96, 12288, 96, 50304, 2048, name="GPT-3 175B"),
    # Mixtral 8x7B (Jiang et al. 2024, table 1): Mistral 7B's shape with 8 SwiGLU experts of width
    # 14336 in every block, top-2; 46.7B parameters, 12.9B active. Trained at 32k tokens; 4096 here
    # (the sequence length of the estimate; `dataclasses.replace` or ``--seq-len`` changes it).
    "mixtral-8x7b": Model(32, 4096, 32, 32000, 4096, name="Mixtral 8x7B", n_kv_head=8, d_ff=14336,
                          n_experts=8, moe_top_k=2, **_LLAMA),
    # DeepSeek-V3-like (DeepSeek-AI 2024, section 4.2: 671B parameters, 37B active): 256 routed experts
    # of width 2048, top-8, one shared expert, d 7168, vocabulary 129280, 128 heads. Rounded where
    # the cost model has no name for the real thing: multi-head attention of head_dim 56 stands for
    # multi-head latent attention (205M parameters per layer against MLA's 187M: +1.1B), and the 58
    # blocks are DeepSeek-V3's 58 MoE blocks without its first 3 dense ones (-1.7B: moe_every cannot
    # say "the first 3 dense"); the multi-token-prediction module (14B) is left out, as in the
    # published 671B. The two roundings partly cancel: 670.3B in all (-0.1%), 36.9B active (-0.4%).
    "deepseek-v3-like": Model(58, 7168, 128, 129280, 4096, name="DeepSeek-V3-like", d_ff=18432,
                              n_experts=256, moe_top_k=8, moe_d_ff=2048, n_shared_experts=1, **_LLAMA),
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
    split: str  # "column" (output rows), "row" (input columns), "vocab", "replicated" or "expert"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, tp: int, ep: int = 1) -> int:
        """Elements on one rank: an "expert" tensor (``[E, ...]``) holds E / ep whole experts, the same
        on every tp rank; "replicated" is whole; the others are split over tp."""
        if self.split == "expert":
            return self.numel // ep
        return self.numel if self.split == "replicated" else self.numel // tp


def parameter_table(model: Model, layers: range | None = None, first: bool = True, last: bool = True,
                    head_copy: bool = False) -> list[Param]:
    """The parameter tensors of a stage holding `layers` (all by default), in registration order.

    `first` adds the embeddings (the position table only with learned positions), `last` the final
    norm and an untied head's own matrix; `head_copy` the last stage's own copy of the tied embedding
    matrix (when the embedding lives on another pipeline stage). The same names and shapes as
    ``GPT.named_parameters()``; `split` is what the tensor-parallel plan does with each: ``attn.qkv``
    in whole heads of each of q, k and v, SwiGLU's fused ``mlp.fc`` in each of its halves (both
    "column"), ``q_norm``/``k_norm`` replicated. A block with experts holds ``mlp.router.gate``
    (``[E, d]``, replicated: every tp rank routes its own tokens under sequence parallelism), the
    stacked experts ``mlp.experts.fc`` (``[E, 2w or w, d]``) and ``mlp.experts.proj`` (``[E, d, w]``),
    split "expert" (E / ep whole experts per rank, not split over tp), and a shared expert
    ``mlp.shared`` (a dense MLP, split as ``mlp``).
    """
    h, V, s = model.d_model, model.vocab_size, model.seq_len
    hd, f = model.head_dim, model.ffn_width
    layers = range(model.n_layer) if layers is None else layers
    out: list[Param] = []

    def norm(name: str) -> None:
        out.append(Param(f"{name}.weight", (h,), "replicated"))
        if model.bias and model.norm == "layer":  # RMSNorm has no bias
            out.append(Param(f"{name}.bias", (h,), "replicated"))

    def linear(name: str, n_out: int, n_in: int, split: str) -> None:
        out.append(Param(f"{name}.weight", (n_out, n_in), split))
        if model.bias:  # a column-parallel layer splits its bias too; a row-parallel one replicates it
            out.append(Param(f"{name}.bias", (n_out,), "column" if split == "column" else "replicated"))

    if first:
        out.append(Param("tok_emb.weight", (V, h), "vocab"))
        if model.pos == "learned":
            out.append(Param("pos_emb.weight", (s, h), "replicated"))
    for i in layers:
        b = f"blocks.{i}"
        norm(f"{b}.ln1")
        linear(f"{b}.attn.qkv", (model.n_head + 2 * model.kv_heads) * hd, h, "column")
        linear(f"{b}.attn.proj", h, h, "row")
        if model.qk_norm:
            out += [Param(f"{b}.attn.q_norm.weight", (hd,), "replicated"),
                    Param(f"{b}.attn.k_norm.weight", (hd,), "replicated")]
        norm(f"{b}.ln2")
        if model.is_moe_block(i):
            E, w, gated = model.n_experts, model.expert_width, model.mlp == "swiglu"
            out.append(Param(f"{b}.mlp.router.gate.weight", (E, h), "replicated"))
            out.append(Param(f"{b}.mlp.experts.fc", (E, 2 * w if gated else w, h), "expert"))
            out.append(Param(f"{b}.mlp.experts.proj", (E, h, w), "expert"))
            if model.n_shared_experts:
                sw = model.n_shared_experts * w
                linear(f"{b}.mlp.shared.fc", 2 * sw if gated else sw, h, "column")
                linear(f"{b}.mlp.shared.proj", h, sw, "row")
        else:
            linear(f"{b}.mlp.fc", 2 * f if model.mlp == "swiglu" else f, h, "column")
            linear(f"{b}.mlp.proj", h, f, "row")
    if last:
        norm("ln_f")
        if head_copy or not model.tie_embeddings:
            out.append(Param("head.weight", (V, h), "vocab"))
    return out


@functools.lru_cache(maxsize=256)  # the search asks for every layout it ranks
def num_params(model: Model, non_embedding: bool = False) -> int:
    """Parameters of the whole model, a tied head counted once (= ``GPT.num_params``).

    ``non_embedding`` leaves out the token embedding and the position table (not an untied head).
    """
    n = sum(p.numel for p in parameter_table(model))
    if non_embedding:
        n -= (model.vocab_size + (model.seq_len if model.pos == "learned" else 0)) * model.d_model
    return n


def inactive_params(model: Model) -> int:
    """Expert parameters a token does *not* use: ``E - k`` experts of every block with experts
    (= `lmkit.experts.inactive_expert_parameters`)."""
    if not model.n_experts:
        return 0
    return model.moe_blocks * (model.n_experts - model.moe_top_k) * model.expert_numel


def active_params(model: Model, non_embedding: bool = False) -> int:
    """Parameters one token uses: `num_params` less the ``E - k`` experts of every MoE block it is not
    routed to (`inactive_params`). A dense model's active parameters are all of them."""
    return num_params(model, non_embedding) - inactive_params(model)


def flops_per_token(model: Model, training: bool = True) -> float:
    """``6 N + 12 L h s`` for training, ``2 N + 4 L h s`` forward only (PaLM, appendix B).

    N counts the non-embedding parameters plus, when tied, the head's V x h matmul (an untied head is
    among the non-embedding parameters already); = ``GPT.flops_per_token``. Grouped-query attention
    changes N (a smaller qkv), not the attention term: the scores are those of all ``n_head`` queries.
    With experts N counts the *active* parameters (`active_params`): a token runs k of E experts (the
    router's ``d E`` matmul is counted, the dispatch's gathers are not FLOPs).
    """
    head = model.d_model * model.vocab_size if model.tie_embeddings else 0
    n = active_params(model, non_embedding=True) + head
    attn = 4 * model.n_layer * model.d_model * model.seq_len
    return float(6 * n + 3 * attn) if training else float(2 * n + attn)


def kv_cache_bytes(model: Model, batch: int = 1, length: int | None = None, act_bytes: int = 2,
                   tp: int = 1) -> float:
    """Bytes of the KV cache for `batch` sequences of `length` tokens (default `seq_len`), per
    tensor-parallel rank: ``2 L KV hd e`` per token and sequence, keys and values of the ``KV``
    key/value heads only (grouped-query attention divides the cache by ``n_head / KV``), split
    over tp with the heads. = what `lmkit.model.KVCache` allocates (``[2, B, KV, T, hd]`` per layer).
    """
    length = model.seq_len if length is None else length
    if tp < 1 or model.kv_heads % tp:
        raise CostError(f"n_kv_head={model.kv_heads} is not divisible by tp={tp}; choose tp among "
                        f"{', '.join(map(str, tp_choices(model)))}")
    return float(2 * model.n_layer * model.kv_heads // tp * model.head_dim * act_bytes * batch * length)


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
        for name, width in _tp_widths(model):
            if width % self.tp:
                raise CostError(f"the {name}{width} is not divisible by tp={self.tp}; its hidden "
                                "features are split over tensor-parallel ranks: choose tp among "
                                f"{', '.join(map(str, tp_choices(model)))}")
        if self.ep > 1 and not model.n_experts:
            raise CostError(f"ep={self.ep} splits experts, but the model has none; set n_experts or ep=1")
        if (self.dp * self.cp) % self.ep:
            raise CostError(f"ep={self.ep} does not divide dp x cp = {self.dp * self.cp}: the expert-"
                            f"parallel ranks are carved out of dp x cp; choose ep among "
                            f"{', '.join(map(str, _divisors(self.dp * self.cp)))}")
        if model.n_experts % self.ep:
            raise CostError(f"ep={self.ep} does not divide n_experts={model.n_experts} (each ep rank holds "
                            f"E / ep whole experts); choose ep among "
                            f"{', '.join(map(str, _divisors(model.n_experts)))}")
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


def _tp_widths(model: Model) -> list[tuple[str, int]]:
    """The hidden widths tensor parallelism splits: the dense MLP's (when some block has one) and the
    shared expert's (experts themselves stay whole)."""
    out = [("MLP's width d_ff=", model.ffn_width)] if model.moe_blocks < model.n_layer else []
    if model.n_experts and model.n_shared_experts:
        out.append(("shared expert's width (n_shared_experts x expert width) ",
                    model.n_shared_experts * model.expert_width))
    return out


def tp_choices(model: Model) -> list[int]:
    """The tensor-parallel sizes the model's shape allows: divisors of the query heads, the key/value
    heads and the MLP's width (and a shared expert's; the vocabulary must divide too; pad it)."""
    return [t for t in _divisors(model.kv_heads)
            if not model.n_head % t and all(w % t == 0 for _, w in _tp_widths(model))]


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
    among the matrices); cached, because the search asks again and again."""
    schedule = "interleaved" if virtual_stages > 1 else "1f1b"
    layout = Layout(pp=pp, virtual_stages=virtual_stages, schedule=schedule)
    chunks = stage_chunks(model, layout, stage)
    params = stage_params(model, layout, stage)
    mats = sum(p.local_numel(tp, ep) for p in params if len(p.shape) >= 2)
    vecs = sum(p.local_numel(tp, ep) for p in params if len(p.shape) < 2)
    replicated = sum(p.numel for p in params if p.split == "replicated")
    layers = [len(c[0]) for c in chunks]
    return (mats, vecs, len(params), replicated, sum(layers), max(layers),
            int(any(c[1] for c in chunks)), int(any(c[2] for c in chunks)))


@functools.lru_cache(maxsize=4096)
def _stage_experts(model: Model, pp: int, virtual_stages: int, stage: int, ep: int) -> tuple[int, int, int]:
    layout = Layout(pp=pp, virtual_stages=virtual_stages,
                    schedule="interleaved" if virtual_stages > 1 else "1f1b")
    chunks = stage_chunks(model, layout, stage)
    params = [p for p in stage_params(model, layout, stage) if p.split == "expert"]
    moe = sum(model.is_moe_block(i) for layers, _, _ in chunks for i in layers)
    return sum(p.local_numel(1, ep) for p in params), len(params), moe


def stage_experts(model: Model, layout: Layout, stage: int) -> tuple[int, int, int]:
    """(expert elements, expert tensors, MoE blocks) on one rank of pipeline rank `stage`: the E / ep
    experts of each MoE block of the stage, whole (the same on every tp rank)."""
    return _stage_experts(model, layout.pp, layout.virtual_stages, stage, layout.ep)


def expert_buckets(model: Model, layout: Layout, stage: int, grad_bytes: int = 4) -> list[int]:
    """Elements of the flat gradient buckets of the expert parameters of pipeline rank `stage`
    (reduced over the expert-data-parallel group, not over dp x cp): the rule of `zero_buckets` for
    the tensors `zero_buckets` leaves out, E / ep experts each; padded to a multiple of
    ``dp x cp / ep`` under ZeRO."""
    return list(_expert_buckets(model, layout.pp, layout.virtual_stages, stage, layout.ep,
                                BUCKET_CAP_BYTES // grad_bytes))


@functools.lru_cache(maxsize=4096)
def _expert_buckets(model: Model, pp: int, virtual_stages: int, stage: int, ep: int,
                    cap: int) -> tuple[int, ...]:
    layout = Layout(pp=pp, virtual_stages=virtual_stages,
                    schedule="interleaved" if virtual_stages > 1 else "1f1b")
    runs: list[int] = []
    for p in reversed([p for p in stage_params(model, layout, stage) if p.split == "expert"]):
        n = p.local_numel(1, ep)
        if not runs or runs[-1] + n > cap:
            runs.append(n)
        else:
            runs[-1] += n
    return tuple(runs)


def muon_tensors(model: Model, layout: Layout, stage: int) -> tuple[int, int]:
    """(elements, tensors) of the matrices Muon steps on pipeline rank `stage` after the tp split: the
    blocks' 2-D weights (`lmkit.optim.is_muon_matrix`)."""
    mats = [p for p in stage_params(model, layout, stage)
            if len(p.shape) == 2 and p.name.startswith("blocks.")]
    return sum(p.local_numel(layout.tp) for p in mats), len(mats)


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
    params = [p for p in stage_params(model, layout, stage) if p.split != "expert"]
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
