"""The chapter-6 program (``python -m lmkit.lab.experiments chapter6``): its pieces, its errors, torchrun.

The forked-process mode runs in full in the chapter's notebook test (SMOKE); here: the ideal
schedules against the bubble formula, group labels, bad input, and one torchrun launch of 2
ranks (the mode a GPU node uses) whose results folder must hold coinciding loss curves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmkit.config import ParallelConfig
from lmkit.lab.experiments import (
    chapter6_checkpoint_plan,
    chapter6_layouts,
    chapter6_model_config,
    chapter6_train_config,
    load_results,
    main,
)
from lmkit.lab.layouts import (
    collective_dim,
    group_label,
    ideal_timeline,
    label,
    max_relative_difference,
    ring_pass,
)
from lmkit.parallel.engine import validate_layout
from lmkit.parallel.instrument import bubble_formula, idle_fractions
from lmkit.parallel.pipeline import schedule_actions
from lmkit.parallel.timeline import Timeline


@pytest.mark.parametrize("schedule, pp, m, v", [("gpipe", 2, 4, 1), ("gpipe", 4, 8, 1), ("1f1b", 2, 4, 1),
                                                ("1f1b", 4, 8, 1), ("interleaved", 2, 4, 2),
                                                ("interleaved", 4, 8, 2), ("interleaved", 2, 8, 4)])
def test_ideal_schedule_idles_exactly_the_bubble_formula(schedule, pp, m, v):
    events = ideal_timeline(schedule, pp, m, v, forward_s=1.0 / v, backward_s=2.0 / v)
    idle = idle_fractions(events)
    for rank in range(pp):
        assert idle["idle"][rank] == pytest.approx(bubble_formula(pp, m, v), abs=1e-12)
        order = [(e["kind"][0].upper(), e["microbatch"], e["chunk"]) for e in events if e["rank"] == rank]
        assert order == [tuple(a) for a in schedule_actions(schedule, m, pp, rank, v)]
    # a forward never starts before the previous stage has finished it
    end = {(e["kind"], e["microbatch"], e["chunk"] * pp + e["rank"]): e["end"] for e in events}
    for e in events:
        stage = e["chunk"] * pp + e["rank"]
        if e["kind"] == "forward" and stage > 0:
            assert e["start"] >= end[("forward", e["microbatch"], stage - 1)]


def test_group_labels_follow_the_rank_order():
    layout = ParallelConfig(dp=2, tp=2, pp=2)  # tp fastest, then dp, then pp
    assert group_label([0, 1], layout) == "tp"
    assert group_label([1, 3], layout) == "dp"
    assert group_label([2, 6], layout) == "pp"
    assert group_label([0, 1, 2, 3], layout) == "dp x tp"
    assert group_label(list(range(8)), layout) == "world"
    assert group_label([0, 4], ParallelConfig(pp=4)) == "embedding"  # first and last stage: tied embedding
    assert group_label([0], layout) == "self" and group_label([0, 1], None) == "self"


def test_context_parallel_groups_follow_the_rank_order_and_the_gradient_group_is_dp():
    layout = ParallelConfig(dp=2, cp=2, tp=2)  # tp fastest, then cp, then dp
    assert group_label([0, 2], layout) == "cp" and group_label([0, 4], layout) == "dp"
    assert group_label([0, 1], layout) == "tp"
    # the ring's messages stay cp; the gradient group dp x cp is lmkit.costs's "dp", even when it is the world
    dim = collective_dim
    assert dim({"kind": "send", "ranks": [0, 2]}, layout) == "cp"
    assert dim({"kind": "all_reduce", "ranks": [0, 2, 4, 6]}, layout) == "dp"
    assert dim({"kind": "all_reduce", "ranks": [0, 1, 2, 3]}, ParallelConfig(dp=2, cp=2)) == "dp"
    assert dim({"kind": "all_reduce", "ranks": [0, 2]}, ParallelConfig(cp=2, tp=2)) == "dp"
    assert dim({"kind": "all_reduce", "ranks": [0, 1]}, layout) == "tp"
    pipe = ParallelConfig(cp=2, pp=2, microbatches=4)
    assert dim({"kind": "send", "ranks": [0, 1]}, pipe) == "cp"  # the ring, inside a pipeline stage
    assert dim({"kind": "send", "ranks": [0, 1, 2, 3]}, pipe) == "pp"  # the pipeline's, via the world


def test_ring_pass_cuts_one_layers_pass_out_of_every_ranks_timeline():
    events = []
    for rank in range(2):
        timeline = Timeline(rank=rank)
        timeline.begin_step(3)
        for layer in (0, 1):
            observe = timeline.ring_observer(layer)
            for micro in range(2):  # two passes of each layer (two microbatches)
                t = 10.0 * micro + layer + rank * 0.5 + timeline.origin
                # reported as they end, as the ring does: a transfer once it has been waited for
                observe("forward", "compute", 0, t + 0.1, t + 0.2, 3)
                observe("forward", "wait", 0, t + 0.2, t + 0.4, 0)
                observe("forward", "kv", 0, t, t + 0.4, 0)
                observe("forward", "compute", 1, t + 0.4, t + 0.5, 2)
        events += timeline.events
    got = ring_pass(events, layer=1, phase="forward", microbatch=1)
    assert [(e["rank"], e["kind"], e["ring_step"]) for e in got] == [
        (r, kind, step) for r in (0, 1) for kind, step in
        (("kv_transfer", 0), ("ring_forward", 0), ("ring_wait", 0), ("ring_forward", 1))]
    assert min(e["start"] for e in got) == 0.0 and got[4]["start"] == pytest.approx(0.5)
    assert all(e["chunk"] == 1 and e["microbatch"] == 1 and e["step"] == 3 for e in got)
    assert [e["blocks"] for e in got if e["kind"] == "ring_forward"] == [3, 2, 3, 2]
    with pytest.raises(ValueError, match="context-parallel layout"):
        ring_pass(events, layer=0, phase="backward")


def test_layouts_cover_both_engines_and_smoke_keeps_one_of_each_kind():
    names = [label(p) for p in chapter6_layouts()]
    assert names[0] == "1 process" and len(names) == len(set(names))
    for kind in ("dp2", "dp2 zero1", "dp2 zero2", "native dp2 zero3", "tp2", "tp2 sp", "pp2 gpipe m4",
                 "pp2 1f1b m4", "pp2 interleaved v2 m4", "native pp2 interleaved v2 m4",
                 "cp2", "cp4", "dp2 x cp2", "cp2 x tp2 sp", "cp2 x pp2 1f1b m4"):
        assert kind in names
    smoke = [label(p) for p in chapter6_layouts(smoke=True)]
    assert set(smoke) < set(names)
    assert {"pp2 gpipe m4", "pp2 1f1b m4", "pp2 interleaved v2 m4", "native dp2 zero3", "cp2"} <= set(smoke)
    assert [n for n in smoke if "cp" in n] == ["cp2"]  # SMOKE keeps one context-parallel layout


def test_every_context_parallel_layout_of_the_chapter_is_valid_for_its_model():
    """The chapter's GPT allows cp: block size 16 splits into 2 cp chunks, no dropout; lmkit engine only."""
    mc = chapter6_model_config()
    assert mc.dropout == 0 and mc.block_size == 16
    layouts = [p for p in chapter6_layouts() if p is not None and p.cp > 1]
    assert {p.cp for p in layouts} == {2, 4} and all(p.engine == "lmkit" for p in layouts)
    for p in layouts + [chapter6_checkpoint_plan(4)[0]]:
        validate_layout(p, chapter6_train_config(20, "x"),
                        mc.n_layer, mc.n_head, mc.vocab_size, mc.block_size, p.world_size, mc.dropout)


