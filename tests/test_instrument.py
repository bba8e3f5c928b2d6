"""The instruments measure what the formulas say: collective bytes, timelines, memory, MFU, bubble.

Process checks share launches (start-up dominates): one `measure_layouts` call trains dp2 and
pp2 through the real `Trainer` (two launches), one more launch exercises every collective API
the counter must see. Memory, timelines of one process, MFU and the Gantt chart run in-process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.costs import CostError, lookup_peak_flops, mfu
from lmkit.lab.layouts import measure_layouts
from lmkit.model import build_model
from lmkit.parallel.instrument import (
    COLLECTIVE_KINDS,
    CommCounter,
    Instrument,
    Timeline,
    bubble_formula,
    idle_fractions,
    memory_report,
    peak_flops,
    read_jsonl,
    wire_bytes,
)
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import single_process_topology
from lmkit.parallel.pipeline import schedule_actions
from lmkit.tokenizer import CharTokenizer
from lmkit.train import Trainer

TEXT = "".join(f"the cat {i % 7} sat on the mat{'.!'[i % 2]}\n" for i in range(400))  # 18 symbols + EOT
MODEL = ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=8, dropout=0.0)
TRAIN = TrainConfig(batch_size=8, max_steps=10, warmup_steps=1, eval_interval=0, seed=3,
                    out_dir="/tmp/lmkit-instrument-test")
M = 4  # pipeline microbatches
EVENT_KEYS = {"rank", "step", "kind", "microbatch", "chunk", "start", "end"}


# --------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    layouts = [ParallelConfig(dp=2), ParallelConfig(pp=2, schedule="1f1b", microbatches=M)]
    results = measure_layouts(MODEL, TRAIN, layouts, steps=1, warmup=1, text=TEXT,
                              cache_dir=str(tmp_path_factory.mktemp("cache")))
    for r in results:
        assert "error" not in r, r
    return {r["name"]: r for r in results}


def _gradient_bytes() -> int:
    vocab = CharTokenizer.train(TEXT).vocab_size
    model = build_model(ModelConfig(**{**MODEL.__dict__, "vocab_size": vocab}))
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight once


@pytest.mark.distributed
def test_dp2_all_reduce_bytes_equal_gradient_bytes(measured):
    grad_bytes = _gradient_bytes()
    for rank in measured["dp2"]["ranks"]:
        calls = [r for r in rank["records"] if r["kind"] == "all_reduce"]
        buckets = [r for r in calls if r["bytes"] != 8]  # the other one: the loss mean (1 fp64)
        assert sum(r["bytes"] for r in buckets) == grad_bytes
        assert sum(r["bytes"] for r in calls) == grad_bytes + 8
        assert all(r["ranks"] == [0, 1] and r["group_size"] == 2 for r in calls)
        assert sum(r["wire_bytes"] for r in buckets) == grad_bytes  # 2 (n-1)/n B with n = 2
        assert rank["memory"]["grad_bytes"] == grad_bytes  # the flat bucket buffers, no padding
        assert {r["kind"] for r in rank["records"]} <= {"all_reduce", "barrier"}


@pytest.mark.distributed
def test_pp2_send_bytes_are_microbatches_times_activation_bytes(measured):
    act = (TRAIN.batch_size // M) * MODEL.block_size * MODEL.d_model * 4  # fp32 [b/m, s, h]
    for rank in measured[f"pp2 1f1b m{M}"]["ranks"]:
        sends = [r for r in rank["records"] if r["kind"] == "send"]
        recvs = [r for r in rank["records"] if r["kind"] == "recv"]
        assert len(sends) == M and sum(r["bytes"] for r in sends) == M * act  # activations or gradients
        assert len(recvs) == M and sum(r["bytes"] for r in recvs) == M * act
        assert sum(r["wire_bytes"] for r in sends) == M * act and sum(r["wire_bytes"] for r in recvs) == 0


def _check_well_formed(events: list[dict]) -> None:
    assert events, "no events"
    for e in events:
        assert set(e) == EVENT_KEYS
        assert e["kind"] in ("forward", "backward") + COLLECTIVE_KINDS
        assert 0 <= e["start"] <= e["end"]
    starts = [e["start"] for e in events]
    assert starts == sorted(starts)
    compute = [e for e in events if e["kind"] in ("forward", "backward")]
    for a, b in zip(compute, compute[1:], strict=False):  # one rank computes one thing at a time
        assert a["end"] <= b["start"] + 1e-6


@pytest.mark.distributed
def test_timelines_are_well_formed_and_ordered(measured):
    for rank in measured["dp2"]["ranks"]:
        events = rank["timeline"]
        _check_well_formed(events)
        compute = [(e["kind"], e["microbatch"]) for e in events if e["kind"] in ("forward", "backward")]
        assert compute == [("forward", 0), ("backward", 0)]
        assert any(e["kind"] == "all_reduce" for e in events)
    pipeline = measured[f"pp2 1f1b m{M}"]["ranks"]
    for pp_rank, rank in enumerate(pipeline):
        events = rank["timeline"]
        _check_well_formed(events)
        compute = [e for e in events if e["kind"] in ("forward", "backward")]
        order = [(e["kind"][0].upper(), e["microbatch"]) for e in compute]
        assert order == [(a.kind, a.microbatch) for a in schedule_actions("1f1b", M, 2, pp_rank)]
        kinds = [e["kind"] for e in events]
        assert kinds.count("send") == M and kinds.count("recv") == M
    # instrumented and plain steps alternate; both layouts reproduce the same loss curve
    dp, pp = measured["dp2"]["ranks"][0]["losses"], pipeline[0]["losses"]
    assert len(dp) == 3 and max(abs(a - b) / b for a, b in zip(dp, pp, strict=True)) < 1e-5
    idle = idle_fractions([e for rank in pipeline for e in rank["timeline"]])
    assert set(idle["idle"]) == {0, 1} and all(0.0 < v < 1.0 for v in idle["idle"].values())


def _collectives_worker() -> dict:
    dist.init_process_group("gloo")
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    x = torch.ones(10)  # 40 bytes
    with CommCounter(keep_records=True) as comm:
        dist.all_reduce(x)
        dist.broadcast(x, src=0)
        dist.reduce(x, dst=0)
        dist.all_gather_into_tensor(torch.empty(20), x)
        dist.reduce_scatter_tensor(torch.empty(5), x)
        ops = [dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, torch.empty(10), peer)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        float(funcol.all_reduce(torch.ones(3), "sum", dist.group.WORLD).sum())  # DTensor's path
        p = torch.nn.Parameter(torch.ones(4))  # a collective from inside backward
        p.register_post_accumulate_grad_hook(lambda t: dist.all_reduce(t.grad))
        (p * 2).sum().backward()
    dist.all_reduce(x)  # after exit: not counted
    return {"summary": comm.summary(), "records": [(r["kind"], r["bytes"]) for r in comm.records],
            "rank": rank}


@pytest.mark.distributed
def test_counter_sees_every_collective_api():
    for result in run_local(2, _collectives_worker):
        assert result["records"] == [("all_reduce", 40), ("broadcast", 40), ("reduce", 40),
                                     ("all_gather", 80), ("reduce_scatter", 40), ("send", 40), ("recv", 40),
                                     ("all_reduce", 12), ("all_reduce", 16)]
        s = result["summary"]
        assert s["all_reduce"] == {"calls": 3, "bytes": 68, "wire_bytes": 68.0}
        assert s["all_gather"]["wire_bytes"] == 40.0 and s["reduce_scatter"]["wire_bytes"] == 20.0


# --------------------------------------------------------------------------- one process


def _single_process_trainer(grad_accum: int = 1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=12, n_layer=1, n_head=2, d_model=8, block_size=8))
    tokens = np.random.default_rng(0).integers(0, 12, 2000).astype(np.uint16)
    cfg = TrainConfig(batch_size=4, grad_accum=grad_accum, max_steps=5, warmup_steps=1, eval_interval=0,
                      out_dir="/tmp/lmkit-instrument-test")
    trainer = Trainer(model, cfg, tokens, parallel=ParallelConfig(), topology=single_process_topology())
    return trainer, model


def test_memory_report_matches_hand_computed_bytes():
    trainer, model = _single_process_trainer()
    trainer.train_step()  # creates AdamW's state
    params = list(model.parameters())  # the tied head once
    n = sum(p.numel() for p in params)
    report = memory_report(trainer.engine)
    assert report["param_bytes"] == 4 * n  # fp32
    assert report["grad_bytes"] == 4 * n  # two flat buffers (decay, no decay), views for every .grad
    assert report["optimizer_bytes"] == 2 * 4 * n + 4 * len(params)  # exp_avg, exp_avg_sq, fp32 step
    assert report["total_bytes"] == report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]
    assert report["param_numel"] == n and report["cuda_peak_bytes"] is None  # CPU

    plain = torch.nn.Linear(5, 3)  # a module with its optimizer, no engine
    opt = torch.optim.AdamW(plain.parameters())
    plain(torch.randn(2, 5)).sum().backward()
    opt.step()
    report = memory_report(plain, opt)
    assert (report["param_bytes"], report["grad_bytes"], report["optimizer_bytes"]) == (72, 72, 2 * 72 + 8)


def test_single_process_timeline_times_every_microbatch(tmp_path):
    trainer, _ = _single_process_trainer(grad_accum=2)
    losses = []
    with Instrument(trainer.engine) as inst:
        for step in range(2):
            with inst.step(step):
                losses.append(trainer.train_step()["loss"])
    events = inst.timeline.step_events(1)
    _check_well_formed(events)
    assert [(e["kind"], e["microbatch"]) for e in events] == [("forward", 0), ("backward", 0),
                                                              ("forward", 1), ("backward", 1)]
    assert inst.steps[-1]["comm"] == {}  # one process: no collectives
    path = inst.timeline.to_jsonl(tmp_path / "timeline.jsonl")
    assert read_jsonl(path) == sorted(inst.timeline.events, key=lambda e: (e["step"], e["start"]))
    losses.append(trainer.train_step()["loss"])  # hooks removed on exit: nothing more is recorded
    assert len(inst.timeline.events) == 8
    reference, _ = _single_process_trainer(grad_accum=2)  # instrumenting changes no number
    assert [reference.train_step()["loss"] for _ in range(3)] == losses


def test_idle_fractions_and_bubble_formula():
    # two ranks, span 0..4: rank 0 busy [0,1] and [2,3] (idle 1/2), rank 1 busy [1,4] (idle 1/4)
    ev = [{"rank": 0, "step": 0, "kind": "forward", "start": 0.0, "end": 1.0},
          {"rank": 0, "step": 0, "kind": "backward", "start": 2.0, "end": 3.0},
          {"rank": 0, "step": 0, "kind": "send", "start": 3.0, "end": 4.0},  # communication is not busy
          {"rank": 1, "step": 0, "kind": "forward", "start": 1.0, "end": 2.5},
          {"rank": 1, "step": 0, "kind": "backward", "start": 2.5, "end": 4.0}]
    idle = idle_fractions(ev)
    assert idle["span_s"] == 4.0 and idle["idle"] == {0: 0.5, 1: 0.25} and idle["mean_idle"] == 0.375
    assert bubble_formula(4, 8) == 3 / 11 and bubble_formula(2, 4, virtual_stages=2) == 1 / 9


def test_wire_bytes_ring_formulas():
    assert wire_bytes("all_reduce", 100, 4) == 150.0  # 2 (n-1)/n B
    assert wire_bytes("all_gather", 100, 4) == 75.0 and wire_bytes("reduce_scatter", 100, 4) == 75.0
    assert wire_bytes("send", 100, 2) == 100.0 and wire_bytes("recv", 100, 2) == 0.0
    assert wire_bytes("all_reduce", 100, 1) == 0.0


def test_mfu_is_none_on_cpu_and_computed_from_a_given_peak():
    assert peak_flops("cpu") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None
    with pytest.raises(CostError):  # no peak, no MFU: never a guess
        mfu(1000.0, 6e6, 2, 0.0)
    assert mfu(1000.0, 6e6, 2, 1e12) == pytest.approx(1000.0 * 6e6 / (2 * 1e12))
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert lookup_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert lookup_peak_flops("NVIDIA H200", torch.float32) == 67e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert lookup_peak_flops("NVIDIA L4") == 121e12 and lookup_peak_flops("NVIDIA L40S") == 362e12
    assert lookup_peak_flops("Tesla T4", "bfloat16") is None  # no bf16 tensor cores
    assert lookup_peak_flops("Some Future GPU") is None


def test_gantt_has_labelled_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmkit.lab.plots import gantt

    tl = Timeline(rank=0)
    tl.begin_step(0)
    t = tl.origin
    tl.add("forward", 0, 0, t, t + 0.01)
    tl.add("backward", 0, 0, t + 0.01, t + 0.03)
    tl.add("all_reduce", -1, -1, t + 0.02, t + 0.04)
    other = Timeline(rank=1)
    other.begin_step(0)
    other.add("forward", 0, 0, other.origin + 0.005, other.origin + 0.02)
    path = tl.to_jsonl(tmp_path / "t.jsonl")
    other.to_jsonl(path, append=True)
    for source in (tl, path, tl.events + other.events):
        fig = gantt(source)
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        plt.close(fig)
    fig = gantt(path)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["rank 0", "rank 1"]
    plt.close(fig)
