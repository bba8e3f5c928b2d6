"""Expert parallelism in the lmkit engine reproduces one process (loss-compare), reshards its
checkpoints across ep sizes, and sends exactly the all-to-all bytes of `lmkit.costs`.

The model has 4 experts, top-2, in every block. Layouts without pipelining run one micro-step per
optimizer step with the balancing loss on (its counts are global: summed over the ranks of a
micro-step, so every layout routes and balances as one process does). Pipelined layouts run several
microbatches per step, whose counts one process would see as one batch: they use DeepSeek-V3's
sigmoid router with the auxiliary-loss-free bias instead (updated from the whole step's counts).
"""

from __future__ import annotations

import dataclasses

import pytest

from lmkit import costs
from lmkit.checkpoint.sharded import load_sharded_full
from lmkit.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig, model_preset
from lmkit.lab.layouts import (
    collective_dim,
    layout_losses,
    layout_name,
    max_relative_difference,
    measure_layouts,
)
from lmkit.parallel.experts import expert_group_lists, validate_experts

pytestmark = pytest.mark.distributed

STEPS = 10
SUBJECTS, PLACES = ["the cat", "a dog", "one bird", "my fish"] * 150, ["mat", "log", "rug"] * 200
TEXT = "".join(f"{w} {i % 7} sat on the {v}{'.!'[i % 2]}\n"
               for i, (w, v) in enumerate(zip(SUBJECTS, PLACES, strict=True)))
MOE = ModelConfig(n_layer=4, n_head=4, d_model=32, block_size=16, dropout=0.0, n_experts=4, moe_top_k=2)
BIASED = dataclasses.replace(MOE, moe_router="sigmoid", moe_aux_coef=0.0, moe_bias_rate=1e-3)
# today's network with experts of their own width and a shared expert (split over tp like the MLP)
LLAMA_MOE = model_preset("llama", n_layer=4, n_head=4, n_kv_head=2, d_model=32, block_size=16, dropout=0.0,
                         n_experts=4, moe_top_k=2, moe_d_ff=24, n_shared_experts=1, moe_every=2)
TRAIN = TrainConfig(batch_size=16, max_steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=2, grad_clip=0.5,
                    eval_interval=0, seed=11, out_dir="/tmp/lmkit-experts")

