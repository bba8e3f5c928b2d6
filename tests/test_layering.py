"""The direction of the code, and folders that show it.

``lmkit/`` is the system a user runs (config, tokenizer, data, model, optim, run, train, checkpoint/,
generate, hf, costs/, cli, ...) with its engine, ``lmkit/parallel/``; beside it ``baselines/``, the
models the book compares the GPT with, and ``tasks/``, what a trained model is used for; on top
``lab/``, the harnesses that run and measure, and the command line. The rules:

- the engine never reaches up: nothing in ``parallel/`` imports the set-up (`lmkit.run`), the
  trainer, the command line (`lmkit.cli`, `lmkit.options`) or the lab; the checkpoints, which the
  engine cuts its state into, import neither the engine nor what is above it;
- the model knows nothing of ranks: `lmkit.model` and `lmkit.weights` import no ``lmkit.parallel``
  and no ``torch.distributed``;
- ``baselines/`` and ``tasks/`` build on the system and never import ``parallel/`` or ``lab/``;
- nothing outside ``lab/`` and `lmkit.cli` imports ``lab/``;
- the system reaches into ``baselines/`` in one place only, `lmkit.model.build_model`, which builds
  the LSTM inside the function (the LSTM builds on the model's input checks: a top-level import
  would be a cycle), and never into ``tasks/``;
- `lmkit.costs` imports no torch (the calculator of chapter 5 runs it in the browser);
- no import cycle; ``lmkit/parallel`` imports lmkit at the top of each file;
- every module of lmkit has at most 600 lines, and each subpackage's docstring names its modules.

Checked on the source with `ast`, so an import hidden inside a function counts too (except where
a rule says "at import time").
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmkit"
ABOVE_THE_ENGINE = ("lmkit.run", "lmkit.train", "lmkit.cli", "lmkit.options", "lmkit.lab")
SUBPACKAGES = ("baselines", "checkpoint", "costs", "lab", "parallel", "tasks")


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).glob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


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


@pytest.mark.parametrize("module", _files("parallel"), ids=_rel)
def test_parallel_never_imports_the_setup_trainer_cli_or_lab(module: Path):
    hits = _hits(module, ABOVE_THE_ENGINE)
    assert not hits, f"{_rel(module)} imports {hits}: the engine must not depend on its users"


@pytest.mark.parametrize("module", _files("checkpoint"), ids=_rel)
def test_checkpoints_import_neither_the_engine_nor_what_is_above_it(module: Path):
    hits = _hits(module, ("lmkit.parallel", *ABOVE_THE_ENGINE))
    assert not hits, f"{_rel(module)} imports {hits}: the engines import the checkpoints, not the reverse"


@pytest.mark.parametrize("name", ["model.py", "weights.py"])
def test_the_model_knows_nothing_of_ranks(name: str):
    hits = _hits(PACKAGE / name, ("lmkit.parallel", "torch.distributed"))
    assert not hits, f"lmkit/{name} imports {hits}: the engine wraps an unmodified model"


@pytest.mark.parametrize("module", _files("baselines", "tasks"), ids=_rel)
def test_baselines_and_tasks_never_import_the_engine_or_the_lab(module: Path):
    hits = _hits(module, ("lmkit.parallel", "lmkit.lab"))
    assert not hits, f"{_rel(module)} imports {hits}: baselines and tasks build on the system only"


@pytest.mark.parametrize("module", sorted(p for p in PACKAGE.rglob("*.py") if p.parent.name != "lab"
                                          and p.name != "cli.py"), ids=_rel)
def test_nothing_but_the_lab_and_the_cli_imports_the_lab(module: Path):
    hits = _hits(module, ("lmkit.lab",))
    assert not hits, f"{_rel(module)} imports {hits}: the lab sits on top; only lmkit.cli may use it"


@pytest.mark.parametrize("module", sorted(PACKAGE.glob("*.py")), ids=_rel)
def test_the_system_reaches_into_baselines_only_to_build_the_lstm(module: Path):
    tree = ast.parse(module.read_text(encoding="utf-8"))
    allowed = set()
    if module.name == "model.py":  # build_model's late import of the LSTM, and nothing else
        build = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "build_model")
        allowed = {id(n) for n in ast.walk(build) if isinstance(n, ast.ImportFrom)
                   and n.module == "lmkit.baselines.lstm"
                   and [a.name for a in n.names] == ["LSTMLanguageModel"]}
        assert allowed, "build_model no longer builds the LSTM baseline"
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in allowed:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [n for n in names if n.startswith(("lmkit.baselines", "lmkit.tasks"))]
            assert not bad, f"{_rel(module)} line {node.lineno} imports {bad}: the system does not use them"


@pytest.mark.parametrize("module", _files("costs"), ids=_rel)
def test_costs_imports_the_standard_library_only(module: Path):
    """The calculator of chapter 5 runs lmkit.costs in the browser (Pyodide): no torch, no numpy."""
    found = imported_modules(module)
    outside = sorted(m for m in found if m.split(".")[0] not in sys.stdlib_module_names
                     and not m.startswith("lmkit.costs") and m != "__future__"
                     and not m.startswith("__future__."))
    assert not outside, f"{_rel(module)} imports {outside}"


def test_the_setup_and_the_trainer_do_not_import_the_cli_or_the_lab():
    """cli drives train (one direction only): no cycle, and one entry point (``python -m lmkit``)."""
    for name in ("run.py", "train.py"):
        assert not _hits(PACKAGE / name, ("lmkit.cli", "lmkit.options", "lmkit.lab", "lmkit.__main__")), name
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


def test_every_module_has_at_most_600_lines():
    lines = {_rel(p): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > 600}
    assert not long, f"split these by job (one job per module): {long}"


@pytest.mark.parametrize("folder", [f for f in SUBPACKAGES if f != "parallel"])
def test_each_subpackage_says_what_lives_there(folder: str):
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8"))) or ""
    missing = [p.stem for p in _files(folder) if p.stem != "__init__" and f"`{p.stem}`" not in doc]
    assert doc and not missing, f"lmkit/{folder}/__init__.py does not name {missing}"


def test_the_subpackages_are_the_ones_the_docstring_lists():
    found = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert found == sorted(SUBPACKAGES)
