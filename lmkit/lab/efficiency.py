"""Measurements behind the efficiency chapter: memory, model size, speed and quality of a model.

Each technique of chapter 7 trades one resource for another. This module holds the small,
tested tools that measure both sides of each trade on a `GPT`:

* `saved_tensor_bytes` - bytes autograd keeps for the backward pass (activation memory), seen
  through ``torch.autograd.graph.saved_tensors_hooks``;
* `kv_cache_bytes` / `kv_cache_tensor_bytes` - the KV cache's formula and its allocated tensors;
* `magnitude_prune` - global unstructured pruning of the blocks' linear weights;
* `quantize_int8` / `DynamicInt8Linear` / `Int8Linear` - int8 weights: the same per-channel int8
  weights with PyTorch's dynamic-quantization kernel (fbgemm/x86) for speed, or dequantized by a
  readable weight-only layer that shows the arithmetic;
* `serialized_bytes` - the size of a model's state dict on disk;
* `eval_loss` - the mean cross-entropy over fixed, contiguous windows of a token array;
* `greedy_agreement` - how often a changed model (int8, pruned) picks the same next token;
* `decode_tokens_per_s` - greedy KV-cache decoding speed of one prompt or a batch;
* `count_ops` / `decode_step_ops` - the operators a call (one cached decoding step) dispatches;
* `count_flops` - the floating-point operations of a call's matrix products and attention,
  counted from the shapes (the same count on every machine, unlike a time);
* `interleaved_medians` - timings of several variants, interleaved round by round, so that a
  noisy machine slows all of them alike.
"""

from __future__ import annotations

import collections
import io
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "saved_tensor_bytes",
    "kv_cache_bytes",
    "kv_cache_tensor_bytes",
    "prunable_linears",
    "magnitude_prune",
    "sparsity",
    "Int8Linear",
    "DynamicInt8Linear",
    "quantize_weight_int8",
    "quantize_int8",
    "dynamic_quantization_available",
    "serialized_bytes",
    "eval_loss",
    "interleaved_medians",
    "greedy_agreement",
    "decode_tokens_per_s",
    "count_ops",
    "decode_step_ops",
    "count_flops",
]


# --------------------------------------------------------------------------- memory


