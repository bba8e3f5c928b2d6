"""Memory of a parallel rank: the storage it holds, and live/peak bytes while something runs.

`memory_report` counts allocated storage once each (parameters, gradient buffers, optimizer
state with mixed precision's fp32 master weights; a DTensor's local shard); `AllocationTracker`
the live and peak bytes allocated while it is active, on a CPU too (a ``TorchDispatchMode``).
The book, chapter 6 (memory at start) and chapter 5, section 5.3.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmkit.parallel.timeline import modules_of

__all__ = ["memory_report", "AllocationTracker"]


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, any other tensor as is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, Tensor) else t


def _storage_bytes(tensors: Iterable[Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        t = _local(t)
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.data_ptr() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _params_and_optimizer(obj: Any, optimizer: Any) -> tuple[list[Tensor], Any, Any]:
    """(the model's parameters, the optimizer, the engine or module they were found in)."""
    if getattr(obj, "engine", None) is not None:  # a Trainer with a parallel engine
        obj = obj.engine
    elif hasattr(obj, "model") and hasattr(obj, "optimizer") and not hasattr(obj, "named_params"):
        optimizer = optimizer or obj.optimizer  # a single-process Trainer
        obj = obj.model if isinstance(obj.model, nn.Module) else obj
    optimizer = optimizer if optimizer is not None else getattr(obj, "optimizer", None)
    if hasattr(obj, "named_params"):  # lmkit ParallelEngine
        params = [p for _, p in obj.named_params]
    elif isinstance(obj, nn.Module):
        params = list(obj.parameters())
    elif callable(getattr(obj, "parameters", None)):
        params = list(obj.parameters())
    else:
        params = [p for m in modules_of(obj) for p in m.parameters()]
    return params, optimizer, obj


def _gradient_buffers(obj: Any) -> list[Tensor]:
    """The flat gradient buffers of lmkit's `DataParallel` (``engine.dp``; ZeRO-2: the shard
    accumulators). The ``.grad`` of a parameter or master is usually a view into them, but not
    always: with bf16 reduction under fp32 masters the masters' ``.grad`` are fp32 copies made for
    the step and dropped after it, and ZeRO-2's full ``.grad`` live only until their bucket is
    reduced, so the buffers are counted themselves."""
    dps = getattr(obj, "dps", None) or [getattr(obj, "dp", None)]  # (the experts' edp: a second one)
    groups = [g for dp in dps for g in (getattr(dp, "groups", None) or ())]
    return [t for g in groups for t in (getattr(g, "grad", None), getattr(g, "shard_grad", None))
            if isinstance(t, Tensor)]


def _key(t: Tensor) -> tuple[Any, int]:
    t = _local(t)
    return t.device, t.untyped_storage().data_ptr()


def memory_report(engine: Any, optimizer: Any = None) -> dict[str, Any]:
    """This rank's parameter, gradient and optimizer-state bytes, and the CUDA peak.

    `engine`: an lmkit `ParallelEngine`, a native engine (anything with ``parameters()``,
    ``stages`` or ``model``, and ``optimizer``), a `Trainer`, or an ``nn.Module`` together with
    its `optimizer`. Bytes are allocated storage, each storage counted once (module docstring).
    ``param_bytes`` are the model's weights (bf16 under ``train.param_dtype=bfloat16``);
    ``master_bytes`` the optimizer's own fp32 copies of them in mixed precision (the tensors it
    steps that share no storage with the model's weights: lmkit's masters, sharded with ZeRO), 0
    otherwise; ``optimizer_bytes`` the masters plus the optimizer's state (moments, step
    counters), as `lmkit.costs.memory` counts its ``optimizer``. ``grad_bytes``: the gradients of
    the weights and masters and the engine's gradient buffers. ``cuda_peak_bytes`` is
    ``torch.cuda.max_memory_allocated`` on a GPU, None on a CPU (no allocator statistics there).
    """
    params, optimizer, obj = _params_and_optimizer(engine, optimizer)
    numel = sum(_local(p).numel() for p in {id(p): p for p in params}.values())
    model_storages = {_key(p) for p in params}
    # ZeRO's shard "parameters" (fp32) are views of the same flat buffers as the weights; mixed
    # precision's masters are storages of their own.
    optimizers = [dp.optimizer for dp in obj.dps] if getattr(obj, "dps", None) else [optimizer]
    optimizers = [o for o in optimizers if o is not None]
    units = [p for o in optimizers for group in o.param_groups for p in group["params"]]
    masters = [p for p in units if _key(p) not in model_storages]
    seen: set = set()
    param_bytes = _storage_bytes(params, seen)
    master_bytes = _storage_bytes(masters, seen)
    grad_bytes = _storage_bytes([p.grad for p in params + units if p.grad is not None]
                                + _gradient_buffers(obj), seen)
    state_tensors = []
    for o in optimizers:
        for state in o.state.values():
            state_tensors += [v for v in state.values() if isinstance(v, Tensor)]
    opt_bytes = master_bytes + _storage_bytes(state_tensors, seen)
    devices = {_local(p).device for p in params}
    cuda = next((d for d in devices if d.type == "cuda"), None)
    return {
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "master_bytes": master_bytes,
        "total_bytes": param_bytes + grad_bytes + opt_bytes,
        "param_numel": numel,
        "device": str(cuda or next(iter(devices), "cpu")),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(cuda) if cuda is not None else None,
    }


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storage allocated while active, on any device.

    A CPU has no allocator statistics (``torch.cuda.max_memory_allocated`` is GPU-only), so the
    tracker watches the dispatcher: the storage of every tensor an operator returns is counted
    once, when first seen, and uncounted when torch frees it (a finalizer on the storage object,
    which torch keeps alive exactly as long as the storage). Views and parameters wrapping a
    counted storage add nothing; meta tensors have none. Not counted: storage allocated before
    the tracker started, and kernels' internal scratch space. What chapter 6 uses to measure a
    rank's peak memory at start::

        with AllocationTracker() as alloc:
            engine = build_engine(model, layout, train_cfg, topology)
        alloc.peak_bytes, alloc.live_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: set[tuple[str, int]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._count(_local(t))
        return out

    def _count(self, t: Tensor) -> None:
        if t.is_meta or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key[1] == 0 or key in self._live:
            return
        n = storage.nbytes()
        self._live.add(key)
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: tuple[str, int], n: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.live_bytes -= n
