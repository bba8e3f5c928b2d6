"""Interop with Hugging Face ``transformers``: lmkit's `GPT` <-> ``GPT2LMHeadModel`` (book, chapter 7).

lmkit's GPT is GPT-2's network (see `lmkit.model`), so a model moves between the two libraries by
renaming and transposing tensors (`gpt2_state_dict_to_hf` / `gpt2_state_dict_from_hf`)
plus a translation of the configuration:

* `to_transformers(model)` builds a ``GPT2LMHeadModel`` with the same logits (within float
  rounding); a model without biases (``bias=False``) becomes one with zero biases, the same
  function, because GPT-2 always has them;
* `from_transformers(hf_model)` builds a `GPT` from a ``GPT2LMHeadModel`` (built or loaded
  locally; nothing is downloaded);
* `save_pretrained(model, directory, tokenizer)` writes a directory that
  ``GPT2LMHeadModel.from_pretrained`` loads, atomically (a temp directory renamed into place),
  with lmkit's tokenizer beside it; `load_pretrained(directory)` reads such a directory, or one
  that transformers saved, back into a `GPT` and a tokenizer.

What GPT-2 cannot express is refused with one line (`HFError`): the LSTM, model options without
a GPT-2 equivalent, and, the other way, GPT-2 variants lmkit does not compute (another
activation, LayerNorm epsilon, untied head, cross-attention, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmkit.config import ModelConfig
from lmkit.model import GPT
from lmkit.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

__all__ = [
    "HFError",
    "TOKENIZER_FILE",
    "gpt2_state_dict_from_hf",
    "gpt2_state_dict_to_hf",
    "gpt2_config",
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


def to_transformers(model: GPT, eot_id: int | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """A ``GPT2LMHeadModel`` computing the same logits as `model` (a fresh copy, in eval mode).

    ``bias=False`` becomes zero biases. ``eot_id`` (the tokenizer's end-of-text id) becomes GPT-2's
    bos/eos token, which ``generate`` stops at.
    """
    if not isinstance(model, GPT):
        raise HFError(f"to_transformers needs an lmkit GPT, got {type(model).__name__}; only arch='gpt' "
                      "converts")
    transformers = _transformers()
    hf = transformers.GPT2LMHeadModel(gpt2_config(model.config, eot_id, attn_implementation))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    theirs = gpt2_state_dict_to_hf({k: v.detach() for k, v in model.state_dict().items()})
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


def from_transformers(hf_model: nn.Module) -> GPT:
    """An lmkit `GPT` (fp32, eval mode, on the model's device) with the logits of `hf_model`."""
    transformers = _transformers()
    if not isinstance(hf_model, transformers.GPT2LMHeadModel):
        raise HFError(f"from_transformers needs a GPT2LMHeadModel, got {type(hf_model).__name__}")
    hc = hf_model.config
    _check_hf_config(hc)
    sd = hf_model.state_dict()
    if not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
        raise HFError("the model's lm_head differs from its token embedding (untied); lmkit ties them")
    config = ModelConfig(vocab_size=hc.vocab_size, block_size=hc.n_positions, n_layer=hc.n_layer,
                         n_head=hc.n_head, d_model=hc.n_embd, dropout=float(hc.resid_pdrop), bias=True)
    model = GPT(config)
    ours = {k: v.detach().to(torch.float32) for k, v in gpt2_state_dict_from_hf(sd).items()}
    model.load_state_dict(ours, strict=True)
    return model.to(next(hf_model.parameters()).device).eval()


def save_pretrained(model: GPT, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` as a transformers GPT-2 directory (config.json, model.safetensors), atomically.

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
    """A `GPT` and its tokenizer from a transformers GPT-2 directory (local files only).

    The tokenizer is lmkit's `TOKENIZER_FILE` if present, else a byte-level BPE ``tokenizer.json``
    (GPT-2's own, say), else None.
    """
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise HFError(f"{path} is not a transformers model directory (no config.json); pass a directory "
                      "written by save_pretrained / lmkit export --hf-dir")
    transformers = _transformers()
    try:
        with _quiet(transformers):
            hf = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFError(f"{path} does not load as a GPT2LMHeadModel ({first[:160]})") from e
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
