"""Key figures of a notebook run, recorded for regression tests.

A notebook calls ``record(perplexity_n3=111.5, ...)``. When the environment variable
``LMKIT_FIGURES`` names a JSON file (the papermill runner in ``book/tools/execute.py`` sets it
next to the executed notebook), the figures are merged into that file atomically; the test
suite compares them with committed reference values, so a change that worsens a result fails
by name. Without the variable (a reader in JupyterLab) recording is a no-op.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lmkit import atomic

__all__ = ["record", "FIGURES_ENV"]

FIGURES_ENV = "LMKIT_FIGURES"


def record(**figures: float) -> dict[str, float]:
    """Record named numeric figures; returns them as floats."""
    clean: dict[str, float] = {}
    for name, value in figures.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"figure {name!r} is {value}; only finite numbers can be recorded")
        clean[name] = value
    target = os.environ.get(FIGURES_ENV)
    if target:
        path = Path(target)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(clean)
        atomic.write_text(path, json.dumps(merged, indent=2, sort_keys=True))
    return clean
