"""lmkit <-> transformers: equal logits both ways, saved directories, and one-line refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from lmkit import hf
from lmkit.config import ModelConfig, model_preset
from lmkit.model import GPT
from lmkit.tokenizer import BPETokenizer, CharTokenizer

CONFIGS = [
    dict(vocab_size=50, block_size=32, n_layer=1, n_head=1, d_model=16, bias=True),
    dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, d_model=32, bias=True),
    dict(vocab_size=65, block_size=48, n_layer=3, n_head=2, d_model=24, bias=False),
    dict(vocab_size=300, block_size=16, n_layer=2, n_head=8, d_model=64, bias=False, dropout=0.1),
]


def _random_gpt(seed: int, **shape) -> GPT:
    """A GPT whose weights (biases and LayerNorms too) are far from their init, so a swapped or
    untransposed tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _tokens(vocab: int, block: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, block), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", CONFIGS, ids=lambda s: f"L{s['n_layer']}H{s['n_head']}d{s['d_model']}"
                         f"{'' if s['bias'] else '-nobias'}")
def test_to_transformers_gives_the_same_logits(shape):
    ours = _random_gpt(1, **shape)
    theirs = hf.to_transformers(ours)
    assert isinstance(theirs, transformers.GPT2LMHeadModel) and not theirs.training
    idx = _tokens(shape["vocab_size"], shape["block_size"], 2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    if not shape["bias"]:  # GPT-2 always has biases: they are exactly zero
        biases = [b.detach() for n, b in theirs.named_parameters() if n.endswith(".bias")]
        assert biases and all(float(b.abs().max()) == 0 for b in biases)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_from_transformers_gives_the_same_logits(activation, attn):
    torch.manual_seed(3)
    hc = transformers.GPT2Config(vocab_size=71, n_positions=40, n_embd=48, n_layer=2, n_head=3,
                                 activation_function=activation, attn_implementation=attn,
                                 bos_token_id=None, eos_token_id=None)
    theirs = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = hf.from_transformers(theirs)
    assert isinstance(ours, GPT) and ours.config.block_size == 40 and ours.config.d_model == 48
    idx = _tokens(71, 40, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=0)


def test_round_trip_and_saved_directory_loads_in_transformers(tmp_path):
    ours = _random_gpt(5, **CONFIGS[2])
    tokenizer = CharTokenizer.train("abcdefgh ijk\n")
    out = hf.save_pretrained(ours, tmp_path / "export", tokenizer)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / hf.TOKENIZER_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the temp dir was renamed
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.eos_token_id == tokenizer.eot_id
    back, tok = hf.load_pretrained(out)
    assert tok.to_dict() == tokenizer.to_dict()
    idx = _tokens(65, 48, 6)
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(loaded(idx).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(idx)[0], want, atol=1e-5, rtol=0)
    # saving again replaces the directory whole
    other = _random_gpt(6, **CONFIGS[2])
    hf.save_pretrained(other, out)
    again, none = hf.load_pretrained(out)
    assert none is None
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], other(idx)[0], atol=1e-5, rtol=0)


def test_a_bpe_tokenizer_is_also_written_for_transformers_users(tmp_path):
    tokenizer = BPETokenizer.train("the cat sat on the mat. " * 50, vocab_size=300)
    ours = _random_gpt(7, vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
    out = hf.save_pretrained(ours, tmp_path / "bpe", tokenizer)
    (out / hf.TOKENIZER_FILE).unlink()  # only GPT-2's own file is left: it is read as BPE
    _, tok = hf.load_pretrained(out)
    assert isinstance(tok, BPETokenizer) and tok.encode("the cat") == tokenizer.encode("the cat")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert fast("the mat")["input_ids"] == tokenizer.encode("the mat")


@dataclasses.dataclass
class _WithRotary(ModelConfig):
    rotary: bool = False


@pytest.mark.parametrize("make, fragment", [
    (lambda: hf.gpt2_config(ModelConfig(arch="lstm")), "arch='lstm' has no GPT-2 equivalent"),
    (lambda: hf.gpt2_config(_WithRotary(rotary=True)), "rotary=True has no GPT-2 equivalent"),
    (lambda: hf.to_transformers(torch.nn.Linear(2, 2)), "needs an lmkit GPT"),
    (lambda: hf.from_transformers(torch.nn.Linear(2, 2)), "needs a GPT2LMHeadModel"),
])
def test_what_gpt2_cannot_express_is_refused_in_one_line(make, fragment):
    with pytest.raises(hf.HFError, match=".*") as err:
        make()
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("option, fragment", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"n_inner": 40}, "n_inner=40"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"attn_pdrop": 0.3}, "different dropouts"),
])
def test_gpt2_variants_lmkit_does_not_compute_are_refused(option, fragment):
    hc = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2, **option)
    with pytest.raises(hf.HFError) as err:
        hf.from_transformers(transformers.GPT2LMHeadModel(hc))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_saving_over_a_directory_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(hf.HFError, match="not a transformers model directory"):
        hf.save_pretrained(_random_gpt(8, **CONFIGS[0]), tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(hf.HFError, match="no config.json"):
        hf.load_pretrained(tmp_path / "notes")


# --------------------------------------------------------------------------- the Llama-style network

LLAMA_BASE = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, d_model=32)
LLAMA_CONFIGS = {  # model_preset("llama") with these on top; bias off unless named
    "gqa1-untied": dict(n_kv_head=1),
    "gqa2-tied": dict(n_kv_head=2, tie_embeddings=True),
    "gqa2-untied-theta-dff": dict(n_kv_head=2, rope_theta=500000.0, d_ff=40),
    "gqa1-tied-8heads": dict(n_kv_head=1, n_head=8, tie_embeddings=True),
    "mha-bias": dict(n_kv_head=4, bias=True),
    "qwen3-qknorm": dict(n_kv_head=2, qk_norm=True),
}


