"""Ring attention equals full causal attention; zigzag sharding balances the work; bytes match the formulas.

One `run_local` launch of 4 gloo processes checks every ring size: the world is cut into groups of
cp = 2 (two groups), 3 (rank 3 sits out) and 4 ranks, so groups that are not the world (global ranks
2 and 3 as a ring of two) are exercised too. Outputs and the gradients of q, k and v are compared
with ``F.scaled_dot_product_attention(is_causal=True)`` in float64 (within 1e-12: the algorithm is
exact), in float32 (within 1e-6 of the reference's largest magnitude: what is left is rounding, of
the reference as much as of the ring) and in bfloat16 with fp32 accumulators (within 1e-2 of it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkit import costs
from lmkit.config import ConfigError, ModelConfig
from lmkit.lab.ring_check import ring_attention_worker
from lmkit.model import GPT
from lmkit.parallel.context_parallel import (
    ContextParallelAttention,
    block_attention,
    chunk_ids,
    merge_partials,
    parallelize_context,
    position_ids,
    ring_attention,
    shard_sequence,
    unshard_sequence,
    validate_cp,
)
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import Topology
from lmkit.parallel.stage import build_stages
from lmkit.parallel.timeline import RING_KINDS, Timeline, attach_timeline

WORLD = 4
DIMS = {"batch": 2, "heads": 3, "head_dim": 8}
SEQ_LENS = {2: (8, 24, 64), 3: (12, 36), 4: (16, 48)}  # multiples of 2 cp
CASES = [(cp, s, layout, dtype) for cp, lens in SEQ_LENS.items() for s in lens
         for layout in ("zigzag", "contiguous") for dtype in ("float32", "float64")]
CASES += [(2, 64, "zigzag", "bfloat16"), (4, 64, "contiguous", "bfloat16")]  # fp32 accumulators, bf16 K/V
BYTES = {"float64": 8, "float32": 4, "bfloat16": 2}
TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-2}  # times max(1, the reference's magnitude)


@pytest.fixture(scope="module")
def ring_results():
    """Every rank's results of every case, from one launch: {case: [result of group rank 0, 1, ...]}."""
    by_case: dict[tuple, dict[int, dict]] = {}
    for per_rank in run_local(WORLD, ring_attention_worker, CASES, **DIMS, timeout=120):
        for r in per_rank:
            ranks = by_case.setdefault((r["cp"], r["seq_len"], r["layout"], r["dtype"]), {})
            if r["rank"] not in ranks:  # cp = 2 runs on two groups; keep the first group's
                ranks[r["rank"]] = r
    return {case: [ranks[i] for i in range(case[0])] for case, ranks in by_case.items()}


@pytest.mark.distributed
def test_ring_attention_output_and_gradients_equal_full_causal_attention(ring_results):
    assert set(ring_results) == set(CASES)
    worst = dict.fromkeys(BYTES, 0.0)
    for (cp, s, layout, dtype), ranks in ring_results.items():
        for r in ranks:
            for name, d in r["max_diff"].items():
                bound = TOLERANCE[dtype] * (1.0 if dtype == "float64" else max(1.0, r["max_abs"][name]))
                assert d <= bound, (cp, s, layout, dtype, r["rank"], name, d)
                worst[dtype] = max(worst[dtype], d)
    print("largest differences from SDPA:", {k: f"{v:.2e}" for k, v in worst.items()})


