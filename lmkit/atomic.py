"""Atomic file writes: a reader, or a crash, sees the old file or the complete new one.

Every file lmkit writes for later use (tokenizers, token caches, checkpoint pointers, recorded
figures, downloaded corpora) goes through `write_bytes` / `write_text`: the data is written to a
temp file in the same directory, fsynced, then renamed over the target with ``os.replace``,
which is atomic when both names are on one filesystem (POSIX and Windows).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_bytes", "write_text"]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace `path` with `data` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace `path` with UTF-8 `text`."""
    return write_bytes(path, text.encode("utf-8"))
