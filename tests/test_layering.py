"""The direction of the code: the engine never reaches up into the trainer, the CLI or the experiments.

``lmkit.parallel`` is wrapped by `lmkit.train`, which is driven by `lmkit.cli` and
`lmkit.experiments`; an import the other way round would make the engine depend on its users
(and, between train and cli, create a cycle). Checked on the source with `ast`, so an import
hidden inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmkit"
ABOVE_THE_ENGINE = ("lmkit.train", "lmkit.cli", "lmkit.experiments")


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Every module `path` imports, at any depth (``from lmkit import train`` -> ``lmkit.train``).

    `root` is the directory holding the package, to resolve relative imports.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package of `path`
                base = ".".join(path.relative_to(root).with_suffix("").parts[:-node.level])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _hits(path: Path, forbidden: tuple[str, ...], root: Path = PACKAGE.parent) -> list[str]:
    return sorted(m for m in imported_modules(path, root) for f in forbidden
                  if m == f or m.startswith(f + "."))


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    fake = tmp_path / "lmkit" / "parallel" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from lmkit import train\n    from ..cli import main\n"
                    "    import lmkit.experiments as e\n")
    found = imported_modules(fake, root=tmp_path)
    assert {"lmkit.train", "lmkit.cli", "lmkit.experiments"} <= found
    expected = ["lmkit.cli", "lmkit.cli.main", "lmkit.experiments", "lmkit.train"]
    assert _hits(fake, ABOVE_THE_ENGINE, root=tmp_path) == expected


@pytest.mark.parametrize("module", sorted((PACKAGE / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_never_imports_the_trainer_cli_or_experiments(module: Path):
    hits = _hits(module, ABOVE_THE_ENGINE)
    assert not hits, f"lmkit/parallel/{module.name} imports {hits}: the engine must not depend on its users"


def test_train_does_not_import_the_cli_or_the_experiments():
    """cli drives train (one direction only): no cycle, and one entry point (``python -m lmkit``)."""
    assert not _hits(PACKAGE / "train.py", ("lmkit.cli", "lmkit.experiments", "lmkit.__main__"))
    assert not _hits(PACKAGE / "experiments.py", ("lmkit.cli", "lmkit.__main__"))


def test_one_entry_point_python_m_lmkit():
    result = subprocess.run([sys.executable, "-m", "lmkit", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--dp" in result.stdout
    old = subprocess.run([sys.executable, "-m", "lmkit.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert old.returncode == 0 and old.stdout == ""  # importing the trainer runs nothing
