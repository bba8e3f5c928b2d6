"""The single-directory checkpoint: full weights in one safetensors file, the rest in state.pt.

What a single process saves (`save_checkpoint`), what ``lmkit generate``, ``lmkit eval`` and
Hugging Face users load, and what `lmkit.checkpoint.export` turns a sharded checkpoint into. The
directory and its manifest are those of `lmkit.checkpoint.format`; tied weights are stored once and
their other names kept as aliases in the safetensors header. `load_checkpoint` and
`load_model_state` also read a sharded checkpoint (`lmkit.checkpoint.sharded`), whole, in this
process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lmkit.checkpoint.format import (
    MODEL_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    CheckpointInfo,
    PathLike,
    capture_rng_state,
    check_weights_only_safe,
    config_dict,
    configs_digest,
    cross_check,
    fsync_dir,
    fsync_file,
    new_manifest,
    read_meta,
    recover,
    restore_rng_state,
    sha256_of,
    state_dict_of,
    swap_into_place,
    unwrap,
    write_manifest,
    write_tokenizer,
)
from lmkit.checkpoint.sharded import SHARDS_DIR, is_sharded, load_sharded_full

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_state"]

_ALIAS_KEY = "lmkit.aliases"
_STEP_KEY = "lmkit.step"
_CONFIGS_KEY = "lmkit.configs_sha256"


def save_checkpoint(
    directory: PathLike,
    *,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    scheduler: Any = None,
    step: int,
    configs: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    sampler: Any = None,
    rng_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to `directory`, atomically; return its path.

    `model` is a module or an already gathered full state dict (what a parallel wrapper
    passes). `optimizer`/`scheduler`/`sampler` are objects with ``state_dict()`` or the state
    dicts themselves. `configs` maps names to config dataclasses or dicts (stored as JSON in
    meta.json). `tokenizer` is an `lmkit.tokenizer.Tokenizer` or a path to its JSON file; a
    copy is stored as tokenizer.json. `extra` (any tensors / plain values, e.g. best val loss)
    goes into state.pt. RNG states are captured now unless `rng_state` is given.
    """
    target = Path(directory)
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative integer, got {step!r}")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    for stale in parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save of this name

    model_sd = state_dict_of(model, "model")
    state: dict[str, Any] = {
        "step": step,
        "optimizer": state_dict_of(optimizer, "optimizer") if optimizer is not None else None,
        "scheduler": state_dict_of(scheduler, "scheduler") if scheduler is not None else None,
        "sampler": state_dict_of(sampler, "sampler") if sampler is not None else None,
        "rng": dict(rng_state) if rng_state is not None else capture_rng_state(),
        "extra": dict(extra or {}),
    }
    config_dicts = {name: config_dict(name, cfg) for name, cfg in (configs or {}).items()}
    state["configs_sha256"] = configs_digest(config_dicts)  # cross-checked against meta.json on load
    check_weights_only_safe(state, "state")

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
    try:
        header = {_STEP_KEY: str(step), _CONFIGS_KEY: state["configs_sha256"]}
        n_tensors, aliases = _write_safetensors(model_sd, tmp / MODEL_FILE, header)
        torch.save(state, tmp / STATE_FILE)
        fsync_file(tmp / STATE_FILE)
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        files = {}
        for p in sorted(tmp.iterdir()):
            files[p.name] = {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        meta = new_manifest(step, config_dicts, tokenizer is not None,
                            model={"tensors": n_tensors, "aliases": aliases}, files=files)
        write_manifest(tmp, meta)  # last: a directory with meta.json had all its files written
        fsync_dir(tmp)
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_safetensors(sd: Mapping[str, torch.Tensor], path: Path,
                       header: Mapping[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """Save `sd` with each storage once; return (tensors written, alias -> stored name)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"model tensor {name!r} is on the meta device (not materialised)")
        if hasattr(t, "full_tensor"):  # a DTensor: gather it (layout independence)
            t = t.full_tensor()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in storages:
            t = t.clone()  # a different view of a shared buffer: store its own copy
        storages.add(ptr)
        seen[key] = name
        tensors[name] = t.contiguous().cpu()
    metadata = {_ALIAS_KEY: json.dumps(aliases), "format": "pt", **(header or {})}
    save_file(tensors, str(path), metadata=metadata)
    fsync_file(path)
    return len(tensors), aliases


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model_state(
    directory: PathLike, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint (aliases of tied weights included)."""
    directory = Path(directory)
    if is_sharded(directory):
        return {k: v.to(map_location) for k, v in load_sharded_full(directory, verify)[0].items()}
    meta = read_meta(directory, verify)
    return _read_safetensors(directory / MODEL_FILE, map_location, meta)


def _read_safetensors(path: Path, map_location: str | torch.device,
                      meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a model file (aliases restored), cross-checked against `meta`."""
    from safetensors import safe_open

    device = str(torch.device(map_location))
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            header = f.metadata() or {}
            aliases = json.loads(header.get(_ALIAS_KEY, "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} cannot be read ({e}): truncated or corrupt, re-save or pick an "
                              "earlier checkpoint") from e
    if meta is not None:  # format 1 has no step or configs in the header: only the tensor count
        manifest = {"step": str(meta["step"]), "tensors": meta.get("model", {}).get("tensors", len(sd))}
        stored = {"step": header.get(_STEP_KEY, manifest["step"]), "tensors": len(sd)}
        if meta.get("format_version", 1) >= 2:
            manifest["configs"] = configs_digest(meta.get("configs", {}))
            stored["configs"] = header.get(_CONFIGS_KEY)
        cross_check(path, manifest, stored)
    for alias, name in aliases.items():
        sd[alias] = sd[name]
    return sd


def load_checkpoint(
    directory: PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    sampler: Any = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    restore_rng: bool = False,
    verify: bool = True,
) -> CheckpointInfo:
    """Read a checkpoint, restore it into the objects given, and describe it.

    Weights are checked against `model` before anything is copied: a shape mismatch always
    raises (naming the tensor and both shapes); missing or unexpected names raise when
    `strict`. With ``restore_rng=True`` the global RNGs are put back as they were at save time
    (needed for a bit-for-bit resume; do it after building the model, whose init draws random
    numbers). States of objects not passed are returned in the `CheckpointInfo`.
    """
    directory = Path(directory)
    if is_sharded(directory):  # every tensor whole, here: generate, eval, a single process
        weights, optimizer_state, info = load_sharded_full(directory, verify)
        info.optimizer_state = optimizer_state
        if model is not None:
            model = unwrap(model)
            path = directory / SHARDS_DIR
            info.missing_keys, info.unexpected_keys = _check_against_model(weights, model, path, strict)
            model.load_state_dict({k: v.to(map_location) for k, v in weights.items()}, strict=strict)
        if optimizer is not None:
            raise CheckpointError(f"{directory} is a sharded checkpoint: its optimizer state is keyed by "
                                  "parameter name; resume it with lmkit train, or `lmkit export` it first")
        if scheduler is not None and info.scheduler_state is not None:
            scheduler.load_state_dict(info.scheduler_state)
        if restore_rng and info.rng_state:
            restore_rng_state(info.rng_state)
        return info
    meta = read_meta(directory, verify)
    state_path = directory / STATE_FILE
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{state_path} is missing from the checkpoint") from e
    except Exception as e:
        raise CheckpointError(f"{state_path} cannot be loaded ({type(e).__name__}: {e}): truncated or "
                              "corrupt, re-save or pick an earlier checkpoint") from e

    stored = {"step": state.get("step") if isinstance(state, dict) else None}
    manifest = {"step": meta["step"]}
    if meta["format_version"] >= 2:
        stored["configs"] = state.get("configs_sha256")
        manifest["configs"] = configs_digest(meta.get("configs", {}))
    cross_check(state_path, manifest, stored)
    info = CheckpointInfo(
        directory=directory,
        step=int(meta["step"]),
        meta=meta,
        configs=meta.get("configs", {}),
        extra=state.get("extra") or {},
        rng_state=state.get("rng"),
        sampler_state=state.get("sampler"),
        optimizer_state=state.get("optimizer"),
        scheduler_state=state.get("scheduler"),
        tokenizer_path=directory / meta["tokenizer"] if meta.get("tokenizer") else None,
    )

    if model is not None:
        model = unwrap(model)
        sd = _read_safetensors(directory / MODEL_FILE, map_location, meta)
        missing, unexpected = _check_against_model(sd, model, directory / MODEL_FILE, strict)
        info.missing_keys, info.unexpected_keys = missing, unexpected
        model.load_state_dict(sd, strict=strict)
    if optimizer is not None:
        if info.optimizer_state is None:
            raise CheckpointError(f"{state_path} has no optimizer state (saved without optimizer=)")
        try:
            optimizer.load_state_dict(info.optimizer_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"optimizer state in {state_path} does not fit the optimizer ({e}); build the optimizer "
                "over the same parameters and param groups as the saved run"
            ) from e
    if scheduler is not None:
        if info.scheduler_state is None:
            raise CheckpointError(f"{state_path} has no scheduler state (saved without scheduler=)")
        scheduler.load_state_dict(info.scheduler_state)
    if sampler is not None:
        if info.sampler_state is None:
            raise CheckpointError(f"{state_path} has no sampler state (saved without sampler=)")
        sampler.load_state_dict(info.sampler_state)
    if restore_rng and info.rng_state is not None:
        restore_rng_state(info.rng_state)
    return info


def _check_against_model(
    sd: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    for name, t in sd.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(own[name].shape)} in the model; the model config differs from the one the "
                "checkpoint was saved with (compare with meta.json 'configs', e.g. vocab_size, d_model, "
                "n_layer)"
            )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not match the model: missing keys {_short(missing)}, unexpected keys "
            f"{_short(unexpected)}; the architecture or config differs (pass strict=False to load the "
            "matching part only)"
        )
    return missing, unexpected


def _short(names: list[str], n: int = 8) -> str:
    return str(names) if len(names) <= n else f"{names[:n]} and {len(names) - n} more"
