"""Tensor and sequence parallelism (`lmkit.parallel.tensor_parallel`) against single-process math.

Each distributed test is one `run_local` launch of 2 gloo processes (tp=2) that runs many
checks; the worker functions live at module level so the forkserver can import them.
Everything is fp32; tolerances are 1e-6 for layers and the loss, 1e-5 for whole-model gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel

from lmkit.config import ConfigError, ModelConfig, ParallelConfig
from lmkit.model import GPT
from lmkit.parallel import comm, plan, tp_rng
from lmkit.parallel import tensor_parallel as tpm
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import Topology
from lmkit.parallel.native_plan import NativeStage, dtensor_plan
from lmkit.parallel.stage import build_stages

TP = 2


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, what: str = "") -> None:
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape and diff <= atol, (
        f"{what}: shapes {tuple(a.shape)} {tuple(b.shape)}, max diff {diff}")


def _init():
    from lmkit.parallel.mesh import init_topology

    return init_topology(ParallelConfig(tp=TP), device="cpu")


def _all_gather_obj(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- worker 1: operators and layers


def _check_comm_ops(topo) -> None:
    r, g = topo.tp_rank, topo.tp_group
    xs = [_rand(10 + i, 2, 4, 3) for i in range(TP)]  # rank i's input
    gs = [_rand(20 + i, 2, 4, 3) for i in range(TP)]  # rank i's upstream gradient
    half = [_rand(30 + i, 2, 2, 3) for i in range(TP)]

    x = xs[r].clone().requires_grad_()  # f: identity forward, all-reduce backward
    y = comm.copy_to_tp(x, g)
    y.backward(gs[r])
    _close(y, xs[r], what="copy_to_tp fwd")
    _close(x.grad, sum(gs), what="copy_to_tp bwd")

    x = xs[r].clone().requires_grad_()  # g: all-reduce forward, identity backward
    y = comm.reduce_from_tp(x, g)
    y.backward(gs[r])
    _close(y, sum(xs), what="reduce_from_tp fwd")
    _close(x.grad, gs[r], what="reduce_from_tp bwd")

    x = xs[0].clone().requires_grad_()  # the same full tensor on every rank
    y = comm.scatter_to_sequence(x, g)
    y.backward(half[r])
    _close(y, xs[0][:, 2 * r:2 * r + 2], what="scatter_to_sequence fwd")
    _close(x.grad, torch.cat(half, 1), what="scatter_to_sequence bwd")

    x = half[r].clone().requires_grad_()
    y = comm.gather_from_sequence(x, g)
    y.backward(gs[r])
    _close(y, torch.cat(half, 1), what="gather_from_sequence fwd")
    _close(x.grad, sum(gs)[:, 2 * r:2 * r + 2], what="gather_from_sequence bwd")

    x = xs[r].clone().requires_grad_()
    y = comm.reduce_scatter_to_sequence(x, g)
    y.backward(half[r])
    _close(y, sum(xs)[:, 2 * r:2 * r + 2], what="reduce_scatter_to_sequence fwd")
    _close(x.grad, torch.cat(half, 1), what="reduce_scatter_to_sequence bwd")

    with pytest.raises(ConfigError, match="not divisible by the tensor-parallel size tp=2"):
        comm.scatter_to_sequence(_rand(0, 2, 3, 4), g)


def _check_layers(topo, sp: bool) -> None:
    """Column, row and vocab-parallel layers against the full nn.Linear / nn.Embedding."""
    r, g = topo.tp_rank, topo.tp_group
    seq = slice(2 * r, 2 * r + 2)  # this rank's sequence chunk of T=4

    def local_in(full: torch.Tensor) -> torch.Tensor:
        return (full[:, seq] if sp else full).clone().requires_grad_()

    def local_out(full: torch.Tensor) -> torch.Tensor:
        return full[:, seq] if sp else full

    # column-parallel with the qkv per-head layout (3 x 2 heads x head_dim 2 = 12 rows)
    torch.manual_seed(0)
    lin = nn.Linear(8, 12)
    rows = plan.qkv_shard_rows(n_head=2, head_dim=2, tp_rank=r, tp_size=TP)
    for shard_rows in (None, rows):
        col = tpm.ColumnParallelLinear(lin, r, TP, g, sp, shard_rows=shard_rows)
        idx = torch.arange(12).chunk(TP)[r] if shard_rows is None else rows
        X, G = _rand(1, 2, 4, 8).requires_grad_(), _rand(2, 2, 4, 12)
        lin.zero_grad()
        (lin(X) * G).sum().backward()
        x = local_in(X.detach())
        y = col(x)
        (y * G[..., idx]).sum().backward()
        _close(y, lin(X)[..., idx], what=f"column fwd sp={sp}")
        _close(x.grad, local_out(X.grad), what=f"column input grad sp={sp}")
        _close(col.weight.grad, lin.weight.grad[idx], what=f"column weight grad sp={sp}")
        _close(col.bias.grad, lin.bias.grad[idx], what=f"column bias grad sp={sp}")
        full_w = tpm.gather_full_param(_FakeStage(col, r, g), "weight", col.weight.detach())
        _close(full_w, lin.weight.detach(), what="gather_full_param column")

    # row-parallel: contiguous input columns, bias added once after the sum
    lin = nn.Linear(12, 8)
    row = tpm.RowParallelLinear(lin, r, TP, g, sp)
    cols = torch.arange(12).chunk(TP)[r]
    Z, G = _rand(3, 2, 4, 12).requires_grad_(), _rand(4, 2, 4, 8)
    (lin(Z) * G).sum().backward()
    z = Z.detach()[..., cols].clone().requires_grad_()
    y = row(z)
    (y * local_out(G)).sum().backward()
    _close(y, local_out(lin(Z)), what=f"row fwd sp={sp}")
    _close(z.grad, Z.grad[..., cols], what=f"row input grad sp={sp}")
    _close(row.weight.grad, lin.weight.grad[:, cols], what=f"row weight grad sp={sp}")
    bias_grad = row.bias.grad.clone()
    if sp:  # partial under SP: summed over the group (what allreduce_tp_partial_grads does)
        torch.distributed.all_reduce(bias_grad, group=g)
    _close(bias_grad, lin.bias.grad, what=f"row bias grad sp={sp}")

    # vocab-parallel embedding
    emb = nn.Embedding(16, 8)
    vemb = tpm.VocabParallelEmbedding(emb, r, TP, g, sp)
    ids = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(5))
    G = _rand(6, 2, 4, 8)
    (emb(ids) * G).sum().backward()
    y = vemb(ids)
    (y * local_out(G)).sum().backward()
    _close(y, local_out(emb(ids)), what=f"embedding fwd sp={sp}")
    _close(vemb.weight.grad, emb.weight.grad[8 * r:8 * r + 8], what=f"embedding grad sp={sp}")


class _FakeStage(nn.Module):
    """Just enough of a parallelized stage for gather_full_param on one layer."""

    def __init__(self, layer, tp_rank, group):
        super().__init__()
        self.layer = layer
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, TP, group
        self.tp_shard_specs = layer.shard_specs()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def _check_against_dtensor(topo) -> None:
    """lmkit's column/row pair computes what DTensor's ColwiseParallel/RowwiseParallel compute."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    r, g = topo.tp_rank, topo.tp_group
    torch.manual_seed(0)
    ref = _MLP()
    ours = _MLP()
    ours.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (TP,))
    parallelize_module(ref, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel()})
    ours.fc = tpm.ColumnParallelLinear(ours.fc, r, TP, g)
    ours.proj = tpm.RowParallelLinear(ours.proj, r, TP, g)

    X = _rand(7, 2, 4, 8)
    x_ref, x_ours = X.clone().requires_grad_(), X.clone().requires_grad_()
    y_ref, y_ours = ref(x_ref), ours(x_ours)
    G = _rand(8, 2, 4, 8)
    (y_ref * G).sum().backward()
    (y_ours * G).sum().backward()
    _close(y_ours, y_ref, what="vs DTensor output")
    _close(x_ours.grad, x_ref.grad, what="vs DTensor input grad")
    for name in ("fc.weight", "fc.bias", "proj.weight", "proj.bias"):
        mine = ours.get_parameter(name).grad
        theirs = ref.get_parameter(name).grad.to_local()
        _close(mine, theirs, what=f"vs DTensor grad {name}")
        _close(ours.get_parameter(name).detach(), ref.get_parameter(name).to_local().detach(),
               what=f"vs DTensor shard {name}")


