"""Everything a training run needs before its first step, shared by every entry point.

`prepare_run` goes corpus -> tokenizer -> token files -> seeded model (`Run`), so the CLI, the
notebooks, the benchmarks, the lab and the tests train the same way; `build_tokenizer` trains
(or reloads from the cache) the run's tokenizer. `resolve_device`, `configure_cuda_matmul` and
`peak_flops_of` pick the device, its matmul precision and the peak FLOP/s that MFU divides by;
`seed_everything` seeds every generator; `build_engine` cuts a model into this rank's part of a
parallel layout (`lmkit.parallel`). The trainer (`lmkit.train`) takes what they build.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.data import default_cache_dir, encode_to_file, load_splits, train_val_split
from lmkit.model import build_model
from lmkit.parallel.engine import ParallelEngine
from lmkit.parallel.instrument import peak_flops
from lmkit.parallel.native import NativeEngine
from lmkit.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "Run", "prepare_run", "build_tokenizer", "build_engine", "resolve_device", "configure_cuda_matmul",
    "peak_flops_of", "seed_everything",
]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return device


def configure_cuda_matmul(device: torch.device, autocast_dtype: torch.dtype | None,
                          allow_tf32: bool | None = None) -> bool:
    """Turn TF32 tensor cores on or off for fp32 matmuls on CUDA Ampere (sm_80) and later; returns
    whether they are on (always False on a CPU, where nothing is changed).

    ``allow_tf32=None`` (auto) turns them on for mixed-precision runs (bf16/fp16 autocast, where
    only a few fp32 matmuls remain) and leaves float32 runs in IEEE fp32, so that the fp32
    loss-compare of every parallel layout holds on a GPU too; True turns them on for float32 runs
    as well (several times the fp32 matmul throughput, products rounded to a 10-bit mantissa).
    The setting is process-wide (``torch.set_float32_matmul_precision``). Book: chapter 7.
    """
    if device.type != "cuda":
        return False
    wanted = autocast_dtype is not None if allow_tf32 is None else allow_tf32
    on = bool(wanted) and torch.cuda.get_device_capability(device)[0] >= 8
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on
    return on


def peak_flops_of(device: torch.device, autocast_dtype: torch.dtype | None, tf32: bool) -> float | None:
    """The dense peak FLOP/s MFU divides by: the GPU's (`lmkit.costs.PEAK_FLOPS`, by
    device name) for the dtype the matmuls run in; None (MFU unknown) on a CPU, an unknown GPU, or
    TF32, which the table does not list. Never a guess."""
    if device.type != "cuda":
        return None
    if tf32 and autocast_dtype is None:
        return None
    return peak_flops(device, autocast_dtype or torch.float32)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so runs are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- corpus to model


def build_tokenizer(cfg: TrainConfig, train_text: str, full_text: str,
                    cache_dir: Path | None = None) -> Tokenizer:
    """The run's tokenizer: characters of the whole corpus, or byte-level BPE trained on the split.

    A trained BPE is cached by (corpus, vocab size) because training it takes seconds to
    minutes and every run on the same corpus would otherwise repeat it.
    """
    if cfg.tokenizer == "char":
        return CharTokenizer.train(full_text)
    cache = (cache_dir or default_cache_dir()) / "tokenizers"
    path = cache / f"bpe-{cfg.corpus.replace('+', '_')}-{cfg.bpe_vocab_size}-{_text_hash(train_text)}.json"
    if path.is_file():
        return load_tokenizer(path)
    tokenizer = BPETokenizer.train(train_text, vocab_size=cfg.bpe_vocab_size)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
    return tokenizer


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass
class Run:
    """Everything a training run needs, built once by `prepare_run`."""

    model_config: ModelConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    model: nn.Module


def prepare_run(model_cfg: ModelConfig, train_cfg: TrainConfig, *, text: str | None = None,
                tokenizer: Tokenizer | None = None, cache_dir: Path | None = None, meta: bool = False) -> Run:
    """Corpus -> tokenizer -> token files -> seeded model. `text` overrides the named corpus.

    The model's vocabulary size always comes from the tokenizer (``model_cfg.vocab_size`` is
    replaced), so the two can never disagree. ``meta=True`` builds the model on the meta device
    (shapes and seed, no storage): what a parallel layout's `Trainer` takes, each rank then
    materialising only its own part (chapter 6, construction at scale).
    """
    train_cfg.validate()
    if text is None:
        train_text, val_text = load_splits(train_cfg.corpus, 0.1)
        full = train_text + val_text
    else:
        full = text
        train_text, val_text = train_val_split(full, 0.1)
    if tokenizer is None:
        tokenizer = build_tokenizer(train_cfg, train_text, full, cache_dir)
    if model_cfg.vocab_size != tokenizer.vocab_size:
        model_cfg = ModelConfig(**{**to_dict(model_cfg), "vocab_size": tokenizer.vocab_size})
    model_cfg.validate()
    tokens_dir = (cache_dir / "tokens") if cache_dir else None
    train_tokens = encode_to_file(train_text, tokenizer, tokens_dir)
    val_tokens = encode_to_file(val_text, tokenizer, tokens_dir)
    seed_everything(train_cfg.seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(model_cfg)
    return Run(model_cfg, train_cfg, tokenizer, train_tokens, val_tokens, model)


# --------------------------------------------------------------------------- a layout


def build_engine(model: nn.Module, parallel: ParallelConfig, cfg: TrainConfig, topology: Any) -> Any:
    """This rank's engine for the layout: `lmkit.parallel.engine.ParallelEngine` (from scratch) or
    `lmkit.parallel.native.NativeEngine`, cut from `model` (on the meta device: this rank's part
    only is ever allocated)."""
    if parallel.engine == "native":
        return NativeEngine(model, parallel, cfg, topology)
    return ParallelEngine(model, parallel, cfg, topology)
