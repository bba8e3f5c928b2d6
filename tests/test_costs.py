"""The analytical cost model (`lmkit.costs`) against the model's own counts and the published figures.

Against the engines (bytes of model states and of every collective, measured): see
``tests/test_costs_engine.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from lmkit import costs
from lmkit.cli import main
from lmkit.config import ModelConfig, model_preset, swiglu_width
from lmkit.lab import efficiency
from lmkit.model import GPT, rope_tables
from lmkit.parallel.pipeline import peak_in_flight, schedule_actions

GB = 1e9


def test_importing_costs_leaves_torch_out():
    """The calculator runs lmkit/costs/ in the browser (Pyodide), where there is no torch."""
    code = "import sys, lmkit.costs; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(n_layer=3, n_head=6, d_model=48, vocab_size=77, block_size=20, bias=False),
    ModelConfig(n_layer=1, n_head=1, d_model=8, vocab_size=5, block_size=3),
], ids=["default", "no-bias", "tiny"])
def test_parameters_and_flops_equal_the_models_own_counts(cfg):
    gpt, model = GPT(cfg), costs.Model.from_config(cfg)
    assert costs.num_params(model) == gpt.num_params(non_embedding=False)
    assert costs.num_params(model, non_embedding=True) == gpt.num_params(non_embedding=True)
    assert costs.flops_per_token(model) == gpt.flops_per_token()
    assert costs.flops_per_token(model, training=False) == gpt.flops_per_token(training=False)
    names = {name for name, _ in gpt.named_parameters()}  # the tied head is registered once
    assert {p.name for p in costs.parameter_table(model)} == names
    shapes = dict(gpt.named_parameters())
    assert all(tuple(shapes[p.name].shape) == p.shape for p in costs.parameter_table(model))


def random_configs(n: int, seed: int = 21) -> list[ModelConfig]:
    """`n` ModelConfigs drawing every option and shape at random (seeded): heads, key/value heads,
    head width, MLP kind and width, tying, positions, norm, QK-norm, bias, activation, dropout."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        n_head = rng.choice([1, 2, 3, 4, 6, 8, 12])
        pos = rng.choice(["learned", "rope"])
        head_dim = rng.choice([2, 4, 6, 8, 16] if pos == "rope" else [1, 3, 4, 5, 8, 16])
        mlp = rng.choice(["plain", "swiglu"])
        out.append(ModelConfig(
            vocab_size=rng.randint(2, 300), block_size=rng.randint(1, 64), n_layer=rng.randint(1, 4),
            n_head=n_head, d_model=n_head * head_dim, dropout=rng.choice([0.0, 0.1]), bias=rng.random() < 0.5,
            pos=pos, norm=rng.choice(["layer", "rms"]), qk_norm=rng.random() < 0.5,
            activation="gelu" if mlp == "swiglu" else rng.choice(["gelu", "relu2"]),
            n_kv_head=rng.choice([0] + [k for k in range(1, n_head + 1) if n_head % k == 0]), mlp=mlp,
            d_ff=rng.choice([0, 0, rng.randint(1, 200)]), tie_embeddings=rng.random() < 0.5).validate())
    return out


@pytest.mark.parametrize("cfg", random_configs(60), ids=lambda c: "-".join(f"{k}={v}" for k, v in (
    ("L", c.n_layer), ("d", c.d_model), ("H", c.n_head), ("KV", c.kv_heads), ("ff", c.ffn_width),
    ("mlp", c.mlp), ("tie", int(c.tie_embeddings)), ("pos", c.pos), ("norm", c.norm), ("qk", int(c.qk_norm)),
    ("bias", int(c.bias)))))
def test_every_option_counts_as_the_model_counts_itself(cfg):
    """Parameters (both variants), FLOPs (both) and every tensor's name and shape, in registration
    order, for random combinations of all the model's options (built on the meta device: shapes only)."""
    with torch.device("meta"):
        gpt = GPT(cfg)
    model = costs.Model.from_config(cfg)
    assert costs.num_params(model) == gpt.num_params(non_embedding=False)
    assert costs.num_params(model, non_embedding=True) == gpt.num_params(non_embedding=True)
    assert costs.flops_per_token(model) == gpt.flops_per_token()
    assert costs.flops_per_token(model, training=False) == gpt.flops_per_token(training=False)
    table = [(p.name, p.shape) for p in costs.parameter_table(model)]
    assert table == [(name, tuple(p.shape)) for name, p in gpt.named_parameters()]
    # the state dict names the tied head as well: the table's copy of it on a last pipeline stage
    with_head = costs.parameter_table(model, head_copy=cfg.tie_embeddings)
    state = [(k, tuple(v.shape)) for k, v in gpt.state_dict().items()]
    assert [(p.name, p.shape) for p in with_head] == state


def test_the_options_default_as_the_config_does():
    for d in (8, 48, 100, 768, 4096, 5120, 8192):
        assert costs.swiglu_width(d) == swiglu_width(d)
    cfg = model_preset("llama", n_layer=2, n_head=8, d_model=64)
    model = costs.Model.from_config(cfg)
    assert (model.kv_heads, model.ffn_width, model.head_dim) == (cfg.kv_heads, cfg.ffn_width, cfg.head_dim)
    assert costs.Model.from_config(ModelConfig()) == costs.Model(4, 128, 4, 256, 128)  # GPT-2's network


def test_presets_have_their_published_size():
    """GPT-2 124M (vocabulary padded to 50304), GPT-3 175B (Brown et al. 2020) and the Llama models
    at the totals of their released weights: 6.74B, 13.02B (Touvron et al. 2023), 8.03B, 70.55B
    (Dubey et al. 2024)."""
    sizes = {name: costs.num_params(m) / 1e9 for name, m in costs.PRESETS.items()}
    assert sizes["gpt2-124m"] == pytest.approx(0.124, abs=0.001)
    assert sizes["gpt3-175b"] == pytest.approx(175, rel=0.005)
    assert round(sizes["llama2-7b"], 2) == 6.74 and round(sizes["llama2-13b"], 2) == 13.02
    assert round(sizes["llama3-8b"], 2) == 8.03 and round(sizes["llama3-70b"], 2) == 70.55
    for key in ("llama3-8b", "llama3-70b"):
        model = costs.PRESETS[key]
        assert model.kv_heads == 8 and not model.tie_embeddings and model.mlp == "swiglu"
        assert model.pos == "rope" and model.norm == "rms" and not model.bias
    # each equals lmkit's own GPT built from the same options (on the meta device)
    for key in ("llama2-7b", "llama3-8b"):
        m = costs.PRESETS[key]
        cfg = model_preset("llama", n_layer=m.n_layer, d_model=m.d_model, n_head=m.n_head,
                           n_kv_head=m.kv_heads, d_ff=m.d_ff, vocab_size=m.vocab_size, block_size=m.seq_len)
        assert costs.Model.from_config(cfg, name=m.name) == m


def test_the_kv_cache_is_what_the_model_allocates_for_its_key_value_heads():
    cfg = model_preset("llama", n_layer=3, n_head=8, n_kv_head=2, d_model=32, vocab_size=50, block_size=16)
    torch.manual_seed(0)
    gpt, model = GPT(cfg).eval(), costs.Model.from_config(cfg)
    for batch, length in ((1, 5), (3, 16)):
        cache = gpt.new_kv_cache(batch, max_len=length)
        with torch.no_grad():
            gpt(torch.randint(0, cfg.vocab_size, (batch, length)), kv_cache=cache)
        allocated = sum(t.numel() * t.element_size() for t in cache.kv)
        assert costs.kv_cache_bytes(model, batch, length, act_bytes=4) == allocated
    mha = dataclasses.replace(model, n_kv_head=0)
    assert costs.kv_cache_bytes(mha, 3, 16) == 4 * costs.kv_cache_bytes(model, 3, 16)  # 8 / 2 heads per group
    assert costs.kv_cache_bytes(model, 3, 16, tp=2) == costs.kv_cache_bytes(model, 3, 16) / 2
    with pytest.raises(costs.CostError, match="n_kv_head=2 is not divisible by tp=4; choose tp among 1, 2"):
        costs.kv_cache_bytes(model, tp=4)


def test_tensor_parallelism_must_divide_the_key_value_heads_and_the_mlp():
    model = costs.Model(2, 64, 8, 64, 32, n_kv_head=2, mlp="swiglu", d_ff=100)
    assert costs.tp_choices(model) == [1, 2]
    with pytest.raises(costs.CostError, match=r"^n_kv_head=2 is not divisible by tp=4; .* among 1, 2$"):
        costs.memory(model, costs.Layout(tp=4), 8)
    with pytest.raises(costs.CostError, match=r"d_ff=100 is not divisible by tp=8; .* among 1, 2, 4$"):
        costs.memory(dataclasses.replace(model, n_kv_head=8), costs.Layout(tp=8), 8)
    h100 = costs.DEVICES["h100"]
    found = costs.search(model, 8, costs.Cluster(8, 80, h100[1]))
    assert found and {c.layout.tp for c in found} == {1, 2}  # the search leaves out tp = 4 and 8
    with pytest.raises(costs.CostError, match="n_kv_head=3 does not divide n_head=8"):
        dataclasses.replace(model, n_kv_head=3).validate()


