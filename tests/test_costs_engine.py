"""`lmkit.costs` against the engines: every layout of the loss-compare matrix, every rank, measured.

For each layout of ``tests/test_parallel_equivalence.py`` (context-parallel ones included, and the
native engine's ZeRO-3), one training step is observed by `lmkit.parallel.instrument`: the bytes of
parameters, gradients and optimizer state every rank allocates must equal `costs.memory` exactly,
and the bytes and calls of every (group, collective) it issues must equal `costs.communication`
exactly (calls where the formula counts them: not the bucketed all-reduces). The bubble formula is
checked against the measured idle fraction of a pipeline whose compute dominates its messages.

ZeRO-1 is a distributed optimizer (one reduce-scatter per bucket and step, the parameter
all-gathers, one fp32 norm^2 all-reduce over dp: 2 Psi per rank, as plain data parallelism). Mixed
precision (bf16 weights, fp32 masters, gradients reduced in fp32 or bf16) is measured on its own
layouts against ``costs.memory(..., "mixed", reduce=...)`` and ``costs.communication``.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter

import pytest
from test_parallel_equivalence import CP_LAYOUTS, LAYOUTS, LLAMA, MODEL, MUON, TEXT, TRAIN, ZERO2_LAYOUTS

from lmkit import costs
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.lab.layouts import collective_dim, group_label, measure_layouts
from lmkit.parallel.instrument import idle_fractions

pytestmark = pytest.mark.distributed

NATIVE = [ParallelConfig(dp=2, zero=3, engine="native")]
# ZeRO-2 over a pipeline with 2 microbatches (its sequence-parallel layout sums the replicated
# gradients' share of each dp shard, which the formula estimates as 1/dp: not exact, left out)
ZERO2 = [p for p in ZERO2_LAYOUTS if not p.sequence_parallel]
VOCAB = len(set(TEXT)) + 1  # characters plus the end-of-text token
# Context parallelism alone and with every other dimension (cp2, cp4, cp2 x dp2, cp2 x tp2, cp2 x pp2,
# cp2 x dp2 ZeRO-2), and with tensor and sequence parallelism; they share the launches of the layouts
# above (one per world size).
CP = CP_LAYOUTS + [ParallelConfig(cp=2, tp=2, sequence_parallel=True)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    layouts = LAYOUTS + ZERO2 + CP + NATIVE
    return list(zip(layouts, measure_layouts(MODEL, TRAIN, layouts, steps=1, warmup=1, text=TEXT,
                                             cache_dir=cache), strict=True))


def measured_group(collective: dict, pc: ParallelConfig) -> str:
    """The `costs.CommTerm.group` of a measured collective: point-to-point messages are ring
    attention's on the cp group and the pipeline's otherwise; any other collective over cp ranks
    (cp alone, or dp x cp, the whole world when there is no tp or pp) is the gradient group, which
    costs calls "dp"."""
    label = group_label(collective["ranks"], pc)
    if collective["kind"] in ("send", "recv"):
        return "cp" if label == "cp" else "pp"
    if label in ("cp", "dp x cp") or (label == "world" and pc.cp > 1 and pc.tp == pc.pp == 1):
        return "dp"
    return label


def _model() -> costs.Model:
    cfg = ModelConfig(**{**MODEL.__dict__, "vocab_size": VOCAB})
    return costs.Model.from_config(cfg)


def test_model_states_per_rank_equal_the_formula(measured):
    model, checked = _model(), 0
    for pc, entry in measured:
        assert "error" not in entry, entry
        layout = costs.Layout.from_parallel_config(pc)
        for rank in entry["ranks"]:
            assert rank["memory"]["param_numel"] > 0
            pred = costs.memory(model, layout, TRAIN.batch_size, "fp32", stage=rank["coords"]["pp"])
            got = rank["memory"]
            where = f"{entry['name']} rank {rank['rank']}"
            if pc.engine == "native":
                # FSDP2 shards every tensor over dp (an even split here) and AdamW steps each shard with
                # its own step counter; the gradients are freed after the step (zero_grad(set_to_none)).
                tensors = costs.parameter_table(model)
                assert got["param_bytes"] == pred.params, where
                assert got["optimizer_bytes"] == 8 * costs.num_params(model) / pc.dp + 4 * len(tensors), where
                assert got["grad_bytes"] == 0, where
                continue
            assert got["param_bytes"] == pred.params, where
            assert got["optimizer_bytes"] == pred.optimizer, where
            assert got["grad_bytes"] == pred.grads, where  # ZeRO-2: the rank's shard, 1/dp
            checked += 1
    assert checked == sum(p.world_size for p in LAYOUTS + ZERO2 + CP)


def _bytes_and_calls(model: costs.Model, pc: ParallelConfig, layout: costs.Layout, rank: dict,
                     optimizer: str = "adamw", precision: str = "fp32",
                     reduce: str = "fp32") -> tuple[Counter, Counter, Counter, Counter, set]:
    """(measured bytes, formula bytes, measured calls, formula calls, keys whose calls the formula
    leaves open) by (group, kind) for one rank's measured step."""
    pred, got, pred_calls, got_calls, uncounted = Counter(), Counter(), Counter(), Counter(), set()
    for term in costs.communication(model, layout, TRAIN.batch_size, precision, rank["coords"]["pp"],
                                    optimizer=optimizer, reduce=reduce):
        key = ("pp" if term.group == "embedding" and pc.pp == 2 else term.group, term.kind)
        pred[key] += term.bytes
        if term.calls is None:  # bucketed: as many calls as buckets
            uncounted.add(key)
        else:
            pred_calls[key] += term.calls
    for c in rank["comm"]:
        if c["kind"] == "barrier":  # the instrument's own barrier before each measured step
            continue
        key = (measured_group(c, pc), c["kind"])
        got[key] += c["bytes"]
        got_calls[key] += c["calls"]
    return got, pred, got_calls, pred_calls, uncounted