def _check_cross_entropy(topo) -> None:
    r, g = topo.tp_rank, topo.tp_group
    V = 16
    logits = 5 * _rand(9, 3, 5, V)
    targets = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(10))
    targets[0, 1] = targets[2, 4] = targets[1, 0] = -100
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.view(-1, V), targets.view(-1), ignore_index=-100)
    ref.backward()
    local = logits[..., r * V // TP:(r + 1) * V // TP].clone().requires_grad_()
    loss = tpm.vocab_parallel_cross_entropy(local, targets, g, r, TP)
    loss.backward()
    _close(loss, ref, what="vocab-parallel CE value")
    _close(local.grad, full.grad[..., r * V // TP:(r + 1) * V // TP], what="vocab-parallel CE grad")


def worker_ops_and_layers() -> str:
    topo = _init()
    _check_comm_ops(topo)
    for sp in (False, True):
        _check_layers(topo, sp)
    _check_cross_entropy(topo)
    _check_against_dtensor(topo)
    return "ok"


# --------------------------------------------------------------------------- worker 2: a whole GPT stage


def _tiny_config(**kw) -> ModelConfig:
    values = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, d_model=32, dropout=0.0)
    values.update(kw)
    return ModelConfig(**values)


def _batch(T: int = 16):
    gen = torch.Generator().manual_seed(123)
    idx = torch.randint(0, 64, (2, T), generator=gen)
    targets = torch.randint(0, 64, (2, T), generator=gen)
    targets[0, 3] = targets[1, 7] = -100
    return idx, targets


def _parallel_step(model, ref, topo, sp: bool, what: str):
    """Parallelize `model` as one stage, run forward/backward on it and on `ref` (its single-process
    copy), check the losses agree and return the stage with its gradients."""
    stage = tpm.parallelize_stage(build_stages(model, 1, 0)[0], topo, sequence_parallel=sp)
    idx, targets = _batch()
    _, ref_loss = ref(idx, targets)
    ref_loss.backward()
    loss = stage(idx, targets)
    loss.backward()
    tpm.allreduce_tp_partial_grads([stage], topo)
    _close(loss, ref_loss, what=f"{what} loss sp={sp}")
    return stage


def _check_stage_matches_gpt(topo, sp: bool) -> None:
    torch.manual_seed(0)
    model = GPT(_tiny_config())
    ref = copy.deepcopy(model)
    stage = _parallel_step(model, ref, topo, sp, what="stage")
    for name, p in stage.named_parameters():
        full = tpm.gather_full_param(stage, name, p.grad)
        ref_p = ref.get_parameter(stage.original_name(name))
        _close(full, ref_p.grad, atol=1e-5, what=f"grad {name} sp={sp}")
        # the round trip full -> shard -> full is exact, and the shard is what the stage holds
        _close(tpm.shard_full_param(stage, name, ref_p.detach()), p.detach(), atol=0.0, what=f"shard {name}")
        assert plan.tp_sharded(name) == (name in ("tok_emb.weight",) or name.endswith((
            "qkv.weight", "qkv.bias", "fc.weight", "fc.bias", "attn.proj.weight", "mlp.proj.weight"))), name
        expect_sp = sp and (".ln" in name or name.startswith("ln_f") or name == "pos_emb.weight"
                            or name.endswith("proj.bias"))
        assert (sp and plan.sequence_partial(name)) == expect_sp, name
        assert plan.tp_sharded(name) == (tpm.shard_spec(stage).get(name) is not None), name  # layers = plan
    assert stage.head.weight is stage.tok_emb.weight  # tied inside one stage
    assert stage.head.weight.shape == (32, 32)  # vocab 64 / tp 2

    if sp:  # a sequence that cannot be split fails with a clear error, on every rank alike
        with pytest.raises(ConfigError, match="multiple of tp"):
            stage(*(t[:, :15] for t in _batch()))


def _check_untied_head(topo) -> None:
    """A last stage that is not the first shards its own copy of the embedding for the head."""
    torch.manual_seed(0)
    model = GPT(_tiny_config())
    last = tpm.parallelize_stage(build_stages(model, 2, 1)[0], topo)
    full = model.tok_emb.weight.detach()
    assert last.head.weight is not model.tok_emb.weight and tpm.shard_spec(last)["head.weight"]
    _close(tpm.gather_full_param(last, "head.weight", last.head.weight.detach()), full, atol=0.0,
           what="untied head shard")


def _run_dropout(topo, sp: bool):
    torch.manual_seed(0)
    model = GPT(_tiny_config(dropout=0.1))
    stage = tpm.parallelize_stage(build_stages(model, 1, 0)[0], topo, sequence_parallel=sp, seed=7)
    stage.train()
    fresh = tp_rng.get_tp_rng_tracker().states[0].clone()
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in stage.blocks]
    torch.manual_seed(1)  # the data-loader / default stream, the same on every tp rank
    loss = stage(*_batch())
    loss.backward()
    for h in hooks:
        h.remove()
    grads = [p.grad.clone() for p in stage.parameters()]
    # the attention dropout (inside SDPA) drew from the rank's own stream
    assert not torch.equal(fresh, tp_rng.get_tp_rng_tracker().states[0]), "tp RNG stream unused"
    return stage, loss.detach(), outs, grads


def _check_dropout(topo) -> None:
    for sp in (False, True):
        _, loss1, outs1, grads1 = _run_dropout(topo, sp)
        stage, loss2, outs2, grads2 = _run_dropout(topo, sp)
        assert loss1.item() == loss2.item(), "TP with dropout must be deterministic"
        assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))
        # every tp rank draws the same default stream (replicated regions) ...
        states = _all_gather_obj(torch.get_rng_state())
        assert torch.equal(states[0], states[1]), "default RNG streams diverged across tp ranks"
        # ... and its own stream for the sharded attention heads
        tracker = tp_rng.get_tp_rng_tracker()
        forked = _all_gather_obj(tracker.states[0])
        assert not torch.equal(forked[0], forked[1])
        if not sp:  # the residual stream is replicated: identical on every tp rank despite dropout
            for out in outs1:
                gathered = _all_gather_obj(out)
                _close(gathered[0], gathered[1], atol=0.0, what="replicated residual stream")
        # the region dropouts themselves: replicated -> same mask, tp -> rank's own mask
        ones = torch.ones(4, 64)
        mask = (stage.blocks[0].mlp.drop(ones) == 0).float()
        masks = _all_gather_obj(mask)
        assert torch.equal(masks[0], masks[1]) != sp, f"hidden dropout masks, sp={sp}"
        masks = _all_gather_obj(stage.blocks[0].attn.resid_drop(ones))
        assert torch.equal(masks[0], masks[1]) != sp, f"residual dropout masks, sp={sp}"
    with tp_rng.fork_tp_rng():
        inside = torch.rand(8)
        with tp_rng.replicated_rng():
            shared = torch.rand(8)
    outside = torch.rand(8)
    a, b, c = _all_gather_obj(inside), _all_gather_obj(shared), _all_gather_obj(outside)
    assert not torch.equal(a[0], a[1]) and torch.equal(b[0], b[1]) and torch.equal(c[0], c[1])


