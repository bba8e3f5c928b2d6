"""Layout-independent, safe, atomic checkpoints.

A checkpoint is a directory::

    step_000123/
      model.safetensors   full (unsharded) weights by state_dict name - no pickle, mmap-able
      state.pt            optimizer, scheduler, RNG states, sampler state, step, extra
                          (torch.save; loaded with weights_only=True, so no code runs on load)
      tokenizer.json      optional copy of the tokenizer (lmkit.tokenizer format)
      meta.json           format version, configs, step, time, lmkit version, sha256 of each file
      meta.json.sha256    sha256 of meta.json itself (the manifest is verified too)

Why this shape:

* *Layout independent.* Weights are stored by parameter name, as the single-process model's
  tensors. A run saved under dp=2, tp=2 resumes under pp=4 or on one CPU. A single process writes
  them whole (this directory); a parallel run writes a *sharded* checkpoint (`save_sharded_checkpoint`,
  section at the end): every rank writes only its own boxes of those tensors with
  ``torch.distributed.checkpoint`` into ``shards/``, and a resume under any layout reads only the
  overlapping parts (`load_sharded_checkpoint`); `export_checkpoint` (``lmkit export``) turns it
  into this single directory.
* *Safe.* safetensors cannot execute code; ``state.pt`` is read with ``weights_only=True``.
  Everything stored there is therefore restricted to tensors and plain Python values; the
  save side checks this (`CheckpointError` naming the offending key) so a bad value fails at
  save time instead of at resume time, days later.
* *Atomic.* Files are written into ``.tmp-<name>-*`` next to the target, fsynced, and the
  directory is renamed into place. Replacing an existing checkpoint renames the old one to
  ``.old-<name>-*`` first; if a crash hits between the two renames, the next save or load
  of that name puts the complete old checkpoint back. At no moment is a half-written
  directory visible under the final name. A run directory additionally has a ``latest`` text
  file (written with os.replace) naming the newest checkpoint: `update_latest`, `find_latest`.
* *Verified.* ``meta.json`` holds the size and sha256 of every other file, so truncation or
  corruption is reported by name instead of surfacing as a cryptic deserialisation error; its own
  sha256 sits in ``meta.json.sha256``, so an edited manifest is refused too. The step and the
  configs are also recorded in ``state.pt`` and in the safetensors header (a digest of the configs)
  and cross-checked on load: a manifest that disagrees with the state it describes is refused.
  Checkpoints of format 1 (before the manifest hash) stay readable, with the step cross-check.

Tied weights (e.g. GPT's token embedding and output head) share one storage; safetensors
refuses shared tensors, so each tensor is stored once and the other names are recorded as
aliases in the safetensors header metadata (``lmkit.aliases``: alias -> stored name) and
restored on load.

RNG states (`capture_rng_state` / `restore_rng_state`): Python ``random`` (its state tuple is
plain ints, fine for weights_only), NumPy's legacy global generator (converted to a dict of
tensors/ints, since numpy arrays are not weights_only-loadable), the torch CPU generator and,
when CUDA is available, every CUDA device's generator.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from lmkit import __version__, atomic
from lmkit.config import from_dict, to_dict
from lmkit.tokenizer import load_tokenizer

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "capture_rng_state",
    "restore_rng_state",
    "update_latest",
    "find_latest",
    "list_checkpoints",
    "prune_checkpoints",
    "step_dir_name",
    "configs_digest",
    "Piece",
    "shard_boxes",
    "shard_pieces",
    "optimizer_meta",
    "load_optimizer_meta",
    "is_sharded",
    "save_sharded_checkpoint",
    "load_sharded_checkpoint",
    "load_sharded_full",
    "export_checkpoint",
]

FORMAT_VERSION = 2
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
META_HASH_FILE = "meta.json.sha256"
TOKENIZER_FILE = "tokenizer.json"
LATEST_FILE = "latest"
_ALIAS_KEY = "lmkit.aliases"
_STEP_KEY = "lmkit.step"
_CONFIGS_KEY = "lmkit.configs_sha256"
_STEP_RE = re.compile(r"^step_(\d+)$")

PathLike = str | os.PathLike[str]


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message names the file and the remedy."""


