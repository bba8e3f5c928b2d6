"""The language model of the book: a GPT (decoder-only Transformer).

`GPT` follows GPT-2: token + learned position embeddings, pre-LayerNorm blocks (causal
self-attention, then a 4x GELU MLP, each wrapped in a residual connection), a final LayerNorm
and an LM head whose weight *is* the token embedding. It is numerically the same network as
Hugging Face's ``GPT2LMHeadModel`` (checked in ``tests/test_model.py``); the GELU is the tanh
approximation GPT-2 was trained with, so real GPT-2 weights load through
`lmkit.hf.gpt2_state_dict_from_hf`. Its initial weights are those of `lmkit.weights`.

Module names are part of the interface. The tensor-parallel engine wraps them and checkpoints
key off ``state_dict()`` names::

    tok_emb, pos_emb, drop,
    blocks[i].ln1, blocks[i].attn.qkv, blocks[i].attn.proj, blocks[i].ln2,
    blocks[i].mlp.fc, blocks[i].mlp.proj,
    ln_f, head            (head.weight is tok_emb.weight when tied: both names appear in state_dict)

``attn.qkv`` is one fused Linear(d, (n_head + 2 n_kv_head) hd) whose output features are laid out
``[q | k | v]``: ``n_head`` query heads, then ``n_kv_head`` key and as many value heads, ``head_dim``
each. A tensor-parallel split must therefore split *whole heads inside each of q, k and v*, not
cut the rows into contiguous chunks (`lmkit.parallel.plan.fused_parts`). The attention infers its
local head counts from the width of the ``qkv`` output, so a column-parallel ``qkv`` and a
row-parallel ``proj`` drop in unchanged.

Model options (`ModelConfig`, all off by default: the defaults are GPT-2's network): ``pos="rope"``
rotates each head's queries and keys by their position (`rope_tables`, base ``rope_theta``) and
drops ``pos_emb``; ``norm="rms"`` makes ``ln1``/``ln2``/``ln_f`` RMSNorms (no bias); ``qk_norm=True``
adds ``attn.q_norm``/``attn.k_norm`` (RMSNorm over a head's features); ``activation="relu2"`` puts
``relu(x)^2`` in the MLP; ``n_kv_head < n_head`` is grouped-query attention (Ainslie et al. 2023:
``n_head / n_kv_head`` query heads share a key/value head, the KV cache shrinks by that factor);
``mlp="swiglu"`` is the gated MLP (`SwiGLU`, fused ``fc`` = ``[gate | up]``); ``tie_embeddings=False``
gives the head its own matrix; ``n_experts > 0`` makes the mlp of every ``moe_every``-th block a
mixture of experts (`lmkit.experts.MoE`: ``mlp.router.gate``, ``mlp.experts.fc``/``proj`` stacked over
the experts, ``mlp.shared``). ``model_preset("llama")`` is the Llama-style network; `lmkit.hf` converts
it to and from transformers' ``LlamaForCausalLM``.

Decoding uses `KVCache`: preallocated keys/values per layer, one position appended per step.
Batches of prompts of different lengths are LEFT-padded: row ``b`` has ``left_pad[b]`` padding
columns before its first real token. Its position ids start at 0 on the first real token and
its queries never attend to the padding, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as torch_module
from torch.utils.checkpoint import checkpoint

from lmkit.config import ModelConfig
from lmkit.experts import MoE, inactive_expert_parameters
from lmkit.weights import initial_parameter, materialize

__all__ = [
    "GPT",
    "KVCache",
    "build_model",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "norm_layer",
    "rope_tables",
    "apply_rope",
    "split_heads",
    "left_pad_tensor",
    "validate_token_ids",
]


# --------------------------------------------------------------------------- input checks


def validate_token_ids(idx: Tensor, vocab_size: int) -> None:
    """Fail with a readable message instead of an index error deep inside nn.Embedding.

    Out-of-range ids almost always mean the data was encoded with a different tokenizer than
    the one the model was configured for, so the message says so.
    """
    if idx.dim() != 2:
        raise ValueError(f"expected token ids of shape [batch, seq_len], got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be an integer tensor (int64), got {idx.dtype}")
    if idx.numel() == 0:
        raise ValueError("empty input: need at least one token per row")
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the compiled graph
    lo, hi = torch.aminmax(idx)
    lo, hi = int(lo), int(hi)
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"token id {bad} is outside the model's vocabulary [0, {vocab_size}); vocab_size={vocab_size}. "
            "The tokenizer and the model config disagree: build the model with "
            "ModelConfig(vocab_size=tokenizer.vocab_size) or re-encode the data with the right tokenizer."
        )


def left_pad_tensor(
    left_pad: Tensor | Sequence[int] | None, batch: int, device: torch.device
) -> Tensor | None:
    """Normalise left padding to a LongTensor [B] on `device`, or None when no row is padded."""
    if left_pad is None:
        return None
    pad = torch.as_tensor(left_pad, dtype=torch.long, device=device).reshape(-1)
    if pad.numel() != batch:
        raise ValueError(f"left_pad has {pad.numel()} entries for a batch of {batch} rows")
    if not bool(pad.any()):
        return None
    return pad


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Per layer, one preallocated ``[2, B, n_head, max_len, head_dim]`` tensor ``kv[i]`` holds the keys
    (``k[i] = kv[i][0]``) and values (``v[i]``); ``length`` positions are filled. A forward call writes
    its new positions at ``length`` in place (one copy per layer, no ``torch.cat``) and attends over
    ``[0, length + T)``. Allocated on the first write, with the shape, dtype and device of the first
    keys seen: the cache needs no knowledge of the (tensor-parallel, hence local) head count.

    ``left_pad`` (optional, [B]) marks left padding: columns ``< left_pad[b]`` of row ``b`` are
    padding that no query may attend to, and position ids count from the first real token.
    """

    def __init__(self, n_layer: int, max_len: int, left_pad: Tensor | Sequence[int] | None = None):
        if max_len <= 0:
            raise ValueError(f"KVCache.max_len must be positive, got {max_len}")
        self.n_layer = n_layer
        self.max_len = max_len
        self.left_pad = None if left_pad is None else torch.as_tensor(left_pad, dtype=torch.long)
        self.length = 0
        self.kv: list[Tensor | None] = [None] * n_layer
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer
        self.plan: tuple | None = None  # (model, its one-token step plan), see GPT._decode_plan

    def reset(self) -> None:
        """Forget the contents (the storage is kept for the next sequence of the same shape) and
        the step plan (the model's modules may have been replaced since, e.g. by quantization)."""
        self.length = 0
        self.plan = None

    def update(self, layer: int, start: int, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys and values ``kv`` ([2, B, H, T, hd]) at positions start..start+T; return the
        filled prefixes of the keys and of the values ([B, H, start+T, hd] each)."""
        _, B, H, T, hd = kv.shape
        end = start + T
        store = self.kv[layer]
        if store is None or store.shape[1] != B:
            store = self.kv[layer] = kv.new_empty(2, B, H, self.max_len, hd)
            self.k[layer], self.v[layer] = store.unbind(0)
        store.narrow(3, start, T).copy_(kv)
        return store[:, :, :, :end].unbind(0)


# --------------------------------------------------------------------------- GPT


NORM_EPS = 1e-5  # nn.LayerNorm's default; the RMSNorms use the same


def norm_layer(config: ModelConfig) -> nn.Module:
    """The block / output normalisation `config.norm` names: LayerNorm (GPT-2) or RMSNorm.

    RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * g``, no mean subtracted and
    no bias; one reduction less than LayerNorm.
    """
    if config.norm == "rms":
        return nn.RMSNorm(config.d_model, eps=NORM_EPS)
    return nn.LayerNorm(config.d_model, bias=config.bias)


class ReLUSquared(nn.Module):
    """``relu(x)^2`` (So et al., 2021, "Primer"): the MLP activation of ``activation="relu2"``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


def rope_tables(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of rotary embeddings (Su et al., 2021) for integer `positions` ([T] or [B, T]).

    Pair ``(i, i + head_dim/2)`` of a head's features turns by ``position * base^(-2i/head_dim)``;
    the tables have shape ``positions.shape + (head_dim/2,)``.
    """
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-even / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys ``x`` [B, H, T, hd] by the tables of `rope_tables` ([T, hd/2] or
    [B, T, hd/2]). A rotation by angle a at the query and b at the key leaves a dot product that
    depends on a - b only: attention sees relative positions."""
    if cos.dim() == 3:  # per-row positions (left padding): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def split_heads(qkv: Tensor, head_dim: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, Hq, T, hd], k and v [B, Hkv, T, hd] from a fused projection's output [B, T, width].

    The output is laid out ``[q | k | v]`` with ``Hq = group * Hkv`` (`group` query heads per
    key/value head); the head counts are read off its width, so under tensor parallelism (this
    rank's heads of each part) nothing changes. (Split, view, transpose: of the layouts tried, the
    one whose backward is fastest here.)
    """
    B, T, width = qkv.shape
    kv_width = width // (group + 2)
    q, k, v = qkv.split((width - 2 * kv_width, kv_width, kv_width), dim=-1)
    return tuple(t.view(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.d_model // config.n_head
        self.group = self.n_head // self.n_kv_head  # query heads per key/value head
        self.dropout = config.dropout
        self.rope_theta = config.rope_theta
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim  # [q | k | v]
        self.qkv = nn.Linear(config.d_model, width, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_drop = nn.Dropout(config.dropout)
        if config.qk_norm:  # one gain per head dimension, shared by the heads
            self.q_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS)

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of this attention's fused projection output (`split_heads`)."""
        return split_heads(qkv, self.head_dim, self.group)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if cache is not None:  # decoding: k and v of these positions cached together
            if self.group == 1 and rope is None and not hasattr(self, "q_norm"):  # [3, B, H, T, hd] view
                qkv3 = qkv.view(B, T, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
                q, kv = qkv3[0], qkv3[1:]
            else:
                q, k, v = self.split_heads(qkv)
                if hasattr(self, "q_norm"):
                    q, k = self.q_norm(q), self.k_norm(k)
                if rope is not None:  # rotate before caching: cached keys keep their own positions
                    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
                kv = torch.stack((k, v))
            k, v = cache.update(layer, start, kv)
        else:
            q, k, v = self.split_heads(qkv)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        width = q.size(1) * self.head_dim  # local width under tensor parallelism
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
            enable_gqa=self.group > 1,
        )
        # [B, H, T, hd] -> [B, T, H * hd]; with one query per row that is a view (no copy)
        y = y.reshape(B, T, width) if T == 1 else y.transpose(1, 2).reshape(B, T, width)
        y = self.proj(y)
        return self.resid_drop(y) if self.resid_drop.training else y  # identity in eval mode: skip the call


class SwiGLU(nn.Module):
    """``silu(gate) * up`` of a gated MLP's fused ``fc`` output laid out ``[gate | up]`` (Shazeer, 2020,
    "GLU Variants Improve Transformer"): the gate's SiLU scales each hidden feature of the up
    projection. Under tensor parallelism ``fc``'s output is this rank's part of each half, so the same
    split holds."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class MLP(nn.Module):
    """``proj(act(fc(x)))``. Plain: ``fc`` maps d to ``d_ff`` (4d), then GELU or ReLU². SwiGLU
    (``mlp="swiglu"``): ``fc`` is the gate and up projections fused, d to ``2 d_ff`` laid out
    ``[gate | up]``, and ``act`` is `SwiGLU` (one matrix multiply for both, like ``attn.qkv``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.ffn_width
        if config.mlp == "swiglu":
            self.fc = nn.Linear(config.d_model, 2 * width, bias=config.bias)
            self.act = SwiGLU()
        else:
            self.fc = nn.Linear(config.d_model, width, bias=config.bias)
            # tanh-approximate GELU: what GPT-2 was trained with ("gelu_new"), so GPT-2 weights load.
            self.act = nn.GELU(approximate="tanh") if config.activation == "gelu" else ReLUSquared()
        self.proj = nn.Linear(width, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(self.act(self.fc(x)))
        return self.drop(y) if self.drop.training else y  # identity in eval mode: skip the call


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x)); block `index` of a model with
    experts holds an `lmkit.experts.MoE` as its mlp when ``config.is_moe_block(index)``."""

    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.ln1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln2 = norm_layer(config)
        if config.is_moe_block(index):
            shared_width = config.n_shared_experts * config.expert_width
            shared = MLP(dataclasses.replace(config, d_ff=shared_width)) if shared_width else None
            self.mlp = MoE(config, shared)
        else:
            self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln1(x), mask, is_causal, cache, layer, start, rope)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """GPT-2-style decoder-only Transformer (see the module docstring for names and layout)."""

    #: Validate token ids on every forward (a clear error instead of an index error or a CUDA
    #: device-side assert). On a GPU it costs one host-device sync per call; set False to skip.
    check_token_ids: bool = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.arch != "gpt":
            raise ValueError(f"GPT needs config.arch='gpt', got {config.arch!r}; use build_model(config)")
        self.config = config
        # The one draw from the global RNG: `torch.manual_seed(s); GPT(config)` stays reproducible,
        # and every weight is then a pure function of (init_seed, name, shape), see `initial_parameter`.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        device = torch.get_default_device()
        with torch.device("meta"):  # no storage yet: torch's default inits would be overwritten anyway
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            if config.pos == "learned":  # rotary positions need no table
                self.pos_emb = nn.Embedding(config.block_size, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
            self.ln_f = norm_layer(config)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying: the output projection reuses the input embedding (saves V*d parameters and
        # is what GPT-2 does). Both names stay in state_dict(), sharing one storage.
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.gradient_checkpointing = False
        if device.type != "meta":  # under `with torch.device("meta")`: shapes only (parallel/ cuts it)
            materialize(self, device)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set every weight to its initial value for ``self.init_seed`` (`initial_parameter`)."""
        for name, p in [*self.named_parameters(), *self.named_buffers()]:  # the tied head: drawn once
            p.copy_(initial_parameter(name, p.shape, self.config, self.init_seed))

    # ------------------------------------------------------------------ knobs and counts

    def set_activation_checkpointing(self, enabled: bool = True) -> GPT:
        """Recompute each block's activations in backward instead of storing them (training only).

        Trades one extra forward of every block for activation memory of O(n_layer * B*T*d)
        instead of O(n_layer * B*T*d * ~16); see the efficiency chapter.
        """
        self.gradient_checkpointing = bool(enabled)
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, the tied head counted once; ``non_embedding=True`` excludes the token
        and position embeddings (and the tied head with them): Kaplan et al.'s N of the 6N rule."""
        n = sum(p.numel() for name, p in self.named_parameters()  # (the tied weight once)
                if not name.endswith("expert_bias"))  # a router's balancing bias is no weight
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if hasattr(self, "pos_emb"):  # rotary positions have no table
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Approximate FLOPs per token (PaLM appendix B / nanoGPT's estimate_mfu).

        With N = non-embedding parameters plus the d*V weights of the LM head (a real matmul even
        though it is tied to the embedding lookup), L layers, width d and context T:

        - training (forward + backward = 3x forward): ``6 * N + 12 * L * d * T``;
        - inference (forward only):                   ``2 * N +  4 * L * d * T``.

        6N counts 2 FLOPs per multiply-add per weight, times 3 for the backward pass; the second
        term is the attention scores QK^T and the weighted sum AV (2 matmuls of 2*T*d FLOPs per
        token per layer), counted over the full T x T square as PaLM does. T defaults to
        block_size.
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        N = self.num_params(non_embedding=True) + (c.d_model * c.vocab_size if c.tie_embeddings else 0)
        N -= inactive_expert_parameters(c)  # a token runs k of E experts: active parameters only
        attn = 4 * c.n_layer * c.d_model * T
        return float(6 * N + 3 * attn) if training else float(2 * N + attn)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, left_pad: Tensor | Sequence[int] | None = None
    ) -> KVCache:
        """An empty cache for up to `max_len` positions (default block_size); see `KVCache`."""
        max_len = self.config.block_size if max_len is None else max_len
        if max_len > self.config.block_size:
            raise ValueError(
                f"KV cache of {max_len} positions exceeds block_size={self.config.block_size}: "
                "the model has no position embedding beyond block_size"
            )
        if left_pad is not None and len(left_pad) != batch_size:
            raise ValueError(f"left_pad has {len(left_pad)} entries for a batch of {batch_size}")
        return KVCache(self.config.n_layer, max_len, left_pad)

    # ------------------------------------------------------------------ one-token decoding step

    def _decode_plan(self) -> tuple | None:
        """What a cached one-token step calls, gathered once per cache: every layer's submodules'
        bound ``forward`` methods; None where the step must go through the modules (rotary
        positions, QK-norm, a submodule in training mode, or any forward hook, e.g. a parallel
        engine's: skipping ``__call__`` would skip the hook).

        At one token per step the work per layer is ~20 small operators, and calling the modules the
        usual way costs up to a fifth of the step (benchmarks/README.md); the plan calls the same forward
        methods, so the arithmetic is that of `forward` exactly (tests/test_generate.py: bit for bit).
        """
        c = self.config
        if c.pos != "learned" or c.qk_norm or c.kv_heads != c.n_head or c.mlp != "plain" or c.n_experts:
            return None
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return None
        if any(m._forward_hooks or m._forward_pre_hooks or m.training for m in self.modules()):
            return None
        layers = tuple((b.ln1.forward, b.attn.qkv.forward, b.attn.proj.forward, b.ln2.forward,
                        b.mlp.fc.forward, b.mlp.act.forward, b.mlp.proj.forward) for b in self.blocks)
        return self.tok_emb.forward, self.pos_emb.weight, layers, self.ln_f.forward, self.head.forward

    def _decode_step(self, idx: Tensor, cache: KVCache, start: int, plan: tuple) -> Tensor:
        """`forward` for one new token per row, no padding, eval mode, through `_decode_plan`:
        the same operations as the module path (keys and values written in place at ``start``,
        attention over the ``start + 1`` cached positions without a mask); returns [B, 1, V]."""
        tok_emb, pos_weight, layers, ln_f, head = plan
        B = idx.size(0)
        hd = self.config.d_model // self.config.n_head
        x = tok_emb(idx) + pos_weight[start]
        for (ln1, qkv_fwd, proj, ln2, fc, act, mlp_proj), store in zip(layers, cache.kv, strict=True):
            qkv = qkv_fwd(ln1(x))
            width = qkv.size(-1) // 3
            qkv3 = qkv.view(B, 1, 3, width // hd, hd).permute(2, 0, 3, 1, 4)
            store.narrow(3, start, 1).copy_(qkv3[1:])
            k, v = store[:, :, :, : start + 1].unbind(0)
            x = x + proj(F.scaled_dot_product_attention(qkv3[0], k, v).reshape(B, 1, width))
            x = x + mlp_proj(act(fc(ln2(x))))
        cache.length = start + 1
        return head(ln_f(x))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int | None = None,
        left_pad: Tensor | Sequence[int] | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, V] (or [B, 1, V] with ``last_only``) and the mean cross-entropy.

        - ``targets`` [B, T]: loss = mean cross-entropy over positions whose target is not -100.
        - ``kv_cache``: append these T positions to the cache and attend over everything cached;
          ``start_pos`` defaults to ``kv_cache.length`` (smaller rewinds); without a cache it is the
          column of ``idx[:, 0]`` (default 0).
        - ``left_pad`` [B]: padding columns at the start of each row (default: the cache's); padded
          rows count positions from their first real token and never attend to the padding.
        - ``last_only``: compute the LM head for the last position only (what decoding needs).
        """
        B, T = idx.shape
        c = self.config
        if kv_cache is not None:
            start = kv_cache.length if start_pos is None else start_pos
            if left_pad is None:
                left_pad = kv_cache.left_pad
        else:
            start = 0 if start_pos is None else start_pos
        if start + T > c.block_size:
            raise ValueError(
                f"sequence of length {start + T} (start_pos={start} + {T} new tokens) is longer than "
                f"block_size={c.block_size}; crop the context to the last {c.block_size} tokens "
                "or build the model with a larger block_size"
            )
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(
                f"KV cache holds {kv_cache.max_len} positions but {start + T} are needed; "
                "allocate a larger cache with model.new_kv_cache(batch_size, max_len)"
            )
        if self.check_token_ids:
            validate_token_ids(idx, c.vocab_size)
        pad = left_pad_tensor(left_pad, B, idx.device)
        if (kv_cache is not None and T == 1 and start > 0 and pad is None and targets is None
                and not self.training and kv_cache.kv[0] is not None and kv_cache.kv[0].shape[1] == B):
            if kv_cache.plan is None or kv_cache.plan[0] is not self:
                kv_cache.plan = (self, self._decode_plan())
            if kv_cache.plan[1] is not None:
                return self._decode_step(idx, kv_cache, start, kv_cache.plan[1]), None

        mask: Tensor | None = None
        if pad is None:
            pos_ids = torch.arange(start, start + T, device=idx.device)  # [T], broadcast over rows
            if kv_cache is None or start == 0:
                is_causal = T > 1  # keys are exactly these T positions
            else:
                is_causal = False
                if T > 1:  # prefill after a prefix: query i (column start+i) sees columns <= start+i
                    cols = torch.arange(start + T, device=idx.device)
                    mask = cols[None, :] <= (start + torch.arange(T, device=idx.device))[:, None]
        else:
            is_causal = False
            qcol = start + torch.arange(T, device=idx.device)
            kcol = torch.arange(start + T, device=idx.device) if kv_cache is not None else qcol
            pos_ids = (qcol[None, :] - pad[:, None]).clamp_min(0)  # [B, T]
            k_, q_ = kcol[None, None, :], qcol[None, :, None]
            allowed = (k_ <= q_) & (k_ >= pad[:, None, None])
            # a padding query has no real key to look at; let it see itself to avoid NaNs
            allowed = allowed | (k_ == q_)
            mask = allowed.unsqueeze(1)  # [B, 1, T, S]

        rope = None
        if c.pos == "rope":
            x = self.tok_emb(idx)
            rope = rope_tables(pos_ids, c.head_dim, c.rope_theta)
        else:
            x = self.tok_emb(idx) + self.pos_emb(pos_ids)
        if self.drop.training:  # dropout is the identity in eval mode: skip the call
            x = self.drop(x)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.blocks):
            if ckpt:
                x = checkpoint(block, x, mask, is_causal, None, 0, 0, rope, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, kv_cache, i, start, rope)
        if kv_cache is not None:
            kv_cache.length = start + T
        x = self.ln_f(x)

        if targets is None:
            logits = self.head(x[:, -1:, :] if last_only else x)
            return logits, None
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


# --------------------------------------------------------------------------- factory


def build_model(config: ModelConfig) -> nn.Module:
    """The network `config.arch` names: ``"gpt"`` -> `GPT`, ``"lstm"`` -> the baseline
    `lmkit.baselines.lstm.LSTMLanguageModel`.

    The baseline is imported when asked for: it builds on this module's input checks, so an import at
    the top would be a cycle (the one place the system reaches into ``lmkit.baselines``).
    """
    config.validate()
    if config.arch == "gpt":
        return GPT(config)
    from lmkit.baselines.lstm import LSTMLanguageModel

    return LSTMLanguageModel(config)
