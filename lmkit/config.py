"""Configuration dataclasses for the model, the training run and the parallel layout.

Every knob of a run lives in one of three dataclasses so that a run can be described by a
TOML file, overridden on the command line, stored in a checkpoint and compared across runs.
Each class validates itself (`validate()`) and raises a `ConfigError` whose message names the
offending field and the fix, *before* any process starts real work. Each field carries its
one-line description and, where the values are enumerated, its choices (``field(metadata=...)``,
read with `describe`): the TOML file and ``lmkit train --help`` share them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "ParallelConfig",
    "from_dict",
    "to_dict",
    "describe",
    "CORPUS_NAMES",
    "NONFINITE_POLICIES",
    "MODEL_OPTION_DEFAULTS",
    "PRESETS",
    "model_preset",
    "swiglu_width",
]

CORPUS_NAMES = ("kjv", "tang", "tinyshakespeare")  # = lmkit.data.CORPORA (kept here: no torch import)
NONFINITE_POLICIES = ("stop", "skip")
POS_CHOICES = ("learned", "rope")
NORM_CHOICES = ("layer", "rms")
ACTIVATION_CHOICES = ("gelu", "relu2")
MLP_CHOICES = ("plain", "swiglu")
OPTIMIZER_CHOICES = ("adamw", "muon")
ROUTER_CHOICES = ("softmax", "sigmoid")
#: Options of ModelConfig beyond GPT-2's network, with the value that is GPT-2's.
MODEL_OPTION_DEFAULTS = {"pos": "learned", "norm": "layer", "qk_norm": False, "activation": "gelu",
                         "n_kv_head": 0, "mlp": "plain", "d_ff": 0, "tie_embeddings": True,
                         "rope_theta": 10000.0, "n_experts": 0}
#: The Llama-style network (Touvron et al. 2023; Llama 3, Qwen, Mistral share it): rotary positions,
#: RMSNorm, a SwiGLU MLP, no biases, an output layer of its own; grouped-query attention with half
#: as many key/value heads as query heads unless `n_kv_head` is given (`model_preset`).
PRESETS = {
    "gpt2": {},
    "llama": {"pos": "rope", "norm": "rms", "mlp": "swiglu", "bias": False, "tie_embeddings": False},
}


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its one-line description (and choices) for the CLI and the docs."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


def describe(f: dataclasses.Field) -> tuple[str, tuple | None]:
    """(one-line help, choices or None) of a config field."""
    return f.metadata.get("help", ""), f.metadata.get("choices")


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message says what to change."""


