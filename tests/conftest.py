"""Shared test set-up: the offline data directory and the book tools on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never touch the network: tinyshakespeare comes from ../shared/data (see its README).
if "LMKIT_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["LMKIT_DATA"] = str(SHARED_DATA)

sys.path.insert(0, str(ROOT / "book" / "tools"))
