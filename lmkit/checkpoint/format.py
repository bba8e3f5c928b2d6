"""The checkpoint format: its files, the verified manifest, the atomic swap, run directories.

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
  them whole (this directory, `lmkit.checkpoint.single`); a parallel run writes a *sharded*
  checkpoint (`lmkit.checkpoint.sharded`): every rank writes only its own boxes of those tensors
  with ``torch.distributed.checkpoint`` into ``shards/``, and a resume under any layout reads only
  the overlapping parts; `lmkit.checkpoint.export` (``lmkit export``) turns it into this single
  directory.
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
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkit import __version__, atomic
from lmkit.config import from_dict, to_dict
from lmkit.tokenizer import load_tokenizer

__all__ = [
    "FORMAT_VERSION", "MODEL_FILE", "STATE_FILE", "META_FILE", "META_HASH_FILE", "TOKENIZER_FILE",
    "LATEST_FILE", "PathLike", "CheckpointError", "CheckpointInfo", "capture_rng_state", "restore_rng_state",
    "configs_digest", "new_manifest", "write_manifest", "read_meta", "cross_check", "sha256_of",
    "step_dir_name", "update_latest", "list_checkpoints", "find_latest", "prune_checkpoints",
]

FORMAT_VERSION = 2
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
META_HASH_FILE = "meta.json.sha256"
TOKENIZER_FILE = "tokenizer.json"
LATEST_FILE = "latest"
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
# Writing: what state.pt may hold, the manifest, durable files, the atomic swap
# --------------------------------------------------------------------------------------------


def state_dict_of(obj: Any, what: str) -> Any:
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "state_dict"):
        if what == "model":
            obj = unwrap(obj)
        return obj.state_dict()
    raise CheckpointError(f"{what} must have a state_dict() method or be a dict, got {type(obj).__name__}")


def unwrap(model: Any) -> Any:
    """Strip torch.compile / DistributedDataParallel wrappers so names are the plain model's."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def config_dict(name: str, cfg: Any) -> Any:
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


def check_weights_only_safe(obj: Any, path: str) -> None:
    """Raise if `obj` holds something torch.load(weights_only=True) would refuse."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{path} has a key of type {type(k).__name__}; use str or int keys")
            check_weights_only_safe(v, f"{path}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{path}[{i}]")
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


def new_manifest(step: int, configs: Mapping[str, Any], tokenizer: bool, **rest: Any) -> dict[str, Any]:
    """The fields every manifest (meta.json) starts with, then `rest` (``model``, ``files``, ...)."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"format_version": FORMAT_VERSION, "lmkit_version": __version__,
            "torch_version": torch.__version__, "created": created, "step": step, "configs": dict(configs),
            "tokenizer": TOKENIZER_FILE if tokenizer else None, **rest}


def write_manifest(directory: Path, meta: Mapping[str, Any]) -> None:
    """Write meta.json and meta.json.sha256 (its own hash), durably; written last, so a directory
    with a manifest had all its files written."""
    manifest = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
    write_bytes(directory / META_FILE, manifest)
    write_bytes(directory / META_HASH_FILE, (hashlib.sha256(manifest).hexdigest() + "\n").encode("ascii"))


def write_tokenizer(tokenizer: Any, path: Path) -> None:
    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not src.is_file():
            raise CheckpointError(f"tokenizer file {src} does not exist")
        shutil.copyfile(src, path)
        fsync_file(path)
    elif hasattr(tokenizer, "save"):
        tokenizer.save(path)
    else:
        raise CheckpointError(
            f"tokenizer must be an lmkit Tokenizer or a path, got {type(tokenizer).__name__}"
        )


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def swap_into_place(tmp: Path, target: Path) -> None:
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
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(target: Path) -> None:
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


# --------------------------------------------------------------------------------------------
# Reading: the manifest verified, files cross-checked against it
# --------------------------------------------------------------------------------------------


def read_meta(directory: Path, verify: bool,
               skip_hash: Callable[[str], bool] | None = None) -> dict[str, Any]:
    recover(directory)
    if not directory.is_dir():
        hint = ""
        if directory.parent.is_dir():
            latest = find_latest(directory.parent)
            if latest is not None:
                hint = f"; the newest checkpoint in {directory.parent} is {latest}"
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist{hint}. Use "
            "lmkit.checkpoint.format.find_latest(out_dir) to locate the newest checkpoint of a run, or check "
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
        if sha256_of(path) != info["sha256"]:
            raise CheckpointError(
                f"{path} fails its sha256 check: the file is truncated or corrupt, re-save or pick an "
                "earlier checkpoint"
            )
    return meta


def cross_check(path: Path, manifest: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
    """Refuse a file whose step / configs / tensor count disagree with meta.json's (one line)."""
    for key, value in manifest.items():
        if stored[key] != value:
            raise CheckpointError(
                f"{path} disagrees with {META_FILE} about the {key} ({stored[key]!r} in the file, {value!r} "
                "in the manifest): the manifest was edited or belongs to another checkpoint; re-save it or "
                "pick an earlier checkpoint")


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
    fsync_dir(out_dir)


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