@dataclass
class ModelConfig:
    """Shape of the language model.

    `arch` selects the network: ``"gpt"`` (decoder-only Transformer) or ``"lstm"`` (the
    recurrent baseline of the source document). The LSTM uses `d_model`, `n_layer`,
    `vocab_size`, `dropout` and ignores the attention fields.
    """

    vocab_size: int = _opt(256, "vocabulary size (replaced by the tokenizer's)")
    block_size: int = _opt(128, "context length in tokens")
    n_layer: int = _opt(4, "number of Transformer blocks (LSTM layers for arch=lstm)")
    n_head: int = _opt(4, "attention heads per block (divides d_model; tp divides it)")
    d_model: int = _opt(128, "width of the residual stream")
    dropout: float = _opt(0.0, "dropout probability in [0, 1)")
    bias: bool = _opt(True, "biases in linear layers and LayerNorms")
    arch: str = _opt("gpt", "network: decoder-only Transformer or the LSTM baseline", ("gpt", "lstm"))
    # Model options (chapter 7, "Time to a given loss"); the defaults are GPT-2's network.
    pos: str = _opt("learned", "positions: a learned table added to the input, or rotary (on q, k)",
                    POS_CHOICES)
    norm: str = _opt("layer", "normalisation of the blocks and the output: LayerNorm or RMSNorm",
                     NORM_CHOICES)
    qk_norm: bool = _opt(False, "RMS-normalise each head's queries and keys before attention")
    activation: str = _opt("gelu", "activation of the plain MLP: GELU (tanh approximation) or ReLU squared",
                           ACTIVATION_CHOICES)
    n_kv_head: int = _opt(0, "key/value heads: grouped-query attention when fewer than n_head "
                          "(0 = n_head; divides n_head; tp divides it)")
    mlp: str = _opt("plain", "MLP: plain (up, activation, down) or gated SwiGLU (silu(gate) * up, down)",
                    MLP_CHOICES)
    d_ff: int = _opt(0, "hidden width of the MLP (0 = 4 d_model; swiglu: 8/3 d_model rounded up to a "
                     "multiple of 32)")
    tie_embeddings: bool = _opt(True, "the output layer reuses the token embedding's matrix")
    rope_theta: float = _opt(10000.0, "base of the rotary angles (pos=rope; Llama 3 uses 500000)")
    # Mixture of experts (chapter 5, "Experts"): n_experts > 0 replaces the MLP of every moe_every-th block.
    n_experts: int = _opt(0, "routed experts of a mixture-of-experts MLP (0 = a dense MLP in every block)")
    moe_top_k: int = _opt(2, "experts each token is sent to (n_experts > 0)")
    moe_every: int = _opt(1, "experts in every k-th block (blocks k-1, 2k-1, ...); the others keep the MLP")
    moe_d_ff: int = _opt(0, "hidden width of one expert (0 = the dense MLP's width)")
    n_shared_experts: int = _opt(0, "shared experts every token passes through beside its routed ones")
    moe_router: str = _opt("softmax", "gate scores: softmax over the experts (Mixtral), or sigmoid "
                           "(DeepSeek-V3); the top-k weights are renormalised to sum to 1", ROUTER_CHOICES)
    moe_aux_coef: float = _opt(0.01, "weight of the load-balancing loss E * sum_i f_i P_i (0 = none)")
    moe_bias_rate: float = _opt(0.0, "auxiliary-loss-free balancing: after each step move every expert's "
                                "routing bias by this toward the mean load (0 = off; DeepSeek-V3: 0.001)")
    moe_capacity: float = _opt(0.0, "capacity factor: an expert takes at most ceil(c * tokens * k / E) "
                               "tokens, the rest are dropped (0 = dropless)")

    def validate(self) -> ModelConfig:
        if self.arch not in ("gpt", "lstm"):
            raise ConfigError(f"model.arch={self.arch!r} is unknown; use 'gpt' or 'lstm'")
        choices_of = {"pos": POS_CHOICES, "norm": NORM_CHOICES, "activation": ACTIVATION_CHOICES}
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is unknown; use one of {choices}")
        if self.arch == "lstm" and self.options():
            raise ConfigError(f"model options {self.options()} apply to arch='gpt' only; "
                              "drop them for the LSTM")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.arch == "gpt" and self.d_model % self.n_head != 0:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"choose n_head among the divisors of d_model (e.g. {_divisors(self.d_model)})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp not in MLP_CHOICES:
            raise ConfigError(f"model.mlp={self.mlp!r} is unknown; use one of {MLP_CHOICES}")
        if self.mlp == "swiglu" and self.activation != "gelu":
            raise ConfigError(f"model.activation={self.activation!r} applies to mlp='plain'; SwiGLU's "
                              "activation is its SiLU gate: drop --activation or use --mlp plain")
        for name in ("n_kv_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{name} must be an integer >= 0 (0 = the default), got {value!r}")
        if self.arch == "gpt" and self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}: each "
                f"key/value head serves n_head/n_kv_head query heads; choose n_kv_head among "
                f"{[k for k in range(1, self.n_head + 1) if self.n_head % k == 0]}")
        self._validate_experts()
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be positive, got {self.rope_theta!r}")
        if self.arch == "gpt" and self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"pos='rope' turns pairs of a head's features: head_dim = d_model/n_head = "
                              f"{self.head_dim} must be even; change d_model or n_head")
        return self

    def _validate_experts(self) -> None:
        for name in ("n_experts", "moe_d_ff", "n_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"model.{name} must be an integer >= 0, got {value!r}")
        if not self.n_experts:
            return
        if self.moe_router not in ROUTER_CHOICES:
            raise ConfigError(f"model.moe_router={self.moe_router!r} is unknown; use one of {ROUTER_CHOICES}")
        if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.n_experts:
            raise ConfigError(f"model.moe_top_k={self.moe_top_k!r} must be in "
                              f"[1, n_experts={self.n_experts}]")
        if not isinstance(self.moe_every, int) or not 1 <= self.moe_every <= self.n_layer:
            raise ConfigError(f"model.moe_every={self.moe_every!r} must be in [1, n_layer={self.n_layer}] "
                              "(some block must hold experts)")
        for name in ("moe_aux_coef", "moe_bias_rate", "moe_capacity"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)!r}")

    def is_moe_block(self, i: int) -> bool:
        """Whether block `i` holds experts (every `moe_every`-th block: k-1, 2k-1, ...)."""
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0

    @property
    def expert_width(self) -> int:
        """Hidden width of one expert: `moe_d_ff`, or the dense MLP's (`ffn_width`)."""
        return self.moe_d_ff or self.ffn_width

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads per block: `n_kv_head`, or `n_head` (multi-head attention) when 0."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_width(self) -> int:
        """Hidden width of the MLP: `d_ff`, or its default for the MLP kind (`swiglu_width`)."""
        if self.d_ff:
            return self.d_ff
        return swiglu_width(self.d_model) if self.mlp == "swiglu" else 4 * self.d_model

    def options(self) -> dict[str, Any]:
        """The model options that differ from GPT-2's network (empty for the default model)."""
        return {name: getattr(self, name) for name, default in MODEL_OPTION_DEFAULTS.items()
                if getattr(self, name) != default}


