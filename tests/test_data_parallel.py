"""Tests of `lmkit.parallel.data_parallel`: bucketed DP, no_sync, ZeRO-1/2, clipping, checkpoints.

The dp=2 checks share one `run_local` launch (process start-up dominates the time); the worker
returns everything the tests need and the single-process references run here, in the parent.

The tiny GPT has ``bias=False``. With biases, the attention *key* bias has an identically zero
true gradient (softmax ignores a constant added to every key), so its computed gradient is pure
rounding noise, which AdamW divides by its own root-mean-square: two correct implementations
then differ in that tensor by far more than 1e-6 relative, while the losses still agree.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.model import GPT
from lmkit.optim import configure_optimizer, lr_multiplier
from lmkit.parallel.data_parallel import DataParallel
from lmkit.parallel.instrument import memory_report
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import init_topology, single_process_topology

MODEL = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, dropout=0.0, bias=False)
TRAIN = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8, weight_decay=0.1, beta1=0.9,
                    beta2=0.99)
SEED, BATCH, MICRO, STEPS, CLIP = 1234, 8, 2, 5, 0.5
BUCKET_MB = 0.01  # ~2600 fp32 elements: the tiny GPT (~27k parameters) gets several buckets
RTOL = 1e-6
# Weights after 5 AdamW steps: two float32 implementations that sum in different orders differ by
# rounding that Adam's 1/sqrt(v) amplifies where a gradient is near zero. Over 30 seeds x 3 ZeRO
# modes (dp=1 against torch.optim.AdamW) the largest tensor difference had median 7e-7 and 90th
# percentile 6e-6, so 1e-6 held for some seeds only (a real bug moves weights by ~1e-2).
PARAM_RTOL = 1e-5


def build_model() -> GPT:
    torch.manual_seed(SEED)
    return GPT(MODEL)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, MODEL.vocab_size, (BATCH, MODEL.block_size + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def local_batch(step: int, dp: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    rows = BATCH // dp
    return x[dp_rank * rows:(dp_rank + 1) * rows], y[dp_rank * rows:(dp_rank + 1) * rows]


def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, TRAIN))


def dp_step(model: GPT, dp: DataParallel, step: int, dp_size: int, dp_rank: int,
            record: dict | None = None) -> tuple[float, float]:
    """One optimizer step as the engine runs it: micro-steps 1..k-1 inside no_sync."""
    x, y = local_batch(step, dp_size, dp_rank)
    rows = x.size(0) // MICRO
    dp.zero_grad()
    if record is not None:
        dp.comm_log = []
    total = 0.0
    for m in range(MICRO):
        sync = m == MICRO - 1
        with contextlib.nullcontext() if sync else dp.no_sync():
            _, loss = model(x[m * rows:(m + 1) * rows], y[m * rows:(m + 1) * rows])
            (loss / MICRO).backward()
        total += loss.item() / MICRO
        if record is not None:
            record["after_backward" if sync else "after_no_sync_backward"] = list(dp.comm_log)
    dp.finish_grad_sync()
    if record is not None:
        record["after_finish"] = list(dp.comm_log)
        dp.comm_log = None
    norm = dp.clip_grad_norm_(CLIP)
    dp.step()
    return total, norm.item()


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def to_numpy(obj):
    """Tensors -> numpy for the trip through the result queue (no shared-memory handles)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_numpy(v) for v in obj)
    return obj


