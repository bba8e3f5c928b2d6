"""lmkit.generate: sampling helpers on hand-made logits, cached == uncached decoding (also for
padded batches and past block_size), stop tokens and strings, seeds and streaming."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    generate_text,
    sample_next,
    stream,
)
from lmkit.model import GPT, KVCache, build_model

V = 65
NEG = float("-inf")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, d_model=32))
    with torch.no_grad():  # larger weights than GPT-2's init give varied, peaked predictions
        for name, p in m.named_parameters():
            if p.dim() == 2 and name != "pos_emb.weight":
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
        m.pos_emb.weight.normal_(0.0, 0.5)
    return m.eval()


class CharTok:
    """Stand-in tokenizer: ids are offsets from ' ' (0..64 covers ' '..'`')."""

    def encode(self, text: str) -> list[int]:
        return [ord(ch) - 32 for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 32) for i in ids)


# --------------------------------------------------------------------------- helpers


def test_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [4.0, 1.0, 1.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.equal(out, torch.tensor([[NEG, 3.0, 2.0, NEG], [4.0, NEG, NEG, 2.0]]))
    assert torch.equal(apply_top_k(logits, 10), logits)
    assert torch.equal(apply_top_k(logits, None), logits)


def test_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = torch.isfinite(apply_top_p(logits, 0.7))
    assert keep.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 so the 0.3 token is needed
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.01)).sum() == 1  # never empty
    assert torch.isfinite(apply_top_p(logits, 0.96)).all()
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.isfinite(apply_top_p(logits[:, perm], 0.7)).tolist() == [[False, True, False, True]]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    out = apply_repetition_penalty(logits, [[0, 1]], 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.0]]))
    mask = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, mask, 2.0), out)
    assert torch.equal(apply_repetition_penalty(logits, [[0]], 1.0), logits)


def test_sample_next_greedy_and_temperature():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)}
    assert draws == {1}


# --------------------------------------------------------------------------- cached == uncached


def test_cached_and_uncached_logits_match_per_step(model):
    """Greedy decoding for 20 steps with a KV cache and by full recomputation, on a left-padded
    batch of prompts of different lengths: the logits agree at every step."""
    prompts = [[5, 9, 1, 33, 7, 2, 8, 40, 12, 3, 6], [14, 2, 60], [1, 2, 3, 4, 5, 6]]
    P = max(map(len, prompts))
    pad = [P - len(p) for p in prompts]
    tokens = torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, pad[b] :] = torch.tensor(p)
    cache = model.new_kv_cache(3, P + 20, left_pad=pad)
    with torch.inference_mode():
        inp = tokens
        for _ in range(20):
            cached = model(inp, kv_cache=cache, last_only=True)[0][:, -1]
            full = model(tokens, left_pad=pad)[0][:, -1]
            assert (cached - full).abs().max().item() < 1e-5
            nxt = full.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            inp = nxt
    # and generate() agrees with itself and with each prompt decoded alone
    new = tokens[:, P:].tolist()
    assert generate(model, prompts, 20, greedy=True) == new
    assert generate(model, prompts, 20, greedy=True, use_cache=False) == new
    for b, p in enumerate(prompts):
        assert generate(model, [p], 20, temperature=0) == [new[b]]


def test_fp32_greedy_tokens_with_the_cache_equal_the_no_cache_forward(model):
    """One unpadded prompt (the decoding path without any mask, keys and values written in place):
    40 greedy tokens from the KV cache are those of recomputing the whole sequence every step."""
    prompt = [5, 9, 1, 33, 7, 2, 8, 40]
    tokens = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(40):
            nxt = model(tokens)[0][:, -1].argmax(-1, keepdim=True)  # the plain forward, no cache
            tokens = torch.cat([tokens, nxt], 1)
    expected = tokens[0, len(prompt) :].tolist()
    assert generate(model, [prompt], 40, greedy=True) == [expected]
    assert generate(model, [prompt], 40, greedy=True, use_cache=False) == [expected]
    assert len(set(expected)) >= 4, "varied tokens: the check is not passed by a constant prediction"


def test_a_decoding_step_writes_the_cache_in_place_and_builds_no_mask(model):
    """What one cached step at one query dispatches: one cache write per layer (no ``cat``), no
    mask, no dropout call in eval mode, one attention and four linears per layer plus the head."""
    from lmkit.lab.efficiency import decode_step_ops

    L = model.config.n_layer
    ops = decode_step_ops(model, context=20)
    assert ops["copy_"] == L and "cat" not in ops and "stack" not in ops
    assert not {"dropout", "native_dropout", "le", "ge", "bitwise_and", "logical_and"} & set(ops)
    assert ops["scaled_dot_product_attention"] == L and ops["linear"] == 4 * L + 1
    assert sum(ops.values()) <= 20 * L + 8, f"{sum(ops.values())} operators per step: {dict(ops)}"
    cache = model.new_kv_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    for i in range(L):  # keys and values are the two halves of one tensor per layer
        assert cache.k[i].data_ptr() == cache.kv[i].data_ptr()
        assert cache.v[i].data_ptr() == cache.kv[i][1].data_ptr()
    assert model.check_token_ids is True and "check_token_ids" not in vars(model)


@pytest.mark.parametrize("int8", [False, True])
def test_the_one_token_step_plan_computes_what_the_modules_compute_bit_for_bit(model, int8):
    """A cached one-token step runs through bound forward methods (`GPT._decode_plan`); a forward
    hook anywhere sends it through the modules instead. Both give identical logits and caches."""
    from lmkit.lab import efficiency

    m = copy.deepcopy(model)
    if int8:
        if not efficiency.dynamic_quantization_available():
            pytest.skip("no dynamic int8 kernel")
        m = efficiency.quantize_int8(m)
    prompt = torch.tensor([[5, 9, 1, 33, 7, 2, 8, 40], [3, 3, 1, 2, 60, 7, 7, 0]])

    def decode(hooked: bool) -> tuple[torch.Tensor, KVCache]:
        handle = m.blocks[0].mlp.register_forward_hook(lambda *_: None) if hooked else None
        cache = m.new_kv_cache(2, 20)
        with torch.inference_mode():
            out = [m(prompt, kv_cache=cache, last_only=True)[0]]
            for _ in range(10):
                out.append(m(out[-1][:, -1:].argmax(-1), kv_cache=cache, last_only=True)[0])
        if handle is not None:
            handle.remove()
        return torch.cat(out, 1), cache

    (fast, fast_cache), (slow, slow_cache) = decode(False), decode(True)
    assert fast_cache.plan[1] is not None and slow_cache.plan[1] is None
    assert torch.equal(fast, slow) and fast_cache.length == slow_cache.length == 18
    assert all(torch.equal(a[:, :, :, :18], b[:, :, :, :18])
               for a, b in zip(fast_cache.kv, slow_cache.kv, strict=True))
    fast_cache.reset()
    assert fast_cache.plan is None and fast_cache.length == 0, "a reset cache gathers a new plan"
    m.train()  # training mode: the modules (dropout) again, the plan is not used
    cache = m.new_kv_cache(1, 4)
    m(prompt[:1, :2], kv_cache=cache)
    m(prompt[:1, 2:3], kv_cache=cache)
    assert cache.plan is None


def test_past_block_size_cache_falls_back_to_cropping():
    torch.manual_seed(1)
    m = GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, d_model=16)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    ref = generate(m, prompts, 30, greedy=True, use_cache=False)
    with pytest.warns(UserWarning, match="block_size=16"):
        got = generate(m, prompts, 30, greedy=True, use_cache=True)
    assert got == ref and all(len(r) == 30 for r in got)
    with pytest.warns(UserWarning, match="exceeds block_size"):
        long = generate(m, [list(range(1, 40))], 3, greedy=True)
    assert long == generate(m, [list(range(23, 40))], 3, greedy=True, use_cache=False)


def test_lstm_generates_with_and_without_state():
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=V, block_size=8, n_layer=2, d_model=32, arch="lstm")).eval()
    prompts = [[3, 4, 5, 6, 7], [9, 1]]
    a = generate(m, prompts, 12, greedy=True, use_cache=True)
    b = generate(m, prompts, 12, greedy=True, use_cache=False)
    assert a == b and len(a[0]) == 12  # no block_size limit for a recurrent model


# --------------------------------------------------------------------------- stopping, seeds, streaming


def test_stop_tokens_stop_each_row_independently(model):
    prompts = [[5, 9, 1], [14, 2, 60, 8]]
    free = generate(model, prompts, 15, greedy=True)
    k = next(k for k in range(2, 15) if free[0][k] not in free[0][:k])
    stop = free[0][k]
    got = generate(model, prompts, 15, greedy=True, stop_token_ids=[stop])
    assert got[0] == free[0][:k]
    cut = free[1].index(stop) if stop in free[1] else len(free[1])
    assert got[1] == free[1][:cut]


def test_stop_strings(model):
    tok = CharTok()
    prompt = tok.decode([5, 9, 1, 20])
    free = generate_text(model, tok, prompt, max_new_tokens=20, temperature=0)
    assert isinstance(free, str) and len(free) == 20
    stop = free[6:8]
    first = free.find(stop)
    got = generate_text(model, tok, [prompt, prompt], max_new_tokens=20, temperature=0, stop=[stop, "~~~"])
    assert got == [free[:first], free[:first]]


def test_seed_reproducibility(model):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.95, repetition_penalty=1.3)
    a = generate(model, [[1, 2, 3]], seed=123, **kw)
    b = generate(model, [[1, 2, 3]], seed=123, **kw)
    c = generate(model, [[1, 2, 3]], seed=124, **kw)
    assert a == b and a != c
    assert generate(model, [[1, 2, 3]], seed=7, **kw, use_cache=False) == generate(
        model, [[1, 2, 3]], seed=7, **kw)


def test_stream_yields_what_generate_returns(model):
    prompts = torch.tensor([[4, 5, 6], [7, 8, 9]])
    kw = dict(max_new_tokens=12, temperature=0.8, seed=3)
    steps = list(stream(model, prompts, **kw))
    assert len(steps) == 12 and all(len(s) == 2 for s in steps)
    assert [[s[b] for s in steps] for b in range(2)] == generate(model, prompts, **kw)


def test_training_mode_restored_and_errors(model):
    model.train()
    generate(model, [[1]], 2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], 2)
    with pytest.raises(ValueError, match="temperature"):
        stream(model, [[1]], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, top_p=0.0)
    with pytest.raises(ValueError, match="vocab"):
        generate(model, [[V + 3]], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(model, [[1]], 0) == [[]]


def test_token_ids_are_checked_for_the_prompt_only_and_the_flag_is_restored(model, monkeypatch):
    import lmkit.model

    calls = []
    real = lmkit.model.validate_token_ids
    monkeypatch.setattr(lmkit.model, "validate_token_ids",
                        lambda idx, v: (calls.append(tuple(idx.shape)), real(idx, v)))
    out = generate(model, [[1, 2, 3], [4, 5]], 6, greedy=True)
    assert calls == [(2, 3)] and "check_token_ids" not in vars(model) and model.check_token_ids
    alone = [generate(model, [p], 6, greedy=True)[0] for p in ([1, 2, 3], [4, 5])]
    assert out == alone  # a left-padded batch decodes what each prompt decodes alone
    model.check_token_ids = False  # an instance setting survives decoding
    try:
        generate(model, [[1]], 3, greedy=True)
        assert vars(model)["check_token_ids"] is False
    finally:
        del model.check_token_ids
    with pytest.raises(ValueError, match="pad_id=65 is outside the vocabulary"):
        stream(model, [[1]], 2, pad_id=V)