@dataclass
class TrainConfig:
    """Optimisation, data and bookkeeping for one training run."""

    corpus: str = _opt("kjv", "training text; join several with '+', e.g. kjv+tang", CORPUS_NAMES)
    tokenizer: str = _opt("char", "characters of the corpus, or byte-level BPE trained on it",
                          ("char", "bpe"))
    bpe_vocab_size: int = _opt(2048, "vocabulary size of the BPE tokenizer")
    batch_size: int = _opt(12, "sequences per optimizer step (global, over all data-parallel ranks)")
    grad_accum: int = _opt(1, "micro-steps per optimizer step (divides batch_size)")
    max_steps: int = _opt(2000, "optimizer steps of the run (the end of the cosine schedule)")
    lr: float = _opt(1e-3, "peak learning rate (after warmup)")
    min_lr: float = _opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "steps of linear warmup")
    weight_decay: float = _opt(0.1, "AdamW weight decay of matrices")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = no clipping)")
    eval_interval: int = _opt(250, "steps between validation losses (0 = none)")
    eval_iters: int = _opt(20, "validation batches per evaluation")
    log_interval: int = _opt(10, "steps between logged training losses")
    seed: int = _opt(1337, "seed of the weights, the batches and dropout")
    dtype: str = _opt("float32", "compute precision (autocast; float16 needs CUDA)",
                      ("float32", "bfloat16", "float16"))
    param_dtype: str = _opt("float32", "dtype of the weights the model computes with: float32, or bfloat16 "
                            "with fp32 master weights and optimizer states (needs dtype=bfloat16)",
                            ("float32", "bfloat16"))
    reduce_dtype: str = _opt("float32", "dtype in which gradients are accumulated and reduced over "
                             "data-parallel ranks (param_dtype=bfloat16): float32, or bfloat16 (half the "
                             "bytes)", ("float32", "bfloat16"))
    activation_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    compile: bool = _opt(False, "torch.compile the model (single process)")
    device: str = _opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N",
                       ("auto", "cpu", "cuda", "cuda:N"))
    num_threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    out_dir: str = _opt("runs/default", "run directory: checkpoints, latest, metrics.jsonl")
    checkpoint_interval: int = _opt(0, "steps between checkpoints (0 = only at the end)")
    tensorboard: bool = _opt(False, "also write TensorBoard scalars to out_dir/tensorboard")
    nonfinite: str = _opt("stop", "a non-finite loss or gradient norm: stop, or skip that update",
                          NONFINITE_POLICIES)
    max_skips: int = _opt(10, "with nonfinite=skip, stop once more steps than this were skipped in the run")
    timeout: float = _opt(300.0, "seconds a collective waits for the other ranks before this rank fails")
    optimizer: str = _opt("adamw", "AdamW for every tensor, or Muon for the blocks' matrices and AdamW "
                          "for the rest", OPTIMIZER_CHOICES)
    muon_lr: float = _opt(0.02, "peak learning rate of the Muon matrices (optimizer=muon)")
    muon_momentum: float = _opt(0.95, "Muon's momentum (optimizer=muon)")
    muon_precision: str = _opt("bfloat16", "precision of Muon's Newton-Schulz iteration: bf16 as "
                               "torch.optim.Muon, or fp32 (every layout then reproduces one process to "
                               "~1e-7)",
                               ("bfloat16", "float32"))

    def validate(self) -> TrainConfig:
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"train.tokenizer={self.tokenizer!r} is unknown; use 'char' or 'bpe'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"train.dtype={self.dtype!r} is unknown; use 'float32', 'bfloat16' or 'float16'"
            )
        if {self.param_dtype, self.reduce_dtype} - {"float32", "bfloat16"}:
            raise ConfigError(f"train.param_dtype={self.param_dtype!r} / reduce_dtype={self.reduce_dtype!r}: "
                              "use 'float32' or 'bfloat16' for each")
        if self.param_dtype == "bfloat16" and self.dtype != "bfloat16":
            raise ConfigError(f"train.param_dtype='bfloat16' computes in bf16 but train.dtype="
                              f"{self.dtype!r}; set dtype=bfloat16 (autocast keeps norms, softmax, loss "
                              "in fp32)")
        if self.reduce_dtype == "bfloat16" and self.param_dtype != "bfloat16":
            raise ConfigError("train.reduce_dtype='bfloat16' applies to bf16 weights with fp32 masters; set "
                              "param_dtype=bfloat16, or keep reduce_dtype=float32 (fp32 weights have fp32 "
                              "gradients)")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.checkpoint_interval < 0:
            raise ConfigError("train.warmup_steps, eval_interval and checkpoint_interval must be >= 0")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.grad_accum={self.grad_accum}; each micro-step needs a whole number of sequences"
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is unknown; use 'stop' or 'skip'")
        if not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ConfigError(f"train.max_skips must be an integer >= 0, got {self.max_skips!r}")
        if not self.timeout > 0:
            raise ConfigError(f"train.timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(f"train.optimizer={self.optimizer!r} is unknown; use 'adamw' or 'muon'")
        if self.muon_precision not in ("bfloat16", "float32"):
            raise ConfigError(f"train.muon_precision={self.muon_precision!r} is unknown; use 'bfloat16' or "
                              "'float32'")
        if not self.muon_lr > 0 or not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"need train.muon_lr > 0 and 0 <= train.muon_momentum < 1 "
                              f"(muon_lr={self.muon_lr}, muon_momentum={self.muon_momentum})")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0 (lr={self.lr}, "
                              f"min_lr={self.min_lr})")
        return self


