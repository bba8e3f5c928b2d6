"""Tokenizers: lossless round trips (English, Chinese, emoji), compression, save/load, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmkit.tokenizer import EOT, BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

ENGLISH = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
    "And God said, Let there be light: and there was light.\n"
)
CHINESE = "我喜欢编程。床前明月光，疑是地上霜。举头望明月，低头思故乡。\n白日依山尽，黄河入海流。"
MIXED = (
    "Mixed «punctuation»: (a) [b] {c} — “quotes” ‘single’ … ¡hola! 100% & 3.14\ttab\r\n"
    "CRLF 🙂🚀👨‍👩‍👧 end"
)
SAMPLES = [ENGLISH, CHINESE, MIXED, "", "\n\n", "  leading and trailing spaces  ", "我喜欢编程"]
CORPUS = ENGLISH * 20 + CHINESE * 10 + MIXED * 5


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train(CORPUS)


def test_both_implement_interface(char, bpe):
    for tok in (char, bpe):
        assert isinstance(tok, Tokenizer)
        assert tok.eot_id == 0
        assert tok.decode([tok.eot_id]) == EOT
        assert len(tok) == tok.vocab_size


@pytest.mark.parametrize("text", SAMPLES)
def test_char_round_trip(char, text):
    assert char.decode(char.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_encodes_unseen_text_losslessly(bpe):
    # Every byte is in the base alphabet: text never seen in training still round-trips.
    unseen = "Ωμέγα ∑∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 한국어 العربية \x00\x07 " + "".join(chr(c) for c in range(0x1F600, 0x1F610))
    assert bpe.decode(bpe.encode(unseen)) == unseen


def test_char_vocabulary_is_sorted_characters(char):
    assert char.chars == sorted(set(CORPUS))
    assert char.vocab_size == len(set(CORPUS)) + 1
    assert char.encode("我")[0] == char.chars.index("我") + 1


def test_char_unknown_character_raises_naming_it(char):
    with pytest.raises(ValueError, match=r"'Ж' \(U\+0416\) at position 3"):
        char.encode("God\u0416")


def test_char_from_text_alias():
    assert CharTokenizer.from_text(["ab", "ca"]).chars == ["a", "b", "c"]


def test_char_train_rejects_empty_text():
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer.train("")


def test_decode_rejects_out_of_range_ids(char, bpe):
    for tok in (char, bpe):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([tok.vocab_size])


def test_bpe_compresses_english(bpe):
    text = ENGLISH * 3
    n_tokens = len(bpe.encode(text))
    n_bytes = len(text.encode("utf-8"))
    assert n_tokens < 0.6 * n_bytes, (n_tokens, n_bytes)


def test_bpe_vocab_size_and_eot(bpe):
    assert bpe.vocab_size == 400
    assert bpe.hf_tokenizer.id_to_token(bpe.eot_id) == EOT


@pytest.mark.parametrize("tok_name", ["char", "bpe"])
def test_eot_handling(tok_name, char, bpe):
    tok = char if tok_name == "char" else bpe
    ids = tok.encode("我喜欢编程", add_eot=True)
    assert ids[-1] == tok.eot_id and ids[:-1] == tok.encode("我喜欢编程")
    # The literal EOT string in a text is the special token (documents separated in a corpus).
    two_docs = tok.encode(f"God said{EOT}床前明月光")
    assert two_docs.count(tok.eot_id) == 1
    assert tok.decode(two_docs) == f"God said{EOT}床前明月光"
    assert tok.decode(two_docs, skip_special=True) == "God said床前明月光"
    assert tok.encode_batch(["God", "明月"], add_eot=True) == [
        tok.encode("God", add_eot=True),
        tok.encode("明月", add_eot=True),
    ]


def test_bpe_vocab_size_validated():
    with pytest.raises(ValueError, match=r"256 byte symbols plus 1 special.*>= 257"):
        BPETokenizer.train(CORPUS, vocab_size=100)


def test_bpe_training_is_deterministic(bpe):
    again = BPETokenizer.train(CORPUS, vocab_size=400)
    assert again.to_dict() == bpe.to_dict()


def test_bpe_training_is_deterministic_across_processes(bpe, tmp_path):
    # A new process has new hash seeds (Python and Rust); merges must not depend on them.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "tok.json"
    code = (
        "import sys, pathlib; from lmkit.tokenizer import BPETokenizer;"
        "t = BPETokenizer.train(pathlib.Path(sys.argv[1]).read_text(encoding='utf-8'), vocab_size=400);"
        "t.save(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, str(corpus), str(out)], check=True)
    assert load_tokenizer(out).to_dict() == bpe.to_dict()


def test_bpe_train_accepts_iterable_of_texts():
    tok = BPETokenizer.train(iter([ENGLISH, CHINESE] * 5), vocab_size=300, min_frequency=2)
    assert tok.decode(tok.encode(CHINESE)) == CHINESE


@pytest.mark.parametrize("tok_name", ["char", "bpe"])
def test_save_load_identity(tok_name, char, bpe, tmp_path):
    tok = char if tok_name == "char" else bpe
    path = tok.save(tmp_path / "sub" / "tok.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["kind"] == tok_name
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.to_dict() == tok.to_dict()
    # Atomic write: nothing but the file itself is left in the directory.
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "wordpiece"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown kind 'wordpiece'.*\['bpe', 'char'\]"):
        load_tokenizer(bad)
    bad.write_text('{"chars": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="no 'kind' field"):
        load_tokenizer(bad)
    bad.write_text('{"kind": "char", "chars": ["a"', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON.*truncated"):
        load_tokenizer(bad)
