"""Expert parallelism in the native engine (`lmkit.parallel.native_experts`) reproduces the single process.

The loss-compare of ``test_native.py`` (fp32, the same global batch of 16 sequences, 10 steps, clipping
that bites, within 1e-5 relative; measured ~1e-7) on the GPT-2 network with 4 experts of which each token
takes 2, dropless. With the balancing loss (``moe_aux_coef=0.01``) every layout takes ONE micro-step per
optimizer step, so its micro-step sees the reference's tokens (the loss uses the micro-step's global
counts); pipelines (several microbatches) are compared with DeepSeek-V3's auxiliary-loss-free bias
instead (``moe_bias_rate``), which uses the whole step's counts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_native import TRAIN, native  # tests/ is on sys.path (pytest)
from test_parallel_equivalence import LLAMA, MODEL, STEPS, TEXT

from lmkit.config import ConfigError, ParallelConfig
from lmkit.lab.layouts import layout_losses, layout_name, max_relative_difference
from lmkit.parallel.native import validate_native_layout
from lmkit.parallel.native_experts import local_order

MOE = dataclasses.replace(MODEL, n_experts=4, moe_top_k=2, moe_aux_coef=0.01)
MOE_BIAS = dataclasses.replace(MOE, moe_aux_coef=0.0, moe_bias_rate=1e-3)
# SwiGLU experts, sigmoid gates, a shared expert (split over tp as the dense MLP, its [gate | up] rows
# permuted), on the Llama-style network (rotary positions, grouped-query attention, QK-norm)
LLAMA_MOE = dataclasses.replace(LLAMA, n_experts=4, moe_top_k=2, moe_aux_coef=0.01, moe_router="sigmoid",
                                n_shared_experts=1)
MODELS = {"aux": MOE, "bias": MOE_BIAS, "llama": LLAMA_MOE}

# ep ranks carved out of dp: ep2 (= dp2), ep4 (= dp4), ep2 x dp2 (dp4, edp 2), with tp + SP, with ZeRO
AUX_LAYOUTS = [
    native(dp=2, ep=2),
    native(dp=4, ep=4),
    native(dp=4, ep=2),
    native(dp=2, ep=2, tp=2, sequence_parallel=True),
    native(dp=2, ep=2, zero=3),
    native(dp=4, ep=2, zero=2),
    native(dp=2),  # experts without ep: the routers' counts still summed over dp
]
BIAS_LAYOUTS = [
    native(dp=2, ep=2, pp=2, microbatches=2),
    native(dp=2, ep=2, pp=2, zero=2, microbatches=2, schedule="gpipe"),
    native(dp=2, ep=2, pp=2, schedule="zb-v", virtual_stages=2, microbatches=2),  # two stages per rank
]


def name(p: ParallelConfig) -> str:
    return (f"ep{p.ep} x " if p.ep > 1 else "") + layout_name(p)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return {key: layout_losses(model, TRAIN, None, STEPS, text=TEXT, cache_dir=cache)
            for key, model in MODELS.items()}, cache


def test_local_order_groups_received_rows_by_local_expert():
    """2 ep ranks, 2 local experts: rank 0 sent (2, 1) rows, rank 1 sent (0, 3) rows."""
    recv = torch.tensor([2, 1, 0, 3])
    rows = torch.arange(6)  # received: [s0e0 s0e0 | s0e1 | s1e1 s1e1 s1e1]
    assert rows[local_order(recv, 2)].tolist() == [0, 1, 2, 3, 4, 5]
    recv = torch.tensor([1, 2, 3, 0])  # [s0e0 | s0e1 s0e1 | s1e0 s1e0 s1e0]
    assert local_order(recv, 2).tolist() == [0, 3, 4, 5, 1, 2]


@pytest.mark.parametrize("layout,model,message", [
    (native(dp=2, ep=2), MODEL, "parallel.ep=2 splits experts but the model has none"),
    (native(dp=4, ep=4), dataclasses.replace(MOE, n_experts=6), "n_experts=6 is not divisible by .*ep=4"),
    (native(dp=2, ep=2, tp=2), MOE, "experts under tp need sequence_parallel"),
])
def test_native_expert_layouts_that_cannot_run_are_refused(layout, model, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_native_layout(layout, TRAIN, model, layout.world_size)
    assert "\n" not in str(info.value)


CASES = ([("aux", p) for p in AUX_LAYOUTS] + [("bias", p) for p in BIAS_LAYOUTS]
         + [("llama", native(dp=2, ep=2, tp=2, sequence_parallel=True)),
            ("accumulate", native(dp=4, ep=2, zero=2))])
# accumulate: 2 micro-steps per step (FSDP2's gradient sync on the last only, experts' too), compared with
# the bias model's one-micro-step reference (routing without the balancing loss is per token)
ACCUMULATE = dataclasses.replace(TRAIN, grad_accum=2)


@pytest.mark.distributed
@pytest.mark.parametrize("balance,layout", CASES, ids=[f"{b}-{name(p)}" for b, p in CASES])
def test_native_expert_layout_reproduces_single_process_losses(balance, layout, references):
    """aux: the balancing loss (one micro-step); bias: pipelines, the auxiliary-loss-free bias moving the
    routing after every step (the whole step's global loads); llama: `LLAMA_MOE` with the balancing loss;
    accumulate: the bias model over 2 micro-steps."""
    refs, cache = references
    accumulate = balance == "accumulate"
    ref, model = (refs["bias"], MOE_BIAS) if accumulate else (refs[balance], MODELS[balance])
    got = layout_losses(model, ACCUMULATE if accumulate else TRAIN, layout, STEPS, text=TEXT, cache_dir=cache)
    diff = max_relative_difference(got["losses"], ref["losses"])
    print(f"native {name(layout)} ({balance}): max relative loss difference {diff:.2e}")
    assert diff < 1e-5
    assert max_relative_difference(got["grad_norms"], ref["grad_norms"]) < 1e-4
    assert ref["grad_norms"][0] > TRAIN.grad_clip  # clipping was active


@pytest.mark.distributed
def test_native_expert_checkpoints_reshard_across_ep_sizes(references, tmp_path):
    """ep2 x dp4 with ZeRO-2 (2 experts per ep rank, sharded over edp) saves at step 10; ep4 x dp4 (1 expert
    per rank) resumes it for 2 steps and saves; dp2 without ep (every expert on every rank) resumes that:
    one unbroken single-process curve (DCP boxes of the full expert tensors, whatever their layout)."""
    refs, cache = references
    ref = layout_losses(MOE, TRAIN, None, STEPS + 3, text=TEXT, cache_dir=cache)["losses"]
    assert max_relative_difference(ref[:STEPS], refs["aux"]["losses"]) == 0
    train = dataclasses.replace(TRAIN, out_dir=str(tmp_path / "run"))
    start, checkpoint = 0, None
    for layout, steps in [(native(dp=4, ep=2, zero=2), STEPS), (native(dp=4, ep=4), 2), (native(dp=2), 1)]:
        got = layout_losses(MOE, train, layout, steps, text=TEXT, cache_dir=cache, resume=checkpoint,
                            save=True)
        diff = max_relative_difference(got["losses"], ref[start:start + steps])
        print(f"native {name(layout)} from step {start}: max relative loss difference {diff:.2e}")
        assert diff < 1e-5
        start, checkpoint = start + steps, got["checkpoint"]