@dataclass
class CheckpointInfo:
    """What `load_checkpoint` found. States not restored into objects are returned here."""

    directory: Path
    step: int
    meta: dict[str, Any]
    configs: dict[str, Any]
    extra: dict[str, Any]
    rng_state: dict[str, Any] | None = None
    sampler_state: Any = None
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    tokenizer_path: Path | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def config(self, name: str, cls: type) -> Any:
        """Rebuild config `name` (e.g. ``"model"``) as dataclass `cls` via `lmkit.config.from_dict`."""
        if name not in self.configs:
            raise CheckpointError(
                f"{self.directory / META_FILE} has no config {name!r}; it has {sorted(self.configs)}"
            )
        return from_dict(cls, self.configs[name])

    def load_tokenizer(self) -> Any:
        """The tokenizer stored with the checkpoint (`lmkit.tokenizer.load_tokenizer`)."""
        if self.tokenizer_path is None:
            raise CheckpointError(f"checkpoint {self.directory} was saved without a tokenizer")
        return load_tokenizer(self.tokenizer_path)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG a training step may consume, in weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put the global RNGs back to a `capture_rng_state` snapshot (missing parts are skipped).

    CUDA states are restored when CUDA is available and the device count matches; a
    checkpoint from a GPU run resumed on a CPU simply has no CUDA generator to restore.
    """
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = npst["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (npst["bit_generator"], keys.astype(np.uint32), int(npst["pos"]),
             int(npst["has_gauss"]), float(npst["cached_gaussian"]))
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda)} device(s) but {torch.cuda.device_count()} "
                "are visible; CUDA RNG not restored (dropout masks will differ from the original run)",
                stacklevel=2,
            )


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


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
    _recover(target)
    for stale in parent.glob(f".tmp-{target.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save of this name

    model_sd = _state_dict(model, "model")
    state: dict[str, Any] = {
        "step": step,
        "optimizer": _state_dict(optimizer, "optimizer") if optimizer is not None else None,
        "scheduler": _state_dict(scheduler, "scheduler") if scheduler is not None else None,
        "sampler": _state_dict(sampler, "sampler") if sampler is not None else None,
        "rng": dict(rng_state) if rng_state is not None else capture_rng_state(),
        "extra": dict(extra or {}),
    }
    config_dicts = {name: _config_dict(name, cfg) for name, cfg in (configs or {}).items()}
    state["configs_sha256"] = configs_digest(config_dicts)  # cross-checked against meta.json on load
    _check_weights_only_safe(state, "state")

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=parent))
    try:
        header = {_STEP_KEY: str(step), _CONFIGS_KEY: state["configs_sha256"]}
        n_tensors, aliases = _write_safetensors(model_sd, tmp / MODEL_FILE, header)
        torch.save(state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
        files = {}
        for p in sorted(tmp.iterdir()):
            files[p.name] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
        meta = {
            "format_version": FORMAT_VERSION,
            "lmkit_version": __version__,
            "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "step": step,
            "configs": config_dicts,
            "tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
            "model": {"tensors": n_tensors, "aliases": aliases},
            "files": files,
        }
        # meta.json (and its hash) are written last: a directory with meta.json had all its files written.
        manifest = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
        _write_bytes(tmp / META_FILE, manifest)
        _write_bytes(tmp / META_HASH_FILE, (hashlib.sha256(manifest).hexdigest() + "\n").encode("ascii"))
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished temp dir to `target`, moving an existing `target` aside first."""
    parent = target.parent
    old: Path | None = None
    if target.exists():
        old = parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # roll back: the old checkpoint stays the current one
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    """Finish or undo a replace that was interrupted between its two renames.

    ``.old-<name>-*`` exists only during a replace. If `target` is missing, the crash hit after
    the old checkpoint was moved aside and before the new one arrived: move the old one back.
    If `target` exists, the new one arrived: the old one is garbage.
    """
    olds = sorted(target.parent.glob(f".old-{target.name}-*")) if target.parent.is_dir() else []
    for old in olds:
        if not target.exists() and (old / META_FILE).is_file():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _state_dict(obj: Any, what: str) -> Any:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict"):
        if what == "model":
            obj = _unwrap(obj)
        return obj.state_dict()
    raise CheckpointError(f"{what} must have a state_dict() method or be a dict, got {type(obj).__name__}")