def test_zero_paper_figures():
    """Rajbhandari et al. 2020, figure 1: a 7.5B model on 64 GPUs, mixed precision with Adam (K = 12).
    The paper's 16 Psi keeps 2-byte gradients: lmkit's bf16 reduce (``reduce="bf16"``)."""
    per_gpu = [sum(costs.model_states(7.5e9, dp=64, zero=stage, reduce="bf16")) / GB for stage in range(4)]
    assert per_gpu[0] == 120.0
    assert round(per_gpu[1], 1) == 31.4 and round(per_gpu[2], 1) == 16.6 and round(per_gpu[3], 1) == 1.9
    assert costs.model_states(10, precision="fp32") == (40, 40, 80)


def test_mixed_precision_holds_what_the_engine_allocates():
    """bf16 weights, gradients in the reduce dtype, fp32 masters and moments: 2 + 4 + 12 = 18 bytes per
    parameter with the default fp32 reduce (16 with bf16); ZeRO-1/2 shard the master and the moments."""
    assert costs.model_states(10) == (20, 40, 120)
    assert costs.model_states(10, reduce="bf16") == (20, 20, 120)
    model, layout = costs.PRESETS["gpt2-124m"], costs.Layout(dp=8, zero=1)
    n = costs.num_params(model)
    for reduce, r in (("fp32", 4), ("bf16", 2)):
        buckets = costs.zero_buckets(model, layout, 0, grad_bytes=r)
        # the cap counts gradient elements; a larger parameter (the embedding) gets a bucket of its own
        assert sum(buckets) == n
        assert all(k <= 25 * 2**20 // r or k == model.vocab_size * model.d_model for k in buckets)
        padded = sum(-(-k // 8) * 8 for k in buckets)
        shard = padded // 8
        plain = costs.memory(model, costs.Layout(dp=8), 8, "mixed", reduce=reduce)
        tensors = len(costs.parameter_table(model))
        assert (plain.params, plain.grads, plain.optimizer) == (2 * n, r * n, 12 * n + 4 * tensors)
        for zero, grads in ((1, r * padded), (2, r * shard)):
            mem = costs.memory(model, costs.Layout(dp=8, zero=zero), 8, "mixed", reduce=reduce)
            states = (mem.params, mem.grads, mem.optimizer)
            assert states == (2 * padded, grads, 12 * shard + 4 * len(buckets))
    # a bf16 gradient buffer fits twice the elements in a bucket: fewer buckets
    assert len(costs.zero_buckets(model, layout, 0, grad_bytes=2)) < len(costs.zero_buckets(model, layout, 0))
    with pytest.raises(costs.CostError, match="reduce='bf16' applies to mixed precision"):
        costs.memory(model, costs.Layout(dp=8), 8, "fp32", reduce="bf16")
    with pytest.raises(costs.CostError, match="reduce='fp16' is unknown"):
        costs.model_states(10, reduce="fp16")


def test_zero1_is_a_distributed_optimizer():
    """ZeRO-1 reduce-scatters each bucket once per step into the rank's chunk, all-gathers the updated
    chunks (bf16 under mixed precision) and all-reduces one fp32 norm^2 over dp."""
    model, layout = costs.PRESETS["gpt2-124m"], costs.Layout(dp=8, zero=1, microbatches=4)
    for reduce, r in (("fp32", 4), ("bf16", 2)):
        terms = costs.communication(model, layout, 32, "mixed", reduce=reduce)
        buckets = costs.zero_buckets(model, layout, 0, grad_bytes=r)
        padded = sum(-(-k // 8) * 8 for k in buckets)
        (rs,) = [t for t in terms if t.kind == "reduce_scatter"]
        assert (rs.calls, rs.bytes) == (len(buckets), r * padded)  # once per step, not per microbatch
        gathers = [t for t in terms if t.kind == "all_gather"]
        assert [(t.calls, t.bytes) for t in gathers] == [(len(buckets), 2 * padded)]
        norms = [t for t in terms if t.kind == "all_reduce" and "norm" in t.what]
        assert [(t.bytes, t.bookkeeping) for t in norms] == [(4, True)]
        assert not any(t.kind == "all_reduce" and not t.bookkeeping for t in terms)


def test_activations_follow_korthikanti_et_al():
    """Section 4 of "Reducing Activation Recomputation in Large Transformer Models" (2022), per layer:
    GPT-3 with dropout (its 1-byte masks are counted only when asked for, ``dropout=True``)."""
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    act = functools.partial(costs.activation_bytes_per_layer, dropout=True)
    assert act(b, s, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert act(b, s, h, a, tp=t) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    sp = {"tp": t, "sequence_parallel": True}
    assert act(b, s, h, a, **sp) == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    assert act(b, s, h, a, **sp, recompute="selective") == pytest.approx(s * b * h * 34 / t)
    assert act(b, s, h, a, tp=t, recompute="full") == 2 * s * b * h
    # fp32, no dropout, flash attention (what lmkit's GPT runs on a CPU): 16 values of b s h x 4 bytes
    assert act(b, s, h, a, act_bytes=4, dropout=False, flash_attention=True) == 64 * s * b * h + 4 * a * s * b


def test_no_dropout_masks_unless_the_model_has_dropout():
    """The default counts no masks: Llama 3 70B (no dropout) at 128k tokens, tp8 + sp, flash, is not
    charged the two 1-byte masks per token and layer (21 GB over its 80 layers) of a model with dropout."""
    m70, s = costs.PRESETS["llama3-70b"], 128 * 1024
    assert not m70.dropout and not any(m.dropout for m in costs.PRESETS.values())
    kw = {"tp": 8, "sequence_parallel": True, "flash_attention": True, **costs.model_activation_options(m70)}
    plain = m70.n_layer * costs.activation_bytes_per_layer(1, s, m70.d_model, m70.n_head, **kw)
    masked = m70.n_layer * costs.activation_bytes_per_layer(1, s, m70.d_model, m70.n_head, dropout=True, **kw)
    assert round((masked - plain) / GB) == 21
    assert masked - plain == m70.n_layer * 2 * s * m70.d_model / 8  # two masks, split over tp by sp
    # memory() and calculate() follow the model: the same layer count without masks
    layout = costs.Layout(tp=8, sequence_parallel=True)
    long = dataclasses.replace(m70, seq_len=s)
    with_dropout = dataclasses.replace(long, dropout=True)
    held = [costs.memory(m, layout, 1, "mixed").activations for m in (long, with_dropout)]
    assert held[1] - held[0] == pytest.approx(m70.n_layer * 2 * s * m70.d_model / 8)


@pytest.mark.parametrize("options", [
    {}, {"n_kv_head": 2}, {"n_kv_head": 1, "bias": False}, {"mlp": "swiglu"}, {"mlp": "swiglu", "d_ff": 40},
    {"d_ff": 72, "activation": "relu2"}, {"norm": "rms"}, {"pos": "rope"}, {"qk_norm": True},
    {"pos": "rope", "qk_norm": True, "n_kv_head": 4}, "llama"], ids=str)
def test_a_block_keeps_the_activations_the_formula_counts(options):
    """One block, fp32, measured with `saved_tensor_bytes` (distinct storages autograd keeps) against
    `activation_bytes_per_layer` with the model's options, plus the copies its docstring leaves out
    by name: torch's unfused RMSNorm keeps x / rms(x) (h per block norm; head_dim per head for
    QK-norm), and the attention output is copied for ``proj`` when q and k were transformed. The
    rest, within 2 %, is the norms' statistics."""
    b, s, h, a = 2, 32, 64, 8
    shape = {"n_layer": 1, "n_head": a, "d_model": h, "block_size": s, "vocab_size": 16}
    if options == "llama":
        cfg = model_preset("llama", n_kv_head=2, **shape)
    else:
        cfg = ModelConfig(**shape, **options)
    torch.manual_seed(0)
    block = GPT(cfg).blocks[0]
    x = torch.randn(b, s, h, requires_grad=True)
    rope = rope_tables(torch.arange(s), cfg.head_dim) if cfg.pos == "rope" else None
    measured = efficiency.saved_tensor_bytes(lambda: block(x, None, True, None, 0, 0, rope), exclude=block)
    model = costs.Model.from_config(cfg)
    counted = costs.activation_bytes_per_layer(b, s, h, a, act_bytes=4, dropout=False, flash_attention=True,
                                               **costs.model_activation_options(model))
    kv = model.kv_width
    extra = (2 * h if cfg.norm == "rms" else 0) + (h + kv if cfg.qk_norm else 0)
    extra += h if (cfg.qk_norm or cfg.pos == "rope") else 0
    expected = counted + 4 * b * s * extra
    assert expected <= measured <= 1.02 * expected, (measured, counted, expected)
    if options in ({}, {"n_kv_head": 2}, {"mlp": "swiglu"}):  # the terms by hand, in units of b s x 4 bytes
        hidden = 4 * swiglu_width(h) if cfg.mlp == "swiglu" else 2 * 4 * h
        assert counted == 4 * b * s * (4 * h + (h + 2 * kv) + h + hidden) + 4 * a * s * b


@pytest.mark.parametrize("schedule,pp,m,v", [
    ("gpipe", 2, 4, 1), ("gpipe", 4, 8, 1), ("1f1b", 2, 2, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 16, 1),
    ("interleaved", 2, 2, 2), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2), ("interleaved", 4, 8, 3),
    ("interleaved", 3, 9, 2), ("zb-h1", 2, 4, 1), ("zb-h1", 4, 8, 1), ("zb-h1", 4, 2, 1),
    ("zb-h1", 8, 16, 1)])
def test_in_flight_equals_the_engines_schedules(schedule, pp, m, v):
    layout = costs.Layout(pp=pp, microbatches=m, schedule=schedule, virtual_stages=v)
    for rank in range(pp):
        assert costs.in_flight(layout, rank) == peak_in_flight(schedule_actions(schedule, m, pp, rank, v))


def test_bubble():
    assert costs.bubble_fraction(1, 8) == 0.0
    assert costs.bubble_fraction(4, 8) == 3 / 11
    # ZB-H1 (Qi et al. 2024): a third of 1F1B's idle time when F, B and W take as long
    assert costs.bubble_fraction(4, 8, schedule="zb-h1") == pytest.approx(3 / (3 * 8 + 3))
    assert costs.bubble_time("zb-h1", 4, 8) == pytest.approx(costs.bubble_time("1f1b", 4, 8) / 3)
    assert costs.bubble_time("zb-h1", 4, 8, t_b=1.5, t_w=0.5) == pytest.approx(3 * 2.0)  # (p-1)(t_F+t_B-t_W)
    assert costs.bubble_time("zb-h1", 4, 8, t_b=0.5, t_w=1.5) == pytest.approx(3 * 1.0)  # the floor (p-1) t_F
    with pytest.raises(costs.CostError, match="no bubble formula"):
        costs.bubble_time("zb-v", 4, 8)
    assert costs.bubble_fraction(4, 8, virtual_stages=2) == 3 / 19


def test_tensor_parallel_traffic_is_4L_plus_2_activations():
    """Megatron's "2 all-reduces forward + 2 backward per layer" (4L) misses the vocab-parallel
    embedding's forward and the head's input gradient: 4L + 2 on a single stage."""
    model = costs.Model(n_layer=4, d_model=64, n_head=4, vocab_size=66, seq_len=32)
    terms = costs.communication(model, costs.Layout(tp=2), 16, "fp32")
    act = [t for t in terms if t.what.startswith("activations")]
    assert len(act) == 1 and act[0].calls == 4 * 4 + 2 and act[0].bytes == (4 * 4 + 2) * 4 * 16 * 32 * 64
    sp = costs.communication(model, costs.Layout(tp=2, sequence_parallel=True), 16, "fp32")
    gathers = [t for t in sp if t.kind == "all_gather"]
    scatters = [t for t in sp if t.kind == "reduce_scatter"]
    assert gathers[0].bytes == scatters[0].bytes == act[0].bytes  # the same volume, split in two halves
    assert gathers[0].wire_bytes + scatters[0].wire_bytes == act[0].wire_bytes


def test_zero_communication_volumes():
    """ZeRO paper section 7: ZeRO-1/2 move what plain DP moves (2 Psi per rank); ZeRO-3 1.5x."""
    model = costs.PRESETS["gpt2-124m"]

    def sent(zero: int, reduce: str = "fp32") -> float:
        return sum(t.wire_bytes for t in costs.communication(model, costs.Layout(dp=8, zero=zero), 8, "mixed",
                                                             reduce=reduce) if not t.bookkeeping)

    # (bf16 reduce: the gradients travel in 2 bytes like the parameters' all-gathers, as in the paper)
    assert sent(2, "bf16") == pytest.approx(sent(0, "bf16"), rel=1e-6)
    assert sent(3, "bf16") == pytest.approx(1.5 * sent(0, "bf16"), rel=1e-6)
    # ZeRO-1 is a distributed optimizer: reduce-scatter + all-gather, the all-reduce's 2 Psi
    assert sent(1, "bf16") == pytest.approx(sent(0, "bf16"), rel=1e-6)
    # an fp32 reduce doubles the gradients' bytes, not the parameters' (bf16) all-gather: 3 Psi of 2
    assert sent(1) == pytest.approx(1.5 * sent(1, "bf16"), rel=1e-6)
    assert sent(0) == pytest.approx(2 * sent(0, "bf16"), rel=1e-6)


def test_memory_shrinks_with_every_dimension():
    model, batch = costs.PRESETS["llama2-7b"], 64
    base = costs.memory(model, costs.Layout(dp=8), batch, "mixed")
    for layout in (costs.Layout(dp=8, zero=1), costs.Layout(dp=8, zero=3), costs.Layout(tp=8, dp=1),
                   costs.Layout(pp=8, microbatches=8)):
        assert costs.memory(model, layout, batch, "mixed").model_states < base.model_states
    tp = costs.memory(model, costs.Layout(tp=8), batch, "mixed")
    sp = costs.memory(model, costs.Layout(tp=8, sequence_parallel=True), batch, "mixed")
    full = costs.memory(model, costs.Layout(tp=8, sequence_parallel=True, recompute="full"), batch, "mixed")
    assert full.activations < sp.activations < tp.activations
    gpipe = costs.memory(model, costs.Layout(pp=4, microbatches=16, schedule="gpipe"), 64, "mixed", stage=0)
    ofob = costs.memory(model, costs.Layout(pp=4, microbatches=16, schedule="1f1b"), 64, "mixed", stage=0)
    assert gpipe.activations == pytest.approx(4 * ofob.activations)  # m = 16 in flight instead of p = 4


def test_bad_layouts_name_the_problem():
    model = costs.PRESETS["llama2-7b"]
    cases = [(costs.Layout(tp=3), "n_head=32 is not divisible by tp=3"),
             (costs.Layout(pp=4, microbatches=2), "needs microbatches >= pp"),
             (costs.Layout(pp=64, microbatches=64), "only 32 layers"),
             (costs.Layout(sequence_parallel=True), "needs tp > 1"),
             (costs.Layout(dp=3), "not divisible by dp x microbatches")]
    for layout, message in cases:
        with pytest.raises(costs.CostError, match=message):
            costs.memory(model, layout, 64)


def test_search_ranks_layouts_that_fit():
    h100 = costs.DEVICES["h100"]
    cluster = costs.Cluster(1024, h100[0], h100[1], intra_node_gbps=h100[2], inter_node_gbps=h100[3])
    found = costs.search(costs.PRESETS["gpt3-175b"], 1536, cluster, zero_stages=(0, 1))
    assert found and all(c.memory.total <= 80 * GB for c in found)
    assert all(a.step_s <= b.step_s + 1e-9 for a, b in zip(found, found[1:], strict=False))
    best = found[0]
    assert best.layout.world_size == 1024 and best.layout.tp <= 8  # tensor parallelism stays in a node
    assert best.layout.pp > 1  # 175B in mixed precision needs the pipeline (or ZeRO-3) to fit in 80 GB
    assert 0.3 < best.compute_s / best.step_s <= 1


def test_search_says_by_how_much_a_model_misses():
    l4 = costs.Cluster(1, 24, 121e12)
    with pytest.raises(costs.CostError, match=r"fits on no layout of 1 device of 24 GB: .* GB too many"):
        costs.search(costs.PRESETS["llama3-70b"], 8, l4)


def test_calculate_is_memory_and_communication_in_json():
    inputs = {"preset": "llama3-70b", "dp": 2, "tp": 8, "pp": 4, "zero": 1, "microbatches": 16,
              "schedule": "1f1b", "global_batch": 64, "precision": "mixed", "device_memory_gb": 80}
    out = costs.calculate(inputs)
    assert out["error"] is None
    layout = costs.Layout(dp=2, tp=8, pp=4, zero=1, microbatches=16, schedule="1f1b")
    mem = costs.memory(costs.PRESETS["llama3-70b"], layout, 64, "mixed")
    assert out["memory"] == mem.as_dict() and out["fits"] == (mem.total <= 80 * GB)
    assert out["bubble"] == costs.bubble_fraction(4, 16)
    assert out["notes"] == ""
    bf16 = costs.calculate({**inputs, "reduce": "bf16"})
    bf16_memory = costs.memory(costs.PRESETS["llama3-70b"], layout, 64, "mixed", reduce="bf16")
    assert bf16["memory"] == bf16_memory.as_dict()
    assert bf16["memory"]["grads"] == out["memory"]["grads"] / 2
    assert bf16["communication"]["dp"] < out["communication"]["dp"]
    # selective recomputation drops the score matrix that flash attention never stores: said, not offered
    selective = costs.calculate({**inputs, "recompute": "selective"})
    assert selective["memory"] == out["memory"] and "no effect with flash attention" in selective["notes"]
    assert costs.calculate({**inputs, "tp": 3})["error"].startswith("n_head=64 is not divisible by tp=3")
    assert costs.calculate({"preset": "nope"})["error"].startswith("unknown preset")


def test_calculate_takes_a_typed_model_with_every_option():
    llama = costs.PRESETS["llama3-8b"]
    layout = {"dp": 2, "tp": 4, "zero": 1, "global_batch": 8}
    by_name = costs.calculate({"preset": "llama3-8b", **layout})
    fields = {k: v for k, v in dataclasses.asdict(llama).items() if k != "name"}
    typed = costs.calculate({"model": json.loads(json.dumps(fields)), **layout})  # as the page sends it
    assert typed["error"] is None and typed["model"] == "custom"
    assert {**typed, "model": ""} == {**by_name, "model": ""}
    assert typed["kv_cache_per_token"] == 2 * 32 * 8 * 128 * 2  # L x K and V x 8 heads x 128 x bf16
    assert typed["num_params"] == costs.num_params(llama)
    for bad, message in (({"mlp": "gated"}, "model mlp='gated' is unknown"),
                         ({"n_kv_head": 5}, "n_kv_head=5 does not divide n_head=32"),
                         ({"tp": 16}, "n_kv_head=8 is not divisible by tp=16")):
        spec = {"model": {**fields, **{k: v for k, v in bad.items() if k != "tp"}}, **layout}
        out = costs.calculate({**spec, **{k: v for k, v in bad.items() if k == "tp"}})
        assert out["error"].startswith(message) and "\n" not in out["error"], out


def test_format_bytes_rounds_into_the_next_unit():
    assert costs.format_bytes(999.7e6) == "1 GB"
    assert costs.format_bytes(1.234e9) == "1.23 GB" and costs.format_bytes(12) == "12 B"


def test_estimate_prints_the_ranked_table(capsys):
    assert main(["estimate", "--preset", "gpt3-175b", "--devices", "1024", "--device", "h100",
                 "--global-batch", "1536", "--zero", "0", "1", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("GPT-3 175B: 174.60B parameters, 1024 x h100") and "layouts fit" in lines[0]
    assert lines[1].split()[:3] == ["layout", "GB/device", "states"] and len(lines) == 3 + 3 + 1
    assert "(fp32 gradients)" in lines[0]
    assert lines[-1] == f"(flash attention; {costs.SELECTIVE_UNDER_FLASH}, so no layout lists it)"
    assert "no effect with flash attention" in lines[-1]
    args = ["estimate", "--preset", "llama2-7b", "--devices", "8", "--global-batch", "8", "--zero", "1",
            "--top", "1", "--json"]
    assert main(args) == 0
    fp32_reduce = json.loads(capsys.readouterr().out)[0]
    assert main([*args, "--reduce-dtype", "bf16"]) == 0
    bf16_reduce = json.loads(capsys.readouterr().out)[0]
    assert bf16_reduce["states_gb"] < fp32_reduce["states_gb"]  # 2-byte gradients
    assert main(["estimate", "--n-layer", "4", "--d-model", "64", "--n-head", "4", "--vocab-size", "66",
                 "--seq-len", "32", "--devices", "2", "--global-batch", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["gb_per_device"] <= 80 for r in rows)
    # a Llama-style shape: 2 key/value heads, a SwiGLU MLP of width 96; tp = 4 would split a key/value head
    shape = ["--n-layer", "4", "--d-model", "64", "--n-head", "8", "--vocab-size", "64", "--seq-len", "32"]
    gqa = ["--n-kv-head", "2", "--mlp", "swiglu", "--d-ff", "96"]
    assert main(["estimate", *shape, *gqa, "--devices", "4", "--global-batch", "8", "--top", "100"]) == 0
    out = capsys.readouterr().out
    model = costs.Model(4, 64, 8, 64, 32, n_kv_head=2, mlp="swiglu", d_ff=96)
    assert out.startswith(f"custom: {costs.num_params(model) / 1e9:.2f}B parameters")
    layouts = [line.split("  ")[0] for line in out.splitlines()[3:]]
    assert layouts and not any("tp4" in name for name in layouts) and any("tp2" in name for name in layouts)


@pytest.mark.parametrize("argv,message", [
    (["--preset", "llama3-70b", "--devices", "1", "--device", "l4", "--global-batch", "8"],
     "lmkit: error: Llama 3 70B fits on no layout of 1 device of 24 GB"),
    (["--preset", "llama2-7b", "--n-layer", "3", "--devices", "8", "--global-batch", "8"],
     "give --preset or the model's shape, not both"),
    (["--n-layer", "3", "--devices", "8", "--global-batch", "8"], "missing --d-model"),
    (["--preset", "llama3-8b", "--n-kv-head", "4", "--devices", "8", "--global-batch", "8"],
     "give --preset or the model's shape, not both (got --preset and --n-kv-head)"),
    (["--n-layer", "2", "--d-model", "64", "--n-head", "8", "--vocab-size", "64", "--seq-len", "32",
      "--n-kv-head", "3", "--devices", "8", "--global-batch", "8"], "n_kv_head=3 does not divide n_head=8"),
    (["--preset", "llama2-7b", "--devices", "8", "--global-batch", "8", "--efficiency", "2"], "--efficiency"),
    (["--preset", "llama2-7b", "--devices", "8", "--global-batch", "8", "--precision", "fp32",
      "--reduce-dtype", "bf16"], "--reduce-dtype bf16 applies to --precision mixed"),
])
def test_estimate_rejects_impossible_requests_in_one_line(argv, message, capsys):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- context parallelism
# (the bytes and work against lmkit's ring attention: tests/test_context_parallel.py)


def test_context_parallel_divides_every_activation_term_including_the_scores_by_cp():
    kw = {"b": 2, "s": 4096, "h": 1024, "a": 16, "tp": 2, "act_bytes": 2}
    for flags in ({}, {"flash_attention": True}, {"sequence_parallel": True}, {"recompute": "full"}):
        one = costs.activation_bytes_per_layer(**kw, **flags)
        assert costs.activation_bytes_per_layer(**kw, **flags, cp=1) == one
        assert costs.activation_bytes_per_layer(**kw, **flags, cp=8) == pytest.approx(one / 8, rel=1e-12)
    with pytest.raises(costs.CostError, match="multiple of cp"):
        costs.activation_bytes_per_layer(**{**kw, "s": 100}, cp=8)


def test_causal_work_is_shared_exactly_by_zigzag_and_grows_with_the_rank_when_contiguous():
    for cp in (1, 2, 3, 4, 8):
        for s in (2 * cp, 16 * cp):
            for layout in costs.CP_LAYOUTS:
                work = costs.cp_attention_work(s, cp, layout)
                assert sum(w["unmasked"] for w in work) == s * (s + 1) // 2  # the causal triangle, once
            zigzag = [w["unmasked"] for w in costs.cp_attention_work(s, cp)]
            contiguous = [w["unmasked"] for w in costs.cp_attention_work(s, cp, "contiguous")]
            assert len(set(zigzag)) == 1
            assert contiguous == sorted(contiguous) and (cp == 1 or contiguous[-1] > contiguous[0])
    c = 1024 // 4  # long chunks: the last contiguous rank does nearly 2 cp - 1 = 7 times the first's work
    work = costs.cp_attention_work(1024, 4, "contiguous")
    ratio = work[-1]["unmasked"] / work[0]["unmasked"]
    assert ratio == pytest.approx((3 * c * c + c * (c + 1) / 2) / (c * (c + 1) / 2), rel=1e-12)
    assert 6.9 < ratio < 7


def test_ring_attention_memory_and_bytes_by_hand():
    b, s, h, a, cp = 1, 8192, 4096, 32, 4
    mem = costs.cp_attention_memory(b, s, h, a, cp, act_bytes=2)
    local = s // cp
    assert mem["saved"] == (3 * 2 + 4) * local * h + 4 * a * local
    assert mem["kv_in_flight"] == 2 * 2 * local * h * 2
    assert mem["score_block"] == 4 * a * (s // (2 * cp)) ** 2
    assert mem["scores_full"] == 2 * a * s * s
    terms = costs.cp_communication(b, s, h, cp, layers=2, microbatches=3, act_bytes=2)
    sends = [t for t in terms if t.kind == "send"]
    block = 2 * local * h * 2
    assert [t.calls for t in sends] == [6 * 3, 6 * 3, 6 * 4]
    assert sum(t.bytes for t in sends) == 6 * (3 * block + 3 * block + 4 * 2 * block)
    assert sum(t.wire_bytes for t in terms) == sum(t.bytes for t in sends)  # receives send nothing
    assert all(t.group == "cp" and t.group_size == cp for t in terms)
    assert costs.cp_communication(b, s, h, 1) == []
    # a ring step's transfer hides behind its compute once a rank holds e F / beta tokens (zigzag)
    peak, beta = 1e15, 1e11
    even = costs.cp_ring_step(b, 4 * 2 * 10_000, h, 4, peak, beta, act_bytes=2)
    assert even["compute_s"] == pytest.approx(even["comm_s"], rel=1e-12)
    contiguous = costs.cp_ring_step(b, 4 * 2 * 10_000, h, 4, peak, beta, act_bytes=2, layout="contiguous")
    assert contiguous["flops"] == 2 * even["flops"] and contiguous["bytes"] == even["bytes"]


# ------------------------------------------------------------------ context parallelism in the layout


def test_a_cp_layout_counts_its_ranks_and_refuses_what_the_engine_refuses():
    from lmkit.config import ConfigError, ParallelConfig, TrainConfig
    from lmkit.parallel.engine import validate_layout

    layout = costs.Layout(dp=2, cp=2, tp=2, sequence_parallel=True, zero=1)
    assert layout.world_size == 8 and layout.grad_ranks == 4
    assert layout.name == "dp2 zero1 x cp2 x tp2 sp x m1"
    pc = ParallelConfig(dp=2, cp=4, pp=2, microbatches=2)
    assert costs.Layout.from_parallel_config(pc) == costs.Layout(dp=2, cp=4, pp=2, microbatches=2)
    model = costs.Model(n_layer=4, d_model=64, n_head=4, vocab_size=64, seq_len=20)
    with pytest.raises(ConfigError) as engine:  # the engine's own words, after its "model.block_size=20: "
        validate_layout(ParallelConfig(cp=4), TrainConfig(batch_size=8), 4, 4, 64, 20, 4)
    with pytest.raises(costs.CostError) as ours:
        costs.memory(model, costs.Layout(cp=4), 8)
    assert str(engine.value).endswith(str(ours.value)) and "multiple of 8" in str(ours.value)
    long = dataclasses.replace(model, seq_len=24)  # 8 chunks of 3 tokens for cp = 4, 6 tokens per rank
    for bad, message in ((costs.Layout(cp=2), "no attention dropout"),
                         (costs.Layout(dp=2, cp=2, zero=3), "zero=3"),
                         (costs.Layout(cp=4, tp=4, sequence_parallel=True), "seq_len / cp = 6 tokens"),
                         (costs.Layout(cp=0), "cp must be a positive integer")):
        with pytest.raises(costs.CostError, match=message):
            costs.memory(dataclasses.replace(long, dropout=True) if "dropout" in message else long, bad, 8)


def test_cp_splits_each_sequence_and_zero_shards_over_dp_x_cp():
    model = dataclasses.replace(costs.PRESETS["llama2-7b"], seq_len=32768)
    one = costs.memory(model, costs.Layout(tp=8, sequence_parallel=True), 1, "mixed")
    two = costs.memory(model, costs.Layout(cp=2, tp=8, sequence_parallel=True), 1, "mixed")
    ring = costs.cp_attention_memory(1, model.seq_len, model.d_model, model.n_head, 2, 8, act_bytes=2,
                                     kv_width=model.kv_width)
    # every activation term (layers, head, logits) holds s / cp tokens, plus the ring's blocks in flight
    in_flight = ring["kv_in_flight"] + ring["dkv_in_flight"]
    assert two.activations == pytest.approx(one.activations / 2 + in_flight, rel=1e-12)
    assert two.model_states == one.model_states  # the parameters are replicated over cp
    # ZeRO: cp is one more data dimension for the parameters (the engine's dp x cp gradient group)
    for precision in ("fp32", "mixed"):
        for zero in (1, 2):
            a = costs.memory(model, costs.Layout(dp=2, cp=2, zero=zero, tp=8), 4, precision)
            b = costs.memory(model, costs.Layout(dp=4, zero=zero, tp=8), 4, precision)
            assert (a.params, a.grads, a.optimizer) == (b.params, b.grads, b.optimizer)
    # without flash attention the single rank keeps the s x s scores; ring attention never does
    plain = costs.memory(model, costs.Layout(tp=8), 1, "mixed", flash_attention=False)
    ringed = costs.memory(model, costs.Layout(cp=2, tp=8), 1, "mixed", flash_attention=False)
    assert ringed.activations < plain.activations / 10


def test_cp_communication_adds_the_ring_and_divides_the_other_messages():
    model = costs.Model(n_layer=4, d_model=64, n_head=4, vocab_size=64, seq_len=32)
    base = costs.Layout(dp=2, tp=2, pp=2, microbatches=2)
    layout = dataclasses.replace(base, cp=2)
    for stage in (0, 1):
        plain = costs.communication(model, base, 8, "fp32", stage)
        terms = costs.communication(model, layout, 8, "fp32", stage)
        ring = [t for t in terms if t.group == "cp"]
        # this stage's 2 layers and 2 microbatches of b = 2 sequences, heads split over tp
        assert ring == costs.cp_communication(2, 32, 64, 2, tp=2, layers=2, microbatches=2, act_bytes=4)
        by_what = {(t.group, t.what): t for t in plain}
        for t in terms:
            if t.group in ("tp", "pp") and not t.bookkeeping and "tied" not in t.what:
                assert t.bytes * 2 == by_what[(t.group, t.what)].bytes  # s / cp tokens per message
            if t.group == "dp":
                assert t.group_size == 4  # gradients over dp x cp
    full = costs.communication(model, dataclasses.replace(layout, recompute="full"), 8, "fp32", 0)
    again = [t for t in full if t.group == "cp" and "recomputation" in t.what]
    assert [t.calls for t in again] == [2 * 2 * 1, 2 * 2 * 1]  # the forward ring once more: send, recv


def test_ring_attention_passes_only_the_key_value_heads():
    """With grouped-query attention a K/V block is [2, b, KV/t, s/cp, hd]: forward cp - 1 hops of it per
    layer, backward cp - 1 more and cp hops of the fp32 dK/dV accumulator of the same shape."""
    b, s, L, cp, tp, hd, kv_heads = 2, 64, 3, 4, 2, 8, 2
    gqa = costs.Model(L, 8 * hd, 8, 64, s, n_kv_head=kv_heads, mlp="swiglu", tie_embeddings=False)
    layout = costs.Layout(cp=cp, tp=tp)
    ring = [t for t in costs.communication(gqa, layout, b, "mixed") if t.group == "cp"]
    block = 2 * b * (kv_heads // tp) * (s // cp) * hd
    sent = L * ((cp - 1) * block * 2 + (cp - 1) * block * 2 + cp * block * 4)  # bf16 K/V, fp32 dK/dV
    assert sum(t.bytes for t in ring if t.kind == "send") == sent
    assert ring == costs.cp_communication(b, s, gqa.d_model, cp, tp, L, 1, 2, kv_width=kv_heads * hd)
    mha = dataclasses.replace(gqa, n_kv_head=0)
    mha_ring = [t for t in costs.communication(mha, layout, b, "mixed") if t.group == "cp"]
    assert sum(t.bytes for t in mha_ring) == 4 * sum(t.bytes for t in ring)  # 8 / 2 heads per group
    # what a rank holds: the K/V and dK/dV blocks in flight shrink alike, q and the output do not
    mem, mem_mha = (costs.cp_attention_memory(b, s, gqa.d_model, 8, cp, tp, 2, kv_width=m.kv_width)
                    for m in (gqa, mha))
    for key in ("kv_in_flight", "dkv_in_flight"):
        assert 4 * mem[key] == mem_mha[key]
    width, kv_width = gqa.d_model // tp, gqa.kv_width // tp
    local = s // cp
    assert mem["saved"] == (2 * (width + 2 * kv_width) + 4 * width) * b * local + 4 * b * (8 // tp) * local
    held = [costs.memory(m, layout, b, "mixed").activations for m in (gqa, mha)]
    assert held[0] < held[1]
    # the ring step moves 4x fewer bytes for the same compute: it hides at 4x shorter chunks
    step, step_mha = (costs.cp_ring_step(b, s, gqa.d_model, cp, 1e12, 1e9, tp, kv_width=m.kv_width)
                      for m in (gqa, mha))
    assert step["flops"] == step_mha["flops"] and 4 * step["bytes"] == step_mha["bytes"]


def test_a_hidden_ring_exposes_only_the_last_hop_of_the_gradient_blocks():
    """At long context every ring step's compute outlasts its transfer (`cp_ring_step`): what is left
    exposed is the dK/dV accumulator's last hop home, one per layer and microbatch."""
    h100 = costs.DEVICES["h100"]
    node = costs.Cluster(8, 80, h100[1])
    model = dataclasses.replace(costs.PRESETS["llama2-7b"], seq_len=65536)
    layout = costs.Layout(cp=2, tp=4, sequence_parallel=True)
    cand = costs.step_time(model, layout, 1, node)
    step = costs.cp_ring_step(1, model.seq_len, model.d_model, 2, 0.5 * h100[1], 450e9, tp=4, act_bytes=2)
    # backward: 2.5x the compute (5 block matmuls against 2) against K/V + dK/dV
    assert costs.RING_BACKWARD_COMPUTE * step["compute_s"] > 3 * step["comm_s"]
    alpha = node.intra_node_latency_s  # each block is one message
    assert cand.cp_exposed_s == pytest.approx(model.n_layer * (2 * step["comm_s"] + alpha), rel=1e-12)
    assert cand.step_s == pytest.approx(cand.compute_s + cand.tp_s + cand.dp_exposed_s + cand.cp_exposed_s,
                                        rel=1e-12)
    # 512 tokens per rank are fewer than e F / beta / 2.5 = 2,197 / 2.5: every step's transfer outlasts its
    # compute, forward and backward
    short = costs.step_time(dataclasses.replace(model, seq_len=1024), layout, 1, node)
    step = costs.cp_ring_step(1, 1024, model.d_model, 2, 0.5 * h100[1], 450e9, tp=4, act_bytes=2)
    k, f = step["comm_s"], step["compute_s"]
    assert k > 2.5 * f
    # forward k - f; backward (2.5 f of compute): K/V k - 2.5f, dK/dV in flight 2k - 2.5f, its last hop
    # 2k (fp32: twice bf16); a message latency alpha on each block
    k, g = k + alpha, 2 * k + alpha
    per_layer = (k - f) + (k - 2.5 * f) + (g - 2.5 * f) + g
    assert short.cp_exposed_s == pytest.approx(model.n_layer * per_layer, rel=1e-12)


def test_search_picks_context_parallelism_for_one_long_sequence_on_two_nodes():
    """One 131,072-token sequence on 2 nodes of 8 H100: the batch cannot split over data parallelism
    and one microbatch cannot fill a pipeline, so without cp only tp = 16 reaches all 16 devices, and
    its all-reduces cross InfiniBand. cp keeps tp inside a node and its ring hides behind compute."""
    h100 = costs.DEVICES["h100"]
    cluster = costs.Cluster(16, 80, h100[1], intra_node_gbps=h100[2], inter_node_gbps=h100[3])
    model = dataclasses.replace(costs.PRESETS["llama2-7b"], seq_len=131072)
    found = costs.search(model, 1, cluster)
    best = found[0]
    assert best.layout.cp > 1 and best.layout.tp <= cluster.devices_per_node and best.layout.dp == 1
    no_cp = [c for c in found if c.layout.cp == 1]
    assert no_cp and all(c.layout.tp == 16 for c in no_cp)  # the only way without cp
    runner_up = no_cp[0]
    assert runner_up.tp_s > best.compute_s  # tensor parallelism over InfiniBand: more than all the compute
    assert best.cp_exposed_s < 0.05 * best.compute_s  # the ring hides (s / cp = 32k tokens per rank)
    assert runner_up.step_s > 2 * best.step_s
    # at GPT-3's length the same batch splits over dp x cp ranks, and cp adds only its ring
    short = costs.search(dataclasses.replace(model, seq_len=2048), 16, cluster)
    assert short[0].layout.cp == 1


def test_calculate_reports_the_ring_in_its_own_row():
    inputs = {"preset": "llama2-7b", "cp": 2, "tp": 8, "sequence_parallel": True, "global_batch": 1,
              "precision": "mixed", "device_memory_gb": 80}
    out = costs.calculate(inputs)
    assert out["error"] is None and out["layout"] == "cp2 x tp8 sp x m1"
    layout = costs.Layout(cp=2, tp=8, sequence_parallel=True)
    ring = [t for t in costs.communication(costs.PRESETS["llama2-7b"], layout, 1, "mixed") if t.group == "cp"]
    assert out["communication"]["cp"] == sum(t.wire_bytes for t in ring) > 0
    sent = out["communication"]
    assert sent["total"] == sent["dp"] + sent["tp"] + sent["pp"] + sent["cp"]
    assert costs.calculate({**inputs, "cp": 1})["communication"]["cp"] == 0
    assert "multiple of 6" in costs.calculate({**inputs, "cp": 3})["error"]  # 2048 = 6 x 341.3 tokens


def test_full_recomputation_repeats_the_forwards_tensor_parallel_collectives():
    """Activation checkpointing re-runs each block's forward, and with it its 2 all-reduces per layer and
    microbatch (sequence parallel: 2 all-gathers and 2 reduce-scatters), as it re-runs cp's ring."""
    model, m, b = costs.PRESETS["llama2-7b"], 4, 8
    for sp, kinds in ((False, ("all_reduce",)), (True, ("all_gather", "reduce_scatter"))):
        calls = {}
        for rc in ("none", "full"):
            layout = costs.Layout(tp=8, sequence_parallel=sp, microbatches=m, recompute=rc)
            terms = costs.communication(model, layout, b, "mixed")
            calls[rc] = {k: sum(t.calls for t in terms if t.kind == k and "activations" in t.what)
                         for k in kinds}
        for k in kinds:
            assert calls["full"][k] - calls["none"][k] == 2 * model.n_layer * m


def test_the_ring_backward_computes_five_block_matmuls_against_the_forwards_two():
    """The constant of the backward ring step is the engine's: per block pair `RingAttention.forward`
    multiplies twice (``Q K^T`` in `_scores`, ``P V`` in `block_attention`), `RingAttention.backward`
    5 times (``P`` recomputed through `_scores`, then 4 products of its own), as read from the source."""
    import inspect

    from lmkit.parallel.context_parallel import RingAttention, _scores, block_attention

    def matmuls(fn) -> int:
        return inspect.getsource(fn).count(" @ ")

    assert "block_attention(" in inspect.getsource(RingAttention.forward)
    assert "_scores(" in inspect.getsource(RingAttention.backward)
    forward = matmuls(_scores) + matmuls(block_attention)
    backward = matmuls(_scores) + matmuls(RingAttention.backward)
    assert (forward, backward) == (2, 5)
    assert costs.RING_BACKWARD_COMPUTE == backward / forward


def test_the_ring_hides_in_backward_at_six_fifths_of_the_forwards_tokens_in_bf16():
    """Backward sends the K/V block and an fp32 dK/dV accumulator per step against 2.5 times the
    forward's compute: k (1 + 4/e) <= 2.5 f, i.e. 1.2x the forward's tokens per rank in bf16, 0.8x in
    fp32."""
    h100 = costs.DEVICES["h100"]
    F, beta, h = 0.5 * h100[1], 450e9, 4096
    for e, factor in ((2, 1.2), (4, 0.8)):
        step = costs.cp_ring_step(1, 65536, h, 2, F, beta, tp=4, act_bytes=e)
        assert step["hide_tokens"] == pytest.approx(e * F / beta)  # (kv_width / h) e F / beta
        assert step["hide_tokens_backward"] == pytest.approx(factor * step["hide_tokens"])
        above, below = step["hide_tokens_backward"] * 1.01, step["hide_tokens_backward"] * 0.99
        for s, hidden in ((4 * math.ceil(above / 2), True), (4 * math.floor(below / 2), False)):  # cp = 2
            at = costs.cp_ring_step(1, s, h, 2, F, beta, tp=4, act_bytes=e)
            assert (2.5 * at["compute_s"] >= at["comm_s"] * (1 + 4 / e)) == hidden


def test_every_message_costs_a_latency_so_tiny_microbatches_are_not_free():
    """Each collective call and send costs the cluster's latency (a few us in a node, ~15 us across):
    it grows with the message count, and the search no longer takes the most microbatches there are."""
    h100 = costs.DEVICES["h100"]
    model, batch = costs.PRESETS["gpt2-124m"], 4096

    def cluster(scale: float) -> costs.Cluster:
        return costs.Cluster(16, h100[0], h100[1], intra_node_gbps=h100[2], inter_node_gbps=h100[3],
                             intra_node_latency_s=5e-6 * scale, inter_node_latency_s=15e-6 * scale)

    assert costs.Cluster(8, 80, 1e15).intra_node_latency_s < costs.Cluster(8, 80, 1e15).inter_node_latency_s
    extra = []
    for m in (16, 64, 256):
        layout = costs.Layout(dp=8, pp=2, microbatches=m)
        free, charged = (costs.step_time(model, layout, batch, cluster(x)) for x in (0.0, 1.0))
        messages = sum(t.calls for t in costs.communication(model, layout, batch, "mixed", 0)
                       if t.group in ("pp", "embedding") and t.kind != "recv")
        assert charged.pp_s - free.pp_s == pytest.approx(messages * 15e-6)  # pp stages on two nodes
        extra.append(charged.step_s - free.step_s)
    assert extra[0] < extra[1] < extra[2]
    best_m = {}
    for scale in (0.0, 1.0):
        found = costs.search(model, batch, cluster(scale), zero_stages=(0, 1))
        best_m[scale] = next(c for c in found if c.layout.pp > 1).layout.microbatches
    assert best_m[0.0] == batch // 8  # without latency: one sequence per microbatch, 512 of them
    assert best_m[1.0] <= 128  # with it: a moderate count


# --------------------------------------------------------------------------------- experts

MOE_CONFIGS = {
    "plain-top2": ModelConfig(n_layer=2, n_head=2, d_model=16, vocab_size=11, block_size=8, n_experts=4),
    "swiglu-llama": model_preset("llama", n_layer=3, n_head=4, d_model=32, n_kv_head=2, vocab_size=40,
                                 block_size=16, n_experts=8, moe_top_k=2),
    "swiglu-shared-every2": ModelConfig(n_layer=4, n_head=2, d_model=16, vocab_size=11, block_size=8,
                                        mlp="swiglu", n_experts=4, moe_top_k=1, moe_every=2, moe_d_ff=12,
                                        n_shared_experts=2),
    "rope-qknorm-untied-shared": model_preset("llama", n_layer=2, n_head=4, d_model=32, vocab_size=50,
                                              block_size=8, qk_norm=True, n_experts=6, moe_top_k=3,
                                              moe_d_ff=24, n_shared_experts=1, bias=True),
}


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_experts_count_as_the_model_counts_itself(name):
    """Parameters (total, non-embedding), every tensor in registration order (and which have no
    gradient: the routers' balancing biases), active parameters and FLOPs per token (active) equal
    lmkit's GPT with experts (softmax and shared experts, moe_every=2)."""
    from lmkit.experts import inactive_expert_parameters

    cfg = MOE_CONFIGS[name]
    with torch.device("meta"):
        gpt = GPT(cfg)
    model = costs.Model.from_config(cfg)
    assert (model.n_experts, model.moe_top_k, model.moe_every, model.moe_d_ff, model.n_shared_experts) == (
        cfg.n_experts, cfg.moe_top_k, cfg.moe_every, cfg.moe_d_ff, cfg.n_shared_experts)
    assert costs.num_params(model) == gpt.num_params(non_embedding=False)
    assert costs.num_params(model, non_embedding=True) == gpt.num_params(non_embedding=True)
    table = [(p.name, p.shape, p.trainable) for p in costs.parameter_table(model)]
    assert table == [(n, tuple(p.shape), p.requires_grad) for n, p in gpt.named_parameters()]
    assert sum(not t for *_, t in table) == model.moe_blocks  # one expert_bias per MoE block
    assert costs.inactive_params(model) == inactive_expert_parameters(cfg) > 0
    assert costs.active_params(model) == costs.num_params(model) - inactive_expert_parameters(cfg)
    assert costs.flops_per_token(model) == gpt.flops_per_token()
    assert costs.flops_per_token(model, training=False) == gpt.flops_per_token(training=False)


def test_a_routers_bias_costs_its_fp32_bytes_on_every_rank_and_nothing_else():
    """``router.expert_bias`` ([E], no gradient) adds 4 E bytes per MoE block to the parameters of
    every rank holding the block (fp32 also under mixed precision; ZeRO and ep shard it not), and
    nothing to gradients, optimizer states, buckets or the parameter count."""
    model = dataclasses.replace(costs.Model.from_config(MOE_CONFIGS["swiglu-shared-every2"]), vocab_size=12)
    # (2 MoE blocks of 4 experts; a vocabulary tp=2 divides)
    frozen = [p.name for p in costs.parameter_table(model) if not p.trainable]
    assert frozen == ["blocks.1.mlp.router.expert_bias", "blocks.3.mlp.router.expert_bias"]
    layouts = (costs.Layout(dp=2), costs.Layout(dp=4, zero=1, ep=2), costs.Layout(dp=2, zero=2, ep=2),
               costs.Layout(dp=2, tp=2, sequence_parallel=True, ep=2), costs.Layout(pp=2, microbatches=2))
    for layout in layouts:
        for stage in range(layout.pp):
            assert costs.stage_frozen(model, layout, stage) == (8 if layout.pp == 1 else 4)
            trainable = sum(p.local_numel(layout.tp, layout.ep)
                            for p in costs.stage_params(model, layout, stage) if p.trainable)
            for precision, w in (("fp32", 4), ("mixed", 2)):
                mem = costs.memory(model, layout, 8, precision, stage=stage)
                assert mem.numel == trainable
                if not layout.zero:  # weights in w bytes, the biases in 4; gradients of the weights only
                    assert mem.params == w * trainable + 4 * costs.stage_frozen(model, layout, stage)
                    assert mem.grads == 4 * trainable
            # no bucket holds a bias
            assert sum(costs.zero_buckets(model, layout, stage)) == trainable - mem.expert_numel
    assert costs.num_params(model) == sum(p.numel for p in costs.parameter_table(model)) - 8


def test_muon_steps_the_stacked_experts_and_gathers_only_split_matrices():
    """Muon (`lmkit.optim.is_muon_matrix`) steps every stacked expert tensor (its E matrices one by one):
    the experts keep a 4-byte momentum and no step counter; under tp it gathers the split matrices'
    shards only (a router's gate and the experts are whole on every tp rank); lmkit's engine refuses it
    with ep > 1, and so does the cost model."""
    model = dataclasses.replace(costs.Model.from_config(MOE_CONFIGS["swiglu-shared-every2"]), vocab_size=12)
    layout = costs.Layout(dp=2)
    held, count, _ = costs.stage_experts(model, layout, 0)
    assert count == 4 and held == 2 * model.n_experts * model.expert_numel
    mats, n = costs.muon_tensors(model, layout, 0)
    # 4 blocks' qkv and proj, 2 dense MLPs' fc and proj, 2 MoE blocks' gate, 2 expert stacks, shared fc, proj
    assert n == 4 * 2 + 2 * 2 + 2 * 5
    two_d = [p for p in costs.parameter_table(model) if len(p.shape) == 2 and p.name.startswith("blocks.")]
    assert mats == held + sum(p.numel for p in two_d)
    adamw = costs.memory(model, layout, 8, optimizer="adamw")
    muon = costs.memory(model, layout, 8, optimizer="muon")
    # every 2-D block weight and expert stack: 4 bytes less per element, no step counter
    assert adamw.optimizer - muon.optimizer == 4 * mats + 4 * n
    for zero in (1, 2):
        z = costs.Layout(dp=2, zero=zero)
        mem, plain = costs.memory(model, z, 8, optimizer="muon"), costs.memory(model, z, 8, optimizer="adamw")
        e = costs.expert_buckets(model, z, 0)
        assert plain.optimizer - mem.optimizer >= 4 * sum(e) // 2 + 4 * len(e)
        gathers = [t for t in costs.communication(model, z, 8, optimizer="muon") if t.what.startswith("Muon")]
        assert {(t.group, t.kind) for t in gathers} == {("dp", "all_gather"), ("edp", "all_gather")}
        assert next(t for t in gathers if t.group == "edp").bytes == 4 * sum(-(-k // 2) * 2 for k in e)
    tp = costs.Layout(tp=2, sequence_parallel=True)
    (gather,) = [t for t in costs.communication(model, tp, 8, optimizer="muon") if t.what.startswith("Muon")]
    split = [p for p in costs.muon_params(model, tp, 0) if p.split in ("column", "row")]
    assert gather.calls == len(split) == 4 * 2 + 2 * 2 + 2 * 2  # qkv, proj; dense fc, proj; shared fc, proj
    assert gather.bytes == 4 * sum(p.numel for p in split)
    with pytest.raises(costs.CostError, match="optimizer='muon' with ep=2"):
        costs.memory(model, costs.Layout(dp=2, ep=2), 8, optimizer="muon")
    with pytest.raises(costs.CostError, match="optimizer='muon' with ep=2"):
        costs.communication(model, costs.Layout(dp=2, ep=2), 8, optimizer="muon")


def test_the_expert_presets_have_their_published_sizes():
    """Mixtral 8x7B: 46.7B parameters, 12.9B active (Jiang et al. 2024). The DeepSeek-V3-like shape:
    671B and 37B (DeepSeek-AI 2024). Its two roundings (see the preset: multi-head attention for MLA,
    +1.1B; the 3 dense blocks left out, -1.7B) are each under 0.3% of the total and up to 4.7% of the
    active count, in opposite directions: together they leave it within 1% of both figures."""
    mixtral, ds = costs.PRESETS["mixtral-8x7b"], costs.PRESETS["deepseek-v3-like"]
    assert costs.num_params(mixtral) == pytest.approx(46.7e9, rel=0.01)
    assert costs.active_params(mixtral) == pytest.approx(12.9e9, rel=0.01)
    assert costs.num_params(ds) == pytest.approx(671e9, rel=0.01)
    assert costs.active_params(ds) == pytest.approx(37e9, rel=0.01)
    # each equals lmkit's GPT with the same options
    cfg = model_preset("llama", n_layer=mixtral.n_layer, d_model=mixtral.d_model, n_head=mixtral.n_head,
                       n_kv_head=8, d_ff=14336, vocab_size=32000, block_size=mixtral.seq_len, n_experts=8,
                       moe_top_k=2)
    assert costs.Model.from_config(cfg, name=mixtral.name) == mixtral
    # FLOPs follow the active parameters: about 12.9 / 46.7 of a dense model of the same size
    assert costs.flops_per_token(mixtral) < 0.3 * 6 * costs.num_params(mixtral)


def test_all_to_all_bytes_follow_the_spec():
    """counts (ep-1)(E/ep) 8; dispatch = combine = 2 N k d b (ep-1)/ep phi; total = counts + 4 N k d b
    (ep-1)/ep phi; nothing with ep = 1."""
    model = costs.PRESETS["mixtral-8x7b"]
    N, k, d = 4096, 2, 4096
    out = costs.all_to_all_bytes(model, costs.Layout(dp=8, ep=8), N, dtype_bytes=2)
    assert out["counts"] == 7 * 1 * 8
    assert out["dispatch"] == out["combine"] == 2 * N * k * d * 2 * 7 / 8
    assert out["total"] == out["counts"] + 4 * N * k * d * 2 * 7 / 8
    skewed = costs.all_to_all_bytes(model, costs.Layout(dp=8, ep=4), N, imbalance=1.25, dtype_bytes=4)
    assert skewed["counts"] == 3 * 2 * 8
    assert skewed["dispatch"] == pytest.approx(2 * N * k * d * 4 * 3 / 4 * 1.25)
    assert costs.all_to_all_bytes(model, costs.Layout(dp=8), N)["total"] == 0
    with pytest.raises(costs.CostError, match="need experts"):
        costs.all_to_all_bytes(costs.PRESETS["llama2-7b"], costs.Layout(), N)


def test_communication_sends_the_all_to_alls_of_every_moe_layer_and_microbatch():
    model = costs.Model(4, 64, 4, 128, 32, n_experts=8, moe_top_k=2, moe_every=2, bias=False)
    layout = costs.Layout(dp=4, cp=2, tp=2, sequence_parallel=True, ep=4, zero=1, microbatches=2)
    terms = costs.communication(model, layout, 16, "mixed", imbalance=1.5)
    b, n_tokens = 16 // (4 * 2), 32 // 2 // 2  # sequences per microbatch; tokens per sequence on a rank
    per_layer = costs.all_to_all_bytes(model, layout, b * n_tokens, 1.5, 2)
    ep = [t for t in terms if t.group == "ep" and t.kind == "all_to_all"]
    assert sum(t.wire_bytes for t in ep) == pytest.approx(2 * 2 * per_layer["total"])  # 2 MoE blocks x m=2
    assert {t.group_size for t in ep} == {4}
    # and once a step the experts' share of the gradient norm^2, summed over ep in fp64
    assert [(t.kind, t.bytes, t.bookkeeping) for t in terms if t.group == "ep" and t not in ep] == \
        [("all_reduce", 8, True)]
    router = [t for t in terms if t.group == "router"]
    assert router[0].calls == 4 and router[0].group_size == 4 * 2 * 2  # dp x cp x tp under SP
    assert router[0].bytes == 4 * 2 * 8 * 4  # 2 E fp32 per call
    edp = [t for t in terms if t.group == "edp"]
    assert {t.kind for t in edp} == {"reduce_scatter", "all_gather", "all_reduce"}  # (all_reduce: norm^2)
    assert {t.group_size for t in edp} == {2}
    experts = costs.memory(model, layout, 16, "mixed").expert_numel
    assert experts == 2 * 2 * 2 * 64 * 256  # 2 MoE blocks x E/ep = 2 experts x (fc + proj) of 64 x 256
    partial = [t for t in terms if t.group == "tp" and "partial over tp" in t.what]
    assert partial[0].bytes == 4 * experts
    # a dense model sends none of it
    dense = costs.communication(dataclasses.replace(model, n_experts=0), dataclasses.replace(layout, ep=1),
                                16, "mixed")
    assert not [t for t in dense if t.group in ("ep", "edp", "router")]


def test_expert_parallelism_divides_the_expert_weights_and_zero_shards_them_over_edp():
    """fp32, ZeRO-1, dp 4: E / ep experts per rank; the optimizer state of the experts is sharded over
    dp x cp / ep, so a rank holds E / (dp cp) experts' moments whatever ep is."""
    model = costs.Model(2, 16, 2, 32, 8, n_experts=4, bias=False)  # expert: 2 x 64 x 16 = 2048
    mems = {ep: costs.memory(model, costs.Layout(dp=4, zero=1, ep=ep), 8, "fp32") for ep in (1, 2, 4)}
    for ep, mem in mems.items():
        assert mem.expert_numel == 2 * 4 // ep * 2048  # 2 MoE blocks
    assert mems[1].params - mems[2].params == 4 * 2 * 2 * 2048  # 2 experts fewer per block, 4 bytes
    assert mems[2].params - mems[4].params == 4 * 2 * 1 * 2048
    assert mems[1].optimizer == mems[2].optimizer  # 8 bytes x 2 experts per rank
    # ep = dp: one replica of each expert, which the engine steps without ZeRO: the same moments, but
    # AdamW's step counter per expert tensor (4: 2 blocks x fc, proj) instead of per bucket (1)
    assert mems[4].optimizer == mems[2].optimizer + 4 * (4 - 1)
    # without ZeRO every rank keeps the moments of its E / ep experts: halved by ep = 2
    unsharded = {ep: costs.memory(model, costs.Layout(dp=4, ep=ep), 8, "fp32").optimizer for ep in (1, 2)}
    assert unsharded[1] - unsharded[2] == 8 * 2 * 2 * 2048


@pytest.mark.parametrize("layout, message", [
    (costs.Layout(dp=4, ep=3), "ep=3 does not divide dp x cp = 4"),
    (costs.Layout(dp=6, ep=3), "ep=3 does not divide n_experts=8"),
    (costs.Layout(dp=2, tp=2, ep=2), "experts with tp=2 need sequence parallelism"),
    (costs.Layout(dp=2, ep=2, zero=3), "ep=2 with zero=3"),
])
def test_expert_layouts_that_cannot_exist_are_refused_in_one_line(layout, message):
    model = costs.Model(4, 64, 4, 128, 32, n_experts=8, bias=False)
    with pytest.raises(costs.CostError, match=message) as error:
        costs.memory(model, layout, 24)
    assert "\n" not in str(error.value)
    with pytest.raises(costs.CostError, match="ep=2 splits experts, but the model has none"):
        costs.memory(dataclasses.replace(model, n_experts=0), costs.Layout(dp=2, ep=2), 8)


def test_an_ep_group_beyond_a_node_sends_its_all_to_alls_over_infiniband():
    model = costs.Model(8, 1024, 16, 32000, 2048, n_experts=32, moe_top_k=2, mlp="swiglu", bias=False)
    cluster = costs.Cluster(32, 80, 989e12)
    times = {ep: costs.step_time(model, costs.Layout(dp=32, ep=ep, zero=1), 64, cluster).ep_s
             for ep in (4, 8, 16)}
    # inside a node (ep <= 8): NVLink; 16 ranks span two nodes, at 50 instead of 450 GB/s
    assert times[16] > 5 * times[8] and times[8] < 1.2 * times[4] * (7 / 8) / (3 / 4) + 1e-3


def test_search_ranks_every_expert_parallel_size_of_mixtral():
    cluster = costs.Cluster(64, 80, 989e12)
    found = costs.search(costs.PRESETS["mixtral-8x7b"], 256, cluster, zero_stages=(1,))
    eps = {c.layout.ep for c in found}
    assert eps - {1} and all(8 % ep == 0 and (c.layout.dp * c.layout.cp) % c.layout.ep == 0
                             for c in found for ep in [c.layout.ep])
    assert all(c.layout.sequence_parallel for c in found if c.layout.tp > 1)
    assert all(c.memory.total <= 80 * GB for c in found)
    only = costs.search(costs.PRESETS["mixtral-8x7b"], 256, cluster, zero_stages=(1,), ep_sizes=(8,))
    assert {c.layout.ep for c in only} == {8}


def test_calculate_reports_the_experts():
    inputs = {"preset": "mixtral-8x7b", "dp": 8, "tp": 8, "ep": 8, "sequence_parallel": True, "zero": 1,
              "microbatches": 4, "global_batch": 32, "precision": "mixed"}
    out = costs.calculate(inputs)
    assert out["error"] is None, out["error"]
    mixtral = costs.PRESETS["mixtral-8x7b"]
    assert out["active_params"] == costs.active_params(mixtral)
    assert out["expert_params_per_rank"] == 32 * 3 * 14336 * 4096  # 1 expert of each of 32 blocks
    tokens = 32 // (8 * 4) * 4096 // 8
    assert out["all_to_all_per_layer"] == costs.all_to_all_bytes(
        mixtral, costs.Layout(dp=8, ep=8), tokens)["total"]
    assert out["communication"]["ep"] > 0 and out["layout"].startswith("dp8 zero1 (ep8) x tp8 sp")
    dense = costs.calculate({"preset": "llama2-7b", "dp": 2, "global_batch": 2})
    assert dense["communication"]["ep"] == dense["all_to_all_per_layer"] == 0
    assert dense["expert_params_per_rank"] == 0
    assert costs.calculate({**inputs, "ep": 3})["error"].startswith("ep=3 does not divide")


def test_estimate_reports_the_experts(capsys):
    args = ["estimate", "--preset", "mixtral-8x7b", "--devices", "64", "--global-batch", "512", "--zero",
            "1", "--top", "5"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Mixtral 8x7B: 46.70B parameters, 64 x h100")
    assert lines[1].split()[-2:] == ["experts/rank", "all-to-all"]
    assert lines[-3].startswith("(experts: 8 of width 14336, top-2, in 32 of 32 blocks: 12.88B active")
    assert main([*args, "--ep", "4", "--imbalance", "1.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    mixtral = costs.PRESETS["mixtral-8x7b"]
    for row in rows:
        assert row["ep"] == 4 and " (ep4)" in row["layout"]
        assert row["expert_params_per_rank"] % (2 * 3 * 14336 * 4096) == 0  # 8 / 4 experts per block
    found = costs.search(mixtral, 512, costs.Cluster(64, 80, 989e12, name="h100"), zero_stages=(1,),
                         imbalance=1.5, ep_sizes=(4,))
    best = found[0]
    assert rows[0]["all_to_all_bytes"] == costs.all_to_all_bytes(
        mixtral, best.layout, costs.routed_tokens(mixtral, best), 1.5)["total"]
    shape = ["--n-layer", "4", "--d-model", "64", "--n-head", "4", "--vocab-size", "64", "--seq-len", "32",
             "--n-experts", "4", "--moe-top-k", "1", "--moe-every", "2"]
    assert main(["estimate", *shape, "--devices", "4", "--global-batch", "8", "--top", "1000", "--json"]) == 0
    assert {r["ep"] for r in json.loads(capsys.readouterr().out)} >= {1, 2}
    dense = ["estimate", "--preset", "llama2-7b", "--devices", "8", "--global-batch", "8", "--ep", "2"]
    assert main(dense) == 2
    assert "--ep 2 splits experts, but the model has none" in capsys.readouterr().err
