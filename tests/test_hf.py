"""lmkit <-> transformers: equal logits both ways, saved directories, and one-line refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from lmkit import hf
from lmkit.config import ModelConfig
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
