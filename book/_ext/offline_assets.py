"""Serve the vendored MathJax, mermaid and Pyodide (with ``lmkit/costs/``) with the site.

``book/tools/assets.py`` copies MathJax (from the ``jupyter-server-mathjax`` package), mermaid and
Pyodide (from the npm registry's ``mermaid`` and ``pyodide`` packages) and ``lmkit/costs/`` into
``book/_vendor/``. This extension adds that folder
to ``html_static_path`` so that Sphinx copies it to ``_build/html/_static/``.

Why not simply ``book/_static/``? Jupyter Book adds every ``*.js`` and ``*.css`` file found under the
static paths it knows about to *every* page, which would put hundreds of MathJax modules on each
page. A path appended here, after Jupyter Book has computed its configuration, is copied but not
injected: MathJax is loaded by ``mathjax_path`` and mermaid by ``mermaid_use_local`` only on the
pages that need them.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)

VENDOR = "_vendor"
REQUIRED = ("mathjax/MathJax.js", "mermaid/mermaid.esm.min.mjs", "pyodide/pyodide.mjs",
            "lmkit/costs/__init__.py", "lmkit/costs/files.json")


def _add_vendor(app: Sphinx, config: Config) -> None:
    vendor = Path(app.srcdir) / VENDOR
    missing = [name for name in REQUIRED if not (vendor / name).is_file()]
    if missing:
        logger.warning(
            "offline assets missing in %s: %s; run `python book/tools/assets.py` first",
            vendor, ", ".join(missing),
        )
    if vendor.is_dir():
        config.html_static_path = [*config.html_static_path, str(vendor)]


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _add_vendor)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