def _unwrap(model: Any) -> Any:
    """Strip torch.compile / DistributedDataParallel wrappers so names are the plain model's."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _config_dict(name: str, cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        value = to_dict(cfg)
    elif isinstance(cfg, Mapping):
        value = dict(cfg)
    else:
        raise CheckpointError(f"config {name!r} must be a dataclass or a dict, got {type(cfg).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config {name!r} is not JSON-serialisable for {META_FILE}: {e}") from e
    return value


_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
                torch.device, torch.Size)


def _check_weights_only_safe(obj: Any, path: str) -> None:
    """Raise if `obj` holds something torch.load(weights_only=True) would refuse."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{path} has a key of type {type(k).__name__}; use str or int keys")
            _check_weights_only_safe(v, f"{path}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{path}[{i}]")
        return
    hint = ""
    if type(obj).__module__ == "numpy":
        hint = " (convert numpy values with .tolist() or torch.from_numpy)"
    raise CheckpointError(
        f"{path} is a {type(obj).__module__}.{type(obj).__name__}, which {STATE_FILE} cannot hold: it "
        "is loaded with torch.load(weights_only=True), so only tensors and plain Python values are "
        f"allowed{hint}"
    )


def configs_digest(configs: Mapping[str, Any]) -> str:
    """sha256 of the configs' canonical JSON: what state.pt and the weights record of meta.json's."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


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
    _fsync_file(path)
    return len(tensors), aliases


def _write_tokenizer(tokenizer: Any, path: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file {src} does not exist")
        shutil.copyfile(src, path)
        _fsync_file(path)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(path)
    else:
        raise CheckpointError(
            f"tokenizer must be an lmkit Tokenizer or a path, got {type(tokenizer).__name__}"
        )


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); directories cannot be opened this way on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_meta(directory: Path, verify: bool,
               skip_hash: Callable[[str], bool] | None = None) -> dict[str, Any]:
    _recover(directory)
    if not directory.is_dir():
        hint = ""
        if directory.parent.is_dir():
            latest = find_latest(directory.parent)
            if latest is not None:
                hint = f"; the newest checkpoint in {directory.parent} is {latest}"
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist{hint}. Use "
            "lmkit.checkpoint.find_latest(out_dir) to locate the newest checkpoint of a run, or check "
            "the path"
        )
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} is missing: {directory} is not a complete lmkit checkpoint "
            "(meta.json is written last, so the save did not finish); pick another checkpoint"
        )
    manifest = meta_path.read_bytes()
    try:
        meta = json.loads(manifest.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): truncated or corrupt") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not an lmkit manifest (a JSON object): corrupt or edited")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format_version {version!r}; this lmkit ({__version__}) reads versions "
            f"1..{FORMAT_VERSION}. It was written by lmkit {meta.get('lmkit_version', '?')}; "
            "use a matching lmkit version"
        )
    if version >= 2:  # the manifest's own hash (format 1 had none)
        hash_path = directory / META_HASH_FILE
        recorded = hash_path.read_text(encoding="ascii").strip() if hash_path.is_file() else None
        if recorded != hashlib.sha256(manifest).hexdigest():
            what = "is missing" if recorded is None else "does not match meta.json"
            raise CheckpointError(
                f"{hash_path} {what}: the manifest {meta_path} was edited or is corrupt, so the checkpoint "
                "is refused; re-save it or pick an earlier checkpoint")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{meta_path} has step {meta.get('step')!r}, not a non-negative integer: "
                              "corrupt or edited; pick an earlier checkpoint")
    for name, info in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint (listed in {META_FILE})")
        if not verify:
            continue
        size = path.stat().st_size
        if skip_hash is not None and skip_hash(name):  # verified where it is read (sharded checkpoints)
            if size != info["bytes"]:
                raise CheckpointError(f"{path} is {size} bytes but {META_FILE} recorded {info['bytes']}: the "
                                      "file is truncated or corrupt, re-save or pick an earlier checkpoint")
            continue
        if size != info["bytes"]:
            raise CheckpointError(
                f"{path} is {size} bytes but {META_FILE} recorded {info['bytes']}: the file is truncated or "
                "corrupt, re-save or pick an earlier checkpoint"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"{path} fails its sha256 check: the file is truncated or corrupt, re-save or pick an "
                "earlier checkpoint"
            )
    return meta


def load_model_state(
    directory: PathLike, map_location: str | torch.device = "cpu", verify: bool = True
) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint (aliases of tied weights included)."""
    directory = Path(directory)
    if is_sharded(directory):
        return {k: v.to(map_location) for k, v in load_sharded_full(directory, verify)[0].items()}
    meta = _read_meta(directory, verify)
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
        _cross_check(path, manifest, stored)
    for alias, name in aliases.items():
        sd[alias] = sd[name]
    return sd


