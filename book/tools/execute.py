"""Execute one chapter notebook with papermill and record its key figures.

Used by `make book` (full parameters, output in ``book/chapters/``, rendered by Jupyter Book
without executing again) and by ``tests/test_notebooks.py`` (``SMOKE=True``), so the book and
the tests run notebooks the same way.

    python book/tools/execute.py notebooks/01_concepts.ipynb book/chapters/01_concepts.ipynb [--smoke]

The executed notebook is written to a temporary file and renamed into place only when every
cell succeeded, so a failed run never leaves a half-executed chapter for the site (the failed
copy is kept as ``<name>.failed.ipynb`` for inspection). The figures a notebook passes to
``lmkit.lab.report.record`` land in ``<name>.figures.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KERNEL = "lmkit"


@dataclass
class Execution:
    notebook: Path
    figures: dict[str, float]
    seconds: float


def figures_path(executed: Path) -> Path:
    return executed.with_suffix(".figures.json")


def _kernel_name() -> str:
    """The project's kernel when registered (``make setup``), else this interpreter's default."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


def execute_notebook(source: Path, target: Path, *, smoke: bool = False,
                     parameters: dict | None = None, timeout: int = 1800) -> Execution:
    """Run `source` top to bottom into `target`; raise papermill's error if a cell fails."""
    import papermill

    source, target = Path(source).resolve(), Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    params = dict(parameters or {})
    if smoke:
        params["SMOKE"] = True
    figures = figures_path(target)
    figures.unlink(missing_ok=True)
    partial = target.with_name(f".{target.stem}.partial.ipynb")
    failed = target.with_name(f"{target.stem}.failed.ipynb")
    old_env = os.environ.get("LMKIT_FIGURES")
    os.environ["LMKIT_FIGURES"] = str(figures)  # inherited by the kernel process
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source), str(partial), parameters=params, kernel_name=_kernel_name(),
            cwd=str(source.parent), execution_timeout=timeout, progress_bar=False,
        )
    except BaseException:
        if partial.exists():
            os.replace(partial, failed)
        raise
    finally:
        if old_env is None:
            os.environ.pop("LMKIT_FIGURES", None)
        else:
            os.environ["LMKIT_FIGURES"] = old_env
    seconds = time.perf_counter() - start
    os.replace(partial, target)
    failed.unlink(missing_ok=True)
    values = json.loads(figures.read_text()) if figures.is_file() else {}
    return Execution(target, values, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--smoke", action="store_true", help="run with SMOKE=True (quick, as CI does)")
    args = parser.parse_args(argv)
    result = execute_notebook(args.source, args.target, smoke=args.smoke)
    print(f"{args.source} -> {args.target} in {result.seconds:.1f} s; figures: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.figures.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
