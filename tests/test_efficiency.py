"""lmkit.lab.efficiency: the measuring tools of chapter 7 (memory, size, quality and speed)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmkit import costs
from lmkit.config import ModelConfig
from lmkit.lab import efficiency
from lmkit.model import GPT

CFG = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_head=4, d_model=32)


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def test_saved_tensor_bytes_counts_activations_once_and_not_parameters():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    # linear saves its input (and the weight, a parameter): only the input counts
    assert efficiency.saved_tensor_bytes(lambda: lin(x), exclude=lin) == x.numel() * 4
    # two views of one storage are one storage
    t = torch.randn(8, 8, requires_grad=True)
    assert efficiency.saved_tensor_bytes(lambda: (t[:4] * t[4:]).sum()) == t.numel() * 4


def test_checkpointing_keeps_only_block_inputs_as_the_cost_model_says():
    model = tiny().train()
    x = torch.randint(0, CFG.vocab_size, (3, CFG.block_size))
    saved = {}
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        saved[enabled] = efficiency.saved_tensor_bytes(lambda: model(x, x)[1], exclude=model)
    shape = (3, CFG.block_size, CFG.d_model, CFG.n_head)
    per_layer = {rc: costs.activation_bytes_per_layer(*shape, recompute=rc, act_bytes=4, dropout=False,
                                                      flash_attention=True)
                 for rc in ("none", "full")}
    measured = saved[False] - saved[True]
    predicted = CFG.n_layer * (per_layer["none"] - per_layer["full"])
    assert abs(measured / predicted - 1) < 0.03
    assert saved[True] < saved[False] / 3


def test_kv_cache_formula_equals_allocated_tensors():
    model = tiny().eval()
    for batch, length in ((1, 5), (3, 32)):
        cache = model.new_kv_cache(batch, max_len=length)
        with torch.no_grad():
            model(torch.randint(0, CFG.vocab_size, (batch, length)), kv_cache=cache)
        assert efficiency.kv_cache_tensor_bytes(cache) == efficiency.kv_cache_bytes(
            CFG.n_layer, CFG.d_model, batch, length, 4)
    assert efficiency.kv_cache_bytes(2, 8, 1, 10, 2, kv_heads_fraction=0.25) == 2 * 2 * 10 * 8 * 2 / 4


def test_magnitude_prune_zeros_the_smallest_block_weights_only():
    model = tiny()
    emb = model.tok_emb.weight.detach().clone()
    before = [m.weight.detach().clone() for m in efficiency.prunable_linears(model)]
    reached = efficiency.magnitude_prune(model, 0.6)
    assert abs(reached - 0.6) < 0.01 and efficiency.sparsity(model) == reached
    assert torch.equal(model.tok_emb.weight, emb), "the (tied) embedding is not pruned"
    pairs = list(zip(before, efficiency.prunable_linears(model), strict=True))
    kept = torch.cat([w[m.weight != 0].abs() for w, m in pairs])
    dropped = torch.cat([w[m.weight == 0].abs() for w, m in pairs])
    assert dropped.max() <= kept.min(), "one global threshold: each pruned weight is below each kept one"
    assert efficiency.magnitude_prune(tiny(), 0.0) == 0.0
    with pytest.raises(ValueError, match="fraction"):
        efficiency.magnitude_prune(model, 1.0)


def test_int8_weights_round_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.linspace(0.01, 2.0, 24)[:, None]
    q, s = efficiency.quantize_weight_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 + 1e-7).all())


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    qlin = efficiency.Int8Linear(lin)
    x = torch.randn(5, 32)
    assert torch.allclose(qlin(x), F.linear(x, qlin.dequantized_weight(), lin.bias), atol=1e-6)
    assert (qlin(x) - lin(x)).abs().max() < 0.02 * lin(x).abs().max()


@pytest.mark.parametrize("method", ["weight_only", "dynamic"])
def test_quantize_int8_shrinks_the_model_and_keeps_its_outputs(method):
    if method == "dynamic" and not efficiency.dynamic_quantization_available():
        pytest.skip("this torch has no dynamic quantization")
    model = tiny().eval()
    quantized = efficiency.quantize_int8(copy.deepcopy(model), method)
    assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear for m in quantized.blocks.modules())
    assert quantized.head.weight is quantized.tok_emb.weight, "the tied head stays fp32"
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        ref, out = model(x)[0], quantized(x)[0]
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    assert efficiency.serialized_bytes(quantized) < 0.6 * efficiency.serialized_bytes(model)
    assert efficiency.decode_tokens_per_s(quantized, [1, 2, 3], 4) > 0
    with pytest.raises(ValueError, match="unknown"):
        efficiency.quantize_int8(model, "int4")


def test_eval_loss_is_the_mean_cross_entropy_of_fixed_windows():
    model = tiny().eval()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 10 * CFG.block_size).astype(np.uint16)
    loss = efficiency.eval_loss(model, tokens, CFG.block_size, max_windows=4, batch_size=3)
    T = CFG.block_size
    data = torch.from_numpy(tokens[: 4 * T + 1].astype(np.int64))
    x, y = data[:-1].view(4, T), data[1:].view(4, T)
    with torch.no_grad():
        expected = model(x, y)[1].item()
    assert loss == pytest.approx(expected, rel=1e-5)
    bf16 = efficiency.eval_loss(model, tokens, T, 4, autocast_dtype=torch.bfloat16)
    assert bf16 == pytest.approx(loss, rel=0.01)
    with pytest.raises(ValueError, match="tokens"):
        efficiency.eval_loss(model, tokens[:T], T)


def test_interleaved_medians_runs_variants_round_robin():
    calls = []
    medians = efficiency.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                             repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_greedy_agreement_counts_equal_argmax_positions():
    model = tiny().eval()
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 6 * CFG.block_size).astype(np.uint16)
    assert efficiency.greedy_agreement(model, copy.deepcopy(model), tokens, CFG.block_size, 3) == 1.0
    other = tiny(seed=5).eval()  # another model: its own predictions
    got = efficiency.greedy_agreement(model, other, tokens, CFG.block_size, max_windows=3, batch_size=2)
    T = CFG.block_size
    x = torch.from_numpy(tokens[: 3 * T + 1].astype(np.int64))[:-1].view(3, T)
    with torch.no_grad():
        expected = (model(x)[0].argmax(-1) == other(x)[0].argmax(-1)).float().mean().item()
    assert got == pytest.approx(expected) and got < 1.0


def test_decode_tokens_per_s_counts_every_row_of_a_batch(monkeypatch):
    import lmkit.generate

    model = tiny().eval()
    seen = []
    real = lmkit.generate.generate

    def spy(m, prompts, new, **kw):
        seen.append(prompts)
        return real(m, prompts, new, **kw)

    monkeypatch.setattr(lmkit.generate, "generate", spy)
    clock = iter([10.0, 12.0])  # the call takes 2 "seconds"
    monkeypatch.setattr(efficiency.time, "perf_counter", lambda: next(clock))
    assert efficiency.decode_tokens_per_s(model, [[1, 2, 3], [4, 5]], 6) == pytest.approx(2 * 6 / 2.0)
    assert seen == [[[1, 2, 3], [4, 5]]]
    clock = iter([0.0, 0.5])
    assert efficiency.decode_tokens_per_s(model, [1, 2, 3], 6) == pytest.approx(6 / 0.5)
    assert seen[-1] == [[1, 2, 3]]


@pytest.mark.skipif(not efficiency.dynamic_quantization_available(), reason="no dynamic int8 kernel")
def test_dynamic_int8_linear_uses_the_per_channel_weights_and_repacks_on_load():
    torch.manual_seed(2)
    linear = nn.Linear(64, 48)
    fast, readable = efficiency.DynamicInt8Linear(linear), efficiency.Int8Linear(linear)
    assert torch.equal(fast.weight_int8, readable.weight_int8) and torch.equal(fast.scale, readable.scale)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = readable(x)
        out = fast(x)  # differs from the dequantized product only by the activations' rounding
    assert out.shape == ref.shape and (out - ref).abs().max() < 0.02 * ref.abs().max()
    other = efficiency.DynamicInt8Linear(nn.Linear(64, 48))
    other.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), out)
    assert set(fast.state_dict()) == {"weight_int8", "scale", "bias"}


def test_count_ops_counts_the_dispatched_operators_and_decode_step_ops_checks_its_context():
    x = torch.ones(3)
    ops = efficiency.count_ops(lambda: (x + 1).mul(2).sum())
    assert ops == {"add": 1, "mul": 1, "sum": 1}
    model = tiny().eval()
    step = efficiency.decode_step_ops(model, context=CFG.block_size - 1)
    assert step["scaled_dot_product_attention"] == CFG.n_layer and step["embedding"] == 1  # + pos_emb's row
    if efficiency.dynamic_quantization_available():  # int8: the same step with int8 kernels
        int8 = efficiency.decode_step_ops(efficiency.quantize_int8(copy.deepcopy(model)), context=5)
        assert int8["quantized.linear_dynamic"] == 4 * CFG.n_layer and int8["linear"] == 1
    with pytest.raises(ValueError, match="block_size"):
        efficiency.decode_step_ops(model, context=CFG.block_size)


def test_count_flops_counts_matrix_products_and_cpu_attention_from_shapes():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert efficiency.count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    assert efficiency.count_flops(lambda: torch.relu(a)) == 0  # elementwise work is not counted
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))  # batch, heads, positions, head width
    # scores q k^T and their product with v: 2 x (2 B H Lq Lk d), the whole score matrix, causal or not
    assert efficiency.count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == (
        2 * 2 * 2 * 4 * 6 * 6 * 8)


def test_count_flops_of_decoding_grows_quadratically_without_the_cache():
    from lmkit.generate import generate

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, block_size=64, n_layer=2, n_head=2, d_model=32)).eval()

    def flops(n: int, use_cache: bool) -> int:
        return efficiency.count_flops(
            lambda: generate(model, [[1, 2, 3]], n, greedy=True, use_cache=use_cache))

    with_cache = flops(8, True), flops(32, True)
    without = flops(8, False), flops(32, False)
    assert with_cache[1] / with_cache[0] < 4.5   # about linear in the new tokens
    assert without[1] / without[0] > 10          # about quadratic
    assert without[1] > 5 * with_cache[1]


@pytest.mark.skipif(not efficiency.dynamic_quantization_available(), reason="no dynamic int8 kernel")
def test_dynamic_int8_packing_raises_no_deprecation_warning():
    # torch 2.13 deprecates creating qint8 tensors (linear_prepack's input), not the kernel: the chapter's
    # pages must not show that warning
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        efficiency.quantize_int8(GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2,
                                                 d_model=16)).eval(), "dynamic")
    assert not [w for w in caught if "quantize_per_channel" in str(w.message)]