class _GatedMLP(nn.Module):
    """The GPT's MLP with a gate: ``proj(act(fc(x)) * gate(x))`` (a projection the GPT lacks)."""

    def __init__(self, mlp: nn.Module, d_model: int):
        super().__init__()
        self.fc, self.act, self.proj, self.drop = mlp.fc, mlp.act, mlp.proj, mlp.drop
        self.gate = nn.Linear(d_model, mlp.fc.out_features)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x)) * self.gate(x)))


def _check_one_row_adds_a_projection(topo, sp: bool) -> None:
    """A new projection is one row of the plan: sharded, gathered and counted without other code."""
    torch.manual_seed(0)
    model = GPT(_tiny_config())
    for block in model.blocks:
        block.mlp = _GatedMLP(block.mlp, 32)
    ref = copy.deepcopy(model)
    rows = plan.GPT_PLAN
    plan.GPT_PLAN = rows + (plan.Row("blocks.*.mlp.gate", "column", "block"),)
    try:
        stage = _parallel_step(model, ref, topo, sp, what="gated")
        gate = stage.blocks[0].mlp.gate
        assert isinstance(gate, tpm.ColumnParallelLinear) and gate.weight.shape == (64, 32)
        assert plan.tp_sharded("blocks.0.mlp.gate.weight")
        assert not plan.sequence_partial("blocks.0.mlp.gate.bias")
        for name in ("blocks.0.mlp.gate.weight", "blocks.1.mlp.gate.bias"):
            full = tpm.gather_full_param(stage, name, stage.get_parameter(name).grad)
            _close(full, ref.get_parameter(name).grad, atol=1e-5, what=f"gated grad {name} sp={sp}")
        native = NativeStage(GPT(_tiny_config()), range(2), True, True)
        for block in native.blocks.values():
            block.mlp = _GatedMLP(block.mlp, 32)
        assert isinstance(dtensor_plan(native, sp)["blocks.1.mlp.gate"], ColwiseParallel)
    finally:
        plan.GPT_PLAN = rows