#: pipeline schedules; the V ones hold chunks ``r`` and ``2 pp - 1 - r`` on rank ``r``
SCHEDULE_CHOICES = ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "dualpipev")
V_SCHEDULES = ("zb-v", "dualpipev")


@dataclass
class ParallelConfig:
    """The layout of a run over ``dp * cp * tp * pp`` processes (``ep`` groups inside dp x cp).

    Rank order is tp fastest, then cp, then dp, then pp (see `lmkit.parallel.mesh`).
    """

    dp: int = _opt(1, "data-parallel size")
    tp: int = _opt(1, "tensor-parallel size (divides n_head and the vocabulary)")
    pp: int = _opt(1, "pipeline-parallel size (stages)")
    cp: int = _opt(1, "context-parallel size: ring attention (block_size divisible by 2*cp)")
    ep: int = _opt(1, "expert-parallel size: the experts split over ep ranks carved out of dp x cp "
                   "(divides dp*cp and n_experts)")
    zero: int = _opt(0, "ZeRO stage: 0 off, 1 optimizer state, 2 also gradients, 3 also weights (native)",
                     (0, 1, 2, 3))
    microbatches: int = _opt(1, "microbatches per step through the pipeline")
    schedule: str = _opt("1f1b", "pipeline schedule: zb-h1 splits backward into input (B) and "
                         "weight (W) gradients; zb-v and dualpipev place two chunks per rank in a V",
                         SCHEDULE_CHOICES)
    virtual_stages: int = _opt(1, "model chunks per pipeline rank (interleaved schedule; 2 for zb-v and "
                               "dualpipev)")
    sequence_parallel: bool = _opt(False, "shard LayerNorm and dropout activations over tp (needs tp > 1)")
    engine: str = _opt("lmkit", "lmkit (from scratch) or native (FSDP2 / DTensor / pipelining)",
                       ("lmkit", "native"))

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    def validate(self, world_size: int | None = None) -> ParallelConfig:
        for name in ("dp", "tp", "pp", "cp", "ep", "microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero={self.zero} is unknown; use 0, 1, 2 (or 3 with engine=native)")
        if self.schedule not in SCHEDULE_CHOICES:
            raise ConfigError(
                f"parallel.schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULE_CHOICES)}"
            )
        if self.engine not in ("lmkit", "native"):
            raise ConfigError(f"parallel.engine={self.engine!r} is unknown; use 'lmkit' or 'native'")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ConfigError("parallel.schedule='interleaved' needs parallel.virtual_stages >= 2")
        if self.schedule in V_SCHEDULES and self.virtual_stages != 2:
            raise ConfigError(f"parallel.schedule={self.schedule!r} places two model chunks per rank in a V; "
                              f"set virtual_stages=2 (got {self.virtual_stages})")
        if self.schedule not in ("interleaved", *V_SCHEDULES) and self.virtual_stages != 1:
            raise ConfigError(
                f"parallel.virtual_stages={self.virtual_stages} only applies to "
                "schedule='interleaved' (or 2 for zb-v/dualpipev); set virtual_stages=1 or "
                "schedule='interleaved'"
            )
        if (self.dp * self.cp) % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} does not divide dp*cp = {self.dp}*{self.cp}: expert "
                              "parallelism splits the data-parallel ranks into groups of ep; choose ep among "
                              f"{_divisors(self.dp * self.cp)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"the world has {world_size} processes but dp*cp*tp*pp = {self.dp}*{self.cp}*{self.tp}*"
                f"{self.pp} = {self.world_size}; launch with torchrun --nproc_per_node={self.world_size} "
                "or change dp/cp/tp/pp"
            )
        return self