def _cross_check(path: Path, manifest: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    """Refuse a file whose step / configs / tensor count disagree with meta.json's (one line)."""
    for key, value in manifest.items():
        if stored[key] != value:
            raise CheckpointError(
                f"{path} disagrees with {META_FILE} about the {key} ({stored[key]!r} in the file, {value!r} "
                "in the manifest): the manifest was edited or belongs to another checkpoint; re-save it or "
                "pick an earlier checkpoint")


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
            model = _unwrap(model)
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
    meta = _read_meta(directory, verify)
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
    _cross_check(state_path, manifest, stored)
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
        model = _unwrap(model)
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


# --------------------------------------------------------------------------------------------
# Run directories: step_000123/, latest pointer, pruning
# --------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    """Canonical name of the checkpoint for `step` inside a run directory: ``step_000123``."""
    return f"step_{step:06d}"


def update_latest(out_dir: PathLike, name: str) -> None:
    """Point ``out_dir/latest`` at checkpoint `name` (atomic: temp file + fsync + os.replace)."""
    out_dir = Path(out_dir)
    name = Path(name).name
    if not (out_dir / name / META_FILE).is_file():
        raise CheckpointError(f"{out_dir / name} is not a complete checkpoint; save it before pointing to it")
    atomic.write_text(out_dir / LATEST_FILE, name + "\n")
    _fsync_dir(out_dir)


def list_checkpoints(out_dir: PathLike) -> list[Path]:
    """Complete ``step_*`` checkpoints of a run, oldest first (temp and aside dirs ignored)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest(out_dir: PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    Follows ``latest`` when it names a complete checkpoint; otherwise (no pointer yet, or a
    pointer to a deleted directory) falls back to the highest-numbered ``step_*`` directory.
    """
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if name and (out_dir / name / META_FILE).is_file():
            return out_dir / name
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out_dir: PathLike, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest ``step_*`` checkpoints (never the ``latest`` one)."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
    ckpts = list_checkpoints(out_dir)
    latest = find_latest(out_dir)
    removed = []
    for p in ckpts[:-keep_last]:
        if latest is not None and p.resolve() == latest.resolve():
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint): each rank writes and reads its own pieces
# --------------------------------------------------------------------------------------------

SHARDS_DIR = "shards"  # DCP's files: .metadata (the global index) and one __<rank>_0.distcp per rank


@dataclass
class Piece:
    """A box of one global (layout-independent) tensor that this rank holds.

    ``fqn``: ``model.<GPT name>`` or ``optim.<GPT name>.<exp_avg | exp_avg_sq>``; ``shape``: the
    full tensor's shape; ``offsets``: where `tensor` (this rank's values, a view) starts in it;
    ``write``: whether this rank is the one that saves it (one replica of each box writes).
    """

    fqn: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor
    write: bool = True