def test_bytes_of_every_collective_equal_the_formula(measured):
    model, checked, cp_checked = _model(), 0, 0
    for pc, entry in measured:
        layout = costs.Layout.from_parallel_config(pc)
        for rank in entry["ranks"]:
            got, pred, got_calls, pred_calls, uncounted = _bytes_and_calls(model, pc, layout, rank)
            where = f"{entry['name']} ({pc.engine}) rank {rank['rank']}"
            if pc.engine == "native":  # FSDP2: 2 parameter all-gathers + 1 reduce-scatter, as costs says
                for key in (("dp", "all_gather"), ("dp", "reduce_scatter")):
                    assert got[key] == pred[key], (where, key, got, pred)
                continue
            assert got == pred, (where, dict(got), dict(pred))
            for key in set(got) - uncounted:
                assert got_calls[key] == pred_calls[key], (where, key, dict(got_calls), dict(pred_calls))
            checked += len(got)
            if pc.cp > 1:
                cp_checked += 1
                assert got[("cp", "send")] > 0, where
    assert checked > 100
    assert cp_checked == sum(p.world_size for p in CP)



# Mixed precision as production runs it (train.param_dtype=bfloat16): bf16 weights, fp32 master weights
# in the optimizer (sharded with its moments under ZeRO), gradients accumulated and reduced in
# train.reduce_dtype. Plain dp, the three ZeRO stages, and tensor and pipeline parallelism (2 launches).
MIXED_LAYOUTS = [ParallelConfig(dp=2), ParallelConfig(dp=2, zero=1), ParallelConfig(dp=2, zero=2),
                 ParallelConfig(pp=2, microbatches=2),
                 ParallelConfig(dp=2, tp=2, zero=1, sequence_parallel=True)]


def _assert_rank_on_formulas(model: costs.Model, pc: ParallelConfig, rank: dict, where: str,
                             precision: str = "fp32", optimizer: str = "adamw", reduce: str = "fp32") -> None:
    """One rank's parameter, gradient and optimizer bytes equal `costs.memory`, and its bytes and calls
    per (group, collective) equal `costs.communication`."""
    layout = costs.Layout.from_parallel_config(pc)
    pred = costs.memory(model, layout, TRAIN.batch_size, precision, stage=rank["coords"]["pp"],
                        optimizer=optimizer, reduce=reduce)
    got = rank["memory"]
    assert (got["param_bytes"], got["grad_bytes"], got["optimizer_bytes"]) == \
        (pred.params, pred.grads, pred.optimizer), where
    got_b, pred_b, got_calls, pred_calls, uncounted = _bytes_and_calls(model, pc, layout, rank, optimizer,
                                                                       precision, reduce)
    assert got_b == pred_b, (where, dict(got_b), dict(pred_b))
    for key in set(got_b) - uncounted:
        assert got_calls[key] == pred_calls[key], (where, key, dict(got_calls), dict(pred_calls))