def swiglu_width(d_model: int, multiple: int = 32) -> int:
    """Default hidden width of a SwiGLU MLP: 8/3 d_model (its three matrices then hold as many
    parameters as a plain MLP's two of 4 d_model), rounded up to a multiple of `multiple`."""
    return -(-8 * d_model // (3 * multiple)) * multiple


def model_preset(name: str, **fields: Any) -> ModelConfig:
    """A `ModelConfig` of the network `name` (`PRESETS`: ``"gpt2"``, ``"llama"``) with `fields` on top.

    ``"llama"`` gives grouped-query attention with ``n_head // 2`` key/value heads (``n_head`` when it
    is odd) unless ``n_kv_head`` is among `fields`.
    """
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; use one of {sorted(PRESETS)}")
    values = {**PRESETS[name], **fields}
    if name == "llama" and "n_kv_head" not in fields:
        n_head = fields.get("n_head", ModelConfig.n_head)
        values["n_kv_head"] = n_head // 2 if n_head % 2 == 0 else n_head
    return ModelConfig(**values).validate()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:8]


def from_dict(cls: type, values: dict[str, Any] | None) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of known ones."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} option(s) {unknown}; known options: {sorted(known)}"
        )
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for JSON checkpoints and logs)."""
    return dataclasses.asdict(obj)

