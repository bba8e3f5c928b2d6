"""Sequence-to-sequence with a decoder-only model: the source is the prompt, the target its continuation.

A decoder-only GPT learns a mapping source -> target from examples written as one text,

    source SEP target EOS         (here: 繁體行 <tab> 简体行 <newline>)

with the loss computed on the target tokens only (the source positions get the ignore label
-100), so the model is trained to *continue* a source with its target, not to model sources.
At test time the source and SEP are the prompt and greedy decoding runs until EOS: the same
generator as free text (`lmkit.generate.generate_text`) with EOS as a stop string. This is how
GPT-style models do translation without an encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lmkit.generate import generate_text

__all__ = ["encode_pairs", "fit_seq2seq", "translate", "char_accuracy", "SEP", "EOS"]

SEP, EOS = "\t", "\n"


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of ``source SEP target EOS`` and the number of prompt tokens (source + SEP).

    Source and target are encoded separately, so the boundary is a token boundary.
    """
    out = []
    for source, target in pairs:
        prompt = tokenizer.encode(source + SEP)
        out.append((prompt + tokenizer.encode(target + EOS), len(prompt)))
    return out


def _batch(examples: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), L), pad_id, dtype=torch.long)
    y = torch.full((len(examples), L), -100, dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(examples):
        ids_t = torch.tensor(ids, dtype=torch.long)
        x[b, : len(ids) - 1] = ids_t[:-1]
        y[b, n_prompt - 1 : len(ids) - 1] = ids_t[n_prompt:]  # predict target tokens only
    return x, y


def fit_seq2seq(model: nn.Module, examples: Sequence[tuple[list[int], int]], *, steps: int,
                batch_size: int = 32, lr: float = 1e-3, seed: int = 0, pad_id: int = 0,
                callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Train on random batches of `examples` for `steps` AdamW steps (cosine learning rate)."""
    too_long = [len(ids) for ids, _ in examples if len(ids) - 1 > model.config.block_size]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than block_size={model.config.block_size} "
                         f"(longest {max(too_long)} tokens); filter them or use a larger block_size")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    history = []
    model.train()
    for step in range(steps):
        x, y = _batch([examples[i] for i in rng.integers(0, len(examples), batch_size)], pad_id)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        event = {"step": step + 1, "loss": loss.item()}
        history.append(event)
        if callback is not None:
            callback(event)
    model.eval()
    return history


def translate(model: nn.Module, tokenizer, sources: Sequence[str], max_new_tokens: int = 32,
              batch_size: int = 64) -> list[str]:
    """Greedy continuation of ``source SEP`` up to EOS, for every source."""
    out: list[str] = []
    for start in range(0, len(sources), batch_size):
        prompts = [s + SEP for s in sources[start : start + batch_size]]
        out += generate_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=[EOS],
                             greedy=True)
    return out


def char_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of reference characters reproduced at the same position (a missing one counts wrong)."""
    right = total = 0
    for p, r in zip(predictions, references, strict=True):
        right += sum(a == b for a, b in zip(p, r, strict=False))  # a short prediction misses the rest
        total += len(r)
    return right / total
