"""Text preprocessing, looked at closely: cleaning, Chinese word segmentation, and what BPE learnt.

The tools chapter 2 uses to show each step between raw text and token ids:

* `clean_text` - Unicode normalisation and whitespace clean-up, nothing that deletes content
  (a language model must predict punctuation and function words, so they stay);
* `segment_chinese` - Chinese word segmentation (中文分词) with jieba's bundled dictionary (offline);
* `token_bytes` / `bpe_merges` - the bytes behind each byte-level BPE token, and the learnt merges
  in training order, as bytes rather than in the GPT-2 byte-to-character alphabet;
* `show_bytes` - a printable form of a byte string that may end inside a UTF-8 character;
* `compression` - tokens, bytes and characters of a text under a tokenizer.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from typing import Any

__all__ = [
    "clean_text",
    "segment_chinese",
    "jieba_dictionary_size",
    "byte_alphabet",
    "token_bytes",
    "bpe_merges",
    "show_bytes",
    "compression",
]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, form: str = "NFC") -> str:
    """Normalise `text` without deleting content.

    Unicode normal form `form` ("NFC" keeps every character's identity; "NFKC" also folds
    compatibility forms such as full-width ``，`` into ``,``), Windows and old Mac line ends become
    ``\\n``, control characters are removed, runs of spaces and tabs (including no-break and
    ideographic spaces) become one space, trailing spaces are stripped from each line and more than
    one blank line in a row becomes one.
    """
    if form not in ("NFC", "NFKC", "NFD", "NFKD"):
        raise ValueError(f"unknown Unicode normal form {form!r}; use 'NFC' or 'NFKC'")
    text = unicodedata.normalize(form, text).replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text)


@functools.lru_cache(maxsize=1)
def _jieba() -> Any:
    try:
        import jieba
    except ImportError as exc:  # pragma: no cover - jieba is a dependency of lmkit
        raise ImportError("segment_chinese needs jieba: pip install jieba==0.42.1") from exc
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages would clutter notebooks
    jieba.initialize()
    return jieba


def segment_chinese(text: str, hmm: bool = True) -> list[str]:
    """Words of a Chinese `text` by jieba (dictionary + HMM for unknown words); punctuation stays.

    jieba's dictionary is modern Chinese; classical poetry is segmented less reliably.
    """
    return _jieba().lcut(text, HMM=hmm)


def jieba_dictionary_size() -> int:
    """Number of words in jieba's bundled dictionary (one ``word frequency [tag]`` line each)."""
    with _jieba().dt.get_dict_file() as f:
        return sum(1 for line in f if line.strip())


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[str, int]:
    """GPT-2's map from the 256 printable stand-in characters of byte-level BPE to byte values.

    Byte-level BPE (GPT-2, Hugging Face ``ByteLevel``) writes each byte as a printable character:
    printable ASCII and Latin-1 bytes as themselves, the others (space, control bytes, ...) as
    characters from U+0100 on, so the space byte 0x20 appears as ``Ġ``.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def token_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token string (as in the vocabulary or the merges) stands for."""
    alphabet = byte_alphabet()
    try:
        return bytes(alphabet[c] for c in piece)
    except KeyError as exc:
        raise ValueError(f"{piece!r} is not a byte-level BPE token string: its characters must come "
                         "from byte_alphabet() (special tokens are not byte sequences)") from exc


def bpe_merges(tokenizer: Any, n: int | None = None) -> list[tuple[bytes, bytes]]:
    """The first `n` merges (all by default) a `BPETokenizer` learnt, in order, as byte pairs."""
    model = json.loads(tokenizer.hf_tokenizer.to_str())["model"]
    merges = model["merges"][:n] if n is not None else model["merges"]
    out = []
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        out.append((token_bytes(left), token_bytes(right)))
    return out


def show_bytes(data: bytes) -> str:
    """Printable form: valid UTF-8 as text (space as ␣, newline as ⏎), other bytes as \\xNN."""
    text = data.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "␣").replace("\n", "⏎")


def compression(tokenizer: Any, text: str) -> dict[str, float]:
    """Tokens, UTF-8 bytes and characters of `text`, and the bytes and characters per token."""
    tokens = len(tokenizer.encode(text))
    n_bytes, chars = len(text.encode("utf-8")), len(text)
    if tokens == 0:
        raise ValueError("compression needs a non-empty text")
    return {"tokens": tokens, "bytes": n_bytes, "chars": chars, "bytes_per_token": n_bytes / tokens,
            "chars_per_token": chars / tokens}