@pytest.mark.parametrize("reduce", ["fp32", "bf16"])
def test_mixed_precision_memory_and_bytes_equal_the_formulas(reduce, tmp_path):
    """Every rank's weights (2 bytes), gradients (4 or 2), fp32 masters plus AdamW's moments (12 bytes,
    sharded by ZeRO-1/2) and every collective's bytes equal ``costs`` "mixed" with `reduce`, exactly."""
    train = TrainConfig(**{**TRAIN.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16",
                           "reduce_dtype": {"fp32": "float32", "bf16": "bfloat16"}[reduce]})
    entries = measure_layouts(MODEL, train, MIXED_LAYOUTS, steps=1, warmup=1, text=TEXT,
                              cache_dir=str(tmp_path), timeout=300)
    model, ranks = _model(), 0
    for pc, entry in zip(MIXED_LAYOUTS, entries, strict=True):
        assert "error" not in entry, entry
        for rank in entry["ranks"]:
            where = f"mixed reduce={reduce} {entry['name']} rank {rank['rank']}"
            _assert_rank_on_formulas(model, pc, rank, where, "mixed", reduce=reduce)
            got = rank["memory"]
            assert got["param_bytes"] == 2 * got["param_numel"], where  # bf16 weights
            masters = 4 * got["param_numel"] / (pc.dp if pc.zero else 1)  # fp32, ZeRO-sharded (even here)
            assert got["master_bytes"] == masters, where
            ranks += 1
    assert ranks == sum(p.world_size for p in MIXED_LAYOUTS)


# Today's model (rotary, RMSNorm, SwiGLU, 2 key/value heads for 4 query heads, untied head, QK-norm), with
# AdamW and with Muon, whose Newton-Schulz gathers whole matrices (over dp under ZeRO, over tp).
LLAMA_LAYOUTS = {
    "adamw": [ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(cp=2, tp=2),
              ParallelConfig(dp=2, pp=2, zero=2, microbatches=2),
              ParallelConfig(dp=2, tp=2, pp=2, zero=1, sequence_parallel=True, microbatches=2)],
    "muon": [ParallelConfig(dp=2, zero=1), ParallelConfig(dp=2, zero=2),
             ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(pp=2, microbatches=4),
             ParallelConfig(cp=2),
             ParallelConfig(dp=2, tp=2, pp=2, zero=1, microbatches=2)],
}


def _measure_by_optimizer(model: ModelConfig, layouts: dict[str, list[ParallelConfig]],
                          cache: str) -> list[tuple[str, ParallelConfig, dict]]:
    """(optimizer, layout, measured entry) of every layout, trained with AdamW or Muon."""
    out = []
    for optimizer, train in (("adamw", TRAIN), ("muon", MUON)):
        entries = measure_layouts(model, train, layouts[optimizer], steps=1, warmup=1, text=TEXT,
                                  cache_dir=cache)
        out += [(optimizer, pc, entry) for pc, entry in zip(layouts[optimizer], entries, strict=True)]
    return out


@pytest.fixture(scope="module")
def llama_measured(tmp_path_factory):
    return _measure_by_optimizer(LLAMA, LLAMA_LAYOUTS, str(tmp_path_factory.mktemp("cache")))


def test_llama_style_model_and_muon_memory_and_bytes_equal_the_formulas(llama_measured):
    model = costs.Model.from_config(ModelConfig(**{**LLAMA.__dict__, "vocab_size": VOCAB}))
    ranks = 0
    muon_bytes = Counter()
    for optimizer, pc, entry in llama_measured:
        assert "error" not in entry, entry
        layout = costs.Layout.from_parallel_config(pc)
        for rank in entry["ranks"]:
            where = f"{optimizer} {entry['name']} rank {rank['rank']}"
            _assert_rank_on_formulas(model, pc, rank, where, optimizer=optimizer)
            terms = costs.communication(model, layout, TRAIN.batch_size, "fp32", rank["coords"]["pp"],
                                        optimizer=optimizer)
            muon_bytes[entry["name"]] += sum(t.bytes for t in terms if t.what.startswith("Muon"))
            ranks += 1
    assert ranks == sum(p.world_size for layouts in LLAMA_LAYOUTS.values() for p in layouts)
    # Muon's gathers are there where a matrix is split (ZeRO chunks, tp shards), and nowhere else
    assert muon_bytes["dp2 zero1"] > 0 and muon_bytes["tp2 sp"] > 0 and muon_bytes["pp2 1f1b m4"] == 0
    assert muon_bytes["cp2"] == 0


