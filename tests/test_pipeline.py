"""Pipeline schedules: pure checks of the orders, then real multi-process runs against one process.

The distributed tests build the same tiny GPT on every rank (fixed seed), run one optimizer
step's forwards and backwards through `run_pipeline`, sum the tied embedding gradients, and
demand the single-process loss (1e-6) and every parameter's gradient (1e-5). Several layouts
share each launch, because starting processes is what costs time here.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from lmkit.config import ConfigError, ModelConfig, ParallelConfig
from lmkit.parallel.pipeline import (
    PipelineStats,
    allreduce_tied_embedding_grads,
    ideal_timeline,
    last_stats,
    peak_in_flight,
    run_pipeline,
    schedule_actions,
    schedule_steps,
    simulate_schedule,
    validate_pipeline,
)

# --------------------------------------------------------------------------- schedules as data


@pytest.mark.parametrize("pp,m", [(1, 1), (1, 3), (2, 2), (2, 5), (3, 7), (4, 4), (4, 8)])
def test_orders_run_every_forward_before_its_backward(pp, m):
    for schedule, v in [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)]:
        if schedule == "interleaved" and (pp < 2 or m % pp):
            continue
        for r in range(pp):
            actions = schedule_actions(schedule, m, pp, r, v)
            assert sorted(actions) == sorted({(k, i, c) for k in "FB" for i in range(m) for c in range(v)})
            for kind, i, c in actions:
                if kind == "B":
                    assert actions.index(("F", i, c)) < actions.index(("B", i, c))


def test_peak_in_flight_gpipe_holds_all_1f1b_at_most_pp_minus_rank():
    pp, m = 4, 8
    for r in range(pp):
        assert peak_in_flight(schedule_actions("gpipe", m, pp, r)) == m
        assert peak_in_flight(schedule_actions("1f1b", m, pp, r)) == pp - r
        # interleaved: Megatron's warm-up 2 (pp - r - 1) + (v - 1) pp, plus the steady state's one
        assert peak_in_flight(schedule_actions("interleaved", m, pp, r, 2)) == 2 * (pp - r - 1) + pp + 1


def test_1f1b_order_is_warmup_then_alternating():
    steps = schedule_steps("1f1b", 4, 2, 0)
    order = [a.kind + str(a.microbatch) for s in steps for a in s]
    assert order == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    inter = schedule_steps("interleaved", 4, 2, 0, 2)
    assert [len(s) for s in inter] == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]  # steady state: F+B per step


def test_every_schedule_completes_with_rendezvous_sends():
    """No deadlock and matching message order, for many shapes (pure simulation, no processes)."""
    for pp in range(1, 6):
        for m in range(1, 11):
            simulate_schedule("gpipe", m, pp)
            if m >= pp:
                simulate_schedule("1f1b", m, pp)
            if pp >= 2 and m >= pp and m % pp == 0:
                for v in (2, 3):
                    simulate_schedule("interleaved", m, pp, v)


@pytest.mark.parametrize("pp,m", [(1, 3), (2, 1), (2, 4), (3, 7), (4, 4), (4, 8), (8, 16)])
def test_zero_bubble_orders_split_every_backward_and_bound_memory(pp, m):
    """ZB-H1: every microbatch's F, B and W once, B after F and W after B; at most 1F1B's pp - r
    activations waiting for their B and at most pp W's waiting; no deadlock under rendezvous sends."""
    for r in range(pp):
        actions = schedule_actions("zb-h1", m, pp, r)
        assert sorted(actions) == sorted((k, i, 0) for k in "FBW" for i in range(m))
        for i in range(m):
            assert actions.index(("F", i, 0)) < actions.index(("B", i, 0)) < actions.index(("W", i, 0))
        assert peak_in_flight(actions) <= pp - r
        pending = peak = 0
        for a in actions:
            pending += {"B": 1, "W": -1}.get(a.kind, 0)
            peak = max(peak, pending)
        assert peak <= pp
    simulate_schedule("zb-h1", m, pp)


@pytest.mark.parametrize("times", [(1, 1, 1), (1, 1.5, 0.5), (1, 0.8, 1.2), (2, 1.3, 0.9)])
def test_ideal_timeline_idle_equals_the_cost_model(times):
    """Every schedule replayed with free messages: each rank's idle time (the step's end minus its
    busy time) equals `costs.bubble_time`, ZB-H1's a third of 1F1B's when the times are equal."""
    from lmkit import costs
    for schedule, v in [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)]:
        for pp, m in [(2, 4), (4, 8), (8, 16)]:
            timeline = ideal_timeline(schedule, m, pp, v, *times)
            end = max(e for rank in timeline for _, _, e in rank)
            for rank in timeline:
                busy = sum(e - s for _, s, e in rank)
                assert end - busy == pytest.approx(costs.bubble_time(schedule, pp, m, v, *times), abs=1e-9)
    one = costs.bubble_time("1f1b", 4, 8)
    assert costs.bubble_time("zb-h1", 4, 8) == pytest.approx(one / 3)


