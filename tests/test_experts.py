"""Mixture of experts (`lmkit.experts`, the model's MoE blocks), one process: routing, the layer's output
against a per-token loop, the balancing loss and its gradient by hand, the auxiliary-loss-free bias,
the capacity factor, placement, parameter and FLOP counts, construction, checkpoints, Muon, the trainer
and the one-line refusals of bad configurations."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.checkpoint.format import find_latest
from lmkit.checkpoint.single import load_checkpoint, load_model_state, save_checkpoint
from lmkit.cli import main
from lmkit.config import ConfigError, ModelConfig, TrainConfig
from lmkit.experts import (
    MoE,
    Router,
    expert_counts,
    inactive_expert_parameters,
    moe_layers,
    set_aux_scale,
    update_router_biases,
)
from lmkit.model import GPT, MLP
from lmkit.optim import MuonAdamW, is_muon_matrix, muon_lr_scale, orthogonalize
from lmkit.weights import InitialWeights, materialize

BASE = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, d_model=16, dropout=0.0, n_experts=4,
            moe_top_k=2, moe_d_ff=24)
N_TOKENS = 12


def config(**fields) -> ModelConfig:
    return ModelConfig(**{**BASE, **fields}).validate()


def moe_layer(seed: int = 0, **fields) -> MoE:
    """Block 0's MoE of a GPT, in fp64, its weights drawn large enough that routing is far from uniform."""
    torch.manual_seed(seed)
    layer = GPT(config(**fields)).blocks[0].mlp
    assert isinstance(layer, MoE)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:  # (the routing bias starts at 0)
                p.normal_(0.0, 0.4)
    return layer.double().train()


def tokens(seed: int = 1, n: int = N_TOKENS, d: int = 16) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def scores_of(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    logits = (x @ layer.router.gate.weight.T).float()  # the router scores in fp32
    return logits.softmax(-1) if layer.router.kind == "softmax" else logits.sigmoid()


def by_hand(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's output, token by token: each token's top-k experts (chosen on score + bias), weighted by
    their scores (renormalised for k > 1), experts over capacity skipping their later assignments."""
    k, n_experts = layer.k, layer.n_experts
    scores = scores_of(layer, x)
    chosen = (scores + layer.router.expert_bias).topk(k, dim=-1).indices
    cap = math.ceil(layer.capacity * len(x) * k / n_experts) if layer.capacity > 0 else len(x) * k
    taken = [0] * n_experts
    out = torch.zeros_like(x)
    for t in range(len(x)):
        w = scores[t, chosen[t]]
        w = w / w.sum() if k > 1 else w
        for e, weight in zip(chosen[t].tolist(), w, strict=True):
            taken[e] += 1
            if taken[e] > cap:  # dropped: contributes nothing
                continue
            h = layer.experts.fc[e] @ x[t]
            if layer.experts.gated:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h, approximate="tanh")
            out[t] += weight.double() * (layer.experts.proj[e] @ h)
    if hasattr(layer, "shared"):
        out = out + layer.shared(x)
    return out


def aux_by_hand(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i: f_i the counted share of the assignments (no gradient), P_i the mean probability
    (sigmoid scores normalised per token)."""
    scores = scores_of(layer, x)
    chosen = (scores.detach() + layer.router.expert_bias).topk(layer.k, dim=-1).indices
    f = torch.bincount(chosen.flatten(), minlength=layer.n_experts) / chosen.numel()
    probs = scores if layer.router.kind == "softmax" else scores / scores.sum(-1, keepdim=True)
    return layer.n_experts * (f * probs.mean(0)).sum()


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_router_picks_the_top_k_and_weighs_them_by_hand(kind, k):
    router = Router(config(moe_router=kind, moe_top_k=k))
    torch.nn.init.normal_(router.gate.weight, 0.0, 0.5)
    x = tokens().float()
    weights, chosen, probs = router(x)
    logits = x @ router.gate.weight.T
    scores = (logits.softmax(-1) if kind == "softmax" else logits.sigmoid()).detach()
    for t in range(len(x)):
        best = sorted(range(4), key=lambda e: -float(scores[t, e]))[:k]
        assert sorted(chosen[t].tolist()) == sorted(best)
        raw = scores[t, chosen[t]]
        expected = raw / raw.sum() if k > 1 else raw  # k = 1: the raw score, so that the router learns
        torch.testing.assert_close(weights[t], expected)
    if k > 1:
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(x)))
    expected_probs = scores if kind == "softmax" else scores / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, expected_probs)
    assert weights.dtype == torch.float32 and probs.dtype == torch.float32


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_expert_bias_moves_the_choice_not_the_weights(kind):
    router = Router(config(moe_router=kind))
    torch.nn.init.normal_(router.gate.weight, 0.0, 0.5)
    x = tokens().float()
    _, _, probs_before = router(x)
    router.expert_bias[3] = 10.0  # every token now picks expert 3
    weights, chosen, probs = router(x)
    assert (chosen == 3).any(-1).all()
    logits = x @ router.gate.weight.T
    scores = logits.softmax(-1) if kind == "softmax" else logits.sigmoid()
    raw = scores.gather(1, chosen)  # the unbiased scores of the chosen experts
    torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, probs_before)  # the balancing loss sees no bias either


