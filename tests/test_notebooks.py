"""Every chapter notebook runs top to bottom with SMOKE=True, fast, and keeps its results.

The notebooks assert their own claims; this test adds the time budget and a regression check
of the key figures each notebook records (``lmkit.lab.report.record``) against
``tests/notebook_references.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from execute import execute_notebook  # book/tools, put on sys.path by conftest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REFERENCES = json.loads((ROOT / "tests" / "notebook_references.json").read_text())
SMOKE_BUDGET_S = 60.0
# The site test renders these executed copies instead of running every notebook a second time.
EXECUTED = ROOT / "build" / "executed"

pytestmark = pytest.mark.notebooks


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no chapter notebooks"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(source: Path):
    result = execute_notebook(source, EXECUTED / source.name, smoke=True, timeout=300)
    print(f"{source.stem}: {result.seconds:.1f} s")
    assert result.seconds < SMOKE_BUDGET_S, (
        f"{source.name} took {result.seconds:.0f} s with SMOKE=True; the budget is {SMOKE_BUDGET_S:.0f} s"
    )
    references = REFERENCES.get(source.stem)
    assert references, f"add reference figures for {source.stem} to tests/notebook_references.json"
    worse, improved = [], []
    for name, ref in references.items():
        assert name in result.figures, f"{source.stem} no longer records the figure {name!r}"
        value, target, tol = result.figures[name], ref["value"], ref["rel_tol"]
        sign = 1.0 if ref["better"] == "lower" else -1.0
        change = sign * (value - target) / abs(target)
        if change > tol:
            worse.append(f"{name}: {value:.6g} vs reference {target:.6g} (worse by {100 * change:.2f} %)")
        elif change < -tol:
            improved.append(f"{name}: {value:.6g} vs {target:.6g}")
    if improved:
        print("better than the reference (tighten tests/notebook_references.json):", improved)
    assert not worse, f"{source.stem} got worse: " + "; ".join(worse)
