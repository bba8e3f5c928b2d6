"""Interop with Hugging Face ``transformers``: lmkit's `GPT` <-> ``GPT2LMHeadModel`` / ``LlamaForCausalLM``.

lmkit's GPT computes two networks transformers knows (book, chapter 7), and a model moves between
the libraries by renaming (and splitting or transposing) tensors plus a translation of the
configuration; which class is read off the model's config (`hf_architecture`):

* GPT-2's network (no model option) is ``GPT2LMHeadModel`` (`gpt2_config`,
  `gpt2_state_dict_to_hf` / `gpt2_state_dict_from_hf`); ``bias=False`` becomes zero biases, the
  same function, because GPT-2 always has them;
* the Llama-style network (``pos='rope'``, ``norm='rms'``, ``mlp='swiglu'``: `lmkit.config.model_preset`
  ``("llama")``, with any ``n_kv_head``, ``d_ff``, ``rope_theta``, ``tie_embeddings``, ``bias``) is
  ``LlamaForCausalLM``, and with ``qk_norm=True`` (no biases) ``Qwen3ForCausalLM`` (`llama_config`,
  `llama_state_dict_to_hf` / `llama_state_dict_from_hf`: lmkit's fused ``attn.qkv`` rows are
  transformers' ``q_proj``, ``k_proj``, ``v_proj``, its fused ``mlp.fc`` rows ``gate_proj``,
  ``up_proj``; both rotate the halves ``(i, i + head_dim/2)`` of a head, so no permutation).

The functions:

* `to_transformers(model)` builds the transformers model with the same logits (within float
  rounding); `from_transformers(hf_model)` builds a `GPT` from one (built or loaded locally;
  nothing is downloaded);
* `save_pretrained(model, directory, tokenizer)` writes a directory that transformers'
  ``from_pretrained`` loads, atomically (a temp directory renamed into place), with lmkit's
  tokenizer beside it; `load_pretrained(directory)` reads such a directory, or one that
  transformers saved, back into a `GPT` and a tokenizer (the class from ``config.json``'s
  ``model_type``).

What neither side can express is refused with one line (`HFError`) naming what to change: the
LSTM, model options of neither network (learned positions with RMSNorm, a plain MLP with rotary
positions, ...), and, the other way, variants lmkit does not compute (another activation or
normalisation epsilon, rotary scaling, sliding windows, untied GPT-2 heads, cross-attention, ...).
Dropout is a training-time option: a Llama-style model's becomes ``attention_dropout`` (Llama has
no residual dropout), which does not change the logits of a model in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmkit.config import ConfigError, ModelConfig, swiglu_width
from lmkit.model import GPT, NORM_EPS
from lmkit.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

__all__ = [
    "HFError",
    "TOKENIZER_FILE",
    "ARCHITECTURES",
    "hf_architecture",
    "hf_config",
    "gpt2_state_dict_from_hf",
    "gpt2_state_dict_to_hf",
    "gpt2_config",
    "llama_config",
    "llama_state_dict_from_hf",
    "llama_state_dict_to_hf",
    "to_transformers",
    "from_transformers",
    "save_pretrained",
    "load_pretrained",
]

#: lmkit's own tokenizer inside an exported directory (transformers ignores the file).
TOKENIZER_FILE = "lmkit_tokenizer.json"
#: ModelConfig fields GPT-2 expresses; any other field must keep its default to be exportable.
_GPT2_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "d_model", "dropout", "bias", "arch"}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, lmkit's MLP
_LN_EPS = 1e-5  # nn.LayerNorm's default, what lmkit's LayerNorms use
#: transformers' ``model_type`` -> the class lmkit converts to and from (GPT-2's network, the Llama-style one,
#: the Llama-style one with QK-norm)
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
#: The options that make lmkit's network Llama's; the others of `lmkit.config.PRESETS["llama"]` (bias,
#: tie_embeddings) and n_kv_head, d_ff, rope_theta, qk_norm map to fields of transformers' config.
_LLAMA_NETWORK = {"pos": "rope", "norm": "rms", "mlp": "swiglu"}


class HFError(ValueError):
    """A model or directory that cannot cross between lmkit and transformers; one line, with the fix."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # an optional dependency (the `test` extra installs it)
        raise HFError("this needs the transformers package: pip install transformers") from e
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No weight-loading / shard-writing progress bars (restored afterwards)."""
    logging = transformers.utils.logging
    was_disabled = logging.is_progress_bar_enabled() is False
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            logging.enable_progress_bar()


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes `config`'s network (a value of `ARCHITECTURES`).

    GPT-2's network (no model option) is ``GPT2LMHeadModel``; the Llama-style one (``pos='rope'``,
    ``norm='rms'``, ``mlp='swiglu'``) is ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with
    ``qk_norm=True``. Anything else is an `HFError` naming the options to change.
    """
    if config.arch != "gpt":
        raise HFError(f"model.arch={config.arch!r} has no GPT-2 equivalent, nor a Llama one; only arch='gpt' "
                      "converts (to GPT2LMHeadModel or LlamaForCausalLM)")
    options = config.options()
    if not options:
        return ARCHITECTURES["gpt2"]
    missing = {name: value for name, value in _LLAMA_NETWORK.items() if getattr(config, name) != value}
    if missing:
        listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
        need = ", ".join(f"{k}={v!r}" for k, v in missing.items())
        raise HFError(f"model options {listed} have no GPT-2 equivalent and are not the Llama-style network: "
                      f"GPT2LMHeadModel takes none of them, LlamaForCausalLM needs also {need}; set those "
                      "(lmkit train --preset llama) or drop the options")
    if config.qk_norm:
        if config.bias:
            raise HFError("qk_norm=True with bias=True has no transformers equivalent: Qwen3ForCausalLM "
                          "(Llama with QK-norm) has no MLP biases; use bias=False")
        return ARCHITECTURES["qwen3"]
    return ARCHITECTURES["llama"]