def worker_stage() -> str:
    topo = _init()
    for sp in (False, True):
        _check_stage_matches_gpt(topo, sp)
        _check_one_row_adds_a_projection(topo, sp)
    _check_untied_head(topo)
    _check_dropout(topo)
    return "ok"


# --------------------------------------------------------------------------- tests


@pytest.mark.distributed
def test_operators_and_layers_tp2():
    """f/g and the sequence operators, column/row/vocab layers (+SP), vocab-parallel CE, DTensor."""
    assert run_local(TP, worker_ops_and_layers) == ["ok"] * TP


@pytest.mark.distributed
def test_gpt_stage_tp2_matches_single_process():
    """Whole stage with and without SP: loss and every gradient; tied/untied heads; dropout RNG."""
    assert run_local(TP, worker_stage) == ["ok"] * TP


def test_config_errors_name_values_and_fix():
    topo = Topology(tp=2, tp_rank=0)  # validation runs before any communication
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"n_head=3 is not divisible by parallel.tp=2.*among \[1, 3\]"):
        tpm.parallelize_stage(build_stages(GPT(_tiny_config(n_head=3, d_model=24)), 1, 0)[0], topo)
    with pytest.raises(ConfigError, match=r"vocab_size=65 is not divisible by parallel.tp=2.*vocab_size=66"):
        tpm.parallelize_stage(build_stages(GPT(_tiny_config(vocab_size=65)), 1, 0)[0], topo)
    with pytest.raises(ConfigError, match=r"block_size=15 is not divisible by parallel.tp=2"):
        tpm.parallelize_stage(build_stages(GPT(_tiny_config(block_size=15)), 1, 0)[0], topo,
                              sequence_parallel=True)
    with pytest.raises(ConfigError, match="sequence_parallel needs parallel.tp > 1"):
        tpm.validate_tp(_tiny_config(), 1, sequence_parallel=True)


def test_qkv_shard_rows_take_whole_heads_of_q_k_and_v():
    rows = [plan.qkv_shard_rows(n_head=4, head_dim=2, tp_rank=r, tp_size=2).tolist() for r in range(2)]
    assert rows[0] == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert rows[1] == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]


def test_tp1_is_a_no_op_and_marks_params():
    torch.manual_seed(0)
    model = GPT(_tiny_config())
    stage = build_stages(model, 1, 0)[0]
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    tpm.parallelize_stage(stage, Topology())
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())
    assert tpm.shard_spec(stage) == {} and not stage.sequence_parallel  # nothing split, no partial grads
    idx, targets = _batch()
    assert torch.allclose(stage(idx, targets), model(idx, targets)[1])