@pytest.mark.parametrize("argv, fragment", [
    (["chapter7"], "invalid choice: 'chapter7'"),
    (["chapter6"], "the following arguments are required: --out"),
    (["chapter6", "--out", "FILE"], "is a file, not a folder"),
    (["chapter6", "--out", "DIR", "--steps", "2"], "--steps must be at least 6"),
    (["chapter6", "--out", "DIR", "--device", "tpu"], "use auto, cpu or cuda"),
    pytest.param(["chapter6", "--out", "DIR", "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_input_exits_2_with_one_line(argv, fragment, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = [{"FILE": str(tmp_path / "file"), "DIR": str(tmp_path / "d")}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err


def test_missing_results_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lmkit.lab.experiments chapter6 --out"):
        load_results(tmp_path)


@pytest.mark.distributed
def test_torchrun_launch_runs_the_layouts_of_its_world_and_lists_the_rest(tmp_path):
    out = tmp_path / "ch6"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lmkit.lab.experiments", "chapter6", "--out", str(out), "--smoke", "--steps", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = load_results(out)
    manifest, layouts = results["manifest"], results["layouts"]
    (run,) = manifest["runs"]
    assert run["world_size"] == 2 and run["mode"] == "torchrun, 2 ranks"
    assert [s["world_size"] for s in run["skipped"]] == [8]  # the 3-D layout needs 8 ranks
    assert "--nproc_per_node=8" in run["skipped"][0]["reason"]
    ref = layouts["1 process"]["losses"]
    assert len(ref) == 6 and len(layouts) == len(chapter6_layouts(smoke=True)) - 1
    for name, entry in layouts.items():
        assert len(entry["ranks"]) == entry["world_size"], name
        assert max_relative_difference(entry["losses"], ref) < 1e-5, name
    sends = [c for c in layouts["pp2 1f1b m4"]["ranks"][0]["comm"] if c["kind"] == "send"]
    assert sends and all(c["dim"] == "pp" for c in sends)
    ring = [c for c in layouts["cp2"]["ranks"][0]["comm"] if c["kind"] == "send"]
    assert ring and all(c["dim"] == "cp" for c in ring)  # ring attention's sends, under torchrun too
    assert any(e["kind"] == "ring_forward" for e in layouts["cp2"]["ranks"][1]["timeline"])
    ckpt = results["checkpoint"]
    assert ckpt["save"]["name"] == "dp2 zero1" and [r["name"] for r in ckpt["resumes"]] == ["pp2 1f1b m2",
                                                                                             "1 process"]
    for resumed in ckpt["resumes"]:
        assert resumed["start_step"] == ckpt["saved_at"] == 3
        assert max_relative_difference(ckpt["save"]["losses"] + resumed["losses"], ref) < 1e-5
    assert json.loads((out / "manifest.json").read_text())["steps"] == 6
