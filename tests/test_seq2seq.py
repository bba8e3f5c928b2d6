"""lmkit.tasks.seq2seq: the loss covers target tokens only, and a small GPT learns a character mapping."""

from __future__ import annotations

import torch

from lmkit.config import ModelConfig
from lmkit.model import build_model
from lmkit.tasks import seq2seq
from lmkit.tokenizer import CharTokenizer


def test_batch_masks_the_source():
    tok = CharTokenizer.train("ab\tcd\n")
    examples = seq2seq.encode_pairs(tok, [("ab", "cd")])
    ids, n_prompt = examples[0]
    assert tok.decode(ids) == "ab\tcd\n" and n_prompt == 3
    x, y = seq2seq._batch(examples, 0)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [-100, -100] + ids[3:]


def test_learns_to_swap_letters_and_measures_accuracy():
    pairs = [(s, s.swapcase()) for s in ("ab", "ba", "aab", "bba", "abab", "b", "a", "bab")]
    tok = CharTokenizer.train("abAB\t\n")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                                    d_model=32))
    history = seq2seq.fit_seq2seq(model, seq2seq.encode_pairs(tok, pairs), steps=150, batch_size=8, lr=3e-3)
    assert history[-1]["loss"] < 0.1
    out = seq2seq.translate(model, tok, [s for s, _ in pairs], max_new_tokens=8)
    assert seq2seq.char_accuracy(out, [t for _, t in pairs]) == 1.0
    assert seq2seq.char_accuracy(["ab"], ["abc"]) == 2 / 3
