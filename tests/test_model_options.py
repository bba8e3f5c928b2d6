"""GPT model options (rotary positions, RMSNorm, QK-norm, ReLU^2) and the Muon optimizer grouping.

Each option off is the old network exactly; each on changes the forward as intended; the KV
cache decodes as the full forward with each; Muon takes the blocks' matrices only; the parallel
layouts and transformers refuse the options in one line.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmkit.config import ConfigError, ModelConfig, TrainConfig
from lmkit.model import GPT, apply_rope, rope_tables
from lmkit.optim import MuonAdamW, muon_parameter_names

BASE = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, d_model=16)
OPTIONS = [
    {"pos": "rope"},
    {"norm": "rms"},
    {"qk_norm": True},
    {"activation": "relu2"},
    {"pos": "rope", "norm": "rms", "qk_norm": True, "activation": "relu2"},
]


def gpt(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(BASE, **options)).eval()


def tokens(shape=(2, 16), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_options_off_is_the_model_from_before_the_options():
    # Logits of GPT(BASE) under torch.manual_seed(0), computed with lmkit/model.py at commit 1c603a1
    # (before any option existed) on tokens(): the default network has not moved.
    logits = gpt()(tokens())[0]
    expected = torch.tensor([-0.0136758527, -0.0088362554, -0.1133639365, -0.0768361166])
    torch.testing.assert_close(logits[0, 3, :4], expected, rtol=0, atol=1e-6)
    assert abs(logits.double().sum().item() - 8.149405702759395) < 1e-4
    assert BASE.options() == {}
    names = set(gpt().state_dict())
    assert "pos_emb.weight" in names and not any("q_norm" in n for n in names)


def test_rope_scores_depend_on_the_offset_only():
    hd, T = 8, 12
    q, k = torch.randn(1, 1, 1, hd).expand(1, 1, T, hd), torch.randn(1, 1, 1, hd).expand(1, 1, T, hd)
    cos, sin = rope_tables(torch.arange(T), hd)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]
    scores = qr @ kr.T  # the same q and k vectors placed at every position
    for offset in range(T):
        diag = torch.diagonal(scores, -offset)  # query at i, key at i - offset
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[:1], torch.diagonal(scores, -3)[:1])
    # a rotation keeps lengths
    torch.testing.assert_close(qr.norm(dim=-1), q[0, 0].norm(dim=-1))


def test_rope_gpt_is_shift_invariant_and_has_no_position_table():
    model, learned = gpt(pos="rope"), gpt()
    idx = tokens((2, 8))
    assert "pos_emb.weight" not in model.state_dict()
    assert learned.num_params() == model.num_params()  # non-embedding counts agree
    torch.testing.assert_close(model(idx, start_pos=5)[0], model(idx)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(learned(idx, start_pos=5)[0], learned(idx)[0], atol=1e-4)


def test_rms_norm_matches_the_formula():
    model = gpt(norm="rms")
    ln = model.blocks[0].ln1
    with torch.no_grad():
        ln.weight.copy_(torch.randn(BASE.d_model))
    x = torch.randn(3, 5, BASE.d_model) * 4 + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * ln.weight
    torch.testing.assert_close(ln(x), expected, rtol=1e-5, atol=1e-5)
    assert {n for n in model.state_dict() if n.startswith("ln_f")} == {"ln_f.weight"}  # no bias


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    idx = tokens()
    for qk_norm in (True, False):
        model = gpt(qk_norm=qk_norm)
        before = model(idx)[0]
        with torch.no_grad():
            for block in model.blocks:
                w = block.attn.qkv.weight
                w[: 2 * BASE.d_model] *= 10.0  # the q and k rows
                block.attn.qkv.bias[: 2 * BASE.d_model] *= 10.0
        after = model(idx)[0]
        assert torch.allclose(before, after, atol=1e-4) == qk_norm
    names = set(gpt(qk_norm=True).state_dict())
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names
    assert torch.equal(gpt(qk_norm=True).blocks[1].attn.k_norm.weight, torch.ones(BASE.head_dim))


def test_relu2_activation():
    act = gpt(activation="relu2").blocks[0].mlp.act
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(act(x), F.relu(x) ** 2)
    assert isinstance(gpt().blocks[0].mlp.act, torch.nn.GELU)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_kv_cache_decode_equals_full_forward(options):
    model = gpt(**options)
    assert gpt(**options)(tokens())[0].shape == (2, 16, BASE.vocab_size)
    assert not torch.allclose(model(tokens())[0], gpt()(tokens())[0], atol=1e-4)  # the option acts
    idx = tokens((2, 12))
    full = model(idx)[0]
    cache = model.new_kv_cache(2)
    steps = [model(idx[:, :5], kv_cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # a left-padded row decodes what it would alone (rope takes positions from its first real token)
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), idx[:1, : 12 - pad]], dim=1)
    both = torch.cat([padded, idx[1:]], dim=0)
    out = model(both, left_pad=[pad, 0])[0]
    torch.testing.assert_close(out[0, pad:], model(idx[:1, : 12 - pad])[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], full[1], rtol=1e-5, atol=1e-5)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = gpt(qk_norm=True, norm="rms")
    names = muon_parameter_names(model)
    assert names == [f"blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, lr=3e-3)
    opt = MuonAdamW(model, cfg)
    by_id = {id(p): n for n, p in model.named_parameters()}
    muon_ids = {id(p) for p in opt.muon.param_groups[0]["params"]}
    assert {by_id[i] for i in muon_ids} == set(names)
    adamw = [by_id[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert "tok_emb.weight" in adamw and "blocks.0.attn.q_norm.weight" in adamw
    assert len(adamw) + len(names) == len(list(model.parameters()))  # each parameter once
    assert [g["lr"] for g in opt.param_groups] == [0.05, 3e-3, 3e-3]

    # one step moves every parameter; a state_dict round trip continues identically
    def step(m, o):
        _, loss = m(tokens(), tokens(seed=2))
        loss.backward()
        o.step()
        o.zero_grad()

    model.train()
    step(model, opt)
    twin = gpt(qk_norm=True, norm="rms").train()
    twin.load_state_dict(model.state_dict())
    twin_opt = MuonAdamW(twin, cfg)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint would: no shared tensors
    step(model, opt)
    step(twin, twin_opt)
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_refusals():
    for bad, message in (({"n_kv_head": 3}, "does not divide model.n_head=4"),
                         ({"mlp": "swiglu", "activation": "relu2"}, "activation is its SiLU gate"),
                         ({"rope_theta": 0.0}, "rope_theta must be positive"),
                         ({"d_ff": -1}, "integer >= 0")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(BASE, n_head=4, **bad).validate()
    for bad in ({"pos": "alibi"}, {"norm": "batch"}, {"activation": "swish"}):
        with pytest.raises(ConfigError, match="is unknown"):
            dataclasses.replace(BASE, **bad).validate()
    with pytest.raises(ConfigError, match="arch='gpt' only"):
        dataclasses.replace(BASE, arch="lstm", norm="rms").validate()
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd").validate()
    pytest.importorskip("transformers")
    from lmkit.hf import HFError, to_transformers

    for options in OPTIONS[:4]:
        with pytest.raises(HFError, match="no GPT-2 equivalent"):
            to_transformers(gpt(**options))


def test_trainer_with_muon_and_options_resumes_bit_for_bit(tmp_path):
    from lmkit.run import prepare_run
    from lmkit.train import Trainer

    text = "".join(f"The {w} sat on mat {i}.\n" for i, w in enumerate(["cat", "dog", "owl"] * 100))
    mc = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16, pos="rope", norm="rms")

    def trainer(out: str) -> Trainer:
        tc = TrainConfig(batch_size=8, max_steps=6, lr=3e-3, warmup_steps=2, eval_interval=0, log_interval=1,
                         optimizer="muon", muon_lr=0.02, out_dir=str(tmp_path / out), seed=3)
        run = prepare_run(mc, tc, text=text, cache_dir=tmp_path / "cache")
        return Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                       tokenizer=run.tokenizer)

    whole = trainer("whole")
    assert isinstance(whole.optimizer, MuonAdamW)
    straight = [whole.train_step()["loss"] for _ in range(6)]
    first = trainer("split")
    head = [first.train_step()["loss"] for _ in range(3)]
    path = first.save()
    second = trainer("split")
    second.resume(path)
    tail = [second.train_step()["loss"] for _ in range(3)]
    assert head + tail == straight
    assert straight[-1] < straight[0]