def shard_boxes(lo: int, hi: int, shape: tuple[int, ...], spec: Any, tp_rank: int
                ) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """``(flat start, global offsets, sizes)`` of the boxes covering elements ``[lo, hi)`` of a
    local (tensor-parallel) shard of `shape`: a partial row, whole rows, a partial row, each mapped
    into the full tensor by the shard's `spec` (contiguous chunks, or rows picked by an index, cut
    into runs of consecutive rows). Every box is contiguous in the flattened shard. `spec`: a
    `lmkit.parallel.plan.ShardSpec` (``dim``, ``full_size``, ``index``) or None (not split)."""
    stride = math.prod(shape[1:])
    local = []
    a = lo
    while a < hi:
        row, col = divmod(a, stride)
        if len(shape) == 1:
            n, off, size = hi - a, (a,), (hi - a,)
        elif col or hi - a < stride:
            n = min(stride - col, hi - a)
            off, size = (row, col), (1, n)
        else:
            rows = (hi - a) // stride
            n, off, size = rows * stride, (row, 0), (rows, stride)
        local.append((a, off, size))
        a += n
    if spec is None:
        return local
    out = []
    for start, off, size in local:
        if spec.index is None:
            moved = list(off)
            moved[spec.dim] += tp_rank * shape[spec.dim]
            out.append((start, tuple(moved), size))
            continue
        rows = spec.index.tolist()
        unit = stride if len(shape) > 1 else 1
        k = 0
        while k < size[0]:
            j = k
            while j + 1 < size[0] and rows[off[0] + j + 1] == rows[off[0] + j] + 1:
                j += 1
            out.append((start + k * unit, (rows[off[0] + k], *off[1:]), (j - k + 1, *size[1:])))
            k = j + 1
    return out


def shard_pieces(fqn: str, flat: torch.Tensor, lo: int, hi: int, shape: tuple[int, ...], spec: Any,
                 tp_rank: int, write: bool) -> list[Piece]:
    """`Piece`s of elements ``[lo, hi)`` of a local shard whose values `flat` holds (flat[0] = lo)."""
    full = list(shape)
    if spec is not None:
        full[spec.dim] = spec.full_size
    return [Piece(fqn, tuple(full), off, flat[start - lo:start - lo + math.prod(size)].view(size), write)
            for start, off, size in shard_boxes(lo, hi, shape, spec, tp_rank)]