def to_torch(obj):
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_torch(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- dp=2 worker


def _train_worker(topo, zero: int) -> dict:
    model = build_model()
    dp = DataParallel(list(model.named_parameters()), topo, TRAIN, zero=zero, bucket_cap_mb=BUCKET_MB)
    sched = scheduler(dp.optimizer)
    out: dict = {"losses": [], "norms": [], "record": {}}
    for step in range(STEPS):
        loss, norm = dp_step(model, dp, step, topo.dp, topo.dp_rank, out["record"] if step == 0 else None)
        sched.step()
        out["losses"].append(loss)
        out["norms"].append(norm)
    out["params"] = params_of(model)
    out["n_buckets"] = len(dp.buckets)
    out["n_params"] = len(dp.params)
    out["chunks"] = [b.chunk for b, _ in dp._chunks] if zero else []
    out["memory"] = memory_report(model, dp.optimizer)
    out["opt_state_numel"] = [sum(v.numel() for v in dp.optimizer.state[p].values() if v.dim())
                              for pg in dp.optimizer.param_groups for p in pg["params"]]
    out["group_numel"] = [g.numel for g in dp.groups]
    if zero == 2:
        state = dp.state_dict()
        out["state"] = state
        # the same state loaded into another layout (ZeRO-1) and saved again
        other = build_model()
        other.load_state_dict(model.state_dict())
        dp1 = DataParallel(list(other.named_parameters()), topo, TRAIN, zero=1, bucket_cap_mb=BUCKET_MB)
        dp1.load_state_dict(state)
        out["state_via_zero1"] = dp1.state_dict()
        dp_step(model, dp, STEPS, topo.dp, topo.dp_rank)
        out["next_params"] = params_of(model)
    return out


def _ddp_worker(topo) -> dict:
    """lmkit DP's averaged gradients against PyTorch DDP's after one backward.

    Three ways to get there: hooks launching buckets during backward; every backward inside
    no_sync (what pipeline schedules do; finish_grad_sync must reduce everything), here with
    ZeRO-1's padded layout; and an extra parameter that never gets a gradient, which holds
    back every bucket until finish_grad_sync.
    """
    from torch.nn.parallel import DistributedDataParallel

    theirs = build_model()
    ddp = DistributedDataParallel(theirs, process_group=topo.dp_group, bucket_cap_mb=BUCKET_MB)
    x, y = local_batch(0, topo.dp, topo.dp_rank)
    ddp(x, y)[1].backward()
    local = build_model()
    local(x, y)[1].backward()
    out = {}
    for variant in ("hooks", "all_no_sync_zero1", "unused_param"):
        ours = build_model()
        named = list(ours.named_parameters())
        if variant == "unused_param":
            named.append(("unused", torch.nn.Parameter(torch.ones(3))))
        dp = DataParallel(named, topo, TRAIN, zero=1 if variant == "all_no_sync_zero1" else 0,
                          bucket_cap_mb=BUCKET_MB)
        dp.comm_log = []
        with dp.no_sync() if variant == "all_no_sync_zero1" else contextlib.nullcontext():
            ours(x, y)[1].backward()
        dp.finish_grad_sync()
        # ZeRO-1 reduce-scatters: a rank holds the reduced gradient of its chunks only (2 Psi on the wire)
        shards = dp.grad_shards()
        worst = max(((values - b.grad.reshape(-1)[lo:hi]).abs().max() / b.grad.abs().max()).item()
                    for (name, b) in theirs.named_parameters() if name in shards
                    for lo, hi, values in [shards[name]] if hi > lo)
        covered = sum(hi - lo for lo, hi, _ in shards.values())
        out[variant] = {"worst_rel_diff": worst, "where": [w for _, w, _ in dp.comm_log], "covered": covered,
                        "n_buckets": len(dp.buckets), "last_grad": dp.params[-1].grad.clone()}
    out["differs_from_local"] = max((a.grad - c.grad).abs().max().item()
                                    for a, c in zip(ours.parameters(), local.parameters(), strict=True))
    return out


def _dp_worker() -> dict:
    topo = init_topology(ParallelConfig(dp=2), device="cpu")
    out = {"runs": {zero: _train_worker(topo, zero) for zero in (0, 1, 2)}, "ddp": _ddp_worker(topo)}
    return to_numpy(out)


@pytest.fixture(scope="module")
def dp2():
    results = run_local(2, _dp_worker)
    return [to_torch(r) for r in results]


def reference_run(steps: int = STEPS) -> dict:
    """Single process, full batch, `configure_optimizer` + torch clipping: the ground truth."""
    model = build_model()
    opt = configure_optimizer(model, TRAIN)
    sched = scheduler(opt)
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = global_batch(step)
        _, loss = model(x, y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        sched.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "params": params_of(model)}


@pytest.fixture(scope="module")
def reference():
    return reference_run()


def assert_params_close(got: dict, want: dict, rtol: float = PARAM_RTOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        rel = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert rel <= rtol, f"{name}: relative difference {rel:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------- dp=2 tests


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_dp2_matches_single_process(dp2, reference, zero):
    runs = [r["runs"][zero] for r in dp2]
    losses = np.mean([r["losses"] for r in runs], axis=0)
    np.testing.assert_allclose(losses, reference["losses"], rtol=RTOL)
    assert max(reference["norms"]) > CLIP, "the clipping threshold must actually clip"
    for r in runs:
        np.testing.assert_allclose(r["norms"], reference["norms"], rtol=RTOL)
        assert_params_close(r["params"], reference["params"])
    for name, p in runs[0]["params"].items():  # replicas stay bitwise identical
        assert torch.equal(p, runs[1]["params"][name]), name


@pytest.mark.distributed
def test_zero_shards_optimizer_state(dp2):
    for r in dp2:
        plain, z1, z2 = (r["runs"][z] for z in (0, 1, 2))
        assert sum(plain["opt_state_numel"]) == 2 * sum(plain["group_numel"])  # exp_avg + exp_avg_sq
        for run in (z1, z2):  # AdamW's two moments for this rank's chunk of every bucket only
            assert run["opt_state_numel"] == [2 * c for c in run["chunks"]]
            assert 2 * sum(run["chunks"]) == sum(run["group_numel"])  # padded buckets split in two
            assert len(run["chunks"]) == run["n_buckets"] >= 4
        # gradient memory: ZeRO-0/1 the full flat buffer, ZeRO-2 this rank's shard (1/dp, padded)
        assert plain["memory"]["grad_bytes"] == 4 * sum(plain["group_numel"])
        assert z1["memory"]["grad_bytes"] == 4 * sum(z1["group_numel"])
        assert z2["memory"]["grad_bytes"] == 4 * sum(z2["chunks"]) == z1["memory"]["grad_bytes"] // 2


@pytest.mark.distributed
def test_dp_grads_equal_pytorch_ddp(dp2):
    for r in dp2:
        res = r["ddp"]
        assert res["differs_from_local"] > 0  # the gradients really were averaged
        for variant in ("hooks", "all_no_sync_zero1", "unused_param"):
            assert res[variant]["worst_rel_diff"] <= 1e-7, variant
        n = sum(p.numel() for p in build_model().parameters())
        assert res["hooks"]["covered"] == n
        assert 0 < res["all_no_sync_zero1"]["covered"] < n  # its chunks: about half of them on dp=2
        assert set(res["hooks"]["where"]) == {"backward"}
        # all inside no_sync: nothing communicated during backward, finish_grad_sync reduced it all
        assert res["all_no_sync_zero1"]["where"] == ["finish"] * res["all_no_sync_zero1"]["n_buckets"]
        # the bucket of a parameter without gradient, and every bucket after it, wait for finish
        where = res["unused_param"]["where"]
        assert len(where) == res["unused_param"]["n_buckets"] and where == sorted(where)
        assert where[0] == "backward" and where[-1] == "finish"
        assert torch.equal(res["unused_param"]["last_grad"], torch.zeros(3))


@pytest.mark.distributed
def test_buckets_launch_during_backward(dp2):
    for r in dp2:
        run = r["runs"][0]
        rec, n = run["record"], run["n_buckets"]
        assert n >= 4
        assert rec["after_no_sync_backward"] == []  # no_sync: no communication at all
        launched = rec["after_backward"]
        # every bucket was launched from a backward hook, in the fixed order, before backward returned
        assert [b for b, where, _ in launched] == list(range(n))
        assert all(where == "backward" for _, where, _ in launched)
        # and the first one while most gradients did not exist yet: communication overlaps backward
        assert launched[0][2] < run["n_params"] // 2
        # each bucket goes as soon as it is complete: only the last waits for the last gradient
        assert launched[-2][2] < run["n_params"]
        assert rec["after_finish"] == launched


@pytest.mark.distributed
def test_zero2_reduce_scatters_every_bucket_in_every_backward(dp2):
    """ZeRO-2 accumulates in the shard: each backward (no_sync or not) reduce-scatters every bucket
    once, as soon as it is complete, in the launch order; nothing is left for finish_grad_sync."""
    for r in dp2:
        run = r["runs"][2]
        rec, n = run["record"], run["n_buckets"]
        first, both = rec["after_no_sync_backward"], rec["after_backward"]
        assert [b for b, _, _ in first] == list(range(n)) and [b for b, _, _ in both[n:]] == list(range(n))
        assert all(where == "backward" for _, where, _ in both)
        assert first[0][2] < run["n_params"] // 2  # overlapping the backward
        assert rec["after_finish"] == both


@pytest.mark.distributed
def test_state_dict_zero2_dp2_loads_into_single_process(dp2):
    run = dp2[0]["runs"][2]
    state = run["state"]
    for r in dp2:  # the gathered state is the same on both ranks
        for name, entry in r["runs"][2]["state"]["state"].items():
            for k, v in entry.items():
                assert torch.equal(v, state["state"][name][k])
    for name, entry in run["state_via_zero1"]["state"].items():  # ZeRO-2 -> ZeRO-1 -> same state
        for k, v in entry.items():
            assert torch.equal(v, state["state"][name][k]), (name, k)
    model = build_model()
    assert set(state["state"]) == {n for n, _ in model.named_parameters()}
    assert state["state"]["tok_emb.weight"]["exp_avg"].shape == model.tok_emb.weight.shape
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run["params"][name])
    dp = DataParallel(list(model.named_parameters()), single_process_topology(), TRAIN, zero=0)
    dp.load_state_dict(state)
    again = dp.state_dict()
    assert again["param_groups"] == state["param_groups"]
    for name, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(again["state"][name][k], v), (name, k)
    dp_step(model, dp, STEPS, 1, 0)  # the next step, full batch, one process
    assert_params_close(params_of(model), run["next_params"])


# ---------------------------------------------------------------------- single process


def test_layout_buckets_and_grad_views():
    model = build_model()
    dp = DataParallel(list(model.named_parameters()), single_process_topology(), TRAIN,
                      bucket_cap_mb=BUCKET_MB)
    cap = int(BUCKET_MB * 2**20) // 4
    assert len(dp.buckets) > 3
    for gi, g in enumerate(dp.groups):
        buckets = sorted((b for b in dp.buckets if b.group == gi), key=lambda b: b.start)
        assert buckets[0].start == 0 and buckets[-1].end == g.numel
        assert all(a.end == b.start for a, b in zip(buckets, buckets[1:], strict=False))
        assert all(b.numel <= cap or len(b.params) == 1 for b in buckets)
        offsets = [g.offsets[i] for i in sorted(g.members)]
        assert offsets == sorted(offsets, reverse=True)  # reverse registration order
    for p in dp.params:  # .grad is a view into its group's flat buffer
        g = dp.groups[0 if p.dim() >= 2 else 1]
        assert g.grad.data_ptr() <= p.grad.data_ptr() < g.grad.data_ptr() + g.grad.numel() * 4
    assert [b.index for b in dp.buckets] == list(range(len(dp.buckets)))
    decay = {id(p) for p in dp.optimizer.param_groups[0]["params"]}
    assert decay == {id(p) for p in model.parameters() if p.dim() >= 2}
    with pytest.raises(ValueError, match="zero=3"):
        DataParallel(list(model.named_parameters()), single_process_topology(), TRAIN, zero=3)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_single_process_matches_torch_adamw(reference, zero):
    """dp=1: no communication; every zero mode is plain AdamW (and survives model.zero_grad())."""
    model = build_model()
    dp = DataParallel(list(model.named_parameters()), single_process_topology(), TRAIN, zero=zero,
                      bucket_cap_mb=BUCKET_MB)
    sched = scheduler(dp.optimizer)
    losses = []
    for step in range(STEPS):
        if step == 1:
            model.zero_grad(set_to_none=True)  # the views must come back, without stale values
        losses.append(dp_step(model, dp, step, 1, 0)[0])
        sched.step()
    np.testing.assert_allclose(losses, reference["losses"], rtol=RTOL)
    assert_params_close(params_of(model), reference["params"])


@pytest.mark.parametrize("zero", [1, 2])
def test_clip_grad_norm_matches_torch_and_norm_weight(zero):
    ours, theirs = build_model(), build_model()
    dp = DataParallel(list(ours.named_parameters()), single_process_topology(), TRAIN, zero=zero)
    x, y = global_batch(0)
    ours(x, y)[1].backward()
    theirs(x, y)[1].backward()
    dp.finish_grad_sync()

    def grads() -> dict[str, torch.Tensor]:  # ZeRO-2 keeps them in its shard (the whole, with dp=1)
        shards = dp.grad_shards()
        sizes = dict(zip(dp.names, (p.numel() for p in dp.params), strict=True))
        assert all(lo == 0 and hi == sizes[name] for name, (lo, hi, _) in shards.items())
        return {name: values for name, (_, _, values) in shards.items()}

    if zero == 2:
        assert all(p.grad is None for p in ours.parameters())  # no full gradient left behind
    full_sq = dp.grad_sq_sum()
    dp.norm_weights[dp.names.index("ln_f.weight")] = 0.0  # e.g. a tensor-parallel replica counted elsewhere
    partial = dp.grad_sq_sum()
    # a difference of two float32 sums: its rounding scales with the whole sum, not with the part
    torch.testing.assert_close(full_sq - partial, grads()["ln_f.weight"].square().sum(), rtol=1e-4,
                               atol=1e-6 * float(full_sq))
    dp.norm_weights[dp.names.index("ln_f.weight")] = 1.0
    norm = dp.clip_grad_norm_(0.1)
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
    torch.testing.assert_close(norm, want, rtol=RTOL, atol=0)
    assert want > 0.1
    got = grads()
    for (name, b) in theirs.named_parameters():
        torch.testing.assert_close(got[name], b.grad.reshape(-1), rtol=1e-6, atol=1e-9)


def test_grads_set_to_none_come_back_as_zero_views():
    model = build_model()
    dp = DataParallel(list(model.named_parameters()), single_process_topology(), TRAIN, zero=1)
    x, y = global_batch(0)
    model(x, y)[1].backward()
    model.zero_grad(set_to_none=True)  # no gradient since: the buffer's old values must not come back
    dp.finish_grad_sync()
    flat = dp.groups[0].grad
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    model(x, y)[1].backward()
    dp.optimizer.zero_grad()  # redirected to dp.zero_grad(): zeroes, keeps the views
    assert flat.abs().sum() == 0
    assert model.tok_emb.weight.grad.data_ptr() == flat.data_ptr() + dp.groups[0].offsets[0] * 4


def _zero2_memory_worker(dp: int) -> dict:
    """One accumulated step (2 microbatches) of ZeRO-2 on `dp` ranks: this rank's memory report."""
    topo = init_topology(ParallelConfig(dp=dp), device="cpu") if dp > 1 else single_process_topology()
    model = build_model()
    zero = DataParallel(list(model.named_parameters()), topo, TRAIN, zero=2, bucket_cap_mb=BUCKET_MB)
    dp_step(model, zero, 0, topo.dp, topo.dp_rank)
    return {"memory": memory_report(model, zero.optimizer), "padded": sum(b.numel for b in zero.buckets)}


@pytest.mark.distributed
def test_zero2_gradient_memory_per_rank_is_divided_by_dp():
    """ZeRO-2's gradient bytes per rank, measured by `memory_report` after a step, for dp = 1, 2, 4."""
    full = 4 * sum(p.numel() for p in build_model().parameters())
    measured = {}
    for dp in (1, 2, 4):
        ranks = [_zero2_memory_worker(1)] if dp == 1 else run_local(dp, _zero2_memory_worker, dp)
        grads = [r["memory"]["grad_bytes"] for r in ranks]
        assert grads == [4 * ranks[0]["padded"] // dp] * dp  # every rank the same shard of the padded buckets
        assert full <= 4 * ranks[0]["padded"] < full + 4 * dp * len(build_model().state_dict())
        measured[dp] = grads[0]
    print(f"ZeRO-2 gradient bytes per rank: {measured} (full gradients {full:,} bytes)")
    assert measured[1] == full
    assert abs(measured[2] / full - 1 / 2) < 0.01 and abs(measured[4] / full - 1 / 4) < 0.01
