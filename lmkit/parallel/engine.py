"""The hybrid-parallel engine: one optimizer step of a GPT over a ``dp x tp x pp`` layout.

Construction (every rank, same order, so every layout starts from the single-process weights):

1. the GPT built with the run's seed, normally on the meta device (shapes, no storage:
   ``with torch.device("meta"): GPT(config)``); a GPT with real weights (loaded, fine-tuned) is
   cut the same way;
2. cut it into pipeline stages (`lmkit.parallel.stage.build_stages`), keep this rank's;
3. shard each stage over the tensor-parallel group, row by row of `lmkit.parallel.plan`
   (`tensor_parallel.parallelize_stage`);
4. a meta model is materialised now: this rank's parameters only (`lmkit.weights.materialize`),
   each set to its shard of the single-process initial value, drawn one parameter at a time
   (`lmkit.weights.InitialWeights`), so a rank's peak at start is its own part plus the largest
   single parameter, not the model;
5. hand the stage parameters to `data_parallel.DataParallel`, which owns the optimizer
   (plain, ZeRO-1 or ZeRO-2) and averages gradients over the data-parallel group; a model with
   experts keeps only this ep rank's experts (`lmkit.parallel.experts`), whose gradients a second
   `DataParallel` sums over their replicas (the edp group) and divides by dp x cp.

One step (`train_step`):

* this data-parallel rank takes its slice of the global batch, cut into ``M`` microbatches
  (``M = grad_accum * microbatches``), so the global batch is the same for every layout;
* ``pp == 1``: forward/backward each microbatch, gradient all-reduce overlapping the last
  backward (``no_sync`` on the others); ``pp > 1``: the pipeline schedule runs all microbatches;
* gradient fix-ups whose order matters: tied-embedding sums over the first/last stage,
  sequence-parallel LayerNorm sums over tp, then the data-parallel reduction;
* the true global gradient norm (each gradient counted once across tp, pp and dp: a replica
  by one tp rank, `plan.tp_sharded`), clipping,
  the optimizer step, the learning-rate schedule;
* the loss reported on *every* rank is the mean over the global batch.

For checkpoints it describes this rank's boxes of the layout-independent tensors (weights and
AdamW moments by GPT parameter name, `sharded_state`: what each rank writes and reads with
``torch.distributed.checkpoint``, nothing gathered), and it still gathers or loads the full state
(`full_state_dict`, `load_full_state`) for single-directory checkpoints of any layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmkit.checkpoint.sharded import Piece, load_optimizer_meta, optimizer_meta, shard_pieces
from lmkit.config import ConfigError, ParallelConfig, TrainConfig
from lmkit.experts import set_aux_scale
from lmkit.optim import muon_lr_scale, orthogonalize
from lmkit.parallel import plan
from lmkit.parallel.context_parallel import parallelize_context, shard_sequence, validate_cp
from lmkit.parallel.data_parallel import DataParallel
from lmkit.parallel.experts import (
    GroupTokens,
    expert_slice,
    gather_experts,
    is_expert_param,
    parallelize_experts,
    validate_experts,
)
from lmkit.parallel.mesh import Topology
from lmkit.parallel.native_plan import quiet_redistribute
from lmkit.parallel.pipeline import (
    pipeline_forward,
    run_pipeline,
    validate_pipeline,
)
from lmkit.parallel.stage import GPTStage, activation_shape, build_stages
from lmkit.parallel.tensor_parallel import (
    gather_full_param,
    parallelize_stage,
    shard_full_param,
    shard_spec,
)
from lmkit.weights import InitialWeights, materialize

__all__ = ["EngineBase", "ParallelEngine", "on_meta", "validate_layout", "gather_over_pp"]


def on_meta(model: nn.Module) -> bool:
    """Whether `model` was built on the meta device: the engine then materialises its own part only."""
    return any(p.is_meta for p in model.parameters())


def validate_layout(pcfg: ParallelConfig, tcfg: TrainConfig, n_layer: int, n_head: int, vocab_size: int,
                    block_size: int, world_size: int | None = None, dropout: float = 0.0,
                    n_kv_head: int | None = None, d_ff: int | None = None, experts: Any = None) -> None:
    """Every layout error, found before any process communicates (one clear message each).
    `n_kv_head` and `d_ff` (the model's key/value heads and MLP width, both split over tp) are
    checked when given, and the expert layouts of the lmkit engine when `experts` (the model's
    `ModelConfig`) is."""
    pcfg.validate(world_size=world_size)
    if experts is not None and pcfg.engine == "lmkit":
        validate_experts(experts, pcfg, tcfg)
    if pcfg.cp > 1:
        if pcfg.engine == "native":
            raise ConfigError("parallel.cp > 1 needs engine='lmkit': the native engine has no context "
                              "parallel (torch 2.13's context_parallel has no CPU sharding strategy for "
                              "aten._scaled_dot_product_flash_attention_for_cpu); use --engine lmkit")
        if dropout > 0:
            raise ConfigError(f"parallel.cp={pcfg.cp}: ring attention has no attention dropout but "
                              f"model.dropout={dropout}; set dropout=0 or cp=1")
        try:
            validate_cp(block_size, pcfg.cp)
        except ConfigError as e:
            raise ConfigError(f"model.block_size={block_size}: {e}") from None
    if pcfg.engine == "native" and pcfg.zero == 1:
        raise ConfigError("parallel.zero=1 does not exist in engine='native': FSDP2 shards gradients and "
                          "optimizer state together; use zero=0 (replicate), 2 (fully_shard, parameters kept "
                          "from forward to backward) or 3 (fully_shard), or engine='lmkit' for ZeRO-1")
    if pcfg.engine == "lmkit" and pcfg.zero == 3:
        raise ConfigError("parallel.zero=3 (fully sharded parameters) needs engine='native'; "
                          "the lmkit engine implements ZeRO-1 and ZeRO-2")
    if pcfg.zero and pcfg.dp == 1:
        raise ConfigError(f"parallel.zero={pcfg.zero} shards over data-parallel ranks but dp=1; set dp > 1")
    if n_head % pcfg.tp:
        raise ConfigError(f"model.n_head={n_head} is not divisible by parallel.tp={pcfg.tp}; "
                          "attention heads are split over tensor-parallel ranks: choose tp among "
                          f"{[d for d in range(1, n_head + 1) if n_head % d == 0]} or change n_head")
    if n_kv_head is not None and n_kv_head % pcfg.tp:
        choices = [d for d in range(1, n_kv_head + 1) if n_kv_head % d == 0]
        raise ConfigError(f"model.n_kv_head={n_kv_head} is not divisible by parallel.tp={pcfg.tp}; each "
                          "tensor-parallel rank keeps whole key/value heads with the query heads that share "
                          f"them: choose tp among {choices} or change n_kv_head")
    if d_ff is not None and d_ff % pcfg.tp:
        raise ConfigError(f"the MLP's hidden width {d_ff} is not divisible by parallel.tp={pcfg.tp}; its "
                          "features are split over tensor-parallel ranks: choose d_ff a multiple of "
                          f"{pcfg.tp}")
    if vocab_size % pcfg.tp:
        raise ConfigError(f"the vocabulary ({vocab_size} tokens) is not divisible by parallel.tp={pcfg.tp}; "
                          "the embedding and the output layer are split by vocabulary rows: choose tp "
                          "dividing the vocabulary size (or a BPE vocabulary size that is a multiple of tp)")
    if pcfg.sequence_parallel and (block_size // pcfg.cp) % pcfg.tp:
        if pcfg.cp > 1:
            raise ConfigError(f"{block_size // pcfg.cp} tokens per context-parallel rank is not divisible by "
                              f"parallel.tp={pcfg.tp}; sequence parallelism splits each rank's tokens over "
                              f"tensor-parallel ranks: choose a block size that is a multiple of "
                              f"{math.lcm(2 * pcfg.cp, pcfg.cp * pcfg.tp)}")
        raise ConfigError(f"model.block_size={block_size} is not divisible by parallel.tp={pcfg.tp}; "
                          "sequence parallelism splits the sequence over tensor-parallel ranks")
    m = pcfg.microbatches
    if pcfg.pp > 1:
        validate_pipeline(pcfg, n_layer, m)
    per_rank = pcfg.dp * tcfg.grad_accum * m
    if tcfg.batch_size % per_rank:
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} is not divisible by dp x grad_accum x microbatches = "
            f"{pcfg.dp} x {tcfg.grad_accum} x {m} = {per_rank}; every microbatch needs a whole number of "
            "sequences")


class EngineBase:
    """What both engines (this one and `lmkit.parallel.native.NativeEngine`) do alike, given their
    ``stages``, ``named_params`` (GPT names), ``optimizer``, ``pcfg``, ``topo``, ``micro_steps``
    and ``_full(name, tensor)`` (the full tensor of this rank's part)."""

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for stage in self.stages:
            stage.activation_checkpointing = bool(enabled)

    def train(self, mode: bool = True) -> None:
        for stage in self.stages:
            stage.train(mode)

    def microbatches(self, sampler, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This data-parallel rank's microbatches of the global batch of `step` (under context
        parallelism this cp rank's chunks of each sequence, tokens and targets alike)."""
        return [self.cp_shard(*sampler.batch(step, rank=self.topo.dp_rank, world=self.pcfg.dp, micro=i,
                                             micro_steps=self.micro_steps, device=self.topo.device))
                for i in range(self.micro_steps)]

    def cp_shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This context-parallel rank's chunks of the sequences `x` and their targets `y`."""
        if self.topo.cp == 1:
            return x, y
        return tuple(shard_sequence(t, self.topo.cp_rank, self.topo.cp) for t in (x, y))

    def mean_over_dp(self, value: float) -> float:
        """The global-batch mean of a per-rank mean (every dp x cp rank has equally many tokens, so
        each token counts once)."""
        topo = self.topo.gradient_view()
        return group_mean(value, topo.dp_group, topo.dp, self.topo.device)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights by `GPT` parameter name (collective: every rank calls it)."""
        with quiet_redistribute():  # (an FSDP2 x TP DTensor takes two gathers: no notice each time)
            local = {name: self._full(name, p.detach()) for name, p in self.named_params
                     if self.saved_as(name) == name}
        full = gather_over_pp(local, self.topo)
        for row in plan.GPT_PLAN:  # the tied head: the embedding's tensor
            partner = plan.tied_to(row, self.config.tie_embeddings)
            if partner is not None:
                full[f"{row.module}.weight"] = full[f"{partner}.weight"]
        return full

    def saved_as(self, name: str) -> str:
        """The name under which parameter `name` is kept (`plan.saved_as` for this model's tying)."""
        return plan.saved_as(name, self.config.tie_embeddings)

    def load_optimizer_meta(self, meta: dict[str, Any]) -> None:
        """The hyper-parameters and the step count of a sharded checkpoint (moments already loaded)."""
        for dp in getattr(self, "dps", [self]):
            load_optimizer_meta(dp.optimizer, meta)


class ParallelEngine(EngineBase):
    """Stages, gradient synchronisation and optimizer of one rank (see the module docstring)."""

    def __init__(self, model: nn.Module, pcfg: ParallelConfig, tcfg: TrainConfig, topo: Topology) -> None:
        cfg = model.config
        validate_layout(pcfg, tcfg, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.block_size, topo.world_size,
                        cfg.dropout, cfg.kv_heads, cfg.ffn_width)
        self.pcfg, self.tcfg, self.topo, self.config = pcfg, tcfg, topo, cfg
        initial = InitialWeights(model) if on_meta(model) else None
        self.stages: list[GPTStage] = build_stages(model, pcfg.pp, topo.pp_rank, pcfg.virtual_stages)
        for stage in self.stages:  # before tp, which hooks the ring attention like any attention
            parallelize_context(stage, topo)
        if pcfg.tp > 1:
            for stage in self.stages:
                parallelize_stage(stage, topo, pcfg.sequence_parallel, seed=tcfg.seed)
        validate_experts(cfg, pcfg, tcfg)
        tokens = GroupTokens(topo.token_group, pcfg.dp * pcfg.cp)
        for stage in self.stages:  # this ep rank's experts; the all-to-all dispatch; global counts
            parallelize_experts(stage, topo.ep_group, pcfg.ep, topo.ep_rank, tokens)
        for stage in self.stages:
            if initial is not None:
                materialize(stage, topo.device)  # this rank's shards only, values set below
            else:
                stage.to(topo.device)
        self.named_params = self._named_parameters()
        if initial is not None:  # before DataParallel, which copies the weights into its buffers
            self.load_full_state(initial, None)
        # Under pipelining the tied embedding's two copies get buckets of their own, so that ZeRO-2
        # gives the first and the last stage the same shard of it (their gradients are summed).
        dense = [(n, p) for n, p in self.named_params if not is_expert_param(n)]
        experts = [(n, p) for n, p in self.named_params if is_expert_param(n)]
        self.dp = DataParallel(dense, topo.gradient_view(), tcfg, zero=pcfg.zero,
                               isolate=("tok_emb.weight", "head.weight") if self._tied_across_stages()
                               and pcfg.zero == 2 else (), norm_weights=self._norm_weights(),
                               orthogonalizer=self._orthogonalize)
        # the experts' replicas (edp group) sum their gradients and divide by dp x cp (moe_spec)
        edp_zero = pcfg.zero if pcfg.dp * pcfg.cp > pcfg.ep else 0  # (one replica: nothing to shard)
        self.edp = DataParallel(experts, topo.expert_view(), tcfg, zero=edp_zero,
                                norm_weights=self._norm_weights(), average_over=pcfg.dp * pcfg.cp
                                ) if experts else None
        self.dps = [dp for dp in (self.dp, self.edp) if dp is not None]
        self.optimizer = self.dp.optimizer
        index = {id(p): k for k, (_, p) in enumerate(self.named_params)}
        self._dp_index = [[index[id(p)] for p in dp.params] for dp in self.dps]  # -> named_params
        self.micro_steps = tcfg.grad_accum * pcfg.microbatches
        self.checkpointing = False

    # ------------------------------------------------------------------ set-up helpers
    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(GPT name, parameter)`` of this rank's stages, each once; ``_where[name]``: its stage and
        name there (the last stage's copy of the tied embedding is ``head.weight``)."""
        named, self._where = [], {}
        for stage in self.stages:
            for local, param in stage.named_parameters():
                name = "head.weight" if stage.tied_embedding_copy() is param else stage.original_name(local)
                if name not in self._where:
                    self._where[name] = (stage, local)
                    named.append((name, param))
        return named

    def _norm_weights(self) -> dict[str, float]:
        """Count every gradient once in the global norm: replicas get weight 0 (`plan.tp_sharded`)."""
        replica = self.topo.tp_rank != 0  # a tp replica is counted by tp rank 0; a tied copy by its partner
        return {name: 0.0 if (replica and not plan.tp_sharded(name)) or self.saved_as(name) != name else 1.0
                for name, _ in self.named_params}

    def _orthogonalize(self, name: str, update: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Muon's direction for this rank's part of matrix `name`: the tensor-parallel shards of its
        Nesterov update all-gathered, Newton-Schulz on the whole matrix, this rank's part kept
        (`lmkit.optim.Muon`); every tp rank calls it for the same names in the same order."""
        stage, local = self._where[name]
        full = gather_full_param(stage, local, update) if self.pcfg.tp > 1 else update
        direction = orthogonalize(full, self.tcfg.muon_precision)
        return shard_full_param(stage, local, direction), muon_lr_scale(full.shape)

    def _tied_across_stages(self) -> bool:
        """Whether the embedding and the head share a matrix held by two pipeline stages."""
        return self.pcfg.pp > 1 and self.config.tie_embeddings

    def _tp_partial(self) -> bool:
        """Whether some replicated gradients are partial over tp (`plan.tp_partial`) and must be summed."""
        return self.pcfg.tp > 1 and (self.pcfg.sequence_parallel or self.config.qk_norm)

    # ------------------------------------------------------------------ one step
    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]],
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         on_event: Callable | None = None) -> float:
        """Gradients of the mean loss over `micro` (summed into .grad); returns this rank's mean loss."""
        topo, pcfg = self.topo, self.pcfg
        self.train(True)
        for stage in self.stages:  # each microbatch's loss is scaled by 1 / len(micro); the aux loss too
            set_aux_scale(stage, 1.0 / len(micro))
        overlap = pcfg.pp == 1 and not self._tp_partial()
        if pcfg.pp == 1:
            stage = self.stages[0]
            total = torch.zeros((), device=topo.device)
            for i, (x, y) in enumerate(micro):
                last = i == len(micro) - 1
                sync = contextlib.nullcontext() if (last and overlap) else self._no_sync()
                with sync:
                    with autocast():
                        loss = stage(x, y)
                    (loss / len(micro)).backward()
                total += loss.detach().float()
            loss_value = total.item() / len(micro)  # one host sync per step, not per microbatch
        else:
            b, t = micro[0][0].shape
            shape = activation_shape(b, t, self.config.d_model, pcfg.tp, pcfg.sequence_parallel)
            dtype = torch.float32 if self.tcfg.dtype == "float32" else getattr(torch, self.tcfg.dtype)
            with self._no_sync():
                loss_value = run_pipeline(pcfg.schedule, self.stages, topo, micro, shape, dtype=dtype,
                                          autocast=autocast if self.tcfg.dtype != "float32" else None,
                                          on_event=on_event, accumulate=self._add_grad)
        if pcfg.zero == 2:  # the gradients are in the dp shards: the fix-ups sum shards (same layout)
            for dp in self.dps:
                dp.finish_grad_sync()
            self._sum_fixups()
            return loss_value
        self._sum_fixups()  # on the full local gradients, before the dp reduction
        for dp in self.dps:
            dp.finish_grad_sync()
        return loss_value

    @contextlib.contextmanager
    def _no_sync(self):
        with contextlib.ExitStack() as stack:
            for dp in self.dps:
                stack.enter_context(dp.no_sync())
            yield

    def _add_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        (self.edp if self.edp is not None and id(param) in self.edp._index else self.dp).add_grad(param, grad)

    def _sum_fixups(self) -> None:
        """The tied embedding's copies (first + last stage) and the replicated gradients that are
        partial over tp (`plan.tp_partial`) summed over their groups, in `DataParallel`'s gradient
        buffers (ZeRO-0/1: the full local gradients; ZeRO-2: the dp shards, after the reduce-scatter:
        both sums are linear, so their order with the dp average does not matter)."""
        topo = self.topo
        if self._tied_across_stages() and (topo.is_first_stage or topo.is_last_stage):
            tied = [p for name, p in self.named_params if name in ("tok_emb.weight", "head.weight")]
            self.dp.all_reduce_grads(tied, topo.embedding_group)
        if self._tp_partial():
            sp = self.pcfg.sequence_parallel
            replicated = [p for name, p in self.named_params if plan.tp_partial(name, sp)]
            for dp in self.dps:
                dp.all_reduce_grads(replicated, topo.tp_group)

    def clip_and_step(self, max_norm: float, finite_loss: bool = True) -> float:
        """Global gradient norm over all ranks, clipping, optimizer step; returns the norm.

        The step is applied only when `finite_loss` and the norm is finite (the same decision on
        every rank: both are global); otherwise the gradients are dropped and the weights kept.
        """
        sq = self.dp.grad_sq_sum().detach().to(torch.float64)
        if self.edp is not None:  # experts: summed over their edp replicas' chunks, then over ep
            sq_experts = self.edp.grad_sq_sum().detach().to(torch.float64)
            if self.pcfg.ep > 1:
                dist.all_reduce(sq_experts, group=self.topo.ep_group)
            sq = sq + sq_experts
        for group, size in ((self.topo.tp_group, self.pcfg.tp), (self.topo.pp_group, self.pcfg.pp)):
            if size > 1:
                dist.all_reduce(sq, group=group)
        norm = math.sqrt(float(sq))
        if not (finite_loss and math.isfinite(norm)):  # a non-finite update would poison the weights
            for dp in self.dps:
                dp.zero_grad()
            return norm
        if max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                for dp in self.dps:
                    dp.scale_grads(coef)
        for dp in self.dps[1:]:  # the schedule drives dp.optimizer's learning rate: the experts follow it
            for group in dp.optimizer.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"]
        for dp in self.dps:
            dp.step()
            dp.zero_grad()
        return norm

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor,
                  autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
        """Loss of one (global) validation batch, computed by the pipeline and shared by all ranks."""
        self.train(False)
        x, y = self.cp_shard(x, y)
        if self.pcfg.pp == 1:
            with autocast():
                value = float(self.stages[0](x, y))
            return self._mean_over_cp(value)
        b, t = x.shape
        shape = activation_shape(b, t, self.config.d_model, self.pcfg.tp, self.pcfg.sequence_parallel)
        dtype = torch.float32 if self.tcfg.dtype == "float32" else getattr(torch, self.tcfg.dtype)
        with autocast():  # activations travel as in training (bf16 weights need bf16 inputs)
            return self._mean_over_cp(pipeline_forward(self.stages, self.topo, x, y, shape, dtype))

    def _mean_over_cp(self, value: float) -> float:
        return group_mean(value, self.topo.cp_group, self.topo.cp, self.topo.device)

    # ------------------------------------------------------------------ checkpoints
    def full_optimizer_state(self) -> dict[str, Any]:
        """Optimizer state by parameter name with full tensors (collective)."""
        sd = self.dp.state_dict()
        for dp in self.dps[1:]:
            sd["state"].update(dp.state_dict()["state"])
        state = {}
        for name, entry in sd["state"].items():
            if self.saved_as(name) != name:
                continue
            state[name] = {k: (self._full(name, v) if torch.is_tensor(v) and v.dim() > 0 else v)
                           for k, v in entry.items()}
        return {"state": gather_over_pp(state, self.topo), "param_groups": sd["param_groups"]}

    def load_full_state(self, weights: dict[str, torch.Tensor], optimizer: dict[str, Any] | None) -> None:
        """Load full (layout-independent) weights and optimizer state into this rank's shards."""
        with torch.no_grad():
            for name, param in self.named_params:
                source = weights[self.saved_as(name)]
                param.copy_(self._shard_tp(name, source.to(param.device)))
        for dp in getattr(self, "dps", ()):  # mixed precision: masters from the weights, unless the
            dp.refresh_masters()  # optimizer has them
        if optimizer is not None:
            state = {}
            for name, _ in self.named_params:
                entry = optimizer["state"].get(self.saved_as(name))
                if entry is None:
                    continue
                state[name] = {k: (self._shard_tp(name, v) if torch.is_tensor(v) and v.dim() > 0 else v)
                               for k, v in entry.items()}
            for dp in self.dps:
                dp.load_state_dict({"state": state, "param_groups": optimizer["param_groups"]})

    def sharded_state(self, create: bool = False) -> tuple[list[Piece], dict[str, Any] | None]:
        """This rank's boxes of the layout-independent tensors (weights, AdamW moments), as views,
        and the optimizer's hyper-parameters: what a sharded checkpoint saves and loads. Nothing is
        gathered; each box names its place in the full GPT tensor, and one replica of each writes
        (dp rank 0 for weights and unsharded moments, tp rank 0 for tp-replicated tensors)."""
        pieces = []
        specs = {name: self._spec(name) for name, _ in self.named_params}
        for name, param in self.named_params:
            source, spec, rank, (tp0, dp0) = self.saved_as(name), specs[name], *self._box_of(name)
            pieces += shard_pieces(f"model.{source}", param.detach().view(-1), 0, param.numel(),
                                   tuple(param.shape), spec, rank, source == name and tp0 and dp0)
        for dp, index in zip(self.dps, self._dp_index, strict=True):
            for i, lo, hi, moments in dp.optimizer_segments(create):
                name, param = self.named_params[index[i]]
                source, spec, rank, (tp0, dp0) = self.saved_as(name), specs[name], *self._box_of(name)
                for key, flat in moments.items():
                    pieces += shard_pieces(f"optim.{source}.{key}", flat, lo, hi, tuple(param.shape), spec,
                                           rank, source == name and tp0 and (dp.zero > 0 or dp0))
        return pieces, optimizer_meta(self.optimizer)

    def _spec(self, name: str) -> Any:
        if is_expert_param(name):  # contiguous experts per ep rank (whole over tp)
            return plan.ShardSpec(0, self.config.n_experts) if self.pcfg.ep > 1 else None
        stage, local = self._where[name]
        return shard_spec(stage).get(local)

    def _box_of(self, name: str) -> tuple[int, tuple[bool, bool]]:
        """The rank along the split of `name`'s `_spec` (tp, or ep for experts) and whether this rank is
        (tp rank 0 or holds a tp shard, replica 0 of the data-parallel group that reduces `name`): one
        replica of every box writes, each box names its place in the full tensor."""
        topo = self.topo.gradient_view()
        if is_expert_param(name):
            return self.topo.ep_rank, (topo.tp_rank == 0, self.topo.expert_view().dp_rank == 0)
        return topo.tp_rank, (self._spec(name) is not None or topo.tp_rank == 0, topo.dp_rank == 0)

    def _full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if is_expert_param(name):
            return gather_experts(tensor, self.topo.ep_group, self.pcfg.ep)
        return gather_full_param(*self._where[name], tensor) if self.pcfg.tp > 1 else tensor.clone()

    def _shard_tp(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if is_expert_param(name):
            first, local = expert_slice(self.config.n_experts, self.pcfg.ep, self.topo.ep_rank)
            return tensor[first:first + local]
        return shard_full_param(*self._where[name], tensor)


def group_mean(value: float, group, size: int, device: torch.device) -> float:
    """The mean of `value` over the `size` ranks of `group` (collective; `value` itself if size 1)."""
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL: device tensors only
    dist.all_reduce(t, group=group)
    return float(t) / size


def gather_over_pp(local: dict[str, Any], topo: Topology) -> dict[str, Any]:
    """The union of every pipeline rank's `local` dict (CPU tensors; collective over the pp group)."""
    if topo.pp == 1:
        return local
    parts: list[Any] = [None] * topo.pp
    dist.all_gather_object(parts, {k: _to_cpu(v) for k, v in local.items()}, group=topo.pp_group)
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