# --------------------------------------------------------------------------- the layer's output


@pytest.mark.parametrize("fields", [
    {}, {"moe_router": "sigmoid"}, {"moe_top_k": 1}, {"mlp": "swiglu"}, {"n_shared_experts": 1},
    {"mlp": "swiglu", "moe_router": "sigmoid", "moe_top_k": 3, "n_shared_experts": 2},
])
def test_moe_output_equals_a_loop_over_tokens_and_their_experts(fields):
    layer = moe_layer(**fields)
    x = tokens()
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x.view(3, 4, 16)).view(-1, 16), by_hand(layer, x), rtol=1e-12,
                                   atol=1e-12)
    assert layer.stats["dropped"] == 0.0  # dropless by default
    assert hasattr(layer, "shared") == bool(fields.get("n_shared_experts"))


def test_shared_expert_is_a_dense_mlp_of_n_shared_times_the_expert_width():
    layer = moe_layer(n_shared_experts=2)
    assert isinstance(layer.shared, MLP) and layer.shared.fc.out_features == 2 * 24


def test_moe_every_places_experts_in_every_kth_block():
    for every, expected in ((1, [1, 1, 1, 1]), (2, [0, 1, 0, 1]), (3, [0, 0, 1, 0]), (4, [0, 0, 0, 1])):
        cfg = config(n_layer=4, moe_every=every)
        model = GPT(cfg)
        assert [int(isinstance(b.mlp, MoE)) for b in model.blocks] == expected
        assert [int(cfg.is_moe_block(i)) for i in range(4)] == expected
        assert len(moe_layers(model)) == sum(expected)
    assert not any(config(n_experts=0).is_moe_block(i) for i in range(2))


# --------------------------------------------------------------------------- balance


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_balancing_loss_by_hand_and_one_for_uniform_routing(kind):
    layer = moe_layer(moe_router=kind, moe_top_k=2)
    x = tokens()
    layer(x)
    chosen = (scores_of(layer, x) + layer.router.expert_bias).topk(2, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=4)
    assert torch.equal(layer.stats["counts"], counts) and int(counts.sum()) == 2 * N_TOKENS
    assert expert_counts(layer) == [counts.tolist()]
    torch.testing.assert_close(layer.stats["aux"], aux_by_hand(layer, x).detach())
    assert float(layer.stats["aux"]) > 1.0  # an uneven router pays more than the minimum
    with torch.no_grad():
        layer.router.gate.weight.zero_()  # every probability 1/E: E * sum_i f_i / E = 1, whatever the counts
    layer(x)
    assert float(layer.stats["aux"]) == pytest.approx(1.0, abs=1e-6)


