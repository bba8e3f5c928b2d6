"""The model on paper: its shape and options, published presets, its parameter tensors, FLOPs.

`Model` is lmkit's GPT by its shape and options (`PRESETS`: GPT-2 124M, Llama 2 and 3, GPT-3 175B,
Mixtral 8x7B, a DeepSeek-V3-like shape); `parameter_table` lists every tensor with how tensor parallelism
splits it, `num_params` and `active_params` count them, `tp_choices` are the tensor-parallel sizes its
shape allows. `flops_per_token` and `mfu` are the FLOPs a token costs and the share of the devices'
peak (`PEAK_FLOPS`) a run reaches; `kv_cache_bytes` what decoding keeps per token. Pure Python, like
all of `lmkit.costs`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GB", "MLP_CHOICES", "POS_CHOICES", "NORM_CHOICES", "CostError", "swiglu_width", "Model", "PRESETS",
    "divisors", "Param", "parameter_table", "num_params", "inactive_params", "active_params", "tp_widths",
    "tp_choices", "flops_per_token", "kv_cache_bytes", "mfu", "PEAK_FLOPS", "lookup_peak_flops",
]

GB = 1e9


class CostError(ValueError):
    """An impossible model, layout or request; the message names the problem and the fix."""



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
                            f"{', '.join(map(str, divisors(self.n_head)))}")
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


def divisors(n: int) -> list[int]:
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


@dataclass(frozen=True)
class Param:
    """One parameter tensor: its name, shape and how tensor parallelism splits it.

    ``trainable=False`` is a tensor without gradient (``requires_grad=False``: a router's
    ``expert_bias``, which the trainer moves itself): no gradient, no optimizer state, not among the
    parameters `num_params` counts; the engines keep it in fp32, whole on every rank of its stage
    (neither ZeRO nor ep shards it) and in no gradient bucket.
    """

    name: str
    shape: tuple[int, ...]
    split: str  # "column" (output rows), "row" (input columns), "vocab", "replicated" or "expert"
    trainable: bool = True

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
    "column"), ``q_norm``/``k_norm`` replicated. A block with experts holds the router's
    ``mlp.router.expert_bias`` (``[E]``, the balancing bias, ``trainable=False``) and ``mlp.router.gate``
    (``[E, d]``, replicated: every tp rank routes its own tokens under sequence parallelism), the
    stacked experts ``mlp.experts.fc`` (``[E, 2w or w, d]``) and ``mlp.experts.proj`` (``[E, d, w]``),
    split "expert" (E / ep whole experts per rank, not split over tp), and a shared expert
    ``mlp.shared`` (a dense MLP, split as ``mlp``).
    """
    return list(_parameter_table(model, layers, first, last, head_copy))


@functools.lru_cache(maxsize=4096)  # a layout search asks for the same stages hundreds of thousands of times
def _parameter_table(model: Model, layers: range | None, first: bool, last: bool,
                     head_copy: bool) -> tuple[Param, ...]:
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
            out.append(Param(f"{b}.mlp.router.expert_bias", (E,), "replicated", trainable=False))
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
    return tuple(out)


@functools.lru_cache(maxsize=256)  # the search asks for every layout it ranks
def num_params(model: Model, non_embedding: bool = False) -> int:
    """Parameters of the whole model, a tied head counted once (= ``GPT.num_params``).

    ``non_embedding`` leaves out the token embedding and the position table (not an untied head).
    Tensors without gradient (a router's ``expert_bias``) are not parameters here, as in the GPT.
    """
    n = sum(p.numel for p in parameter_table(model) if p.trainable)
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


def tp_widths(model: Model) -> list[tuple[str, int]]:
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
    return [t for t in divisors(model.kv_heads)
            if not model.n_head % t and all(w % t == 0 for _, w in tp_widths(model))]


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