def _random_llama(seed: int, **fields) -> GPT:
    """A Llama-style GPT whose weights (norm gains and biases too) are far from their init."""
    torch.manual_seed(seed)
    model = GPT(model_preset("llama", **{**LLAMA_BASE, **fields})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_a_llama_style_model_exports_with_the_same_logits(name):
    ours = _random_llama(11, **LLAMA_CONFIGS[name])
    c = ours.config
    theirs = hf.to_transformers(ours)
    want = transformers.Qwen3ForCausalLM if c.qk_norm else transformers.LlamaForCausalLM
    assert type(theirs) is want and not theirs.training
    hc = theirs.config
    assert (hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim, hc.intermediate_size) == \
        (c.n_head, c.kv_heads, c.head_dim, c.ffn_width)
    assert hc.tie_word_embeddings == c.tie_embeddings and hc.rope_parameters["rope_theta"] == c.rope_theta
    assert hc.attention_bias == c.bias and hc.rms_norm_eps == 1e-5 and hc.max_position_embeddings == 32
    lm_head, embed = theirs.lm_head.weight, theirs.model.embed_tokens.weight
    assert (lm_head.data_ptr() == embed.data_ptr()) == c.tie_embeddings
    idx = _tokens(c.vocab_size, c.block_size, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)


def _random_hf_llama(seed: int, qwen3: bool = False, attn: str = "sdpa", **fields) -> torch.nn.Module:
    """A LlamaForCausalLM (Qwen3ForCausalLM) built here with random weights far from its init."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=53, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=24, rms_norm_eps=1e-5,
                 head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                 attn_implementation=attn)
    shape.update(fields)
    config = transformers.Qwen3Config(**shape) if qwen3 else transformers.LlamaConfig(**shape)
    model = (transformers.Qwen3ForCausalLM if qwen3 else transformers.LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("qwen3, attn, fields", [
    (False, "sdpa", dict(num_key_value_heads=1)),
    (False, "eager", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    (False, "sdpa", dict(num_key_value_heads=6, attention_bias=True, mlp_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    (True, "sdpa", dict(num_key_value_heads=3)),
], ids=["gqa1-untied", "gqa2-tied-eager", "mha-bias-theta", "qwen3-gqa3"])
def test_a_llama_built_in_transformers_imports_with_the_same_logits(qwen3, attn, fields):
    theirs = _random_hf_llama(13, qwen3, attn, **fields)
    hc = theirs.config
    ours = hf.from_transformers(theirs)
    c = ours.config
    assert (c.pos, c.norm, c.mlp, c.qk_norm, c.bias) == ("rope", "rms", "swiglu", qwen3, hc.attention_bias)
    assert (c.n_head, c.kv_heads, c.ffn_width, c.block_size) == (6, hc.num_key_value_heads, 72, 24)
    assert c.tie_embeddings == hc.tie_word_embeddings and c.rope_theta == hc.rope_parameters["rope_theta"]
    idx = _tokens(53, 24, 14)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gqa1-untied", "gqa2-tied", "mha-bias", "qwen3-qknorm"])
def test_llama_state_dicts_round_trip_exactly(name):
    ours = _random_llama(15, **LLAMA_CONFIGS[name]).state_dict()
    theirs = hf.llama_state_dict_to_hf(ours)
    assert not [k for k in theirs if "qkv" in k or "fc" in k]  # the fused tensors are split
    back = hf.llama_state_dict_from_hf(theirs)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    # and the other way: a transformers state dict through lmkit's names and back
    hf_state = hf.to_transformers(_random_llama(16, **LLAMA_CONFIGS[name])).state_dict()
    again = hf.llama_state_dict_to_hf(hf.llama_state_dict_from_hf(hf_state))
    assert again.keys() == hf_state.keys()
    assert all(torch.equal(again[k], hf_state[k]) for k in hf_state)


def test_a_llama_directory_saves_and_loads_by_its_model_type(tmp_path):
    ours = _random_llama(17, **LLAMA_CONFIGS["gqa2-untied-theta-dff"])
    tokenizer = CharTokenizer.train("abcdefgh ijk\n")
    out = hf.save_pretrained(ours, tmp_path / "llama", tokenizer)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.eos_token_id == tokenizer.eot_id
    back, tok = hf.load_pretrained(out)
    assert back.config == ours.config and tok.to_dict() == tokenizer.to_dict()
    idx = _tokens(61, 32, 18)
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(loaded(idx).logits, want, atol=1e-5, rtol=0)
        assert torch.equal(back(idx)[0], want)
    tied_qwen = _random_llama(19, **LLAMA_CONFIGS["qwen3-qknorm"], tie_embeddings=True)
    qwen = hf.save_pretrained(tied_qwen, tmp_path / "qwen3")  # the tied head is saved once
    assert json.loads((qwen / "config.json").read_text())["model_type"] == "qwen3"
    back, _ = hf.load_pretrained(qwen)
    assert back.config == tied_qwen.config and back.head.weight is back.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(back(idx)[0], tied_qwen(idx)[0])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(hf.HFError, match="model_type='mistral'; lmkit converts 'gpt2', 'llama', 'qwen3'"):
        hf.load_pretrained(tmp_path / "other")


@pytest.mark.parametrize("fields, fragment", [
    (dict(pos="rope"), "LlamaForCausalLM needs also norm='rms', mlp='swiglu'"),
    (dict(norm="rms", mlp="swiglu"), "LlamaForCausalLM needs also pos='rope'"),
    (dict(pos="rope", norm="rms", activation="relu2"), "activation='relu2'"),
    (dict(tie_embeddings=False), "tie_embeddings=False have no GPT-2 equivalent"),
    (dict(pos="rope", norm="rms", mlp="swiglu", qk_norm=True, bias=True), "use bias=False"),
    (dict(arch="lstm"), "arch='lstm' has no GPT-2 equivalent, nor a Llama one"),
])
def test_networks_neither_class_computes_are_refused_in_one_line(fields, fragment):
    config = ModelConfig(**fields)
    with pytest.raises(hf.HFError) as err:
        hf.hf_architecture(config)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(hf.HFError):
        hf.hf_config(config)


def test_the_format_follows_the_model_config():
    assert hf.hf_architecture(ModelConfig()) == "GPT2LMHeadModel"
    assert hf.hf_architecture(model_preset("gpt2", bias=False)) == "GPT2LMHeadModel"
    assert hf.hf_architecture(model_preset("llama")) == "LlamaForCausalLM"
    assert hf.hf_architecture(model_preset("llama", qk_norm=True)) == "Qwen3ForCausalLM"
    assert isinstance(hf.hf_config(ModelConfig()), transformers.GPT2Config)
    with pytest.raises(hf.HFError, match="GPT-2's network .* converts to GPT2LMHeadModel"):
        hf.llama_config(ModelConfig())
    with pytest.raises(hf.HFError, match="tensor pos_emb.weight has no LlamaForCausalLM equivalent"):
        hf.llama_state_dict_to_hf(_random_gpt(20, **CONFIGS[0]).state_dict())


@pytest.mark.parametrize("qwen3, option, fragment", [
    (False, {"rms_norm_eps": 1e-6}, "rms_norm_eps=1e-06 (lmkit's RMSNorms use 1e-05)"),
    (False, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (False, {"head_dim": 16}, "head_dim=16"),
    (False, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type='linear'"),
    (False, {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    (True, {"attention_bias": True}, "MLP biases Qwen3 has not"),
    (True, {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, "sliding-window"),
])
def test_llama_variants_lmkit_does_not_compute_are_refused(qwen3, option, fragment):
    with pytest.raises(hf.HFError) as err:
        hf.from_transformers(_random_hf_llama(21, qwen3, **option))
    assert fragment in str(err.value) and "\n" not in str(err.value)