def _gate_grads(layer: MoE, batches: list[torch.Tensor], target: torch.Tensor, coef: float,
                explicit: bool) -> dict[str, torch.Tensor]:
    """Gradients of sum_m scale * (loss_m + coef * aux_m), scale = 1 / micro-batches: through the layer's own
    `_AttachAux` (explicit=False), or with the aux term written out and the layer's switched off."""
    layer = copy.deepcopy(layer)
    layer.aux_coef = 0.0 if explicit else coef
    scale = 1 / len(batches)
    set_aux_scale(layer, scale)
    for x in batches:
        loss = (layer(x) * target).sum()
        if explicit:
            loss = loss + coef * aux_by_hand(layer, x)
        (scale * loss).backward()
    return {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}  # (not the routing bias)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("micro", [1, 3])
def test_injected_balancing_gradient_equals_autograd_of_loss_plus_aux(kind, micro):
    layer = moe_layer(moe_router=kind)
    batches = [tokens(seed=10 + m) for m in range(micro)]
    target = tokens(seed=99)
    coef = 0.3  # large, so that the aux term's share of the gate's gradient is far above rounding
    ours = _gate_grads(layer, batches, target, coef, explicit=False)
    theirs = _gate_grads(layer, batches, target, coef, explicit=True)
    without = _gate_grads(layer, batches, target, 0.0, explicit=True)
    for name in ours:  # the router computes its scores in fp32: agreement to fp32's rounding
        assert float((ours[name] - theirs[name]).norm()) <= 1e-6 * float(theirs[name].norm()), name
    gate = "router.gate.weight"
    assert float((ours[gate] - without[gate]).norm()) > 1e-3 * float(without[gate].norm())
    assert torch.equal(ours["experts.fc"], without["experts.fc"])  # aux reaches the router only


def test_no_balancing_gradient_in_eval_or_without_grad():
    layer = moe_layer(moe_bias_rate=0.1)
    x = tokens()
    layer.eval()
    layer(x)
    with torch.no_grad():
        layer.train()
        layer(x)
    assert layer.step_counts is None  # only training forwards count toward the bias update


# --------------------------------------------------------------------------- auxiliary-loss-free bias


def test_update_router_biases_signs_the_steps_counts_then_resets():
    layer = moe_layer(moe_bias_rate=0.05)
    first, second = tokens(seed=3), tokens(seed=4)
    layer(first)
    c1 = layer.stats["counts"].clone()
    layer(second)  # two micro-batches of one step: their counts add up
    load = c1 + layer.stats["counts"]
    assert torch.equal(layer.step_counts, load)
    update_router_biases(layer)
    expected = 0.05 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(layer.router.expert_bias, expected.to(layer.router.expert_bias.dtype))
    assert layer.step_counts is None
    assert (layer.router.expert_bias[load.argmax()] < 0) and (layer.router.expert_bias[load.argmin()] > 0)
    # a step without training forwards changes nothing; a rate of 0 counts, and resets, but never moves
    before = layer.router.expert_bias.clone()
    update_router_biases(layer)
    assert torch.equal(layer.router.expert_bias, before)
    still = moe_layer()
    still(first)
    update_router_biases(still)
    assert still.step_counts is None and not still.router.expert_bias.any()


def test_bias_balances_a_collapsed_router():
    """With the gate frozen in favour of one expert, the bias alone spreads the load over the steps."""
    layer = moe_layer(moe_bias_rate=0.05, moe_top_k=1, moe_aux_coef=0.0)
    x = tokens(n=64)
    x[:, 0] = 3.0
    with torch.no_grad():
        layer.router.gate.weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # expert 0 leads by 3 logits
    loads = []
    for _ in range(80):
        layer(x)
        loads.append(layer.stats["counts"].float())
        update_router_biases(layer)
    assert int(loads[0][0]) > 50  # collapsed: nearly every token on expert 0
    late = torch.stack(loads[-30:]).mean(0)
    assert float(late.max()) < 24 and float(late.min()) > 8, late  # about 16 each


# --------------------------------------------------------------------------- capacity