def test_deferred_weight_grads_split_backward_into_b_and_w():
    """Inside the mode, backward gives the input gradient and no weight gradient; running the stored
    W then gives exactly autograd's weight and bias gradients."""
    from lmkit.parallel.weight_grads import WeightGradStore, deferred_weight_grads
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5)
    x = torch.randn(3, 4, 8, requires_grad=True)
    ref = copy.deepcopy(lin)
    xr = x.detach().clone().requires_grad_()
    (ref(xr) ** 2).sum().backward()
    store = WeightGradStore(lambda p, g: setattr(p, "grad", g.clone() if p.grad is None else p.grad + g))
    with deferred_weight_grads(store, {id(lin.weight)}):
        out = lin(x)
        store.key = (0, 0)
        (out ** 2).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None and store.held() == 1
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-6)
    store.run((0, 0))
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)
    assert store.held() == 0


# --------------------------------------------------------------------------- validation


def test_validation_names_the_numbers():
    with pytest.raises(ConfigError, match=r"pp=4 x virtual_stages=2 = 8 .*n_layer=4"):
        validate_pipeline(ParallelConfig(pp=4, schedule="interleaved", virtual_stages=2), n_layer=4,
                          microbatches=8)
    with pytest.raises(ConfigError, match=r"microbatches=2 < pp=4"):
        validate_pipeline(ParallelConfig(pp=4, schedule="1f1b"), n_layer=4, microbatches=2)
    with pytest.raises(ConfigError, match=r"microbatches=3 < pp=4"):
        validate_pipeline(ParallelConfig(pp=4, schedule="interleaved", virtual_stages=2), n_layer=8,
                          microbatches=3)
    with pytest.raises(ConfigError, match=r"microbatches=6 and pp=4; use 4 or 8"):
        validate_pipeline(ParallelConfig(pp=4, schedule="interleaved", virtual_stages=2), n_layer=8,
                          microbatches=6)
    validate_pipeline(ParallelConfig(pp=4, schedule="gpipe"), n_layer=4, microbatches=2)  # GPipe: any m
    validate_pipeline(ParallelConfig(pp=2, schedule="interleaved", virtual_stages=2), n_layer=4,
                      microbatches=4)


def test_run_pipeline_validates_before_communicating():
    from lmkit.parallel.mesh import Topology

    topo = Topology(pp=2)  # no process group: the check must come first
    with pytest.raises(ConfigError, match=r"microbatches=1 < pp=2"):
        run_pipeline("1f1b", [object()], topo, [(torch.zeros(1, 1), torch.zeros(1, 1))],
                     torch.Size((1, 1, 1)))


def test_single_stage_needs_no_process_group():
    """pp = 1: the same code is plain gradient accumulation, equal to one big batch."""
    from lmkit.model import GPT
    from lmkit.parallel.mesh import single_process_topology
    from lmkit.parallel.stage import activation_shape, build_stages

    torch.manual_seed(0)
    model = GPT(_tiny(2))
    ref = copy.deepcopy(model)
    idx, tgt = torch.randint(0, 64, (6, 8)), torch.randint(0, 64, (6, 8))
    _, ref_loss = ref(idx, tgt)
    ref_loss.backward()
    stages = build_stages(model, 1, 0)
    mbs = [(idx[i:i + 2], tgt[i:i + 2]) for i in (0, 2, 4)]
    for schedule in ("gpipe", "1f1b"):
        model.zero_grad(set_to_none=True)
        loss = run_pipeline(schedule, stages, single_process_topology(), mbs, activation_shape(2, 8, 32))
        allreduce_tied_embedding_grads(stages, single_process_topology())  # a no-op at pp = 1
        assert abs(loss - float(ref_loss.detach())) < 1e-6
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name
        assert last_stats().peak_in_flight == (3 if schedule == "gpipe" else 1)


# --------------------------------------------------------------------------- multi-process runs

B, T, M = 2, 16, 4  # sequences per microbatch, sequence length, microbatches


def _tiny(n_layer: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, d_model=32, dropout=0.0)


