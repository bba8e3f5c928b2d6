"""The hand-written ring all-reduce equals dist.all_reduce and sends exactly 2 (N-1)/N of the payload."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lmkit.parallel.collectives import collectives_worker, ring_all_reduce
from lmkit.parallel.instrument import wire_bytes
from lmkit.parallel.launch import run_local

N, NUMEL = 4, 1 << 10
WAYS = ("all_reduce", "reduce_scatter + all_gather", "ring (send/recv)")


@pytest.mark.distributed
def test_three_ways_to_all_reduce_agree_and_their_bytes_match_the_formulas():
    for rank, out in enumerate(run_local(N, collectives_worker, NUMEL, timeout=120)):
        payload = out["payload_bytes"]
        assert out["rank"] == rank and out["world_size"] == N and payload == NUMEL * 8
        assert all(out[way]["equal"] for way in WAYS)
        assert out["reduce_scatter + all_gather"]["shard_equal"]
        ar = out["all_reduce"]["comm"]["all_reduce"]
        assert ar == {"calls": 1, "bytes": payload, "wire_bytes": wire_bytes("all_reduce", payload, N)}
        split = out["reduce_scatter + all_gather"]["comm"]
        assert split["reduce_scatter"]["bytes"] == split["all_gather"]["bytes"] == payload
        assert split["reduce_scatter"]["wire_bytes"] + split["all_gather"]["wire_bytes"] == ar["wire_bytes"]
        ring = out["ring (send/recv)"]["comm"]
        assert ring["send"]["calls"] == ring["recv"]["calls"] == 2 * (N - 1)
        assert ring["send"]["bytes"] == ring["recv"]["bytes"] == 2 * (N - 1) * payload // N
        assert ring["send"]["bytes"] == ar["wire_bytes"]


def test_ring_all_reduce_is_a_no_op_on_one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        x = torch.arange(6.0)
        assert torch.equal(ring_all_reduce(x.clone()), x)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_the_tour_of_collectives_leaves_what_each_collective_promises():
    from lmkit.lab.collectives_tour import collectives_tour_worker

    outs = run_local(N, collectives_tour_worker, timeout=120)
    held = [out["holds"] for out in outs]
    total = [sum(col) for col in zip(*held, strict=True)]
    for rank, out in enumerate(outs):
        assert out["rank"] == rank and out["all_reduce"] == out["all_gather"] == total
        assert out["reduce_scatter"] == [total[rank]] and out["broadcast"] == held[0]
        assert out["all_to_all"] == [h[rank] for h in held]
        for kind, counted in out["comm"].items():
            assert counted == {"calls": 1, "bytes": N * 8, "wire_bytes": wire_bytes(kind, N * 8, N)}
