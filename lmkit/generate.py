"""Text generation: KV-cache decoding with greedy, temperature, top-k, top-p, repetition penalty,
stop tokens, stop strings and streaming.

The decoding loop is `stream`; `generate` collects it and `generate_text` adds a tokenizer and
stop strings on top. The sampling steps are small pure functions on a logits tensor
(`apply_repetition_penalty`, `apply_top_k`, `apply_top_p`), applied in that order after the
temperature, like Hugging Face's logits processors, so each can be tested and shown on its own.

Batches of prompts of different lengths are LEFT-padded (see `lmkit.model`): every row's next
token then sits in the same column, so one forward call per step serves the whole batch.

Context length. A GPT has no position embedding past ``block_size``:
- without a cache, the context is cropped to the last ``block_size`` tokens each step (the
  nanoGPT convention: the window slides and positions restart at 0);
- with a cache, decoding uses the cache while prompt + generated tokens fit in ``block_size``,
  then switches (with a warning) to the cropped, uncached path for the remaining steps; until the
  switch both paths compute the same thing, so the result is what ``use_cache=False`` gives.
The LSTM has no such limit; its "cache" is its recurrent state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "GenerationError",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "check_options",
    "generate",
    "generate_text",
    "sample_next",
    "stream",
]

Prompts = Sequence[Sequence[int]] | Tensor


class GenerationError(ValueError):
    """A decoding option or prompt that cannot work; the message names it and the allowed values."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --------------------------------------------------------------------------- sampling helpers


def apply_repetition_penalty(
    logits: Tensor, seen: Tensor | Sequence[Sequence[int]], penalty: float
) -> Tensor:
    """CTRL's repetition penalty: make tokens already present less likely.

    For every token in ``seen`` (a bool mask shaped like ``logits``, or one id list per row),
    a positive logit is divided by ``penalty`` and a negative one multiplied by it, so the token
    always loses probability when ``penalty > 1``. ``logits`` is [B, V] (or [V]); returns a new
    tensor.
    """
    if penalty <= 0:
        raise GenerationError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return logits
    if not isinstance(seen, Tensor) or seen.dtype != torch.bool:
        rows = [seen] if logits.dim() == 1 else seen
        mask = torch.zeros(logits.shape if logits.dim() == 2 else (1, logits.size(-1)),
                           dtype=torch.bool, device=logits.device)
        for b, ids in enumerate(rows):
            ids = torch.as_tensor(list(ids), dtype=torch.long, device=logits.device)
            mask[b, ids] = True
        seen = mask.reshape(logits.shape)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: Tensor, k: int | None) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf (ties at the k-th are kept)."""
    if k is None or k >= logits.size(-1):
        return logits
    if k < 1:
        raise GenerationError(f"top_k must be >= 1, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability is >= ``p``.

    A token is dropped when the tokens strictly more likely than it already reach ``p``; the most
    likely token is always kept, so the result is never empty.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise GenerationError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from [B, V] logits; ``temperature == 0`` means argmax (greedy)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- decoding loop


def _prompt_rows(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise GenerationError(f"prompt tensor must be [T] or [B, T], got shape {tuple(prompts.shape)}")
        return [[int(t) for t in row] for row in prompts.tolist()]
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise GenerationError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise GenerationError(f"prompt {i} is empty: start it with at least one token (e.g. a newline)")
    return rows


def check_options(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """Raise `GenerationError` for a decoding option outside its range (before any model work)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}; "
                              "use 0 or more")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}; use 0 (greedy) "
                              "or a positive value")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}; use a positive count, or unset for no top-k")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}; use e.g. 0.9, or 1 for no nucleus cut")
    if not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty must be > 0, got {repetition_penalty}; use 1 for none")


def stream(
    model: nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
) -> Iterator[list[int | None]]:
    """Yield, at every step, one new token id per prompt (None for a row that has stopped).

    A row stops when it samples one of ``stop_token_ids`` (the stop token itself is not yielded)
    or after ``max_new_tokens``; the iterator ends when every row has stopped. ``greedy=True`` or
    ``temperature=0`` picks the argmax. ``seed`` makes sampling reproducible through a private
    ``torch.Generator`` (the global RNG is left alone). See the module docstring for how
    ``use_cache`` and ``block_size`` interact. The model is put in eval mode while iterating.
    """
    rows = _prompt_rows(prompts)
    check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    vocab = model.config.vocab_size
    if not 0 <= pad_id < vocab:
        raise GenerationError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab}); use a token id of "
                              "the model, e.g. 0")
    return _decode(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                   greedy or temperature == 0, stop_token_ids, seed, use_cache, pad_id)