def hf_config(config: ModelConfig, eot_id: int | None = None, attn_implementation: str = "sdpa") -> Any:
    """The transformers config of `config`'s network: `gpt2_config` or `llama_config` (`hf_architecture`)."""
    if hf_architecture(config) == ARCHITECTURES["gpt2"]:
        return gpt2_config(config, eot_id, attn_implementation)
    return llama_config(config, eot_id, attn_implementation)


def _check_expressible(config: ModelConfig) -> None:
    if config.arch != "gpt":
        raise HFError(f"model.arch={config.arch!r} has no GPT-2 equivalent; only arch='gpt' converts to "
                      "transformers' GPT2LMHeadModel")
    defaults = type(config)()  # every field at its default (a config class may grow new options)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in _GPT2_FIELDS and value != getattr(defaults, f.name):
            raise HFError(f"model option {f.name}={value!r} has no GPT-2 equivalent; GPT2LMHeadModel needs "
                          f"{f.name}={getattr(defaults, f.name)!r}")


def gpt2_config(config: ModelConfig, eot_id: int | None = None, attn_implementation: str = "sdpa") -> Any:
    """The ``GPT2Config`` of the same network (`HFError` for what GPT-2 cannot express)."""
    _check_expressible(config)
    transformers = _transformers()
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id}  # None: no special token (not 50256)
    hc = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.d_model,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
        activation_function="gelu_pytorch_tanh",  # = gelu_new, as one fused kernel
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        layer_norm_epsilon=_LN_EPS, tie_word_embeddings=True, attn_implementation=attn_implementation,
        **special)
    return hc


def llama_config(config: ModelConfig, eot_id: int | None = None, attn_implementation: str = "sdpa") -> Any:
    """The ``LlamaConfig`` (``Qwen3Config`` with ``qk_norm``) of a Llama-style network; `HFError` for
    any other network (`hf_architecture`). ``rms_norm_eps`` is lmkit's 1e-5; the rotary base goes into
    ``rope_parameters`` (how transformers 5 spells ``rope_theta``)."""
    architecture = hf_architecture(config)
    if architecture == ARCHITECTURES["gpt2"]:
        raise HFError("this model is GPT-2's network (no model options): it converts to GPT2LMHeadModel "
                      "(gpt2_config); for LlamaForCausalLM build it with model_preset('llama')")
    transformers = _transformers()
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_width,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.block_size, rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias,
        attention_dropout=config.dropout, attn_implementation=attn_implementation,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None)  # None: no special token
    if architecture == ARCHITECTURES["qwen3"]:
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, mlp_bias=config.bias)