# Experts (4 of them, top-2, in every block) split over ep = 2 inside dp: plain, ZeRO-1 (one replica per
# expert when ep = dp: the engine steps them without ZeRO), ZeRO-1 and 2 over an edp group of 2, with
# tensor (and sequence) parallelism and with a pipeline; and Muon (ep = 1: the engine refuses it with
# ep > 1), whose Newton-Schulz steps each expert's matrix.
MOE = ModelConfig(**{**MODEL.__dict__, "n_experts": 4, "moe_top_k": 2})
MOE_LAYOUTS = {
    "adamw": [ParallelConfig(dp=2, ep=2), ParallelConfig(dp=2, ep=2, zero=1),
              ParallelConfig(dp=4, ep=2, zero=1), ParallelConfig(dp=4, ep=2, zero=2),
              ParallelConfig(dp=2, tp=2, sequence_parallel=True, ep=2),
              ParallelConfig(dp=2, pp=2, ep=2, microbatches=2)],
    "muon": [ParallelConfig(dp=2, zero=1), ParallelConfig(dp=2, zero=2)],
}


@pytest.fixture(scope="module")
def moe_measured(tmp_path_factory):
    return _measure_by_optimizer(MOE, MOE_LAYOUTS, str(tmp_path_factory.mktemp("cache")))