def _decode(
    model: nn.Module,
    rows: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    greedy: bool,
    stop_token_ids: Sequence[int] | None,
    seed: int | None,
    use_cache: bool,
    pad_id: int,
) -> Iterator[list[int | None]]:
    """The decoding loop behind `stream` (arguments already validated)."""
    if max_new_tokens == 0:
        return
    param = next(model.parameters())
    device = param.device
    cfg = model.config
    # Longest context the model accepts: block_size for the GPT, unbounded for the LSTM.
    limit: int | None = None if getattr(cfg, "arch", "gpt") == "lstm" else cfg.block_size
    B = len(rows)
    P = max(len(r) for r in rows)
    pads = [P - len(r) for r in rows]
    stops = set(stop_token_ids or ())
    was_training = model.training
    # The prompt is checked by the model's first forward; every later input is a token the model
    # itself picked from its vocabulary (or pad_id, checked above), so the per-step range check,
    # a device-to-host sync on a GPU, is switched off until decoding ends.
    checks = "check_token_ids" in vars(model), getattr(model, "check_token_ids", None)
    model.eval()
    try:
        with torch.inference_mode():
            tokens = torch.full((B, P + max_new_tokens), pad_id, dtype=torch.long, device=device)
            for b, r in enumerate(rows):
                tokens[b, pads[b] : P] = torch.tensor(r, dtype=torch.long)
            left_pad = torch.tensor(pads, dtype=torch.long, device=device)
            any_pad = any(pads)
            stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=device) if stops else None
            done = torch.zeros(B, dtype=torch.bool, device=device)
            seen = None
            if repetition_penalty != 1.0:
                seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
                for b, r in enumerate(rows):
                    seen[b, torch.tensor(r, dtype=torch.long, device=device)] = True
            gen = None
            if seed is not None and not greedy:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
            cache = None
            if use_cache and hasattr(model, "new_kv_cache"):
                fed = P + max_new_tokens - 1  # the last sampled token is never fed back
                max_len = fed if limit is None else min(limit, fed)
                if limit is not None and P > limit:
                    warnings.warn(f"prompt of {P} tokens exceeds block_size={limit}; decoding without "
                                  "the KV cache on the last block_size tokens", stacklevel=2)
                else:
                    cache = model.new_kv_cache(B, max_len, left_pad=pads if any_pad else None)

        cur = P
        for step in range(max_new_tokens):
            with torch.inference_mode():
                if cache is not None:
                    inp = tokens[:, :P] if step == 0 else tokens[:, cur - 1 : cur]
                    if cache.max_len is not None and cache.length + inp.size(1) > cache.max_len:
                        warnings.warn(
                            f"prompt + generated tokens exceed block_size={limit}; continuing without the "
                            f"KV cache on the last {limit} tokens (the window now slides)", stacklevel=2)
                        cache = None
                if step == 1 and checks[1] is not None:
                    model.check_token_ids = False
                if cache is not None:
                    logits, _ = model(inp, kv_cache=cache, last_only=True)
                else:
                    lo = 0 if limit is None else max(0, cur - limit)
                    lp = (left_pad - lo).clamp_min(0) if any_pad else None
                    logits, _ = model(tokens[:, lo:cur], left_pad=lp, last_only=True)
                logits = logits[:, -1, :].float()
                if seen is not None:
                    logits = apply_repetition_penalty(logits, seen, repetition_penalty)
                if greedy:
                    nxt = logits.argmax(dim=-1)
                else:
                    nxt = sample_next(logits, temperature, top_k, top_p, generator=gen)
                if stop_t is not None:  # without stop tokens no row ever stops early: no bookkeeping
                    nxt = nxt.masked_fill(done, pad_id)
                tokens[:, cur] = nxt
                cur += 1
                if seen is not None:
                    seen[torch.arange(B, device=device), nxt] = True
                out: list[int | None] = nxt.tolist()
                all_done = False
                if stop_t is not None:
                    hit = torch.isin(nxt, stop_t) & ~done
                    out = [None if d or h else t
                           for t, d, h in zip(out, done.tolist(), hit.tolist(), strict=True)]
                    done |= hit
                    all_done = bool(done.all())
            yield out
            if all_done:
                return
    finally:
        model.train(was_training)
        if checks[1] is not None:
            if checks[0]:
                model.check_token_ids = checks[1]
            else:
                vars(model).pop("check_token_ids", None)  # back to the class default


def generate(
    model: nn.Module,
    prompts: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    greedy: bool = False,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens excluded); see `stream` for the arguments."""
    rows = _prompt_rows(prompts)
    out: list[list[int]] = [[] for _ in rows]
    for step in stream(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                       greedy, stop_token_ids, seed, use_cache, pad_id):
        for b, t in enumerate(step):
            if t is not None:
                out[b].append(t)
    return out


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    max_new_tokens: int = 100,
    stop: Sequence[str] | None = None,
    **kwargs: Any,
) -> str | list[str]:
    """Generate continuations of text prompts and cut each at its first stop string.

    ``tokenizer`` is anything with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``.
    Stop strings are found in the decoded text (a string can span several tokens, so it cannot be
    a token-level check); decoding ends early once every row contains one. Other keyword
    arguments go to `stream`. A single prompt string gives a single string back.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    rows = [tokenizer.encode(t) for t in texts]
    stops = [s for s in (stop or ()) if s]
    new: list[list[int]] = [[] for _ in rows]
    cut: list[str | None] = [None] * len(rows)
    it = stream(model, rows, max_new_tokens, **kwargs)
    try:
        for step in it:
            for b, t in enumerate(step):
                if t is None or cut[b] is not None:
                    continue
                new[b].append(t)
                if stops:
                    text = tokenizer.decode(new[b])
                    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                    if hits:
                        cut[b] = text[: min(hits)]
            if stops and all(c is not None for c in cut):
                break
    finally:
        it.close()
    result = [c if c is not None else tokenizer.decode(n) for c, n in zip(cut, new, strict=True)]
    return result[0] if single else result
