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
ABOVE_THE_ENGINE = ("lmkit.train", "lmkit.cli", "lmkit.lab")


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
                    "    import lmkit.lab.experiments as e\n")
    found = imported_modules(fake, root=tmp_path)
    assert {"lmkit.train", "lmkit.cli", "lmkit.lab.experiments"} <= found
    expected = ["lmkit.cli", "lmkit.cli.main", "lmkit.lab.experiments", "lmkit.train"]
    assert _hits(fake, ABOVE_THE_ENGINE, root=tmp_path) == expected


@pytest.mark.parametrize("module", sorted((PACKAGE / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_never_imports_the_trainer_cli_or_experiments(module: Path):
    hits = _hits(module, ABOVE_THE_ENGINE)
    assert not hits, f"lmkit/parallel/{module.name} imports {hits}: the engine must not depend on its users"


def test_train_does_not_import_the_cli_or_the_experiments():
    """cli drives train (one direction only): no cycle, and one entry point (``python -m lmkit``)."""
    assert not _hits(PACKAGE / "train.py", ("lmkit.cli", "lmkit.lab", "lmkit.__main__"))
    assert not _hits(PACKAGE / "lab" / "experiments.py", ("lmkit.cli", "lmkit.__main__"))


def test_one_entry_point_python_m_lmkit():
    result = subprocess.run([sys.executable, "-m", "lmkit", "train", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--dp" in result.stdout
    old = subprocess.run([sys.executable, "-m", "lmkit.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert old.returncode == 0 and old.stdout == ""  # importing the trainer runs nothing


# --------------------------------------------------------------------------- imports in sight, no cycle

MODULES = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _module_of(name: str, modules: set[str]) -> str | None:
    """`name` (``lmkit.parallel.plan`` or ``lmkit.parallel.plan.Row``) as a module of `modules`."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = PACKAGE.parent, package: str = "lmkit") -> dict[str, set[str]]:
    """``{module: modules of the package it imports when it is imported}``: module-level imports
    only (those in functions run later), ``if TYPE_CHECKING:`` blocks left out."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        found: set[str] = set()
        todo = list(ast.parse(path.read_text(encoding="utf-8")).body)
        while todo:
            node = todo.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                todo += node.orelse
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                todo += [n for f in ("body", "orelse", "finalbody", "handlers") for n in getattr(node, f, [])]
            elif isinstance(node, ast.ExceptHandler):
                todo += node.body
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in (_module_of(n, set(paths)) for n in found) if m and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of `graph`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_the_cycle_finder_finds_a_cycle_and_ignores_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("import pkg.c\n\ndef f():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.c"}  # the import inside f does not count
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    from pkg import a\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_no_import_cycle_in_lmkit():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("module", sorted((PACKAGE / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_parallel_imports_lmkit_at_the_top(module: Path):
    """The direction of the code is visible at the top of every file of lmkit/parallel."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    hidden = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
              if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
              and any(m.startswith("lmkit") for m in ([a.name for a in n.names] if isinstance(n, ast.Import)
                                                     else [n.module or ""]))]
    assert not hidden, f"lmkit/parallel/{module.name} imports lmkit inside a function or class: {hidden}"


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