def to_transformers(model: GPT, eot_id: int | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """The transformers model (`hf_architecture`) computing the same logits as `model` (a fresh copy, in
    eval mode).

    GPT-2: ``bias=False`` becomes zero biases. ``eot_id`` (the tokenizer's end-of-text id) becomes the
    bos/eos token, which ``generate`` stops at.
    """
    if not isinstance(model, GPT):
        raise HFError(f"to_transformers needs an lmkit GPT, got {type(model).__name__}; only arch='gpt' "
                      "converts")
    transformers = _transformers()
    hc = hf_config(model.config, eot_id, attn_implementation)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if hf_architecture(model.config) == ARCHITECTURES["gpt2"]:
        hf, theirs = transformers.GPT2LMHeadModel(hc), gpt2_state_dict_to_hf(state)
    else:
        hf = getattr(transformers, hf_architecture(model.config))(hc)
        theirs = llama_state_dict_to_hf(state)
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    target = hf.state_dict()
    for name, tensor in target.items():  # bias=False: GPT-2's biases stay zero
        if name not in theirs and name.endswith(".bias"):
            theirs[name] = torch.zeros_like(tensor)
    hf.load_state_dict(theirs, strict=True)
    hf.tie_weights()
    return hf.eval()


def _check_hf_config(hc: Any) -> None:
    """Refuse a GPT-2 configuration whose network is not lmkit's (one line naming the option)."""
    problems = []
    if hc.activation_function not in _TANH_GELUS:
        problems.append(f"activation_function={hc.activation_function!r} (lmkit computes {_TANH_GELUS[0]!r})")
    if abs(hc.layer_norm_epsilon - _LN_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon={hc.layer_norm_epsilon} (lmkit uses {_LN_EPS})")
    if hc.n_inner not in (None, 4 * hc.n_embd):
        problems.append(f"n_inner={hc.n_inner} (lmkit's MLP is 4 x n_embd = {4 * hc.n_embd})")
    if not hc.scale_attn_weights or hc.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if hc.add_cross_attention:
        problems.append("add_cross_attention=True")
    if not getattr(hc, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False (lmkit's head is the token embedding)")
    if hc.n_embd % hc.n_head:
        problems.append(f"n_embd={hc.n_embd} not divisible by n_head={hc.n_head}")
    drops = {hc.resid_pdrop, hc.embd_pdrop, hc.attn_pdrop}
    if len(drops) > 1:
        problems.append(f"different dropouts {sorted(drops)} (lmkit has one dropout probability)")
    if problems:
        raise HFError(f"this GPT-2 configuration is not lmkit's network: {problems[0]}; convert a model "
                      "with GPT-2's defaults for these options")


def _rope(hc: Any) -> tuple[str, float]:
    """(rope_type, rope_theta) of a Llama or Qwen3 config (``rope_parameters`` in transformers 5)."""
    params = getattr(hc, "rope_parameters", None) or {}
    scaling = getattr(hc, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return kind, float(params.get("rope_theta", getattr(hc, "rope_theta", 10000.0)))


def _llama_model_config(hc: Any) -> ModelConfig:
    """The `ModelConfig` of a Llama or Qwen3 config; `HFError` naming the first option lmkit does not
    compute (another activation, norm epsilon, head width, rotary scaling, sliding window, ...)."""
    name, qwen3 = ARCHITECTURES[hc.model_type], hc.model_type == "qwen3"
    n_head, d = hc.num_attention_heads, hc.hidden_size
    n_kv = hc.num_key_value_heads or n_head
    kind, theta = _rope(hc)
    head_dim = getattr(hc, "head_dim", None) or d // n_head
    problems = []
    if hc.hidden_act != "silu":
        problems.append(f"hidden_act={hc.hidden_act!r} (lmkit's SwiGLU gate is 'silu')")
    if abs(hc.rms_norm_eps - NORM_EPS) > 1e-12:
        problems.append(f"rms_norm_eps={hc.rms_norm_eps} (lmkit's RMSNorms use {NORM_EPS})")
    if d % n_head or head_dim != d // n_head:
        problems.append(f"head_dim={head_dim} (lmkit's heads are hidden_size/num_attention_heads wide)")
    if kind != "default":
        problems.append(f"rope_type={kind!r} (lmkit rotates by the plain angles, rope_type='default')")
    if not qwen3 and bool(hc.attention_bias) != bool(hc.mlp_bias):
        problems.append(f"attention_bias={hc.attention_bias} with mlp_bias={hc.mlp_bias} (lmkit's bias "
                        "option covers both)")
    if qwen3 and hc.attention_bias:
        problems.append("attention_bias=True (lmkit's bias option would add MLP biases Qwen3 has not)")
    if qwen3 and (hc.use_sliding_window or set(hc.layer_types or []) - {"full_attention"}):
        problems.append("sliding-window attention (lmkit attends over the whole context)")
    if problems:
        raise HFError(f"this {name} configuration is not lmkit's network: {problems[0]}; convert a model "
                      "with lmkit's value for this option")
    d_ff = hc.intermediate_size
    try:
        return ModelConfig(
            vocab_size=hc.vocab_size, block_size=hc.max_position_embeddings, n_layer=hc.num_hidden_layers,
            n_head=n_head, d_model=d, dropout=float(hc.attention_dropout), bias=bool(hc.attention_bias),
            pos="rope", norm="rms", qk_norm=qwen3, n_kv_head=0 if n_kv == n_head else n_kv, mlp="swiglu",
            d_ff=0 if d_ff == swiglu_width(d) else d_ff, tie_embeddings=bool(hc.tie_word_embeddings),
            rope_theta=theta).validate()
    except ConfigError as e:
        raise HFError(f"this {name} configuration is not an lmkit model: {e}") from e


def from_transformers(hf_model: nn.Module) -> GPT:
    """An lmkit `GPT` (fp32, eval mode, on the model's device) with the logits of `hf_model`: a
    ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen3ForCausalLM``."""
    transformers = _transformers()
    llama_like = (transformers.LlamaForCausalLM, transformers.Qwen3ForCausalLM)
    if isinstance(hf_model, llama_like):
        config = _llama_model_config(hf_model.config)
        ours = llama_state_dict_from_hf(hf_model.state_dict())
    elif isinstance(hf_model, transformers.GPT2LMHeadModel):
        hc = hf_model.config
        _check_hf_config(hc)
        sd = hf_model.state_dict()
        if not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
            raise HFError("the model's lm_head differs from its token embedding (untied); lmkit ties them")
        config = ModelConfig(vocab_size=hc.vocab_size, block_size=hc.n_positions, n_layer=hc.n_layer,
                             n_head=hc.n_head, d_model=hc.n_embd, dropout=float(hc.resid_pdrop), bias=True)
        ours = gpt2_state_dict_from_hf(sd)
    else:
        raise HFError(f"from_transformers needs a GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, got "
                      f"{type(hf_model).__name__}")
    model = GPT(config)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in ours.items()}, strict=True)
    return model.to(next(hf_model.parameters()).device).eval()


def save_pretrained(model: GPT, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` as a transformers directory (config.json, model.safetensors) of the class
    `hf_architecture` names (GPT-2, Llama or Qwen3), atomically.

    The files go into a temp directory next to `directory`, which is then renamed into place, so
    a crash leaves the old directory or the complete new one. With a `tokenizer`, lmkit's file
    (`TOKENIZER_FILE`) is added, and a BPE tokenizer also as ``tokenizer.json`` (what
    ``PreTrainedTokenizerFast(tokenizer_file=...)`` reads).
    """
    target = Path(directory)
    if target.exists() and not (target / "config.json").is_file():
        raise HFError(f"{target} exists and is not a transformers model directory; choose a new directory")
    hf = to_transformers(model, None if tokenizer is None else tokenizer.eot_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        with _quiet(_transformers()):
            hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
            if isinstance(tokenizer, BPETokenizer):
                tokenizer.hf_tokenizer.save(str(tmp / "tokenizer.json"))
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_pretrained(directory: str | os.PathLike) -> tuple[GPT, Tokenizer | None]:
    """A `GPT` and its tokenizer from a transformers directory (local files only) of GPT-2, Llama or
    Qwen3: the class is ``config.json``'s ``model_type`` (`ARCHITECTURES`; GPT-2 when it has none).

    The tokenizer is lmkit's `TOKENIZER_FILE` if present, else a byte-level BPE ``tokenizer.json``
    (GPT-2's own, say), else None.
    """
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise HFError(f"{path} is not a transformers model directory (no config.json); pass a directory "
                      "written by save_pretrained / lmkit export --hf-dir")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "gpt2")
    except (OSError, ValueError, AttributeError) as e:
        raise HFError(f"{path / 'config.json'} is not a JSON object ({type(e).__name__}); pass a directory "
                      "written by save_pretrained / lmkit export --hf-dir") from e
    if model_type not in ARCHITECTURES:
        raise HFError(f"{path} holds a transformers model_type={model_type!r}; lmkit converts "
                      f"{', '.join(map(repr, ARCHITECTURES))} ({', '.join(ARCHITECTURES.values())})")
    transformers = _transformers()
    try:
        with _quiet(transformers):
            hf = getattr(transformers, ARCHITECTURES[model_type]).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFError(f"{path} does not load as a {ARCHITECTURES[model_type]} ({first[:160]})") from e
    model = from_transformers(hf)
    tokenizer: Tokenizer | None = None
    if (path / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    elif (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tokenizer = BPETokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")))
        except ValueError as e:
            raise HFError(f"{path / 'tokenizer.json'}: {e}") from e
    return model, tokenizer


# --------------------------------------------------------------------------- state dicts: renamed, transposed


# lmkit name <-> Hugging Face GPT-2 name, per block (after "blocks.{i}." / "transformer.h.{i}.")
_HF_BLOCK_NAMES = {
    "ln1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_HF_TOP_NAMES = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "ln_f": "transformer.ln_f"}
_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # HF stores these as Conv1D: weight is [in, out]


def gpt2_state_dict_from_hf(hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a Hugging Face ``GPT2LMHeadModel`` state dict to `GPT`'s names.

    HF's GPT-2 uses ``Conv1D`` layers whose weights are stored transposed ([in, out]); they are
    transposed back here. Non-parameter buffers of old HF versions (``attn.bias`` masks) are
    skipped. The result loads with ``GPT.load_state_dict`` for a config of the same shape.
    """
    inv_block = {v: k for k, v in _HF_BLOCK_NAMES.items()}
    inv_top = {v: k for k, v in _HF_TOP_NAMES.items()}
    out: dict[str, Tensor] = {}
    for name, t in hf_state_dict.items():
        if name == "lm_head.weight":
            continue
        stem, _, leaf = name.rpartition(".")
        if stem in inv_top:
            out[f"{inv_top[stem]}.{leaf}"] = t
            continue
        parts = stem.split(".")
        if len(parts) >= 4 and parts[:2] == ["transformer", "h"]:
            sub = ".".join(parts[3:])
            if sub not in inv_block:
                continue  # e.g. attn.bias / attn.masked_bias buffers
            ours = inv_block[sub]
            out[f"blocks.{parts[2]}.{ours}.{leaf}"] = t.t().contiguous() if (
                ours in _CONV1D and leaf == "weight") else t
    out["head.weight"] = out["tok_emb.weight"]
    return out


def gpt2_state_dict_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `gpt2_state_dict_from_hf`: `GPT` names -> HF ``GPT2LMHeadModel`` names."""
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        stem, _, leaf = name.rpartition(".")
        if stem == "head":
            out["lm_head.weight"] = t
        elif stem in _HF_TOP_NAMES:
            out[f"{_HF_TOP_NAMES[stem]}.{leaf}"] = t
        elif stem.startswith("blocks."):
            _, i, sub = stem.split(".", 2)
            out[f"transformer.h.{i}.{_HF_BLOCK_NAMES[sub]}.{leaf}"] = (
                t.t().contiguous() if (sub in _CONV1D and leaf == "weight") else t
            )
    return out


# lmkit name <-> Hugging Face Llama / Qwen3 name, per block (after "blocks.{i}." / "model.layers.{i}.")
_LLAMA_BLOCK_NAMES = {
    "ln1": "input_layernorm",
    "attn.proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "ln2": "post_attention_layernorm",
    "mlp.proj": "mlp.down_proj",
}
# lmkit's fused projections: their output rows are these projections of transformers, in this order
_LLAMA_FUSED = {"attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.fc": ("mlp.gate_proj", "mlp.up_proj")}
_LLAMA_TOP_NAMES = {"tok_emb": "model.embed_tokens", "ln_f": "model.norm", "head": "lm_head"}


def llama_state_dict_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Llama-style `GPT`'s state dict under ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` names.

    The fused ``attn.qkv`` rows ``[q | k | v]`` become ``q_proj`` (the first ``d_model`` rows: as many
    as ``attn.proj`` has inputs), ``k_proj`` and ``v_proj`` (half the rest each); the fused
    ``mlp.fc`` rows ``[gate | up]`` become ``gate_proj`` and ``up_proj``. The parts are views of
    the fused tensors. A tensor Llama has no place for (``pos_emb``: learned positions) is an `HFError`.
    """
    out: dict[str, Tensor] = {}
    for name, t in state_dict.items():
        stem, _, leaf = name.rpartition(".")
        if stem in _LLAMA_TOP_NAMES:
            out[f"{_LLAMA_TOP_NAMES[stem]}.{leaf}"] = t
            continue
        block, i, sub = stem.split(".", 2) if stem.count(".") >= 2 else (stem, "", "")
        if block != "blocks" or sub not in {**_LLAMA_BLOCK_NAMES, **_LLAMA_FUSED}:
            raise HFError(f"tensor {name} has no LlamaForCausalLM equivalent; convert a Llama-style model "
                          "(model_preset('llama'))")
        prefix = f"model.layers.{i}."
        if sub == "attn.qkv":
            q_rows = state_dict[f"blocks.{i}.attn.proj.weight"].shape[1]
            kv_rows = (t.shape[0] - q_rows) // 2
            parts = t.split((q_rows, kv_rows, kv_rows))
        elif sub == "mlp.fc":
            parts = t.chunk(2)
        else:
            out[f"{prefix}{_LLAMA_BLOCK_NAMES[sub]}.{leaf}"] = t
            continue
        for theirs, part in zip(_LLAMA_FUSED[sub], parts, strict=True):
            out[f"{prefix}{theirs}.{leaf}"] = part
    return out


def llama_state_dict_from_hf(hf_state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `llama_state_dict_to_hf`: ``q_proj``, ``k_proj``, ``v_proj`` concatenated into
    ``attn.qkv``, ``gate_proj`` and ``up_proj`` into ``mlp.fc``; a tied model (no ``lm_head.weight``)
    gets ``head.weight`` = ``tok_emb.weight``. Old versions' ``rotary_emb.inv_freq`` buffers are
    skipped; any other unknown tensor is an `HFError`."""
    inv_block = {v: k for k, v in _LLAMA_BLOCK_NAMES.items()}
    inv_fused = {theirs: ours for ours, names in _LLAMA_FUSED.items() for theirs in names}
    inv_top = {v: k for k, v in _LLAMA_TOP_NAMES.items()}
    out: dict[str, Tensor] = {}
    fused: dict[tuple[str, str, str], dict[str, Tensor]] = {}  # (layer, lmkit name, leaf) -> parts
    for name, t in hf_state_dict.items():
        stem, _, leaf = name.rpartition(".")
        parts = stem.split(".", 3)
        if stem in inv_top:
            out[f"{inv_top[stem]}.{leaf}"] = t
        elif stem.endswith("rotary_emb"):
            continue
        elif parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in inv_block:
            out[f"blocks.{parts[2]}.{inv_block[parts[3]]}.{leaf}"] = t
        elif parts[:2] == ["model", "layers"] and len(parts) == 4 and parts[3] in inv_fused:
            fused.setdefault((parts[2], inv_fused[parts[3]], leaf), {})[parts[3]] = t
        else:
            raise HFError(f"tensor {name} has no lmkit equivalent; lmkit converts the Llama network "
                          "(q/k/v/o, gate/up/down projections, RMSNorms, QK-norms)")
    for (i, ours, leaf), pieces in fused.items():
        missing = [theirs for theirs in _LLAMA_FUSED[ours] if theirs not in pieces]
        if missing:
            raise HFError(f"model.layers.{i}.{missing[0]}.{leaf} is missing; pass a complete state dict")
        out[f"blocks.{i}.{ours}.{leaf}"] = torch.cat([pieces[theirs] for theirs in _LLAMA_FUSED[ours]])
    if "head.weight" not in out and "tok_emb.weight" in out:  # tied: saved once
        out["head.weight"] = out["tok_emb.weight"]
    return out