def saved_tensor_bytes(fn: Callable[[], Tensor], exclude: nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs.

    Parameters of `exclude` (the model) are not activations and are left out; views of one
    storage (Q, K and V are slices of one QKV output) are counted once. With activation
    checkpointing (non-reentrant) the recomputed blocks save nothing but their inputs here.
    """
    params = set() if exclude is None else {p.untyped_storage().data_ptr() for p in exclude.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def kv_cache_bytes(n_layer: int, d_model: int, batch: int, length: int, bytes_per_element: int = 4,
                   kv_heads_fraction: float = 1.0) -> float:
    """Bytes of a KV cache: keys and values (2) x layers x batch x positions x width x element size.

    ``kv_heads_fraction`` is n_kv_heads / n_head for grouped-query attention (1 for GPT-2/lmkit).
    """
    return 2 * n_layer * batch * length * d_model * kv_heads_fraction * bytes_per_element


def kv_cache_tensor_bytes(cache) -> int:
    """Bytes actually allocated by an `lmkit.model.KVCache` (its key and value tensors)."""
    return sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v) if t is not None)


# --------------------------------------------------------------------------- pruning


def prunable_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers inside the Transformer blocks (qkv, attention and MLP projections).

    The token embedding (tied to the LM head) and the position embedding are left alone: they
    are lookups, a small share of a large model, and pruning a tied matrix prunes two layers.
    """
    blocks = getattr(model, "blocks", model)
    return [m for m in blocks.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def magnitude_prune(model: nn.Module, fraction: float) -> float:
    """Zero the `fraction` of the blocks' linear weights with the smallest magnitude, in place.

    One global threshold over all those layers (global magnitude pruning); biases are kept.
    Returns the sparsity reached over the pruned weights.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    weights = [m.weight for m in prunable_linears(model)]
    if not weights:
        raise ValueError("the model has no linear layers inside blocks to prune")
    if fraction > 0:
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
        k = int(fraction * magnitudes.numel())
        if k > 0:
            threshold = magnitudes.kthvalue(k).values
            for w in weights:
                w.masked_fill_(w.abs() <= threshold, 0.0)
    return sparsity(model)


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros in the blocks' linear weights."""
    weights = [m.weight for m in prunable_linears(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


# --------------------------------------------------------------------------- int8 weights


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight ~ q * scale[:, None]`` with q in [-127, 127].

    The scale of each row is its largest magnitude / 127, so the rounding error of every weight
    is at most half a step, ``scale / 2``.
    """
    scale = weight.detach().abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(weight.detach() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class Int8Linear(nn.Module):
    """A linear layer that stores int8 weights and one fp32 scale per output (weight-only int8).

    Readable rather than fast: forward dequantizes the weight and calls a float matmul, so it
    saves memory (1 byte per weight instead of 4) but not time. A fast kernel reads the int8
    weights directly (`quantize_int8` uses PyTorch's).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_weight_int8(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized_weight(self) -> Tensor:
        return self.weight_int8.to(torch.float32) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))


class DynamicInt8Linear(Int8Linear):
    """The int8 weights of `quantize_weight_int8` (per output channel) multiplied by PyTorch's
    dynamic-quantization kernel: each activation row is quantized to int8 on the fly and the
    product runs in int8 (fbgemm/x86: VNNI dot products where the CPU has them).

    The weights are packed once for the kernel (``quantized::linear_prepack``) and forward calls
    ``quantized::linear_dynamic`` directly: decoding a token calls every linear layer once on one
    row, so the Python around the kernel is a visible share of the time (``torch.ao``'s module
    spends about 7 us more per call on this CPU). The state dict holds the int8 weights, the
    scales and the bias (those of `Int8Linear`), so its size is what an int8 checkpoint stores.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)  # the buffers: int8 weights, scales, bias
        # fbgemm/x86 quantize activations to 7 bits so that int8 x int8 pairs cannot saturate
        # their 16-bit intermediate sums on CPUs without VNNI (what torch.ao does there, too)
        self.reduce_range = torch.backends.quantized.engine in ("fbgemm", "x86")
        self._pack()
        self.register_load_state_dict_post_hook(lambda module, keys: module._pack())

    def _pack(self) -> None:
        zero = torch.zeros(self.scale.numel(), dtype=torch.long)
        # linear_prepack takes its weights only as a quantized (qint8) tensor, whose creation functions
        # PyTorch 2.13 marks as deprecated (in favour of torchao) with a UserWarning on every process's
        # first call; the kernel itself is not deprecated, so that one warning is silenced here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
            qw = torch._make_per_channel_quantized_tensor(self.weight_int8.cpu(), self.scale.double().cpu(),
                                                          zero, 0)
        self._packed = torch.ops.quantized.linear_prepack(qw, None if self.bias is None else self.bias.cpu())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)


def dynamic_quantization_available() -> bool:
    """Whether this torch has the dynamic int8 linear kernel and an int8 CPU engine."""
    try:
        torch.ops.quantized.linear_dynamic  # noqa: B018 - raises if the op is not registered
        torch.ops.quantized.linear_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return bool(set(torch.backends.quantized.supported_engines) & {"x86", "fbgemm", "qnnpack", "onednn"})


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    blocks = getattr(model, "blocks", model)
    for parent in list(blocks.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child).train(child.training))  # keep the layer's mode


def quantize_int8(model: nn.Module, method: str = "dynamic") -> nn.Module:
    """The blocks' linear layers of `model` with int8 weights (in place; returns the model).

    Both methods store the symmetric per-output-channel int8 weights of `quantize_weight_int8`.
    ``method="dynamic"``: `DynamicInt8Linear`, int8 products with activations quantized on the
    fly (PyTorch's fbgemm/x86 kernel; `dynamic_quantization_available` says whether this torch
    has it); what ``lmkit generate --int8`` uses. ``method="weight_only"``: `Int8Linear` (the
    arithmetic, no fast kernel). The embeddings and the tied LM head stay fp32. Book: section 7.7.
    """
    if method == "weight_only":
        _replace_linears(model, Int8Linear)
        return model
    if method != "dynamic":
        raise ValueError(f"method={method!r} is unknown; use 'dynamic' or 'weight_only'")
    if not dynamic_quantization_available():
        raise RuntimeError("this torch has no quantized::linear_dynamic kernel with an int8 engine; "
                           "use method='weight_only'")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise RuntimeError("int8 dynamic quantization runs on the CPU; move the model there (model.cpu()) or "
                           "use method='weight_only'")
    _replace_linears(model, DynamicInt8Linear)
    return model


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` (shared storages such as tied weights once)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# --------------------------------------------------------------------------- quality and speed


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: np.ndarray, block_size: int, max_windows: int = 32,
              batch_size: int = 8, autocast_dtype: torch.dtype | None = None) -> float:
    """Mean cross-entropy (nats per token) over the first `max_windows` non-overlapping windows.

    The same windows every time, so two variants of one model are compared on identical text.
    """
    data = _windows(tokens, block_size, max_windows)
    n = len(data)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        chunk = data[start : start + batch_size]
        x, y = chunk[:, :-1], chunk[:, 1:]
        if autocast_dtype is None:
            _, loss = model(x, y)
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int = 5,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each variant, run round-robin: A B C, A B C, ...

    Interleaving spreads a noisy neighbour's load over all variants instead of one, and the
    median ignores the slowest rounds; ratios between the medians are what to trust.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _windows(tokens: np.ndarray, block_size: int, max_windows: int) -> Tensor:
    """The first `max_windows` non-overlapping windows of ``block_size + 1`` tokens, as [n, T+1]."""
    span = block_size + 1
    n = min(max_windows, (len(tokens) - 1) // block_size)
    if n < 1:
        raise ValueError(f"need more than {span} tokens to evaluate, got {len(tokens)}")
    rows = [np.asarray(tokens[i * block_size : i * block_size + span], dtype=np.int64) for i in range(n)]
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def greedy_agreement(reference: nn.Module, other: nn.Module, tokens: np.ndarray, block_size: int,
                     max_windows: int = 32, batch_size: int = 8) -> float:
    """Fraction of positions where `other` predicts the same most likely next token as `reference`.

    Teacher-forced on the windows `eval_loss` uses: both models read the same real text, so one
    disagreement does not derail the positions after it (as it would in free-running decoding).
    """
    data = _windows(tokens, block_size, max_windows)[:, :-1]
    reference.eval()
    other.eval()
    same = 0
    for start in range(0, len(data), batch_size):
        x = data[start : start + batch_size]
        same += int((reference(x)[0].argmax(-1) == other(x)[0].argmax(-1)).sum())
    return same / data.numel()


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt: list[int] | list[list[int]], new_tokens: int) -> float:
    """Greedy KV-cache decoding speed in new tokens per second, summed over the batch.

    `prompt` is one prompt (a list of ids) or several (a list of lists, decoded together as one
    left-padded batch).
    """
    from lmkit.generate import generate

    prompts = prompt if prompt and isinstance(prompt[0], (list, tuple)) else [prompt]
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, greedy=True)
    seconds = time.perf_counter() - start
    return sum(len(o) for o in out) / max(seconds, 1e-9)


class _OpCounter(TorchDispatchMode):
    """Counts every operator that reaches the dispatcher below autograd (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """The operators (name -> calls) that `fn()` dispatches, counted by a ``TorchDispatchMode``
    (so below autograd: the ATen and quantized kernels a CPU runs, views included)."""
    with _OpCounter() as counter:
        fn()
    return counter.counts


@torch.inference_mode()
def decode_step_ops(model: nn.Module, context: int, batch: int = 1) -> collections.Counter[str]:
    """The operators (name -> calls) of one KV-cache decoding step after `context` cached tokens.

    At small sizes a step's time is mostly the fixed cost of its operator calls (each goes
    through Python and the dispatcher), so their number is what the decoding path keeps low: no
    ``cat`` (the cache is written in place), no mask at one query without padding, one cache
    write per layer. The model's token-id check is skipped as during decoding (`lmkit.generate`).
    """
    cfg = model.config
    if context + 1 > cfg.block_size:
        raise ValueError(f"context={context} leaves no room for a step within block_size={cfg.block_size}")
    cache = model.new_kv_cache(batch, context + 1)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    model.eval()
    model(torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device), kv_cache=cache,
          last_only=True)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    had_flag = "check_token_ids" in vars(model)
    flag = model.check_token_ids
    model.check_token_ids = False
    try:
        counts = count_ops(lambda: model(token, kv_cache=cache, last_only=True))
    finally:
        if had_flag:
            model.check_token_ids = flag
        else:
            del model.check_token_ids
    return counts


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: The fused attention kernel a CPU runs, which ``FlopCounterMode`` does not count by itself; counted
#: like its GPU kernels (the whole score matrix, causal mask or not).
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of the matrix products and attention kernels `fn()` runs.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` from the operands' shapes (2 per
    multiply-add), plus the CPU's fused attention kernel; elementwise work is not counted. A count,
    not a time: it does not depend on the machine or its load, so a notebook can assert on it
    (chapter 2 compares decoding with and without the KV cache this way).
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())
