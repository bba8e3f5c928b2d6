"""Configuration dataclasses for the model, the training run and the parallel layout.

Every knob of a run lives in one of three dataclasses so that a run can be described by a
TOML file, overridden on the command line, stored in a checkpoint and compared across runs.
Each class validates itself (`validate()`) and raises a `ConfigError` whose message names the
offending field and the fix, *before* any process starts real work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainConfig",
    "ParallelConfig",
    "from_dict",
    "to_dict",
]


class ConfigError(ValueError):
    """An impossible or inconsistent configuration; the message says what to change."""


@dataclass
class ModelConfig:
    """Shape of the language model.

    `arch` selects the network: ``"gpt"`` (decoder-only Transformer) or ``"lstm"`` (the
    recurrent baseline of the source document). The LSTM uses `d_model`, `n_layer`,
    `vocab_size`, `dropout` and ignores the attention fields.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    arch: str = "gpt"

    def validate(self) -> ModelConfig:
        if self.arch not in ("gpt", "lstm"):
            raise ConfigError(f"model.arch={self.arch!r} is unknown; use 'gpt' or 'lstm'")
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
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class TrainConfig:
    """Optimisation, data and bookkeeping for one training run."""

    corpus: str = "kjv"
    tokenizer: str = "char"  # "char" or "bpe"
    bpe_vocab_size: int = 2048
    batch_size: int = 12  # sequences per optimizer step (global, over all data-parallel ranks)
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    dtype: str = "float32"  # "float32", "bfloat16" or "float16" (autocast)
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_threads: int = 0  # 0 = leave torch's default
    out_dir: str = "runs/default"
    checkpoint_interval: int = 0  # 0 = only at the end
    tensorboard: bool = False

    def validate(self) -> TrainConfig:
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"train.tokenizer={self.tokenizer!r} is unknown; use 'char' or 'bpe'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"train.dtype={self.dtype!r} is unknown; use 'float32', 'bfloat16' or 'float16'"
            )
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
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0 (lr={self.lr}, "
                              f"min_lr={self.min_lr})")
        return self


@dataclass
class ParallelConfig:
    """The layout of a run over ``dp * tp * pp`` processes.

    Rank order is tp fastest, then dp, then pp (see `lmkit.parallel.mesh`).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0  # 0 = plain data parallel, 1 = shard optimizer state, 2 = also gradients
    microbatches: int = 1
    schedule: str = "1f1b"  # "gpipe", "1f1b" or "interleaved"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    engine: str = "lmkit"  # "lmkit" (from scratch) or "native" (FSDP2 / DTensor / pipelining)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self, world_size: int | None = None) -> ParallelConfig:
        for name in ("dp", "tp", "pp", "microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero={self.zero} is unknown; use 0, 1, 2 (or 3 with engine=native)")
        if self.schedule not in ("gpipe", "1f1b", "interleaved"):
            raise ConfigError(
                f"parallel.schedule={self.schedule!r} is unknown; use 'gpipe', '1f1b' or 'interleaved'"
            )
        if self.engine not in ("lmkit", "native"):
            raise ConfigError(f"parallel.engine={self.engine!r} is unknown; use 'lmkit' or 'native'")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise ConfigError("parallel.schedule='interleaved' needs parallel.virtual_stages >= 2")
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise ConfigError(
                f"parallel.virtual_stages={self.virtual_stages} only applies to "
                "schedule='interleaved'; set virtual_stages=1 or schedule='interleaved'"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"the world has {world_size} processes but dp*tp*pp = {self.dp}*{self.tp}*{self.pp} "
                f"= {self.world_size}; launch with torchrun --nproc_per_node={self.world_size} "
                "or change dp/tp/pp"
            )
        return self


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