def test_capacity_drops_the_overflow_in_token_order():
    layer = moe_layer(moe_capacity=1.0)
    x = tokens(n=10)
    layer.router.expert_bias[:] = torch.tensor([10.0, 10.0, 0.0, 0.0])  # every token to experts 0 and 1
    y = layer(x).detach()
    cap = math.ceil(1.0 * 10 * 2 / 4)  # 5 assignments per expert: half of the 20 are dropped
    assert torch.equal(layer.stats["counts"], torch.tensor([10, 10, 0, 0]))
    assert float(layer.stats["dropped"]) == pytest.approx(1 - 2 * cap / 20)
    torch.testing.assert_close(y, by_hand(layer, x), rtol=1e-12, atol=1e-12)
    assert float(y[cap:].abs().max()) == 0.0  # tokens 5..9 lost both experts: their output is 0
    # a looser factor keeps more; uneven random routing is dropped exactly as the loop drops it
    layer.router.expert_bias.zero_()
    for factor in (0.5, 1.25):
        layer.capacity = factor
        y = layer(x)
        chosen = (scores_of(layer, x)).topk(2, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=4)
        kept = counts.clamp(max=math.ceil(factor * 10 * 2 / 4)).sum()
        assert float(layer.stats["dropped"]) == pytest.approx(float(1 - kept / 20))
        torch.testing.assert_close(y, by_hand(layer, x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("mlp", ["plain", "swiglu"])
def test_active_parameters_and_flops_per_token(mlp):
    cfg = config(n_layer=4, moe_every=2, mlp=mlp, n_shared_experts=1)
    model = GPT(cfg)
    per_expert = (3 if mlp == "swiglu" else 2) * 24 * 16
    assert inactive_expert_parameters(cfg) == 2 * (4 - 2) * per_expert  # 2 MoE blocks, E - k idle experts
    stacked = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert stacked == 2 * 4 * per_expert and inactive_expert_parameters(cfg) == stacked * (4 - 2) // 4
    active = model.num_params(non_embedding=True) - inactive_expert_parameters(cfg) + 16 * 32
    assert model.flops_per_token() == 6 * active + 12 * 4 * 16 * 8
    assert inactive_expert_parameters(config(n_experts=0)) == 0


def test_a_dense_mlp_of_k_expert_widths_plus_half_e_has_the_same_flops():
    """The comparison of chapter 7: E experts of width w, k per token, cost what a dense MLP of width
    k w + E/2 costs (the router's d x E weights are the E/2)."""
    moe = GPT(config(n_experts=8, moe_top_k=2, moe_d_ff=30, bias=False))
    dense = GPT(config(n_experts=0, d_ff=2 * 30 + 8 // 2, bias=False))  # (biases: the dense MLP's only)
    assert moe.flops_per_token() == dense.flops_per_token()
    # but it holds all E experts: 8 x 2 x 30 x 16 weights and the router's 16 x 8, against 2 x 64 x 16
    assert moe.num_params() - dense.num_params() == 2 * (8 * 2 * 30 * 16 + 16 * 8 - 2 * 64 * 16)


# --------------------------------------------------------------------------- construction and checkpoints


def test_meta_construction_and_initial_weights_equal_gpt_construction():
    cfg = config(n_shared_experts=1, mlp="swiglu")
    torch.manual_seed(5)
    reference = GPT(cfg).state_dict()
    for name in ("blocks.0.mlp.router.gate.weight", "blocks.0.mlp.router.expert_bias",
                 "blocks.1.mlp.experts.fc", "blocks.1.mlp.experts.proj", "blocks.0.mlp.shared.fc.weight"):
        assert name in reference, name
    torch.manual_seed(5)
    with torch.device("meta"):
        model = GPT(cfg)
    materialize(model, "cpu")
    model.load_state_dict(dict(InitialWeights(model)))
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(state[name], value), name
    assert not reference["blocks.0.mlp.router.expert_bias"].any()
    assert float(reference["blocks.0.mlp.experts.fc"].std()) == pytest.approx(0.02, rel=0.1)


def test_single_directory_checkpoint_keeps_expert_bias(tmp_path):
    cfg = config(moe_bias_rate=0.1)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.blocks[1].mlp.router.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    save_checkpoint(tmp_path / "ckpt", model=model, step=3)
    assert torch.equal(load_model_state(tmp_path / "ckpt")["blocks.1.mlp.router.expert_bias"],
                       torch.tensor([0.5, -0.25, 0.0, 1.0]))
    torch.manual_seed(1)
    fresh = GPT(cfg)
    assert load_checkpoint(tmp_path / "ckpt", model=fresh).step == 3
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- Muon


def test_muon_orthogonalises_each_experts_matrix():
    """The stacked [E, out, in] expert weights are E matrices: Muon steps each as torch.optim.Muon steps a
    matrix of its own, bit for bit (not the stack as one matrix, not AdamW)."""
    torch.manual_seed(0)
    model = GPT(config())
    names = {n for n, p in model.named_parameters() if is_muon_matrix(n, p)}
    expected = {"blocks.0.mlp.experts.fc", "blocks.1.mlp.experts.proj", "blocks.1.mlp.router.gate.weight"}
    assert expected <= names
    assert "tok_emb.weight" not in names
    cfg = TrainConfig(optimizer="muon", muon_lr=0.02, weight_decay=0.1, muon_momentum=0.95)
    opt = MuonAdamW(model, cfg)
    stack = model.blocks[0].mlp.experts.fc
    assert any(p is stack for p in opt.muon.param_groups[0]["params"])
    slices = [torch.nn.Parameter(m.detach().clone()) for m in stack]
    theirs = torch.optim.Muon(slices, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
    for step in range(2):
        grad = torch.randn(stack.shape, generator=torch.Generator().manual_seed(step))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        stack.grad = grad.clone()
        for s, g in zip(slices, grad, strict=True):
            s.grad = g.clone()
        opt.step()
        theirs.step()
        for e, s in enumerate(slices):
            assert torch.equal(stack[e], s), (step, e)
    assert muon_lr_scale(stack.shape) == muon_lr_scale(stack.shape[1:])
    stacked = torch.randn(3, 8, 5)
    assert torch.equal(orthogonalize(stacked, "float32")[1], orthogonalize(stacked[1], "float32"))


# --------------------------------------------------------------------------- the trainer and the command line

TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "0", "--log-interval", "1", "--corpus", "tinyshakespeare"]


def test_lmkit_train_with_experts_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", "--n-experts", "4", "--moe-top-k", "2", "--moe-every", "2", "--moe-bias-rate", "0.01",
            "--n-shared-experts", "1", "--optimizer", "muon", "--grad-accum", "2", "--max-steps", "3",
            "--out-dir", str(out), *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "step      3 | loss" in text and "saved" in text
    state = load_model_state(find_latest(out))
    assert "blocks.1.mlp.experts.fc" in state and "blocks.0.mlp.fc.weight" in state
    bias = state["blocks.1.mlp.router.expert_bias"]
    # 3 steps of +-0.01 (0 where a load equals the mean): the bias moved, in steps of the rate
    assert bias.abs().max() > 0 and torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
    assert main(["eval", str(out), "--iters", "2", "--json"]) == 0
    assert '"val_loss"' in capsys.readouterr().out


@pytest.mark.parametrize("argv, fragment", [
    (["--n-experts", "4", "--moe-top-k", "5"], "model.moe_top_k=5 must be in [1, n_experts=4]"),
    (["--n-experts", "4", "--moe-every", "3"], "model.moe_every=3 must be in [1, n_layer=2]"),
    (["--n-experts", "-2"], "model.n_experts must be an integer >= 0"),
    (["--n-experts", "4", "--moe-d-ff", "-1"], "model.moe_d_ff must be an integer >= 0"),
    (["--n-experts", "4", "--moe-aux-coef", "-0.1"], "model.moe_aux_coef must be >= 0"),
    (["--n-experts", "4", "--moe-capacity", "-1"], "model.moe_capacity must be >= 0"),
    (["--n-experts", "4", "--moe-router", "top1"], "invalid choice: 'top1'"),
])
def test_bad_expert_configs_exit_2_with_one_line(argv, fragment, capsys, tmp_path):
    assert main(["train", *argv, "--max-steps", "1", "--out-dir", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_expert_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="moe_top_k"):
        ModelConfig(**{**BASE, "moe_top_k": 0}).validate()
    with pytest.raises(ConfigError, match="moe_router"):
        ModelConfig(**{**BASE, "moe_router": "top1"}).validate()
    dataclasses.replace(config(), n_experts=0, moe_top_k=9).validate()  # ignored without experts
