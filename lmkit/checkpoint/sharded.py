"""The sharded checkpoint: every rank writes and reads only its own pieces (torch.distributed.checkpoint).

A parallel run saves with `save_sharded_checkpoint`: each rank hands its boxes of the
layout-independent tensors (`Piece`: a part of a ``model.<name>`` or ``optim.<name>.<moment>``
tensor, from `shard_pieces`) to ``torch.distributed.checkpoint`` (DCP), which writes one
``shards/__<rank>_0.distcp`` file per rank and the global index ``shards/.metadata``; rank 0 adds
state.pt, the tokenizer and the manifest (`lmkit.checkpoint.format`), whose file list holds every
shard's sha256, computed by the rank that wrote it. A resume under any layout reads only the
overlapping parts of the saved boxes (`load_sharded_checkpoint`, DCP's resharding), hashing only
the shard files it reads; `load_sharded_full` reads every tensor whole in one process (what
``lmkit export``, generation and the native engine use). Chapter 6, section 6.5.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from lmkit.checkpoint.format import (
    META_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    CheckpointInfo,
    PathLike,
    check_weights_only_safe,
    config_dict,
    configs_digest,
    cross_check,
    fsync_dir,
    fsync_file,
    new_manifest,
    read_meta,
    recover,
    sha256_of,
    state_dict_of,
    swap_into_place,
    write_manifest,
    write_tokenizer,
)

__all__ = [
    "SHARDS_DIR", "Piece", "shard_boxes", "shard_pieces", "optimizer_meta", "load_optimizer_meta",
    "is_sharded", "save_sharded_checkpoint", "load_sharded_checkpoint", "load_sharded_full",
]

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
    local = [(lo + start, off, size) for start, off, size in _flat_boxes(hi - lo, lo, shape)]
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


def _flat_boxes(n: int, lo: int, shape: tuple[int, ...]
                ) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(start relative to lo, offsets, sizes)`` covering ``n`` elements of a tensor of `shape`
    from flat position `lo`: whole sub-tensors along the first dimension where they fit, the partial
    ones at both ends cut further along the next dimensions (a stacked expert matrix is 3-D)."""
    if len(shape) == 1:
        return [(0, (lo,), (n,))]
    stride, out, a, hi = math.prod(shape[1:]), [], lo, lo + n
    while a < hi:
        row, col = divmod(a, stride)
        if col or hi - a < stride:
            take = min(stride - col, hi - a)
            out += [(a - lo + s, (row, *off), (1, *size))
                    for s, off, size in _flat_boxes(take, col, shape[1:])]
        else:
            take = (hi - a) // stride * stride
            out.append((a - lo, (row,) + (0,) * (len(shape) - 1), (take // stride, *shape[1:])))
        a += take
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
    steps = [float(st["step"]) for st in optimizer.state.values() if st and "step" in st]
    if not steps:
        return None
    groups = [{k: v for k, v in pg.items() if k != "params"} for pg in optimizer.param_groups]
    return {"param_groups": groups, "step": steps[0]}


def load_optimizer_meta(optimizer: torch.optim.Optimizer, meta: Mapping[str, Any]) -> None:
    """Inverse of `optimizer_meta` (after the moments were loaded into the optimizer's state)."""
    for group, saved in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    for st in optimizer.state.values():
        if st and "step" in st:  # (Muon's state counts no steps)
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
            if info is None or sha256_of(path) != info["sha256"]:
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
        recover(target)
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        where[0] = tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent)
        (Path(where[0]) / SHARDS_DIR).mkdir()
    dist.broadcast_object_list(where, src=0)
    tmp = Path(where[0])
    try:
        check_weights_only_safe(dict(rank_state), "rank state")
        dcp.save({}, storage_writer=FileSystemWriter(tmp / SHARDS_DIR),
                 planner=_PieceSavePlanner(pieces, {f"rank_state/{rank}": dict(rank_state)}))
        mine = {f"{SHARDS_DIR}/{p.name}": {"sha256": sha256_of(p), "bytes": p.stat().st_size}
                for p in sorted((tmp / SHARDS_DIR).glob(f"__{rank}_*.distcp"))}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            config_dicts = {name: config_dict(name, cfg) for name, cfg in (configs or {}).items()}
            state = {"step": step, "sharded": True, "optimizer": dict(optimizer) if optimizer else None,
                     "scheduler": state_dict_of(scheduler, "scheduler") if scheduler is not None else None,
                     "extra": dict(extra or {}), "rng": dict(rank_state.get("rng", {})),
                     "configs_sha256": configs_digest(config_dicts)}
            check_weights_only_safe(state, "state")
            torch.save(state, tmp / STATE_FILE)
            fsync_file(tmp / STATE_FILE)
            if tokenizer is not None:
                write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
            files = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            files[f"{SHARDS_DIR}/.metadata"] = {"sha256": sha256_of(tmp / SHARDS_DIR / ".metadata"),
                                                "bytes": (tmp / SHARDS_DIR / ".metadata").stat().st_size}
            for part in every:
                files.update(part)
            models = sorted({p.fqn for p in pieces if p.fqn.startswith("model.")})
            meta = new_manifest(step, config_dicts, tokenizer is not None,
                                sharded={"world_size": world, "format": "torch.distributed.checkpoint"},
                                model={"tensors": len(models), "aliases": {}}, files=files)
            write_manifest(tmp, meta)
            fsync_dir(tmp / SHARDS_DIR)
            fsync_dir(tmp)
            swap_into_place(tmp, target)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return target


def _read_sharded(directory: Path, verify: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """meta.json (shard files: sizes only, each is hashed where it is read) and state.pt, cross-checked."""
    meta = read_meta(directory, verify, skip_hash=lambda name: name.endswith(".distcp"))
    if not meta.get("sharded"):
        raise CheckpointError(f"{directory} is not a sharded checkpoint (no 'sharded' in {META_FILE})")
    state_path = directory / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{state_path} cannot be loaded ({type(e).__name__}: {e}): truncated or "
                              "corrupt, re-save or pick an earlier checkpoint") from e
    cross_check(state_path, {"step": meta["step"], "configs": configs_digest(meta.get("configs", {}))},
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
    state (same layout only). Returns the info, that state, and ``{"bytes_read", "bytes_hashed",
    "masters_from_weights"}`` (the fp32 master pieces the checkpoint does not have).
    """
    directory = Path(directory)
    meta, state = _read_sharded(directory, verify)
    if state.get("optimizer") is None:  # saved before the first step: no moments to read
        pieces = [p for p in pieces if not p.fqn.startswith("optim.")]
    received: dict[str, Any] = {}
    objects = [f"rank_state/{rank_state_of}"] if rank_state_of is not None else []
    reader = _VerifyingReader(directory / SHARDS_DIR, meta["files"], verify)
    # fp32 master weights (bf16 weights, `train.param_dtype`) that a checkpoint saved with fp32 weights
    # lacks: the caller takes them from the weights (`DataParallel.refresh_masters`)
    saved = reader.read_metadata().state_dict_metadata
    unsaved = [p for p in pieces if p.fqn.endswith(".master") and p.fqn not in saved]
    pieces = [p for p in pieces if not (p.fqn.endswith(".master") and p.fqn not in saved)]
    planner = _PieceLoadPlanner(pieces, objects, received)
    _dcp_load(storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    stats = {"bytes_read": planner.bytes_read, "bytes_hashed": reader.bytes_hashed,
             "masters_from_weights": len(unsaved)}
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
