"""The training loop: AdamW, warmup + cosine schedule, accumulation, clipping, eval, checkpoints.

`Trainer` is deliberately one readable loop (nanoGPT's ``train.py`` is the model to follow):

    for step in range(start, max_steps):
        for each micro-batch:   loss = model(x, y) / grad_accum;  loss.backward()
        clip the global gradient norm;  optimizer.step();  scheduler.step()
        every eval_interval steps: validation loss and perplexity;  maybe save a checkpoint

The numerical guard: a step whose loss or global gradient norm is non-finite is never applied
(the engines drop its gradients), and then the run stops (``nonfinite="stop"``) or goes on with
the next batch (``"skip"``, at most ``max_skips`` times in the run); the weights are checked
before every save, so no checkpoint, and no ``latest``, ever holds a NaN. `NonFiniteError`
says which step, what was non-finite and which checkpoint is the last good one.

Batches are a pure function of ``(seed, step)`` (`lmkit.data.BatchSampler`), and the RNG
states are saved in checkpoints, so a resumed run reproduces an uninterrupted one bit for bit.

`lmkit.run.prepare_run` does the set-up every entry point shares (corpus -> tokenizer -> token
files -> model), so the CLI, the notebooks, the benchmarks and the tests train the same way; the
optimizer and its schedule come from `lmkit.optim`. The command line (``lmkit train`` =
``python -m lmkit train``, also under ``torchrun -m lmkit train``) lives in `lmkit.cli`, which
imports this module, never the reverse.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmkit import costs
from lmkit.checkpoint.format import (
    META_FILE,
    CheckpointInfo,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    restore_rng_state,
    step_dir_name,
    update_latest,
)
from lmkit.checkpoint.sharded import (
    is_sharded,
    load_sharded_checkpoint,
    load_sharded_full,
    save_sharded_checkpoint,
)
from lmkit.checkpoint.single import load_checkpoint, load_model_state, save_checkpoint
from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.data import BatchSampler
from lmkit.experts import set_aux_scale, update_router_biases
from lmkit.optim import (
    configure_optimizer,
    load_named_optimizer_state,
    lr_multiplier,
    named_optimizer_state,
    peak_lrs,
)
from lmkit.parallel.mesh import single_process_topology
from lmkit.parallel.tp_rng import get_tp_rng_tracker
from lmkit.run import build_engine, configure_cuda_matmul, peak_flops_of, resolve_device
from lmkit.tokenizer import Tokenizer
from lmkit.weights import materialize

__all__ = ["Trainer", "NonFiniteError", "SCHEDULE_FIELDS"]

EVAL_STREAM = 1  # sampler stream for validation batches (training uses stream 0)
SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr", "warmup_steps")  # what a resume must not change silently


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient norm or weight stopped the run; the message is one line."""


# --------------------------------------------------------------------------- the loop


