"""lmkit.lab.textprep: cleaning keeps content, jieba segments offline, BPE merges read back as bytes."""

from __future__ import annotations

from collections import Counter

import pytest

from lmkit.lab.textprep import (
    bpe_merges,
    byte_alphabet,
    clean_text,
    compression,
    jieba_dictionary_size,
    segment_chinese,
    show_bytes,
    token_bytes,
)
from lmkit.tokenizer import BPETokenizer, CharTokenizer


def test_clean_text_normalises_whitespace_and_line_ends_but_keeps_punctuation():
    raw = "In the\tbeginning,\u00a0God  created.  \r\nAnd the earth\x07 was\r\n\n\n\nwithout form;"
    assert clean_text(raw) == "In the beginning, God created.\nAnd the earth was\n\nwithout form;"


def test_clean_text_nfkc_folds_full_width_punctuation_nfc_does_not():
    line = "床前明月光，疑是地上霜。"
    assert clean_text(line) == line
    assert clean_text(line, form="NFKC") == "床前明月光,疑是地上霜。"
    with pytest.raises(ValueError, match="normal form"):
        clean_text(line, form="nfc")


def test_segment_chinese_splits_the_books_example_into_three_words():
    assert segment_chinese("我喜欢编程") == ["我", "喜欢", "编程"]
    assert "".join(segment_chinese("床前明月光，疑是地上霜。")) == "床前明月光，疑是地上霜。"
    assert jieba_dictionary_size() > 100_000


def test_byte_alphabet_is_a_bijection_onto_the_256_bytes():
    alphabet = byte_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == 0x20 and alphabet["a"] == ord("a")


def test_token_bytes_of_an_encoding_concatenate_to_the_text():
    text = "In the beginning God created the heaven and the earth. 我喜欢编程\n" * 20
    tok = BPETokenizer.train(text, vocab_size=300)
    ids = tok.encode(text)
    vocab = {i: s for s, i in tok.hf_tokenizer.get_vocab().items()}
    assert b"".join(token_bytes(vocab[i]) for i in ids) == text.encode("utf-8")
    with pytest.raises(ValueError, match="not a byte-level BPE token"):
        token_bytes("中")


def test_first_merge_is_the_most_frequent_adjacent_pair():
    text = "abab abab abab cd cd xy"
    tok = BPETokenizer.train([text] * 5, vocab_size=260)
    first = bpe_merges(tok, 1)[0]
    words = [w for w, _ in tok.hf_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    pairs = Counter((token_bytes(a), token_bytes(b)) for w in words for a, b in zip(w, w[1:], strict=False))
    assert pairs[first] == max(pairs.values())
    assert first == (b"a", b"b")
    assert len(bpe_merges(tok)) == tok.vocab_size - 257


def test_show_bytes_marks_spaces_and_escapes_partial_characters():
    assert show_bytes(b" the\n") == "␣the⏎"
    assert show_bytes("我".encode()[:2]) == "\\xe6\\x88"


def test_compression_counts_tokens_bytes_and_characters():
    text = "我喜欢编程"
    stats = compression(CharTokenizer.train(text), text)
    assert stats == {"tokens": 5, "bytes": 15, "chars": 5, "bytes_per_token": 3.0, "chars_per_token": 1.0}