def _ranks_of_group(pc: ParallelConfig, rank: int, group: str) -> list[int]:
    """The ranks of `costs.CommTerm.group` `group` that hold `rank` (the spec's groups: ep and edp are
    carved out of dp x cp with j = d cp + c; the router's counts run over dp x cp, x tp under SP)."""
    dp, cp, tp, pp, ep = pc.dp, pc.cp, pc.tp, pc.pp, pc.ep
    t, c, d, p = rank % tp, rank // tp % cp, rank // (tp * cp) % dp, rank // (tp * cp * dp)

    def at(p: int, j: int, t: int) -> int:  # j = d cp + c
        return (p * dp * cp + j) * tp + t

    j = d * cp + c
    members = {"dp": [at(p, i, t) for i in range(dp * cp)],
               "ep": [at(p, i, t) for i in range(dp * cp) if i // ep == j // ep],
               "edp": [at(p, i, t) for i in range(dp * cp) if i % ep == j % ep],
               "router": [at(p, i, u) for i in range(dp * cp)
                          for u in range(tp if pc.sequence_parallel else 1)],
               "tp": [at(p, j, u) for u in range(tp)], "pp": [at(q, j, t) for q in range(pp)],
               "embedding": [at(0, j, t), at(pp - 1, j, t)], "cp": [at(p, d * cp + u, t) for u in range(cp)]}
    return sorted(members[group])


def test_expert_layouts_memory_and_bytes_equal_the_formulas(moe_measured):
    """Every rank of every expert layout: parameters (the routers' fp32 biases included), gradients and
    optimizer state (AdamW's or Muon's, the experts' sharded over edp) equal `costs.memory` exactly;
    every collective's bytes and calls per group (`collective_dim`: ep, edp, dp, tp, pp, world) equal
    `costs.communication`, the all-to-alls' wire bytes with the rank's measured routing imbalance."""
    model = costs.Model.from_config(ModelConfig(**{**MOE.__dict__, "vocab_size": VOCAB}))
    ranks, a2a = 0, 0
    for optimizer, pc, entry in moe_measured:
        assert "error" not in entry, entry
        layout = costs.Layout.from_parallel_config(pc)
        for rank in entry["ranks"]:
            where = f"{optimizer} {entry['name']} rank {rank['rank']}"
            stage = rank["coords"]["pp"]
            pred = costs.memory(model, layout, TRAIN.batch_size, "fp32", stage=stage, optimizer=optimizer)
            got = rank["memory"]
            assert (got["param_bytes"], got["grad_bytes"], got["optimizer_bytes"]) == \
                (pred.params, pred.grads, pred.optimizer), where
            # phi: the rows this rank sent and received over their mean under uniform routing
            tokens = TRAIN.batch_size // (pc.dp * pc.microbatches) * MOE.block_size // pc.tp
            rows, calls = rank["experts"]["rows_sent"], rank["experts"]["calls"]
            phi = rows / calls / (2 * tokens * MOE.moe_top_k * (pc.ep - 1) / pc.ep) if pc.ep > 1 else 1.0
            want, seen, want_calls, seen_calls, open_calls = Counter(), Counter(), Counter(), Counter(), set()
            for term in costs.communication(model, layout, TRAIN.batch_size, "fp32", stage,
                                            optimizer=optimizer, imbalance=phi):
                key = (collective_dim({"ranks": _ranks_of_group(pc, rank["rank"], term.group),
                                       "kind": term.kind}, pc), term.kind)
                # all-to-all: the bytes that leave the rank (its own rows stay), as `all_to_all_bytes`
                want[key] += term.wire_bytes if term.kind == "all_to_all" else term.bytes
                if term.calls is None:
                    open_calls.add(key)
                else:
                    want_calls[key] += term.calls
            for c in rank["comm"]:
                if c["kind"] != "barrier":
                    key = (collective_dim(c, pc), c["kind"])
                    seen[key] += c["wire_bytes"] if c["kind"] == "all_to_all" else c["bytes"]
                    seen_calls[key] += c["calls"]
            assert set(seen) == set(want), (where, dict(seen), dict(want))
            for key in seen:
                assert seen[key] == pytest.approx(want[key], rel=1e-12 if key[1] == "all_to_all" else 0), \
                    (where, key, dict(seen), dict(want))
                assert key in open_calls or seen_calls[key] == want_calls[key], (where, key, dict(seen_calls))
            a2a += ("ep", "all_to_all") in seen
            ranks += 1
    assert ranks == sum(p.world_size for layouts in MOE_LAYOUTS.values() for p in layouts)
    assert a2a == sum(p.world_size for p in MOE_LAYOUTS["adamw"])


def test_full_recomputation_runs_the_ring_of_every_layer_again(tmp_path):
    """Activation checkpointing re-runs each block's forward in backward, and with it the forward
    ring: cp2 sends 4 K/V blocks per layer instead of 3 (the formula's ``recompute="full"``)."""
    train = TrainConfig(**{**TRAIN.__dict__, "activation_checkpointing": True})
    pc = ParallelConfig(cp=2)
    (entry,) = measure_layouts(MODEL, train, [pc], steps=1, warmup=1, text=TEXT, cache_dir=str(tmp_path))
    model = _model()
    for rank in entry["ranks"]:
        got, pred, got_calls, pred_calls, uncounted = _bytes_and_calls(
            model, pc, costs.Layout.from_parallel_config(pc, recompute="full"), rank)
        assert got == pred, (rank["rank"], dict(got), dict(pred))
        assert all(got_calls[key] == pred_calls[key] for key in set(got) - uncounted)
        plain = costs.communication(model, costs.Layout(cp=2), TRAIN.batch_size, "fp32")
        sends = sum(t.calls for t in plain if t.group == "cp" and t.kind == "send")
        assert got_calls[("cp", "send")] == sends + MODEL.n_layer * (pc.cp - 1)  # one more per layer


@pytest.mark.slow
def test_pipeline_timeline_of_a_compute_bound_model_holds_every_microbatch(tmp_path):
    """pp2 1F1B on a model whose microbatch compute dwarfs a gloo message (8 layers, width 256,
    8 sequences of 128 tokens per microbatch): every rank's measured timeline holds one forward and
    one backward per microbatch and an idle fraction in [0, 1). How close the idle comes to the
    bubble (p-1)/(m+p-1) = 0.2 is a ratio of times: printed here beside the load, compared side by
    side in benchmarks/parallel.py, never asserted (a shared machine makes it anything)."""
    model = ModelConfig(n_layer=8, n_head=8, d_model=256, block_size=128, dropout=0.0)
    train = TrainConfig(batch_size=32, max_steps=10, warmup_steps=1, eval_interval=0, seed=3,
                        out_dir=str(tmp_path / "run"))
    layout = ParallelConfig(pp=2, microbatches=4, schedule="1f1b")
    (result,) = measure_layouts(model, train, [layout], steps=2, warmup=1, text=TEXT * 6,
                                cache_dir=str(tmp_path / "cache"))
    events = [e for rank in result["ranks"] for e in rank["timeline"]]
    for r in range(layout.pp):
        for kind in ("forward", "backward"):
            assert sorted(e["microbatch"] for e in events if e["rank"] == r and e["kind"] == kind) == \
                list(range(layout.microbatches)), (r, kind)
    idle = idle_fractions(events)["idle"]
    assert all(0 <= v < 1 for v in idle.values())
    print(f"pp2 1f1b m4: measured idle {statistics.mean(idle.values()):.3f}, formula "
          f"{costs.bubble_fraction(2, 4):.3f} (load average {os.getloadavg()[0]:.1f})")