@pytest.mark.distributed
def test_each_rank_holds_its_chunks_and_positions(ring_results):
    for (cp, s, layout, _), ranks in ring_results.items():
        positions = []
        for r in ranks:
            assert r["chunks"] == list(chunk_ids(r["rank"], cp, layout))
            assert r["shape"] == [DIMS["batch"], DIMS["heads"], s // cp, DIMS["head_dim"]]
            positions += r["positions"]
        assert sorted(positions) == list(range(s))  # every position exactly once


@pytest.mark.distributed
def test_zigzag_balances_the_causal_work_and_contiguous_does_not(ring_results):
    heads = DIMS["batch"] * DIMS["heads"]
    for (cp, s, layout, _), ranks in ring_results.items():
        measured = [r["work"] for r in ranks]
        formula = [{k: v * (heads if k != "blocks" else 1) for k, v in w.items()}
                   for w in costs.cp_attention_work(s, cp, layout)]
        assert measured == formula, (cp, s, layout)
        unmasked = [w["unmasked"] for w in measured]
        c = s // (2 * cp) if layout == "zigzag" else s // cp
        if layout == "zigzag":
            assert max(unmasked) == min(unmasked) == heads * ((2 * cp - 1) * c * c + c * (c + 1))
            assert {w["blocks"] for w in measured} == {2 * cp + 1}
        else:  # rank r: r full blocks and a triangle; the last rank does 2cp - 1 times the first's, nearly
            assert unmasked == [heads * (r * c * c + c * (c + 1) // 2) for r in range(cp)]
            assert max(unmasked) / min(unmasked) == ((cp - 1) * c * c + c * (c + 1) / 2) / (c * (c + 1) / 2)
            assert max(unmasked) / min(unmasked) > 1.5


@pytest.mark.distributed
def test_bytes_sent_and_saved_equal_the_cost_model(ring_results):
    b, a, hd = DIMS["batch"], DIMS["heads"], DIMS["head_dim"]
    for (cp, s, layout, dtype), ranks in ring_results.items():
        e = BYTES[dtype]
        terms = costs.cp_communication(b, s, a * hd, cp, act_bytes=e)
        forward = [t for t in terms if "forward" in t.what]
        backward = [t for t in terms if "forward" not in t.what]
        for r in ranks:
            for phase, expected in (("forward", forward), ("backward", backward)):
                for kind in ("send", "recv"):
                    got = r["comm"][phase][kind]
                    want = [t for t in expected if t.kind == kind]
                    assert got["calls"] == sum(t.calls for t in want), (cp, s, phase, kind)
                    assert got["bytes"] == sum(t.bytes for t in want), (cp, s, phase, kind)
                assert set(r["comm"][phase]) == {"send", "recv"}  # nothing but the ring's point-to-point
            memory = costs.cp_attention_memory(b, s, a * hd, a, cp, act_bytes=e, layout=layout)
            assert r["saved_bytes"] == memory["saved"], (cp, s, layout)


@pytest.mark.distributed
def test_the_ring_reports_its_steps_transfers_and_waits(ring_results):
    """`on_event` sees, per pass, cp compute steps (the first on the rank's own block), a K/V block
    in flight before each of the cp - 1 steps after it, posted before the compute it can hide
    behind, and in backward cp hops of the dK/dV accumulator; blocks add up to the work counted."""
    for (cp, _, layout, _), ranks in ring_results.items():
        for r in ranks:
            events = [tuple(e) for e in r["events"]]
            assert all(start <= end for *_, start, end, _ in events)
            for phase in ("forward", "backward"):
                mine = [e for e in events if e[0] == phase]
                compute = [e for e in mine if e[1] == "compute"]
                kv = [e for e in mine if e[1] == "kv"]
                assert [e[2] for e in compute] == list(range(cp))
                assert [e[2] for e in kv] == list(range(cp - 1))
                assert all(t[3] <= compute[t[2]][3] for t in kv)  # posted before that step's compute
                dkv = [e[2] for e in mine if e[1] == "dkv"]
                assert dkv == (list(range(cp)) if phase == "backward" else [])
                # forward: one wait per K/V hop; backward: per K/V hop and per dK/dV hop
                waits = [e for e in mine if e[1] == "wait"]
                assert len(waits) == (cp - 1 if phase == "forward" else 2 * cp - 1)
                assert sum(e[5] for e in compute) == r["work"]["blocks"]
            if layout == "zigzag":  # the own block: 2 triangles + 1 full block; each other rank's: 2
                assert [e[5] for e in events if e[:2] == ("forward", "compute")] == [3] + [2] * (cp - 1)


# --------------------------------------------------------------------------- one process


def test_a_timeline_records_the_ring_of_every_layer_and_lets_go_of_it():
    """attach_timeline gives each ContextParallelAttention an observer (None otherwise: the ring
    reports nothing) and takes it away again; without a process group the ring is one step."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, block_size=16, vocab_size=32, dropout=0.0))
    stage = parallelize_context(build_stages(model, 1, 0)[0], Topology(cp=2, cp_rank=0))
    rings = [block.attn for block in stage.blocks]
    assert all(isinstance(a, ContextParallelAttention) and a.on_event is None for a in rings)
    timeline = Timeline(rank=0)
    remove = attach_timeline(stage, timeline)
    assert all(a.on_event is not None for a in rings)
    timeline.begin_step(1)
    idx = torch.randint(0, 32, (2, 8))  # this rank's 8 tokens of a 16-token sequence
    stage(idx, idx).backward()
    remove()
    assert all(a.on_event is None for a in rings)
    ring = [e for e in timeline.events if e["kind"] in ("ring_forward", "ring_backward")]
    assert sorted((e["chunk"], e["kind"], e["ring_step"], e["blocks"], e["microbatch"]) for e in ring) == [
        (layer, kind, 0, 3, 0) for layer in (0, 1) for kind in ("ring_backward", "ring_forward")]
    assert {e["kind"] for e in timeline.events} <= {"forward", "backward", *RING_KINDS["compute"]}
    assert all(e["phase"] == e["kind"].removeprefix("ring_") for e in ring)
    n = len(timeline.events)
    stage(idx, idx).backward()  # detached: nothing more recorded
    assert len(timeline.events) == n


def test_shard_and_unshard_are_inverse_and_zigzag_takes_one_chunk_from_each_end():
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)
    for cp in (1, 2, 4):
        for layout in ("zigzag", "contiguous"):
            parts = [shard_sequence(x, r, cp, dim=1, layout=layout) for r in range(cp)]
            assert torch.equal(unshard_sequence(parts, dim=1, layout=layout), x)
    assert position_ids(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert position_ids(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert position_ids(8, 1, 2, layout="contiguous", start=10).tolist() == [14, 15, 16, 17]


def test_a_sequence_that_does_not_split_is_refused_in_one_line_naming_the_fix():
    with pytest.raises(ConfigError) as e:
        validate_cp(12, 4)
    message = str(e.value)
    assert "\n" not in message and "not divisible by 8" in message and "multiple of 8" in message
    validate_cp(12, 4, "contiguous")  # 12 tokens do split into 4 contiguous chunks
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_sequence(torch.zeros(1, 12), 0, 4)
    with pytest.raises(ConfigError, match="unknown"):
        validate_cp(16, 2, "striped")
    with pytest.raises(costs.CostError, match="multiple of 8"):
        costs.cp_attention_work(12, 4)


def test_without_a_process_group_ring_attention_is_blockwise_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grads_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    out = ring_attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(grads, grads_ref, strict=True))


def test_merging_two_blocks_with_log_sum_exp_equals_softmax_over_both():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    full, _ = block_attention(q, k, v, causal=False, scale=0.5)
    left = block_attention(q, k[..., :2, :], v[..., :2, :], causal=False, scale=0.5)
    right = block_attention(q, k[..., 2:, :], v[..., 2:, :], causal=False, scale=0.5)
    merged, lse = merge_partials(*left, *right)
    assert torch.allclose(merged, full, atol=1e-14, rtol=0)
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-2, -1) * 0.5, -1), atol=1e-14, rtol=0)


def test_stage_embeds_the_positions_of_its_zigzag_chunks():
    """A cp rank's stage embeds its tokens at their own positions: its chunks of the full embedding."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=16, vocab_size=32, dropout=0.0))
    idx = torch.randint(0, 32, (2, 16))
    full = build_stages(model, 1, 0)[0].embed(idx)
    for rank in range(2):
        stage = parallelize_context(build_stages(model, 1, 0)[0], Topology(cp=2, cp_rank=rank))
        assert isinstance(stage.blocks[0].attn, ContextParallelAttention)
        mine = stage.embed(shard_sequence(idx, rank, 2))
        torch.testing.assert_close(mine, shard_sequence(full, rank, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sequence length 32 exceeds block_size=16"):
        stage.embed(idx)  # 16 tokens of this rank: a 32-token sequence
