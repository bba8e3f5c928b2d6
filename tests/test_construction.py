"""Construction at scale: a rank builds its stages and shards from the meta device, never the
whole model, and still starts from the single-process weights (chapter 6; issue 9 item 10)."""

from __future__ import annotations

import pytest
import torch

from lmkit.baselines.lstm import LSTMLanguageModel
from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
from lmkit.lab.layouts import start_memory
from lmkit.model import GPT
from lmkit.parallel.instrument import AllocationTracker
from lmkit.parallel.mesh import single_process_topology
from lmkit.run import build_engine
from lmkit.train import Trainer

TINY = ModelConfig(vocab_size=32, n_layer=2, n_head=2, d_model=16, block_size=8, dropout=0.0)
TOKENS = torch.arange(400).remainder(32).numpy()
#: big enough that the whole model (100 MiB of fp32 weights) dwarfs one parameter (4 MiB)
WIDE = ModelConfig(vocab_size=2048, n_layer=8, n_head=8, d_model=512, block_size=256, dropout=0.0)


# --------------------------------------------------------------------------- the tracker


def test_tracker_counts_live_and_peak_storage_once():
    before = torch.zeros(1000)  # allocated before: never counted
    with AllocationTracker() as alloc:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:].view(-1, 10)  # a view: no new storage
        param = torch.nn.Parameter(a)  # wraps the same storage
        assert alloc.live_bytes == 4000
        b = before + 1  # 4000 more
        del a, view, param
        assert alloc.live_bytes == 4000 and alloc.peak_bytes == 8000
        del b
        assert alloc.live_bytes == 0
        with torch.device("meta"):
            torch.empty(10**9)  # shapes only
        assert alloc.peak_bytes == 8000


def test_tracker_sees_a_whole_gpt_built_on_the_cpu_and_nothing_on_meta():
    with AllocationTracker() as alloc:
        torch.manual_seed(0)
        model = GPT(TINY)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert alloc.live_bytes == weights and weights <= alloc.peak_bytes < 1.2 * weights
    with AllocationTracker() as alloc, torch.device("meta"):
        GPT(TINY)
    assert alloc.peak_bytes == 8  # the one int64 of the seed draw; the weights have no storage


# --------------------------------------------------------------------------- one process


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("engine", ["lmkit", "native"])
def test_an_engine_built_from_meta_holds_the_single_process_weights(engine):
    torch.manual_seed(7)
    reference = GPT(TINY).state_dict()
    torch.manual_seed(7)
    with torch.device("meta"):
        model = GPT(TINY)
    built = build_engine(model, ParallelConfig(engine=engine), TrainConfig(batch_size=4),
                         single_process_topology())
    assert not any(p.is_meta for _, p in built.named_params)
    assert _same(built.full_state_dict(), reference)


def test_a_meta_model_without_a_layout_is_materialised_whole():
    torch.manual_seed(3)
    reference = GPT(TINY).state_dict()
    torch.manual_seed(3)
    with torch.device("meta"):
        model = GPT(TINY)
    trainer = Trainer(model, TrainConfig(batch_size=4, eval_interval=0), TOKENS, model_config=TINY)
    assert _same(trainer.model.state_dict(), reference)
    assert trainer.model.head.weight is trainer.model.tok_emb.weight


def test_a_meta_lstm_is_refused_in_one_line():
    lstm_cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=16, block_size=8, arch="lstm")
    with torch.device("meta"):
        model = LSTMLanguageModel(lstm_cfg)
    with pytest.raises(ConfigError, match="meta device has no weights"):
        Trainer(model, TrainConfig(batch_size=4), TOKENS, model_config=lstm_cfg)


# --------------------------------------------------------------------------- 8 ranks


@pytest.mark.distributed
def test_tp4_pp2_ranks_start_with_a_fraction_of_the_model():
    """dp x tp x pp = 1 x 4 x 2, both engines: each rank holds about 1/8 of the weights; its peak
    while building them stays near that (its parameters, the lmkit engine's gradient buckets, one
    parameter drawn whole), while cutting from the whole model needed all of it."""
    layouts = [ParallelConfig(tp=4, pp=2, microbatches=2, engine=e) for e in ("lmkit", "native")]
    for layout, ranks in zip(layouts, start_memory(WIDE, layouts, timeout=300), strict=True):
        assert len(ranks) == 8
        for r in ranks:
            full = r["full_model_bytes"]
            assert r["same_weights"], (layout.engine, r)
            assert r["meta_peak_bytes"] < 0.35 * full, (layout.engine, r)
            assert r["meta_peak_bytes"] <= (r["local_param_bytes"] + r["local_grad_bytes"]
                                            + 2 * r["largest_parameter_bytes"]), (layout.engine, r)
            assert r["cut_from_full_peak_bytes"] >= full, (layout.engine, r)
            assert 0.1 * full < r["local_param_bytes"] < 0.15 * full, (layout.engine, r)
            assert (r["local_grad_bytes"] == r["local_param_bytes"]) == (layout.engine == "lmkit")


def test_start_memory_needs_one_world_size():
    with pytest.raises(ValueError, match="one world size"):
        start_memory(TINY, [ParallelConfig(tp=2), ParallelConfig(pp=4)])