def _check_layout(topo, schedule: str, v: int, n_layer: int, dtype=torch.float32, autocast=None) -> dict:
    """One step of `schedule` on this rank vs the full model in this process; returns the diffs."""
    from lmkit.model import GPT
    from lmkit.parallel.stage import activation_shape, build_stages

    torch.manual_seed(1234)
    model = GPT(_tiny(n_layer))
    g = torch.Generator().manual_seed(7 + topo.dp_rank)  # each data-parallel replica its own data
    idx = torch.randint(0, 64, (M * B, T), generator=g)
    tgt = torch.randint(0, 64, (M * B, T), generator=g)

    ref = copy.deepcopy(model)
    _, ref_loss = ref(idx, tgt)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())

    stages = build_stages(model, topo.pp, topo.pp_rank, v)
    events = []
    stats = PipelineStats()
    mbs = [(idx[i * B:(i + 1) * B], tgt[i * B:(i + 1) * B]) for i in range(M)]
    loss = run_pipeline(schedule, stages, topo, mbs, activation_shape(B, T, 32), dtype=dtype,
                        autocast=autocast, on_event=lambda *e: events.append(e), stats=stats)
    allreduce_tied_embedding_grads(stages, topo)

    worst, worst_name, names = 0.0, "", []
    for stage in stages:
        for name, p in stage.named_parameters():
            full = stage.original_name(name)
            expect = ref_grads["tok_emb.weight" if full == "head.weight" else full].grad
            diff = float((p.grad - expect).abs().max())
            names.append(full)
            if diff > worst:
                worst, worst_name = diff, full
    kinds = [e[0] for e in events]
    return {"loss": loss, "ref_loss": float(ref_loss.detach()), "grad_diff": worst, "worst": worst_name,
            "names": names, "all_names": sorted(ref_grads), "peak": stats.peak_in_flight,
            "expected_peak": peak_in_flight(schedule_actions(schedule, M, topo.pp, topo.pp_rank, v)),
            "forwards": kinds.count("forward"), "backwards": kinds.count("backward"),
            "sends": kinds.count("send"), "recvs": kinds.count("recv"), "messages": stats.messages}


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def pp2_worker() -> dict:
    from lmkit.parallel.mesh import init_topology

    topo = init_topology(ParallelConfig(pp=2))
    return {"gpipe": _check_layout(topo, "gpipe", 1, 4),
            "1f1b": _check_layout(topo, "1f1b", 1, 4),
            "interleaved": _check_layout(topo, "interleaved", 2, 4),
            "1f1b_bf16": _check_layout(topo, "1f1b", 1, 4, dtype=torch.bfloat16, autocast=_bf16_autocast),
            "1f1b_nullctx": _check_layout(topo, "1f1b", 1, 4, autocast=contextlib.nullcontext)}


def pp4_worker() -> dict:
    from lmkit.parallel.mesh import init_topology

    topo = init_topology(ParallelConfig(pp=4))
    out = {"pp4_gpipe": _check_layout(topo, "gpipe", 1, 4),
           "pp4_1f1b": _check_layout(topo, "1f1b", 1, 4),
           "pp4_interleaved": _check_layout(topo, "interleaved", 2, 8)}
    topo = init_topology(ParallelConfig(dp=2, pp=2))  # pp_peer and the embedding group with dp > 1
    out["dp2_pp2_1f1b"] = _check_layout(topo, "1f1b", 1, 4)
    return out


def _assert_matches(results: list[dict], name: str, pp: int, v: int, loss_tol: float = 1e-6,
                    grad_tol: float = 1e-5) -> None:
    per_rank = [r[name] for r in results]
    covered = set()
    for rank, r in enumerate(per_rank):
        where = f"{name} rank {rank}"
        assert abs(r["loss"] - r["ref_loss"]) <= loss_tol, f"{where}: loss {r['loss']} vs {r['ref_loss']}"
        assert r["grad_diff"] <= grad_tol, f"{where}: gradient of {r['worst']} off by {r['grad_diff']:.2e}"
        assert r["peak"] == r["expected_peak"], f"{where}: peak in flight {r['peak']} != {r['expected_peak']}"
        assert r["forwards"] == r["backwards"] == M * v, where
        assert r["sends"] + r["recvs"] == r["messages"], where
        covered |= set(r["names"])
    covered.discard("head.weight")
    assert covered == set(per_rank[0]["all_names"]), f"{name}: parameters not covered by any stage"


@pytest.mark.distributed
def test_pipeline_two_ranks_matches_single_process():
    from lmkit.parallel.launch import run_local

    results = run_local(2, pp2_worker, timeout=240)
    for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("1f1b_nullctx", 1)]:
        _assert_matches(results, name, pp=2, v=v)
    # peaks that the schedules promise: GPipe holds all m, 1F1B at most pp - rank
    assert [r["gpipe"]["peak"] for r in results] == [M, M]
    assert [r["1f1b"]["peak"] for r in results] == [2, 1]
    # messages: 1F1B's 4 activations + 4 gradients each way; interleaved v=2 sends 2x + wrap-around
    assert [r["1f1b"]["messages"] for r in results] == [2 * M, 2 * M]
    assert [r["interleaved"]["messages"] for r in results] == [6 * M, 6 * M]
    # bf16 autocast with bf16 activations on the wire: runs, and stays close to fp32
    _assert_matches(results, "1f1b_bf16", pp=2, v=1, loss_tol=3e-2, grad_tol=5e-2)


@pytest.mark.distributed
def test_pipeline_four_ranks_matches_single_process():
    from lmkit.parallel.launch import run_local

    results = run_local(4, pp4_worker, timeout=300)
    _assert_matches(results, "pp4_gpipe", pp=4, v=1)
    _assert_matches(results, "pp4_1f1b", pp=4, v=1)
    _assert_matches(results, "pp4_interleaved", pp=4, v=2)
    _assert_matches(results, "dp2_pp2_1f1b", pp=2, v=1)
    assert [r["pp4_1f1b"]["peak"] for r in results] == [4, 3, 2, 1]
    assert [r["pp4_gpipe"]["peak"] for r in results] == [M] * 4