def optimizer_meta(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer's hyper-parameters per group and its step count (the same on every rank), or
    None before the first step: what a sharded checkpoint keeps beside the moments."""
    steps = [float(st["step"]) for st in optimizer.state.values() if st]
    if not steps:
        return None
    groups = [{k: v for k, v in pg.items() if k != "params"} for pg in optimizer.param_groups]
    return {"param_groups": groups, "step": steps[0]}


def load_optimizer_meta(optimizer: torch.optim.Optimizer, meta: Mapping[str, Any]) -> None:
    """Inverse of `optimizer_meta` (after the moments were loaded into the optimizer's state)."""
    for group, saved in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for st in optimizer.state.values():
        if st:
            st["step"] = torch.tensor(float(meta["step"]))


class _PieceSavePlanner(DefaultSavePlanner):
    """DCP's default planner (dedup, global metadata) over exactly this rank's pieces and objects."""

    def __init__(self, pieces: list[Piece], objects: Mapping[str, Any]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces, self.objects = pieces, dict(objects)
        self.data: dict[Any, Any] = {}

    def create_local_plan(self) -> SavePlan:
        items = []
        for piece in self.pieces:
            offsets = torch.Size(piece.offsets)
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(piece.tensor.shape))
            data = TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(piece.tensor),
                                   size=torch.Size(piece.shape))
            items.append(WriteItem(index=MetadataIndex(piece.fqn, offsets), type=WriteItemType.SHARD,
                                   tensor_data=data))
            self.data[(piece.fqn, tuple(piece.offsets))] = piece.tensor
        for key, value in self.objects.items():
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
            self.data[(key, None)] = value
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        offset = write_item.index.offset
        value = self.data[(write_item.index.fqn, tuple(offset) if offset is not None else None)]
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            buffer.seek(0)
            return buffer
        return value.detach().contiguous().cpu()  # the box alone, not the storage it views


class _PieceLoadPlanner(DefaultLoadPlanner):
    """Reads, for every piece, its overlap with every saved chunk (DCP's resharding), in place."""

    def __init__(self, pieces: list[Piece], objects: Sequence[str], received: dict[str, Any]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.pieces, self.objects, self.received = pieces, list(objects), received
        self.bytes_read = 0  # tensor bytes this rank reads (what the resume costs it)

    def create_local_plan(self) -> LoadPlan:
        items, self.targets = [], {}
        by_fqn: dict[str, list[Piece]] = {}
        for piece in self.pieces:
            by_fqn.setdefault(piece.fqn, []).append(piece)
        for fqn, group in by_fqn.items():
            saved = self.metadata.state_dict_metadata.get(fqn)
            if not isinstance(saved, TensorStorageMetadata):
                raise CheckpointError(f"the sharded checkpoint has no tensor {fqn!r}; it was saved from "
                                      "another model (compare meta.json 'configs')")
            if tuple(saved.size) != tuple(group[0].shape):
                raise CheckpointError(f"tensor {fqn!r} has shape {tuple(saved.size)} in the checkpoint but "
                                      f"{tuple(group[0].shape)} in the model; the model config differs")
            chunks = [ChunkStorageMetadata(offsets=torch.Size(p.offsets), sizes=torch.Size(p.tensor.shape))
                      for p in group]
            for item in create_read_items_for_chunk_list(fqn, saved, chunks):
                items.append(item)
                self.bytes_read += math.prod(item.lengths) * group[0].tensor.element_size()
            for k, p in enumerate(group):
                self.targets[(fqn, k)] = p.tensor
        for key in self.objects:
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                                  dest_offsets=torch.Size([0]), storage_index=MetadataIndex(key),
                                  storage_offsets=torch.Size([0]), lengths=torch.Size([0])))
        self.plan = LoadPlan(items)
        return self.plan

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self.targets[(read_item.dest_index.fqn, read_item.dest_index.index)]
        return narrow_tensor_by_index(target, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the values are in place

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.received[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


class _VerifyingReader(FileSystemReader):
    """DCP's file reader that checks the sha256 of each shard file before this rank reads from it
    (only the files it reads: a rank never hashes the whole checkpoint)."""

    def __init__(self, path: Path, files: Mapping[str, Any], verify: bool = True) -> None:
        super().__init__(path)
        self.files, self.root, self.verify, self.checked = files, Path(path), verify, set()
        self.bytes_hashed = 0

    def read_data(self, plan: LoadPlan, planner: Any) -> Any:
        for item in plan.items if self.verify else ():
            relative = self.storage_data[item.storage_index].relative_path
            if relative in self.checked:
                continue
            name, path = f"{SHARDS_DIR}/{relative}", self.root / relative
            info = self.files.get(name)
            if info is None or _sha256(path) != info["sha256"]:
                raise CheckpointError(f"{path} fails its sha256 check (or is not listed in {META_FILE}): the "
                                      "shard is corrupt, re-save or pick an earlier checkpoint")
            self.bytes_hashed += path.stat().st_size
            self.checked.add(relative)
        return super().read_data(plan, planner)


def _dcp_load(**kwargs: Any) -> None:
    """``dcp.load``, with the `CheckpointError` a rank raised inside it surfacing as itself (one line)."""
    try:
        dcp.load({}, **kwargs)
    except CheckpointException as e:
        for inner, _trace in e.failures.values():  # (exception, stack) per failed rank
            if isinstance(inner, CheckpointError):
                raise inner from None
        raise CheckpointError(f"the sharded checkpoint cannot be read: {str(e).splitlines()[0]}") from e


def is_sharded(directory: PathLike) -> bool:
    """Whether `directory` is a sharded checkpoint (written by `save_sharded_checkpoint`)."""
    return (Path(directory) / SHARDS_DIR).is_dir()


def save_sharded_checkpoint(directory: PathLike, *, pieces: list[Piece], rank_state: Mapping[str, Any],
                            step: int, configs: Mapping[str, Any] | None = None, scheduler: Any = None,
                            optimizer: Mapping[str, Any] | None = None, tokenizer: Any = None,
                            extra: Mapping[str, Any] | None = None) -> Path:
    """Write a sharded checkpoint: every rank its own `pieces` and `rank_state` (collective).

    The tensors go through ``torch.distributed.checkpoint`` (one ``__<rank>_0.distcp`` file per
    rank, ``.metadata`` the global index of every box); rank 0 adds state.pt (step, schedule,
    ``optimizer``'s hyper-parameters and step count, `extra`), the tokenizer and meta.json, whose
    file list holds each shard's sha256, computed by the rank that wrote it. Atomic like
    `save_checkpoint`: all ranks write into one temp directory that rank 0 renames into place.
    Nothing is gathered but file names and hashes (the book, chapter 6, section 6.5).
    """
    target = Path(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    where: list[Any] = [None]
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        where[0] = tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent)
        (Path(where[0]) / SHARDS_DIR).mkdir()
    dist.broadcast_object_list(where, src=0)
    tmp = Path(where[0])
    try:
        _check_weights_only_safe(dict(rank_state), "rank state")
        dcp.save({}, storage_writer=FileSystemWriter(tmp / SHARDS_DIR),
                 planner=_PieceSavePlanner(pieces, {f"rank_state/{rank}": dict(rank_state)}))
        mine = {f"{SHARDS_DIR}/{p.name}": {"sha256": _sha256(p), "bytes": p.stat().st_size}
                for p in sorted((tmp / SHARDS_DIR).glob(f"__{rank}_*.distcp"))}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            config_dicts = {name: _config_dict(name, cfg) for name, cfg in (configs or {}).items()}
            state = {"step": step, "sharded": True, "optimizer": dict(optimizer) if optimizer else None,
                     "scheduler": _state_dict(scheduler, "scheduler") if scheduler is not None else None,
                     "extra": dict(extra or {}), "rng": dict(rank_state.get("rng", {})),
                     "configs_sha256": configs_digest(config_dicts)}
            _check_weights_only_safe(state, "state")
            torch.save(state, tmp / STATE_FILE)
            _fsync_file(tmp / STATE_FILE)
            if tokenizer is not None:
                _write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
            files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            files[f"{SHARDS_DIR}/.metadata"] = {"sha256": _sha256(tmp / SHARDS_DIR / ".metadata"),
                                                "bytes": (tmp / SHARDS_DIR / ".metadata").stat().st_size}
            for part in every:
                files.update(part)
            models = sorted({p.fqn for p in pieces if p.fqn.startswith("model.")})
            meta = {"format_version": FORMAT_VERSION, "lmkit_version": __version__,
                    "torch_version": torch.__version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "step": step, "configs": config_dicts,
                    "tokenizer": TOKENIZER_FILE if tokenizer is not None else None,
                    "sharded": {"world_size": world, "format": "torch.distributed.checkpoint"},
                    "model": {"tensors": len(models), "aliases": {}}, "files": files}
            manifest = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
            _write_bytes(tmp / META_FILE, manifest)
            _write_bytes(tmp / META_HASH_FILE, (hashlib.sha256(manifest).hexdigest() + "\n").encode("ascii"))
            _fsync_dir(tmp / SHARDS_DIR)
            _fsync_dir(tmp)
            _swap_into_place(tmp, target)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return target


def _read_sharded(directory: Path, verify: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """meta.json (shard files: sizes only, each is hashed where it is read) and state.pt, cross-checked."""
    meta = _read_meta(directory, verify, skip_hash=lambda name: name.endswith(".distcp"))
    if not meta.get("sharded"):
        raise CheckpointError(f"{directory} is not a sharded checkpoint (no 'sharded' in {META_FILE})")
    state_path = directory / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{state_path} cannot be loaded ({type(e).__name__}: {e}): truncated or "
                              "corrupt, re-save or pick an earlier checkpoint") from e
    _cross_check(state_path, {"step": meta["step"], "configs": configs_digest(meta.get("configs", {}))},
                 {"step": state.get("step"), "configs": state.get("configs_sha256")})
    return meta, state


def _info(directory: Path, meta: dict[str, Any], state: dict[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(directory=directory, step=int(meta["step"]), meta=meta,
                          configs=meta.get("configs", {}), extra=state.get("extra") or {},
                          rng_state=state.get("rng"),
                          optimizer_state=state.get("optimizer"), scheduler_state=state.get("scheduler"),
                          tokenizer_path=directory / meta["tokenizer"] if meta.get("tokenizer") else None)


def load_sharded_checkpoint(directory: PathLike, *, pieces: list[Piece], rank_state_of: int | None = None,
                            verify: bool = True
                            ) -> tuple[CheckpointInfo, dict[str, Any] | None, dict[str, int]]:
    """Read this rank's `pieces` (in place) from a sharded checkpoint saved under any layout.

    Each piece gets exactly the overlapping parts of the saved boxes (DCP's resharding); a rank
    hashes only the shard files it reads. `rank_state_of`: also return that rank's saved RNG
    state (same layout only). Returns the info, that state, and ``{"bytes_read", "bytes_hashed"}``.
    """
    directory = Path(directory)
    meta, state = _read_sharded(directory, verify)
    if state.get("optimizer") is None:  # saved before the first step: no moments to read
        pieces = [p for p in pieces if not p.fqn.startswith("optim.")]
    received: dict[str, Any] = {}
    objects = [f"rank_state/{rank_state_of}"] if rank_state_of is not None else []
    planner = _PieceLoadPlanner(pieces, objects, received)
    reader = _VerifyingReader(directory / SHARDS_DIR, meta["files"], verify)
    _dcp_load(storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    stats = {"bytes_read": planner.bytes_read, "bytes_hashed": reader.bytes_hashed}
    return _info(directory, meta, state), received.get(objects[0]) if objects else None, stats


def load_sharded_full(directory: PathLike, verify: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, CheckpointInfo]:
    """Every tensor of a sharded checkpoint, whole, in this process (no collective): the full weights
    by GPT name and the name-keyed optimizer state of `save_checkpoint`'s format. What `export`, the
    single process and the native engine use."""
    directory = Path(directory)
    meta, state = _read_sharded(directory, verify)
    reader = FileSystemReader(directory / SHARDS_DIR)
    tensors = {fqn: md for fqn, md in reader.read_metadata().state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata)}
    full = {fqn: torch.zeros(tuple(md.size), dtype=md.properties.dtype) for fqn, md in tensors.items()}
    pieces = [Piece(fqn, tuple(t.shape), (0,) * t.dim(), t) for fqn, t in full.items()]
    reader = _VerifyingReader(directory / SHARDS_DIR, meta["files"])
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _dcp_load(storage_reader=reader, planner=_PieceLoadPlanner(pieces, [], {}), no_dist=True)
    weights = {fqn[len("model."):]: t for fqn, t in full.items() if fqn.startswith("model.")}
    if "tok_emb.weight" in weights:
        weights.setdefault("head.weight", weights["tok_emb.weight"])
    info = _info(directory, meta, state)
    optimizer = None
    saved = state.get("optimizer")
    if saved:
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for fqn, t in full.items():
            if fqn.startswith("optim."):
                name, key = fqn[len("optim."):].rsplit(".", 1)
                entries.setdefault(name, {"step": torch.tensor(float(saved["step"]))})[key] = t
        optimizer = {"state": entries, "param_groups": saved["param_groups"]}
    return weights, optimizer, info


def export_checkpoint(source: PathLike, target: PathLike) -> Path:
    """A sharded checkpoint as today's single directory (model.safetensors + state.pt): what
    ``lmkit generate`` and Hugging Face users load. A single-directory source is copied as is."""
    source, target = Path(source), Path(target)
    if not is_sharded(source):
        info = load_checkpoint(source)
        return save_checkpoint(target, model=load_model_state(source), optimizer=info.optimizer_state,
                               scheduler=info.scheduler_state, step=info.step, configs=info.configs,
                               tokenizer=info.tokenizer_path, extra=info.extra, rng_state=info.rng_state)
    weights, optimizer, info = load_sharded_full(source)
    return save_checkpoint(target, model=weights, optimizer=optimizer, scheduler=info.scheduler_state,
                           step=info.step, configs=info.configs, tokenizer=info.tokenizer_path,
                           extra=info.extra, rng_state=info.rng_state or None)