@dataclass
class Trainer:
    """The training loop, for one process or one rank of a parallel layout.

    Args:
        model: a `GPT` or `LSTMLanguageModel` (anything with ``forward(x, y) -> (logits, loss)``),
            built with the run's seed. Under a parallel layout every rank passes the same model,
            normally built on the meta device (``prepare_run(..., meta=True)``), and the engine
            allocates and initialises this rank's part only; a model with real weights is cut
            the same way. A meta model without a layout is materialised whole.
        cfg: optimisation and bookkeeping (`TrainConfig`).
        train_tokens / val_tokens: flat token arrays (memmaps from `encode_to_file`).
        model_config / tokenizer: stored in checkpoints so that `lmkit generate` can rebuild
            the model and decode its output.
        parallel / topology: the layout (`ParallelConfig`) and this rank's place in it
            (`lmkit.parallel.mesh.init_topology`); None for a single process.
        callbacks: called with every logged event (a dict with ``kind`` = "train" or "eval"),
            e.g. to draw a live loss curve in a notebook.
        allow_tf32: TF32 matmuls on CUDA (`configure_cuda_matmul`; None = for mixed precision only).

    Logged training events carry ``tokens_per_s`` and ``mfu`` (model FLOPs utilisation from
    ``flops_per_token`` and the GPU's peak, `peak_flops_of`; None when the peak is unknown).
    """

    model: nn.Module
    cfg: TrainConfig
    train_tokens: np.ndarray
    val_tokens: np.ndarray | None = None
    model_config: ModelConfig | None = None
    tokenizer: Tokenizer | None = None
    callbacks: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    parallel: ParallelConfig | None = None
    topology: Any = None
    allow_tf32: bool | None = None

    def __post_init__(self) -> None:
        self.cfg.validate()
        if self.cfg.num_threads > 0:
            torch.set_num_threads(self.cfg.num_threads)
        if self.model_config is None:
            self.model_config = getattr(self.model, "config", None)
        self.block_size = self.model_config.block_size
        count = getattr(self.model, "flops_per_token", None)  # before a layout keeps only this rank's part
        self.flops_per_token = count(training=True) if count is not None else None
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                               "float16": torch.float16}[self.cfg.dtype]
        self.engine = None
        if self.cfg.param_dtype != "float32" and self.parallel is None:
            self.parallel = ParallelConfig()  # the engine keeps the fp32 masters, on one process too
        if self.parallel is not None and (self.parallel.world_size > 1 or self.topology is not None
                                          or self.cfg.param_dtype != "float32"):
            topo = self.topology or single_process_topology(resolve_device(self.cfg.device))
            self.topology = topo
            self.device = topo.device
            self.engine = build_engine(self.model, self.parallel, self.cfg, topo)
            # Keep only this rank's part: the other stages' weights of the full model can be freed.
            self.model = nn.ModuleList(self.engine.stages)
            self.optimizer = self.engine.optimizer
            if self.cfg.activation_checkpointing:
                self.engine.set_activation_checkpointing(True)
        else:
            self.device = resolve_device(self.cfg.device)
            if any(p.is_meta for p in self.model.parameters()):  # built on meta: draw the weights here
                if not hasattr(self.model, "reset_parameters"):
                    raise ConfigError(f"a {type(self.model).__name__} on the meta device has no weights to "
                                      "draw; build it without torch.device('meta') for a single process")
                materialize(self.model, self.device).reset_parameters()
            self.model.to(self.device)
            if self.cfg.activation_checkpointing:
                self.model.set_activation_checkpointing(True)
            self.optimizer = configure_optimizer(self.model, self.cfg, self.device)
        self.is_logging_rank = self.topology is None or self.topology.rank == 0
        self.tf32 = configure_cuda_matmul(self.device, self.autocast_dtype, self.allow_tf32)
        self.peak_flops = peak_flops_of(self.device, self.autocast_dtype, self.tf32)
        batch, seed = self.cfg.batch_size, self.cfg.seed
        self.train_sampler = BatchSampler(self.train_tokens, self.block_size, batch, seed)
        self.val_sampler = (BatchSampler(self.val_tokens, self.block_size, batch, seed)
                            if self.val_tokens is not None else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, self.cfg))
        if self.autocast_dtype is torch.float16 and self.device.type != "cuda":
            raise ConfigError("train.dtype='float16' needs CUDA (no fp16 autocast on this device); "
                              "use 'bfloat16' or 'float32'")
        if self.autocast_dtype is torch.float16 and self.engine is not None:
            raise ConfigError("train.dtype='float16' (loss scaling) is single-process only; use 'bfloat16' "
                              "for parallel layouts")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype is torch.float16)
        compiled = self.cfg.compile and self.engine is None
        self.forward_model = torch.compile(self.model) if compiled else self.model
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # steps whose update the numerical guard dropped (nonfinite="skip")
        self._writer = None

    # ------------------------------------------------------------------ pieces
    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation of a global throughput over all devices (`lmkit.costs.mfu`)."""
        if self.peak_flops is None or self.flops_per_token is None:
            return None
        devices = self.parallel.world_size if self.engine is not None else 1
        return costs.mfu(tokens_per_s, self.flops_per_token, devices, self.peak_flops)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns loss, grad norm (before clipping), lr."""
        lr = self.optimizer.param_groups[0]["lr"]
        if self.engine is not None:
            micro = self.engine.microbatches(self.train_sampler, self.step)
            local = self.engine.forward_backward(micro, self.autocast)
            loss = self.engine.mean_over_dp(local)  # global: the same value on every rank
            grad_norm = self.engine.clip_and_step(self.cfg.grad_clip, finite_loss=math.isfinite(loss))
        else:
            loss, grad_norm = self._single_process_step()
        update_router_biases(self.model)  # experts' auxiliary-loss-free balance (a no-op without)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.cfg.batch_size * self.block_size
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    def nonfinite(self, stats: dict[str, float]) -> str | None:
        """What was non-finite in a step's `stats` ("the loss is nan", ...), or None.

        Under float16 loss scaling an infinite gradient norm is the scaler's business (it skips
        the step and lowers the scale), so only the loss counts there.
        """
        problems = []
        if not math.isfinite(stats["loss"]):
            problems.append(f"the loss is {stats['loss']}")
        if not math.isfinite(stats["grad_norm"]) and not self.scaler.is_enabled():
            problems.append(f"the global gradient norm is {stats['grad_norm']}")
        return " and ".join(problems) or None

    def _single_process_step(self) -> tuple[float, float]:
        self.model.train()
        micro_steps = self.cfg.grad_accum
        total = torch.zeros((), device=self.device)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        set_aux_scale(self.model, scale / micro_steps)  # the balancing loss is scaled as the loss is
        for micro in range(micro_steps):
            x, y = self.train_sampler.batch(self.step, micro=micro, micro_steps=micro_steps,
                                            device=self.device)
            with self.autocast():
                _, loss = self.forward_model(x, y)
            self.scaler.scale(loss / micro_steps).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        loss = (total / micro_steps).item()
        if self.scaler.is_enabled():  # the scaler skips steps with inf/nan gradients itself
            if math.isfinite(loss):
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif math.isfinite(loss) and math.isfinite(grad_norm):  # never apply a non-finite update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self, iters: int | None = None) -> dict[str, float]:
        """Mean validation loss over `iters` fixed batches (the same batches at every eval)."""
        if self.val_sampler is None:
            raise ValueError("evaluate() needs val_tokens")
        iters = iters or self.cfg.eval_iters
        losses = torch.zeros(iters)
        if self.engine is None:
            self.model.eval()
        for i in range(iters):
            x, y = self.val_sampler.batch(i, stream=EVAL_STREAM, device=self.device)
            if self.engine is not None:
                losses[i] = self.engine.eval_loss(x, y, self.autocast)
                continue
            with self.autocast():
                _, loss = self.forward_model(x, y)
            losses[i] = loss.float()
        val_loss = losses.mean().item()
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until `max_steps` (default ``cfg.max_steps``); returns the logged history."""
        cfg = self.cfg
        end = cfg.max_steps if max_steps is None else max_steps
        out_dir = Path(cfg.out_dir)
        progress = _progress(range(self.step, end), desc="train", enabled=self.is_logging_rank)
        window_seconds, window_tokens = 0.0, 0  # throughput of training steps only (no eval)
        for _ in progress:
            if cfg.eval_interval and self.val_sampler is not None and self.step % cfg.eval_interval == 0:
                self._emit({"kind": "eval", "step": self.step, **self.evaluate()})
            started = time.perf_counter()
            stats = self.train_step()
            window_seconds += time.perf_counter() - started
            window_tokens += cfg.batch_size * self.block_size
            problem = self.nonfinite(stats)
            if problem is not None:  # the update was not applied; the decision is the same on every rank
                self.skipped_steps += 1
                if cfg.nonfinite == "stop" or self.skipped_steps > cfg.max_skips:
                    why = ("" if cfg.nonfinite == "stop"
                           else f" ({self.skipped_steps} skipped steps > train.max_skips={cfg.max_skips})")
                    raise NonFiniteError(
                        f"step {self.step}: {problem}{why}; the update was not applied and nothing was "
                        f"saved; {self._last_good(out_dir)}; lower --lr (or --grad-clip), or pass "
                        "--nonfinite skip to skip such steps")
                self._emit({"kind": "skip", "step": self.step, **stats, "problem": problem,
                            "skipped_steps": self.skipped_steps})
            elif self.step % cfg.log_interval == 0 or self.step == end:
                stats["tokens_per_s"] = window_tokens / max(window_seconds, 1e-9)
                stats["mfu"] = self.mfu(stats["tokens_per_s"])
                window_seconds, window_tokens = 0.0, 0
                self._emit({"kind": "train", "step": self.step, **stats})
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{stats['loss']:.4f}")
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < end:
                self.save(out_dir)
        if self.val_sampler is not None and cfg.eval_interval:
            self._emit({"kind": "eval", "step": self.step, **self.evaluate()})
        return self.history

    def _emit(self, event: dict[str, Any]) -> None:
        self.history.append(event)
        if not self.is_logging_rank:
            return
        out_dir = Path(self.cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        if self.cfg.tensorboard:
            self._tensorboard(event)
        for callback in self.callbacks:
            callback(event)

    def _tensorboard(self, event: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(self.cfg.out_dir) / "tensorboard"))
        for key, value in event.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                self._writer.add_scalar(f"{event['kind']}/{key}", value, event["step"])
        self._writer.flush()

    # ------------------------------------------------------------------ checkpoints
    def save(self, out_dir: str | Path | None = None) -> Path:
        """Save a layout-independent checkpoint ``out_dir/step_NNNNNN`` and point ``latest`` at it.

        Under a parallel layout every rank must call it: each writes its own pieces of a sharded
        checkpoint (`lmkit.checkpoint.sharded.save_sharded_checkpoint`), both engines alike.
        """
        out_dir = Path(out_dir or self.cfg.out_dir)
        bad = self.nonfinite_weights()
        if bad:
            raise NonFiniteError(
                f"step {self.step}: the weights {_short(bad)} are non-finite, so no checkpoint was saved; "
                f"{self._last_good(out_dir)}; lower --lr (or --grad-clip) and resume from it")
        name = step_dir_name(self.step)
        configs: dict[str, Any] = {"train": self.cfg, "model": self.model_config}
        if self.parallel is not None:
            configs["parallel"] = self.parallel
        extra: dict[str, Any] = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}
        if self._sharded():  # every rank writes its own shards (torch.distributed.checkpoint)
            pieces, optimizer_meta = self.engine.sharded_state()
            rank_state = {"rng": capture_rng_state(), "tp": get_tp_rng_tracker().state_dict()}
            path = save_sharded_checkpoint(
                out_dir / name, pieces=[p for p in pieces if p.write], rank_state=rank_state, step=self.step,
                configs=configs, scheduler=self.scheduler, optimizer=optimizer_meta, tokenizer=self.tokenizer,
                extra=extra)
            if self.is_logging_rank:
                update_latest(out_dir, name)
            self._barrier()
            return path
        if self.engine is not None:
            weights: Any = self.engine.full_state_dict()
            optimizer = self.engine.full_optimizer_state()
            extra["rank_rng"] = self._gather_rank_rng()
        else:
            weights, optimizer = self.model, named_optimizer_state(self.model, self.optimizer)
        path = out_dir / name
        if self.is_logging_rank:
            path = save_checkpoint(path, model=weights, optimizer=optimizer, scheduler=self.scheduler,
                                   step=self.step, configs=configs, tokenizer=self.tokenizer, extra=extra)
            update_latest(out_dir, name)
        self._barrier()
        return path

    def resume(self, path: str | Path, allow_schedule_change: bool = False) -> CheckpointInfo:
        """Restore weights, optimizer, schedule, RNG and step from a checkpoint directory.

        `path` may be a checkpoint or a run directory (its ``latest`` is used). The checkpoint
        may come from any layout: weights and optimizer state are stored whole, by name.

        A schedule (`SCHEDULE_FIELDS`) that differs from the checkpoint's is refused, since the
        learning rate would jump (a longer ``max_steps`` re-stretches the cosine); with
        `allow_schedule_change` the new schedule is evaluated from the checkpoint's step on:
        the learning rate of step ``s`` is ``lr * lr_multiplier(s, new config)``.
        """
        path = Path(path)
        if not (path / META_FILE).exists() and (latest := find_latest(path)) is not None:
            path = latest
        self._check_schedule(path, allow_schedule_change)
        if is_sharded(path):
            info = self._resume_sharded(path)
        elif self.engine is not None:
            info = load_checkpoint(path, scheduler=self.scheduler, restore_rng=True)
            weights = load_model_state(path)
            self.engine.load_full_state(weights, info.optimizer_state)
            self._restore_rank_rng(info)
        else:
            info = load_checkpoint(path, model=self.model, scheduler=self.scheduler,
                                   map_location=self.device, restore_rng=True)
            if info.optimizer_state is not None:
                load_named_optimizer_state(self.model, self.optimizer, info.optimizer_state)
        self.step = info.step
        self.tokens_seen = int(info.extra.get("tokens_seen", 0))
        self.skipped_steps = int(info.extra.get("skipped_steps", 0))
        if allow_schedule_change:  # the checkpoint's scheduler state holds the old peak lr
            self.scheduler.base_lrs = peak_lrs(self.optimizer, self.cfg)
            for group, peak in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["initial_lr"] = peak
                group["lr"] = peak * lr_multiplier(self.step, self.cfg)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        bad = self.nonfinite_weights()
        if bad:
            earlier = _short([p.name for p in list_checkpoints(path.parent) if p.name < path.name])
            raise NonFiniteError(f"{path} holds non-finite weights ({_short(bad)}); resume from an earlier "
                                 f"checkpoint ({earlier or 'none in ' + str(path.parent)})")
        return info

    def _sharded(self) -> bool:
        """Whether this run saves sharded checkpoints: either engine over several processes."""
        engine = self.engine
        return engine is not None and self.parallel.world_size > 1 and hasattr(engine, "sharded_state")

    def _resume_sharded(self, path: Path) -> CheckpointInfo:
        """Each rank reads its own boxes (resharded from any saved layout); otherwise every tensor
        whole, in this process (the single process, the native engine)."""
        if not self._sharded():
            weights, optimizer, info = load_sharded_full(path)
            if self.engine is not None:
                self.engine.load_full_state(weights, optimizer)
            else:
                self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
                if optimizer is not None:
                    load_named_optimizer_state(self.model, self.optimizer, optimizer)
            restore_rng_state(info.rng_state or {})
        else:
            saved = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            same = saved.get("configs", {}).get("parallel") == to_dict(self.parallel)
            pieces, _ = self.engine.sharded_state(create=True)
            info, mine, self.last_resume_stats = load_sharded_checkpoint(
                path, pieces=pieces, rank_state_of=self.topology.rank if same else None)
            if self.last_resume_stats.get("masters_from_weights") and hasattr(self.engine, "dp"):
                self.engine.dp.refresh_masters()  # saved with fp32 weights: bf16 ones get masters from them
            if info.optimizer_state is not None:
                self.engine.load_optimizer_meta(info.optimizer_state)
            restore_rng_state((mine or {}).get("rng") or info.rng_state or {})
            if mine and mine["tp"]["states"] is not None:
                get_tp_rng_tracker().load_state_dict(mine["tp"])
        if info.scheduler_state is not None:
            self.scheduler.load_state_dict(info.scheduler_state)
        return info

    def _check_schedule(self, path: Path, allow: bool) -> None:
        """Refuse (one line) a resume of another model, or whose learning-rate schedule differs."""
        try:  # only the manifest: a missing or corrupt checkpoint is reported by the load itself
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
            saved = dict(meta.get("configs", {}).get("train") or {})
        except (OSError, ValueError, AttributeError):
            return
        model = dict(meta.get("configs", {}).get("model") or {})
        differ = [f"{k}={model[k]!r} (now {v!r})" for k, v in to_dict(self.model_config).items()
                  if k in model and model[k] != v and k != "dropout"]  # dropout may change, shapes not
        if differ:
            raise ConfigError(f"{path} holds another model: {', '.join(differ)}; resume with the "
                              "checkpoint's model options, or train into a new --out-dir")
        changed = [(name, saved[name], getattr(self.cfg, name)) for name in SCHEDULE_FIELDS
                   if name in saved and saved[name] != getattr(self.cfg, name)]
        if changed and not allow:
            what = ", ".join(f"--{n.replace('_', '-')} {new} (checkpoint: {old})" for n, old, new in changed)
            raise ConfigError(
                f"{path} was trained with another learning-rate schedule: {what}; the learning rate would "
                "jump at the resumed step. Pass --allow-schedule-change to continue with the new schedule "
                "from this step, or resume with the checkpoint's values")

    def nonfinite_weights(self) -> list[str]:
        """Names of this rank's parameters holding a NaN or an infinity, agreed by all ranks.

        Under a layout each rank checks its own shards and one all-reduce tells every rank the
        total, so all of them raise (or save) together; the names listed are this rank's.
        """
        bad = []
        for name, param in self.model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if not bool(torch.isfinite(local.detach()).all()):
                bad.append(name)
        if self.engine is not None and self.parallel.world_size > 1:
            import torch.distributed as dist

            count = torch.tensor([len(bad)], dtype=torch.int64, device=self.device)
            dist.all_reduce(count)
            if count.item() and not bad:
                bad = [f"{int(count.item())} tensors on other ranks"]
        return bad

    def _last_good(self, out_dir: Path) -> str:
        """"the last good checkpoint is ..." for the guard's messages (every saved one is finite)."""
        latest = find_latest(out_dir)
        if latest is None:
            return f"no checkpoint was saved in {out_dir} yet"
        return f"the last good checkpoint is {latest}"

    def _gather_rank_rng(self) -> list[dict[str, Any]]:
        """Every rank's RNG states (and tensor-parallel dropout stream), in rank order (collective).

        Dropout draws from per-rank streams, so resuming the *same* layout bit for bit needs each
        rank's own state; a different layout cannot replay the same masks and starts from rank 0's.
        """
        mine = {"rng": capture_rng_state(), "tp": get_tp_rng_tracker().state_dict()}
        if self.parallel.world_size == 1:
            return [mine]
        import torch.distributed as dist

        states: list[Any] = [None] * self.parallel.world_size
        dist.all_gather_object(states, mine)
        return states

    def _restore_rank_rng(self, info: CheckpointInfo) -> None:
        states = info.extra.get("rank_rng")
        saved = info.configs.get("parallel")
        if not states or saved is None or saved != to_dict(self.parallel):
            return  # another layout: rank 0's global RNG state was restored by load_checkpoint
        mine = states[self.topology.rank]
        restore_rng_state(mine["rng"])
        if mine["tp"]["states"] is not None:
            get_tp_rng_tracker().load_state_dict(mine["tp"])

    def _barrier(self) -> None:
        if self.engine is not None and self.parallel.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def _short(names: list[str], n: int = 4) -> str:
    """At most `n` names, then "and k more"."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _progress(steps: Iterable[int], desc: str, enabled: bool = True):
    """tqdm progress bar on a terminal; silent in non-interactive runs (CI, papermill, logs)."""
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)
