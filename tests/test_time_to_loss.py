"""lmkit.lab.time_to_loss: the curve arithmetic, the fixed batches and the interleaved training loop."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit.config import ParallelConfig
from lmkit.lab.time_to_loss import (
    ABLATION,
    Curve,
    ablation_recipes,
    best_recipe,
    bits_per_byte,
    combined_changes,
    equal_flops_moe,
    fixed_batches,
    nanogpt_recipe,
    recipe_under_layouts,
    shakespeare_tokens,
    time_table,
    train_curves,
)
from lmkit.model import GPT
from lmkit.tokenizer import CharTokenizer

TINY = {"n_layer": 1, "n_head": 2, "d_model": 16, "block_size": 16}


def test_time_to_interpolates_between_evaluations():
    c = Curve("x", steps=[0, 10, 20, 30], seconds=[0.0, 1.0, 3.0, 4.0], val_loss=[4.0, 3.0, 2.0, 1.5])
    assert c.time_to(2.5) == pytest.approx(2.0)  # halfway between 3.0 (1 s) and 2.0 (3 s)
    assert c.step_to(2.5) == pytest.approx(15.0)
    assert c.time_to(3.0) == pytest.approx(1.0)
    assert c.time_to(5.0) == 0.0
    assert math.isinf(c.time_to(1.0)) and math.isinf(c.step_to(1.0))
    assert c.final_loss == 1.5 and c.train_seconds == 4.0
    rows = time_table([c, Curve("y", [0, 10], [0.0, 0.5], [4.0, 2.0])], target=2.0)
    assert rows[1]["x_reference"] == pytest.approx(0.5 / 3.0)


def test_fixed_batches_are_fixed_windows_of_the_text():
    tokens = torch.arange(1000)
    a, b = fixed_batches(tokens, 5, 3, 8, seed=7), fixed_batches(tokens, 5, 3, 8, seed=7)
    assert a.shape == (5, 3, 9) and torch.equal(a, b)
    assert torch.equal(a[..., 1:] - a[..., :-1], torch.ones(5, 3, 8, dtype=a.dtype))  # contiguous windows
    assert not torch.equal(a, fixed_batches(tokens, 5, 3, 8, seed=8))
    with pytest.raises(ValueError, match="too few"):
        fixed_batches(torch.arange(9), 1, 1, 8, seed=0)


def test_reference_and_lmkit_train_the_same_function():
    pytest.importorskip("transformers")
    tokens = torch.arange(3000) % 30  # learnable: each token predicts the next
    val = fixed_batches(tokens, 2, 4, 16, seed=1)
    base = nanogpt_recipe(30, max_steps=12).with_options("lmkit", TINY, {"batch_size": 4})
    hf = base.with_options("hf")
    hf.hf = True
    muon = base.with_options("muon+rope", {"pos": "rope"}, {"optimizer": "muon"})
    curves = train_curves([hf, base, muon], tokens, val, eval_every=5)
    assert [c.steps for c in curves] == [[0, 5, 10, 12]] * 3
    assert curves[0].val_loss[0] == pytest.approx(curves[1].val_loss[0], abs=1e-6)  # same initial weights
    assert curves[0].val_loss == pytest.approx(curves[1].val_loss, abs=2e-4)  # same batches, same updates
    assert curves[1].final_loss < curves[1].val_loss[0]
    assert curves[2].val_loss != pytest.approx(curves[1].val_loss, abs=1e-3)
    assert all(c.seconds == sorted(c.seconds) and c.seconds[-1] > 0 for c in curves)


def test_best_recipe_and_ablation_rows():
    base = nanogpt_recipe(65)
    best = best_recipe(base)
    assert best.model.options() and best.train.optimizer == "muon"
    assert best.train.max_steps < base.train.max_steps and best.train.warmup_steps <= base.train.warmup_steps
    rows = ablation_recipes(base)
    assert rows[0].model == base.model and rows[0].train == base.train
    assert len({r.name for r in rows}) == len(rows)
    singles = rows[1:-1]  # each changes exactly one thing from the baseline
    for r in singles:
        changed = len(r.model.options()) + sum(getattr(r.train, f) != getattr(base.train, f)
                                               for f in ("optimizer", "lr", "max_steps"))
        assert changed == 1, r.name


def test_combined_changes_are_the_single_rows_the_best_recipe_contains():
    base = nanogpt_recipe(65)
    best = best_recipe(base)
    combined = set(combined_changes())
    assert combined, "the best recipe combines no single change of the ablation"
    for label, model, train in ABLATION:
        inside = all(getattr(best.model, k) == v for k, v in model.items()) and all(
            getattr(best.train, k) == v for k, v in train.items())
        assert (label in combined) == inside, label


def test_step_work_counts_operators_and_flops_of_one_training_step():
    from lmkit.lab.time_to_loss import step_work

    tokens = torch.arange(3000) % 30
    batch = fixed_batches(tokens, 1, 4, 16, seed=1)[0]
    base = nanogpt_recipe(30, max_steps=12).with_options("lmkit", TINY, {"batch_size": 4})
    work = {name: step_work(base.with_options(name, model, train), batch)
            for name, model, train in (("base", {}, {}), ("rope", {"pos": "rope"}, {}),
                                       ("qk", {"qk_norm": True}, {}), ("muon", {}, {"optimizer": "muon"}))}
    assert work["base"] == step_work(base, batch)  # counts, not times: the same every call
    # rotary positions and QK-norm add elementwise operators, no matrix FLOPs;
    # Muon adds the products of its Newton-Schulz iterations
    assert work["rope"]["flops"] == work["qk"]["flops"] == work["base"]["flops"] > 0
    assert work["rope"]["ops"] > work["base"]["ops"] and work["qk"]["ops"] > work["base"]["ops"]
    assert work["muon"]["flops"] > work["base"]["flops"]


@pytest.mark.distributed
def test_best_recipe_under_dp2_follows_the_single_process(tmp_path):
    """The recipe chapter 7 recommends (rotary, QK-norm, ReLU^2, Muon) trains under a parallel layout."""
    _, _, vocab = shakespeare_tokens()
    rows = recipe_under_layouts(best_recipe(nanogpt_recipe(vocab, 100)), [ParallelConfig(dp=2)], 3,
                                str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    assert [r["layout"] for r in rows] == ["1 process", "dp2"]
    assert rows[1]["max_rel_diff"] < 1e-5 and rows[0]["final_loss"] < math.log(vocab) + 0.5


def test_equal_flops_moe_and_its_curve_reports_expert_loads():
    """Chapter 7's MoE against dense: the same FLOPs per token, E times the expert parameters, and the
    MoE's curve holds the validation tokens each expert received (E k per token in every layer)."""
    tokens = torch.arange(3000) % 30
    val = fixed_batches(tokens, 2, 4, 16, seed=1)
    base = nanogpt_recipe(30, max_steps=6).with_options("dense", TINY, {"batch_size": 4})  # d_ff 64
    moe = equal_flops_moe(base, 8, 2)
    assert moe.model.moe_d_ff == (2 * 64 - 8) // 4 == 30 and moe.name == "8 experts, top-2"
    assert GPT(moe.model).flops_per_token() == GPT(base.model).flops_per_token()
    swiglu = base.with_options("swiglu", {"mlp": "swiglu", "d_ff": 64})
    assert equal_flops_moe(swiglu, 6, 2).model.moe_d_ff == (3 * 64 - 6) // 6
    with pytest.raises(ValueError, match="use bias=False"):
        equal_flops_moe(base.with_options("biased", {"bias": True}), 8, 2)
    with pytest.raises(ValueError, match="positive multiple of 2 x k"):
        equal_flops_moe(base, 7, 2)  # 2 x 64 - 7 is odd
    dense_curve, moe_curve = train_curves([base, moe], tokens, val, eval_every=3)
    assert dense_curve.expert_loads == []
    assert len(moe_curve.expert_loads) == 1 and sum(moe_curve.expert_loads[0]) == 2 * val[..., 1:].numel()


def test_bits_per_byte_of_a_curve_counts_the_bytes_of_the_targets():
    tok = CharTokenizer.train("aé")  # "é" is two bytes in UTF-8
    val = torch.tensor([[[1, 2, 2], [2, 1, 1]]])  # ids 1 "a", 2 "é"; targets: "éé", "aa": 6 bytes, 4 tokens
    assert bits_per_byte(math.log(2), val, tok) == pytest.approx(4 / 6)