AUX_LAYOUTS = [
    ParallelConfig(dp=2, ep=2),
    ParallelConfig(dp=4, ep=4),
    ParallelConfig(dp=4, ep=2),
    ParallelConfig(dp=2, ep=2, zero=1),
    ParallelConfig(dp=4, ep=2, zero=2),
    ParallelConfig(dp=2, tp=2, ep=2, sequence_parallel=True),
    ParallelConfig(cp=2, ep=2),
    ParallelConfig(dp=2, cp=2, ep=2, zero=1),
    # experts without expert parallelism: reduced over dp x cp like the dense parameters
    ParallelConfig(dp=2, tp=2, zero=1, sequence_parallel=True),
    ParallelConfig(dp=2, pp=2, schedule="gpipe", microbatches=1),
]
BIAS_LAYOUTS = [
    ParallelConfig(dp=2, ep=2),
    ParallelConfig(dp=2, pp=2, ep=2, microbatches=2),
    ParallelConfig(dp=2, pp=2, ep=2, zero=2, schedule="zb-h1", microbatches=2),
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return {name: layout_losses(model, TRAIN, None, STEPS, text=TEXT, cache_dir=cache)
            for name, model in (("aux", MOE), ("bias", BIASED), ("llama", LLAMA_MOE))}, cache


def _assert_on_the_curve(model: ModelConfig, layout: ParallelConfig, reference: dict, cache: str) -> None:
    got = layout_losses(model, TRAIN, layout, STEPS, text=TEXT, cache_dir=cache)
    diff = max_relative_difference(got["losses"], reference["losses"])
    print(f"experts {layout_name(layout)}: max relative loss difference {diff:.2e}")
    assert diff < 1e-5, f"{layout_name(layout)}: {got['losses']} vs {reference['losses']}"
    assert max_relative_difference(got["grad_norms"], reference["grad_norms"]) < 1e-4


@pytest.mark.parametrize("layout", AUX_LAYOUTS, ids=[layout_name(p) for p in AUX_LAYOUTS])
def test_expert_layout_reproduces_single_process_losses(layout, references):
    refs, cache = references
    _assert_on_the_curve(MOE, layout, refs["aux"], cache)


@pytest.mark.parametrize("layout", BIAS_LAYOUTS, ids=[layout_name(p) for p in BIAS_LAYOUTS])
def test_pipelined_expert_layout_with_bias_balance_reproduces_single_process_losses(layout, references):
    refs, cache = references
    assert refs["bias"]["losses"] != refs["aux"]["losses"]  # another router and balance: another curve
    _assert_on_the_curve(BIASED, layout, refs["bias"], cache)


@pytest.mark.parametrize("layout", [ParallelConfig(dp=2, tp=2, ep=2, sequence_parallel=True),
                                    ParallelConfig(dp=2, pp=2, ep=2, zero=1, schedule="gpipe",
                                                   microbatches=1)],
                         ids=["dp2 x ep2 x tp2 sp", "dp2 zero1 x ep2 x pp2 gpipe m1"])
def test_llama_style_experts_with_a_shared_expert_reproduce_single_process_losses(layout, references):
    refs, cache = references
    _assert_on_the_curve(LLAMA_MOE, layout, refs["llama"], cache)


def test_expert_checkpoint_reshards_across_ep_sizes(references, tmp_path):
    """dp4 x ep2 (ZeRO-1) trains 5 steps and saves; ep4, dp2 without ep and one process resume."""
    refs, cache = references
    ref = refs["aux"]["losses"]
    train = dataclasses.replace(TRAIN, out_dir=str(tmp_path / "run"))
    first = layout_losses(MOE, train, ParallelConfig(dp=4, ep=2, zero=1), 5, text=TEXT, cache_dir=cache,
                          save=True)
    assert max_relative_difference(first["losses"], ref[:5]) < 1e-5
    for layout in (ParallelConfig(dp=4, ep=4), ParallelConfig(dp=2), None):
        resumed = layout_losses(MOE, train, layout, 5, text=TEXT, cache_dir=cache, resume=first["checkpoint"])
        assert max_relative_difference(resumed["losses"], ref[5:]) < 1e-5, layout_name(layout)


def test_router_biases_travel_with_the_checkpoint(references, tmp_path):
    """The auxiliary-loss-free biases move every step and are part of the state: dp2 x ep2 saves at
    step 5 with biases away from 0, dp4 x ep4 and one process resume on the biased curve."""
    refs, cache = references
    ref = refs["bias"]["losses"]
    train = dataclasses.replace(TRAIN, out_dir=str(tmp_path / "run"))
    first = layout_losses(BIASED, train, ParallelConfig(dp=2, ep=2), 5, text=TEXT, cache_dir=cache, save=True)
    weights, _, _ = load_sharded_full(first["checkpoint"])
    assert any(float(w.abs().max()) > 0 for name, w in weights.items() if name.endswith("expert_bias"))
    for layout in (ParallelConfig(dp=4, ep=4), None):
        resumed = layout_losses(BIASED, train, layout, 5, text=TEXT, cache_dir=cache,
                                resume=first["checkpoint"])
        assert max_relative_difference(resumed["losses"], ref[5:]) < 1e-5, layout_name(layout)


def test_every_all_to_all_sends_the_bytes_of_the_formula():
    """Per rank: the counts and the token rows of every dispatch and combine (forward and backward),
    measured at the collective, equal `costs.all_to_all_bytes` with the rank's measured imbalance."""
    train = dataclasses.replace(TRAIN, max_steps=4)
    layouts = [ParallelConfig(dp=2, ep=2), ParallelConfig(dp=4, ep=2, zero=1)]
    shape = costs.Model.from_config(MOE)
    for result in measure_layouts(MOE, train, layouts, steps=1, warmup=1, text=TEXT):
        layout = ParallelConfig(**result["layout"])
        tokens = train.batch_size // layout.dp * MOE.block_size  # one microbatch of this rank
        for rank in result["ranks"]:
            a2a = [c for c in rank["comm"] if c["kind"] == "all_to_all"]
            assert {collective_dim(c, layout) for c in a2a} == {"ep"}
            calls, rows = rank["experts"]["calls"], rank["experts"]["rows_sent"]
            assert calls == MOE.n_layer and sum(c["calls"] for c in a2a) == 5 * calls  # counts, 2 fwd, 2 bwd
            uniform = 2 * tokens * MOE.moe_top_k * (layout.ep - 1) / layout.ep
            per_layer = costs.all_to_all_bytes(shape, costs.Layout.from_parallel_config(layout), tokens,
                                               imbalance=rows / calls / uniform, dtype_bytes=4)
            assert sum(c["wire_bytes"] for c in a2a) == pytest.approx(calls * per_layer["total"], rel=1e-12)


def test_expert_groups_are_carved_out_of_dp_x_cp():
    assert expert_group_lists(4, 1, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert expert_group_lists(2, 2, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])


@pytest.mark.parametrize(("model", "layout", "train", "words"), [
    (ModelConfig(), ParallelConfig(dp=2, ep=2), TRAIN, "has none"),
    (MOE, ParallelConfig(dp=3, ep=3), TRAIN, "not divisible by parallel.ep=3"),
    (MOE, ParallelConfig(dp=2, tp=2), TRAIN, "needs sequence_parallel"),
    (MOE, ParallelConfig(dp=2, ep=2), dataclasses.replace(TRAIN, optimizer="muon"), "muon"),
])
def test_impossible_expert_layouts_are_refused_in_one_line(model, layout, train, words):
    with pytest.raises(ConfigError, match=words) as info:
        validate_experts(model, layout, train)
    assert "\n" not in str(info.value)


def test_ep_must_divide_dp_x_cp():
    with pytest.raises(ConfigError, match="does not divide dp\\*cp"):
        ParallelConfig(dp=2, ep=4).validate()
