"""Tokenizers: text <-> integer ids, trained locally, saved as one JSON file.

Two tokenizers share one small interface (`Tokenizer`):

* `CharTokenizer` - one id per character seen in the training text. Tiny vocabulary, long
  sequences, trivially explainable: the right first tokenizer for a book chapter.
* `BPETokenizer` - byte-level byte-pair encoding, trained with Hugging Face ``tokenizers``
  (Rust, fast). Every one of the 256 byte values is in the base alphabet, so *any* string -
  Chinese, emoji, control characters - is encodable and decodes back losslessly; merges learnt
  from the corpus make frequent byte sequences single tokens, so sequences get shorter.

Both reserve one special token, ``<|endoftext|>`` (EOT, id 0), used to separate documents in
a token stream and to stop generation. The literal string ``<|endoftext|>`` inside a text is
encoded as the EOT token (the GPT-2 convention, and Hugging Face's default), so a corpus that
separates documents with that string tokenizes as intended; `decode` writes EOT back as the
same string unless ``skip_special=True``, which keeps ``decode(encode(s)) == s`` for every ``s``.

A tokenizer is saved as a JSON file with a ``"kind"`` field; `load_tokenizer` dispatches on it,
so a checkpoint can store a copy and rebuild the right class without knowing it in advance.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmkit import atomic

__all__ = [
    "EOT",
    "Tokenizer",
    "CharTokenizer",
    "BPETokenizer",
    "load_tokenizer",
]

EOT = "<|endoftext|>"
FORMAT_VERSION = 1


class Tokenizer(ABC):
    """Common interface of lmkit tokenizers (what data, training and generation rely on)."""

    kind: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; the model's embedding needs exactly this many rows."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """Id of the end-of-text special token ``<|endoftext|>``."""

    @abstractmethod
    def encode(self, text: str, add_eot: bool = False) -> list[int]:
        """Ids of `text`; with ``add_eot=True`` the EOT id is appended (end of a document)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; EOT becomes ``<|endoftext|>`` unless `skip_special`."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, including ``"kind"``; inverse of ``from_dict``."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        """Rebuild from `to_dict` output."""

    def encode_batch(self, texts: Iterable[str], add_eot: bool = False) -> list[list[int]]:
        """Encode many texts (subclasses may do this in parallel)."""
        return [self.encode(t, add_eot=add_eot) for t in texts]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer to `path` as JSON, atomically (never a half-written file)."""
        path = Path(path)
        atomic.write_text(path, _dumps(self.to_dict()))
        return path

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------------------------
# Character level
# --------------------------------------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """One id per character; id 0 is EOT, ids 1..n are the training characters in sorted order.

    A character that was not in the training text raises `ValueError` on `encode` (naming the
    character, its code point and position) rather than mapping to an ``<unk>`` id: a silent
    ``<unk>`` would make the round trip lossy and hide a train/test mismatch until generation
    produces garbage. Train on all the text you will encode, or use `BPETokenizer`.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has duplicate characters")
        self.chars: list[str] = chars
        self._itos: list[str] = [EOT, *chars]
        self._stoi: dict[str, int] = {c: i for i, c in enumerate(self._itos)}

    @classmethod
    def train(cls, text: str | Iterable[str]) -> CharTokenizer:
        """Vocabulary = sorted set of the characters of `text` (a string or an iterable of strings).

        The EOT literal is removed from the text first, so its characters are only added if they
        also occur elsewhere.
        """
        texts = [text] if isinstance(text, str) else list(text)
        chars: set[str] = set()
        for t in texts:
            chars.update(t.replace(EOT, ""))
        if not chars:
            raise ValueError("CharTokenizer.train needs a non-empty text")
        return cls(sorted(chars))

    from_text = train

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def eot_id(self) -> int:
        return 0

    def encode(self, text: str, add_eot: bool = False) -> list[int]:
        ids: list[int] = []
        parts = text.split(EOT)
        stoi = self._stoi
        offset = 0
        for k, part in enumerate(parts):
            if k:
                ids.append(self.eot_id)
                offset += len(EOT)
            try:
                ids.extend([stoi[c] for c in part])
            except KeyError:
                pos = next(i for i, c in enumerate(part) if c not in stoi)
                c = part[pos]
                raise ValueError(
                    f"character {c!r} (U+{ord(c):04X}) at position {offset + pos} is not in the "
                    f"CharTokenizer vocabulary ({len(self.chars)} characters); train the tokenizer on "
                    "text that contains it, or use BPETokenizer, which can encode any text"
                ) from None
            offset += len(part)
        if add_eot:
            ids.append(self.eot_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        itos = self._itos
        out: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(itos):
                raise ValueError(f"token id {i} is out of range for a vocabulary of {len(itos)}")
            if i == 0 and skip_special:
                continue
            out.append(itos[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "eot": EOT, "chars": self.chars}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        return cls(data["chars"])


# --------------------------------------------------------------------------------------------
# Byte-level BPE
# --------------------------------------------------------------------------------------------


class BPETokenizer(Tokenizer):
    """Byte-level BPE (the GPT-2 scheme) trained with Hugging Face ``tokenizers``.

    Text is split GPT-2 style (words, numbers, punctuation, whitespace runs), each piece is
    mapped to bytes, and learnt merges join frequent byte pairs. Because the 256 single bytes
    are all in the vocabulary, nothing is ever unknown. A single token may hold part of a
    multi-byte UTF-8 character (common for Chinese and emoji), so decode whole sequences, not
    token by token, when you need valid text.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any):
        self._tok = hf_tokenizer
        eot = hf_tokenizer.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"the Hugging Face tokenizer has no {EOT} special token")
        self._eot_id = int(eot)

    @classmethod
    def train(
        cls, texts: Iterable[str] | str, vocab_size: int, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges from `texts` until the vocabulary has `vocab_size` entries.

        `vocab_size` counts the 256 byte symbols and the EOT special, so it must be >= 257.
        The result may be smaller when the corpus has fewer pairs occurring `min_frequency`
        times; read `vocab_size` from the trained tokenizer, not from the request. Training is
        deterministic: the same texts give the same merges and ids.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = 256 + 1
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"BPETokenizer vocab_size={vocab_size!r} is too small: byte-level BPE needs the 256 "
                f"byte symbols plus 1 special token ({EOT}), so use vocab_size >= {minimum} "
                "(values like 1024-8192 suit a small corpus)"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
        if isinstance(texts, str):
            texts = [texts]
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_strings(texts), trainer=trainer)
        return cls(tok)

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (for inspection: ``.get_vocab()``, offsets...)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str, add_eot: bool = False) -> list[int]:
        ids = list(self._tok.encode(text).ids)
        if add_eot:
            ids.append(self._eot_id)
        return ids

    def encode_batch(self, texts: Iterable[str], add_eot: bool = False) -> list[list[int]]:
        """Encode many texts with the Rust tokenizer's thread pool (much faster than a loop)."""
        out = [list(e.ids) for e in self._tok.encode_batch(list(texts))]
        if add_eot:
            for ids in out:
                ids.append(self._eot_id)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {n}")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "eot": EOT,
            "hf_tokenizer": json.loads(self._tok.to_str()),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(data["hf_tokenizer"])))


# --------------------------------------------------------------------------------------------
# Loading and file helpers
# --------------------------------------------------------------------------------------------

_KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "bpe": BPETokenizer}


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer JSON file written by `Tokenizer.save` and return the right class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON ({e}); is it truncated?") from e
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"tokenizer file {path} has no 'kind' field; it was not written by lmkit")
    kind = data["kind"]
    if kind not in _KINDS:
        raise ValueError(f"tokenizer file {path} has unknown kind {kind!r}; known kinds: {sorted(_KINDS)}")
    version = data.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"tokenizer file {path} has format_version {version}, newer than this lmkit "
            f"supports ({FORMAT_VERSION}); upgrade lmkit"
        )
    return _KINDS[kind].from_dict(data)


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"expected strings to train on, got {type(t).__name__}")
        yield t


def _dumps(data: dict[str, Any]) -> str:
    # Human-readable (Chinese characters stay characters); lone surrogates cannot be written
    # as UTF-8, so fall back to \u escapes for such (rare) vocabularies.
    text = json.dumps(data, ensure_ascii=False, indent=1)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(data, ensure_ascii=True, indent=1)
    return text
