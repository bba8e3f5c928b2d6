"""lmkit.model: the GPT is a real GPT-2 (checked against Hugging Face), causal, correctly counted,
with a KV cache and left padding that change nothing numerically; the LSTM baseline keeps the
same contract."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit.baselines.lstm import LSTMLanguageModel
from lmkit.config import ConfigError, ModelConfig
from lmkit.hf import gpt2_state_dict_from_hf, gpt2_state_dict_to_hf
from lmkit.model import GPT, build_model
from lmkit.weights import InitialWeights, initial_parameter, materialize, parameter_seed

V, BLOCK, L, H, D = 65, 32, 2, 4, 32


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, block_size=BLOCK, n_layer=L, n_head=H, d_model=D, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny()).eval()


# --------------------------------------------------------------------------- basics


def test_loss_at_init_is_log_vocab(model):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (8, BLOCK), generator=g)
    targets = torch.randint(0, V, (8, BLOCK), generator=g)
    logits, loss = model(idx, targets)
    assert logits.shape == (8, BLOCK, V)
    assert abs(loss.item() - math.log(V)) < 0.1


def test_ignore_index_is_excluded_from_loss(model):
    idx = torch.randint(0, V, (2, 10))
    targets = torch.randint(0, V, (2, 10))
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, V), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_causal(model):
    idx = torch.randint(0, V, (1, 20))
    t = 12
    other = idx.clone()
    other[0, t] = (idx[0, t] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t], b[:, t])


def test_tied_weights(model):
    assert model.head.weight is model.tok_emb.weight
    assert "head.weight" in model.state_dict() and "tok_emb.weight" in model.state_dict()
    m = GPT(tiny())
    _, loss = m(torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8)))
    loss.backward()
    assert m.tok_emb.weight.grad is not None and m.head.weight.grad is m.tok_emb.weight.grad


@pytest.mark.parametrize("bias", [True, False])
def test_param_count_formula(bias):
    m = GPT(tiny(bias=bias))
    ln = 2 * D if bias else D
    # qkv: 3D^2(+3D), proj: D^2(+D), fc: 4D^2(+4D), proj: 4D^2(+D)  -> 12 D^2 (+9D)
    per_block = 2 * ln + 12 * D * D + (9 * D if bias else 0)
    non_emb = L * per_block + ln
    assert m.num_params(non_embedding=True) == non_emb
    assert m.num_params(non_embedding=False) == non_emb + V * D + BLOCK * D
    assert m.num_params(False) == sum(p.numel() for p in m.parameters())


def test_flops_per_token_formula(model):
    N = model.num_params() + D * V
    assert model.flops_per_token() == 6 * N + 12 * L * D * BLOCK
    assert model.flops_per_token(seq_len=8, training=False) == 2 * N + 4 * L * D * 8


def test_gpt2_init_std():
    torch.manual_seed(0)
    cfg = tiny(n_layer=8, d_model=128)
    m = GPT(cfg)
    assert abs(m.blocks[0].mlp.fc.weight.std().item() - 0.02) < 2e-3
    want = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(m.blocks[3].attn.proj.weight.std().item() - want) < want * 0.1
    assert abs(m.blocks[3].mlp.proj.weight.std().item() - want) < want * 0.1
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)
    assert torch.all(m.ln_f.weight == 1) and torch.all(m.blocks[1].ln2.bias == 0)


def _same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_follows_the_global_seed():
    torch.manual_seed(3)
    a, b = GPT(tiny()), GPT(tiny())  # two draws: two different models, as before
    torch.manual_seed(3)
    again = GPT(tiny())
    torch.manual_seed(4)
    other = GPT(tiny())
    assert _same_weights(a, again) and a.init_seed == again.init_seed
    assert not torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    assert not torch.equal(a.blocks[0].mlp.fc.weight, other.blocks[0].mlp.fc.weight)
    assert a.head.weight is a.tok_emb.weight


def test_init_is_a_function_of_seed_name_and_shape():
    """Independent of the other modules: a deeper model starts with the same first blocks, and
    each parameter is `initial_parameter` of its name (what a rank draws for its shard)."""
    torch.manual_seed(0)
    small = GPT(tiny(n_layer=2))
    torch.manual_seed(0)
    deep = GPT(tiny(n_layer=4))  # residual projections are scaled by depth, the rest is equal
    for name, p in small.named_parameters():
        assert torch.equal(p, initial_parameter(name, p.shape, small.config, small.init_seed)), name
    for name, p in small.named_parameters():
        same = torch.equal(p, deep.get_parameter(name))
        assert same == (not name.endswith("proj.weight")), name
    assert torch.equal(initial_parameter("head.weight", (V, D), small.config, small.init_seed),
                       small.tok_emb.weight)
    # stable across processes (sha256, not the salted hash) and distinct per name
    assert parameter_seed(0, "tok_emb.weight") == 6220692838476482389
    assert parameter_seed(0, "pos_emb.weight") != parameter_seed(0, "tok_emb.weight")
    with pytest.raises(ValueError, match="not a GPT parameter"):
        initial_parameter("blocks.0.attn.qkv.scale", (3,), small.config, 0)


def test_meta_construction_then_materialize_gives_the_same_weights():
    torch.manual_seed(5)
    real = GPT(tiny())
    torch.manual_seed(5)
    with torch.device("meta"):
        lazy = GPT(tiny())
    assert all(p.is_meta for p in lazy.parameters()) and lazy.init_seed == real.init_seed
    weights = InitialWeights(lazy)
    assert set(weights) == set(real.state_dict()) and len(weights) == len(real.state_dict())
    assert all(torch.equal(weights[k], v) for k, v in real.state_dict().items())
    lazy.tok_emb.weight.tag = "kept"
    materialize(lazy, "cpu").reset_parameters()
    assert lazy.head.weight is lazy.tok_emb.weight and lazy.tok_emb.weight.tag == "kept"
    assert _same_weights(lazy, real)


# --------------------------------------------------------------------------- errors


def test_config_is_validated():
    with pytest.raises(ConfigError, match="divisible"):
        GPT(tiny(d_model=30, n_head=4))
    with pytest.raises(ValueError, match="arch"):
        GPT(tiny(arch="lstm"))


def test_too_long_sequence_message(model):
    with pytest.raises(ValueError, match=rf"length {BLOCK + 1}.*block_size={BLOCK}"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_out_of_vocab_message(model):
    idx = torch.zeros(1, 4, dtype=torch.long)
    idx[0, 2] = V
    with pytest.raises(ValueError, match=rf"vocab_size={V}.*tokenizer"):
        model(idx)
    with pytest.raises(ValueError, match="tokenizer"):
        model(-idx)


# --------------------------------------------------------------------------- Hugging Face equivalence


def _hf_twin(m: GPT):
    transformers = pytest.importorskip("transformers")
    c = m.config
    hc = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hc).eval()
    hf.load_state_dict(gpt2_state_dict_to_hf(m.state_dict()))
    return hf


def test_matches_huggingface_gpt2():
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=3)).eval()
    # non-trivial LayerNorm and bias values so that a mapping mistake cannot hide
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    hf = _hf_twin(m)
    idx = torch.randint(0, V, (3, BLOCK))
    targets = torch.randint(0, V, (3, BLOCK))
    with torch.no_grad():
        ours, loss = m(idx, targets)
        theirs = hf(idx, labels=None)
    assert (ours - theirs.logits).abs().max().item() < 1e-5
    ref = torch.nn.functional.cross_entropy(theirs.logits.reshape(-1, V), targets.reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5
    # and back: HF names -> ours reproduces the same weights
    m2 = GPT(tiny(n_layer=3)).eval()
    m2.load_state_dict(gpt2_state_dict_from_hf(hf.state_dict()))
    with torch.no_grad():
        assert torch.equal(m2(idx)[0], ours)


# --------------------------------------------------------------------------- training knobs


def test_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    a = GPT(tiny()).train()
    b = GPT(tiny()).train()
    b.load_state_dict(a.state_dict())
    b.set_activation_checkpointing(True)
    idx, tgt = torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16))
    la = a(idx, tgt)[1]
    lb = b(idx, tgt)[1]
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, V, (2, 16))
    m.eval()
    assert torch.equal(m(idx)[0], m(idx)[0])
    m.train()
    assert not torch.equal(m(idx)[0], m(idx)[0])


# --------------------------------------------------------------------------- KV cache and padding


def test_cache_prefill_chunks_and_steps_match_full_forward(model):
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2, 24)
        parts = [model(idx[:, :7], kv_cache=cache)[0], model(idx[:, 7:15], kv_cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(15, 24)]
    assert cache.length == 24
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    # rewinding with start_pos overwrites the tail
    with torch.no_grad():
        again, _ = model(idx[:, 20:], kv_cache=cache, start_pos=20)
    assert (again - full[:, 20:]).abs().max().item() < 1e-5


def test_cache_overflow_message(model):
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model.new_kv_cache(1, BLOCK + 1)


def test_left_padding_matches_unpadded_rows(model):
    lens = [20, 13, 5]
    seqs = [torch.randint(1, V, (n,)) for n in lens]
    T = max(lens)
    idx = torch.zeros(3, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s) :] = s
    pad = [T - n for n in lens]
    with torch.no_grad():
        padded, _ = model(idx, left_pad=pad)
        cache = model.new_kv_cache(3, T, left_pad=pad)
        parts = [model(idx[:, :8], kv_cache=cache)[0]]
        parts += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(8, T)]
        cached = torch.cat(parts, dim=1)
        for b, s in enumerate(seqs):
            alone, _ = model(s[None])
            assert (padded[b, pad[b] :] - alone[0]).abs().max().item() < 1e-5
            assert (cached[b, pad[b] :] - alone[0]).abs().max().item() < 1e-5
    assert not torch.isnan(padded).any()


# --------------------------------------------------------------------------- LSTM baseline


def test_lstm_contract_and_padding():
    torch.manual_seed(0)
    cfg = tiny(arch="lstm")
    m = build_model(cfg).eval()
    assert isinstance(m, LSTMLanguageModel)
    assert m.head.weight is m.tok_emb.weight
    idx, tgt = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    logits, loss = m(idx, tgt)
    assert logits.shape == (3, 16, V) and abs(loss.item() - math.log(V)) < 0.1
    assert m.num_params(False) == m.num_params() + V * D
    assert m.flops_per_token() == 6 * (m.num_params() + D * V)
    with torch.no_grad():
        # carried state == one long forward
        state = m.new_kv_cache(3)
        steps = torch.cat([m(idx[:, :9], kv_cache=state)[0]] + [m(idx[:, t : t + 1], kv_cache=state)[0]
                                                               for t in range(9, 16)], 1)
        assert (steps - logits).abs().max().item() < 1e-5
        # left padding: each padded row equals the row alone
        padded = idx.clone()
        padded[1, :4] = 0
        padded[2, :11] = 0
        out, _ = m(padded, left_pad=[0, 4, 11])
        for b, p in enumerate([0, 4, 11]):
            alone, _ = m(idx[b : b + 1, p:])
            assert (out[b, p:] - alone[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="tokenizer"):
        m(torch.full((1, 3), V))


def test_build_model_dispatch():
    assert isinstance(build_model(tiny()), GPT)
    with pytest.raises(ConfigError):
        build_model(tiny(arch="rnn"))
