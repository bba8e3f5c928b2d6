"""The ``lmkit-calculator`` directive: chapter 5's layout calculator, running lmkit/costs/ in Pyodide.

A notebook's markdown cell writes::

    ```{lmkit-calculator}
    ```

and the page gets the form below (inputs and outputs with stable ``calc-*`` ids, which the site
test drives) plus ``lmkit-calculator.mjs``/``.css``, added to that page only. The script loads the
Pyodide runtime and the modules of ``lmkit/costs/`` that ``book/tools/assets.py`` vendored into
``_static/`` and calls ``lmkit.costs.calculate``: the numbers on the page are those the tests check.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util.docutils import SphinxDirective

STATIC = Path(__file__).resolve().parent / "calculator_static"
SCRIPT, STYLE = "lmkit-calculator.mjs", "lmkit-calculator.css"

# (id, label, default, minimum) of the number inputs; ids are the calculate() keys with "-". The
# defaults are Llama 3 8B's (the page fills in the preset's values once Python runs).
MODEL_INPUTS = [("n-layer", "layers", 32, 1), ("d-model", "width d", 4096, 1), ("n-head", "heads", 32, 1),
                ("n-kv-head", "key/value heads (0: as many as heads)", 8, 0),
                ("d-ff", "MLP width d_ff (0: the default)", 14336, 0),
                ("vocab-size", "vocabulary", 128256, 1), ("seq-len", "sequence length", 8192, 1),
                ("n-experts", "routed experts (0: a dense MLP)", 0, 0),
                ("moe-top-k", "experts per token k", 2, 1),
                ("moe-every", "experts in every k-th block", 1, 1),
                ("moe-d-ff", "expert width (0: the MLP's)", 0, 0),
                ("n-shared-experts", "shared experts", 0, 0)]
# The model's options that are not numbers: the MLP kind, and the network, which sets positions, norm
# and biases together (GPT-2: learned, LayerNorm, biases; Llama: rotary, RMSNorm, none).
MODEL_SELECTS = {
    "mlp": ("MLP", [("plain", "plain (4d, GELU)"), ("swiglu", "SwiGLU (gated)")], "swiglu"),
    "network": ("network", [("gpt2", "GPT-2: learned positions, LayerNorm, biases"),
                            ("llama", "Llama: rotary positions, RMSNorm, no biases")], "llama"),
}
LAYOUT_INPUTS = [("dp", "data parallel dp", 2, 1), ("cp", "context parallel cp", 1, 1),
                 ("tp", "tensor parallel tp", 4, 1), ("pp", "pipeline stages pp", 1, 1)]
BATCH_INPUTS = [("microbatches", "microbatches m", 1, 1), ("virtual-stages", "virtual stages v", 1, 1),
                ("global-batch", "global batch (sequences)", 16, 1)]
SELECTS = {
    # expert parallelism: ep ranks carved out of dp x cp (dividing it and the experts)
    "ep": ("expert parallel ep", [(str(e), str(e)) for e in (1, 2, 4, 8, 16, 32, 64)], "1"),
    "zero": ("ZeRO stage", [("0", "0: replicated"), ("1", "1: optimizer sharded"),
                            ("2", "2: + gradients"), ("3", "3: + parameters")], "1"),
    # flash attention (which the calculator assumes) never stores the scores selective recomputation drops
    "recompute": ("recomputation", [("none", "none"),
                                    ("selective", "selective (no effect with flash attention)"),
                                    ("full", "full")], "none"),
    "schedule": ("pipeline schedule", [("gpipe", "GPipe"), ("1f1b", "1F1B"),
                                       ("interleaved", "interleaved 1F1B"),
                                       ("zb-h1", "ZB-H1 (zero bubble)")], "1f1b"),
    "precision": ("precision", [("mixed", "mixed (bf16 weights + fp32 masters and Adam)"), ("fp32", "fp32")],
                  "mixed"),
    # the gradients' dtype under mixed precision (train.reduce_dtype); shown only when precision is mixed
    "reduce": ("gradients accumulated and reduced in", [("fp32", "fp32 (lmkit's default)"),
                                                        ("bf16", "bf16 (half the bytes)")], "fp32"),
}
OUTPUTS = {  # section -> (data-output key, label)
    "model": [("model", "model"), ("num-params", "parameters"),
              ("active-params", "active parameters (per token)"),
              ("expert-params-per-rank", "expert parameters per rank"),
              ("kv-cache-per-token", "KV cache per token (bf16)"), ("layout", "layout"),
              ("stage", "worst pipeline stage")],
    "memory per rank": [("memory-params", "parameters"), ("memory-grads", "gradients"),
                        ("memory-optimizer", "optimizer state"), ("memory-activations", "activations"),
                        ("memory-total", "total"), ("device-memory", "device memory"), ("fits", "fits")],
    "sent per rank per step": [("communication-dp", "data parallel (gradients over dp x cp)"),
                               ("communication-cp", "context parallel (ring attention)"),
                               ("communication-tp", "tensor parallel"), ("communication-pp", "pipeline"),
                               ("communication-ep", "expert parallel (all-to-all, router counts)"),
                               ("communication-total", "total")],
    "experts": [("all-to-all-per-layer", "all-to-all per MoE layer and microbatch")],
    "pipeline": [("bubble", "bubble (idle fraction)")],
    "notes": [("notes", "notes")],
}


class calculator_node(nodes.General, nodes.Element):  # noqa: N801 - docutils' naming
    """Placeholder for the calculator's markup; rendered by `visit_html`."""


def _number(key: str, label: str, value: float, minimum: float, step: str = "1") -> str:
    return (f'<label for="calc-{key}">{html.escape(label)}</label>'
            f'<input id="calc-{key}" type="number" min="{minimum}" step="{step}" value="{value}" disabled>')


def _select(key: str, label: str, options: list[tuple[str, str]], default: str) -> str:
    opts = "".join(f'<option value="{v}"{" selected" if v == default else ""}>{html.escape(t)}</option>'
                   for v, t in options)
    return (f'<label for="calc-{key}">{html.escape(label)}</label>'
            f'<select id="calc-{key}" disabled>{opts}</select>')


def markup(preset: str) -> str:
    """The calculator's HTML: a form of inputs, a start button (Pyodide loads when the reader asks, not
    with the page), a status line, an error line, the bar and the results."""
    model = "".join(_number(*row) for row in MODEL_INPUTS)
    model += "".join(_select(key, *row) for key, row in MODEL_SELECTS.items())
    model += ('<label for="calc-tie-embeddings">output layer tied to the embedding</label>'
              '<input id="calc-tie-embeddings" type="checkbox" disabled>')
    layout = "".join(_number(*row) for row in LAYOUT_INPUTS) + _select("ep", *SELECTS["ep"])
    layout += _select("zero", *SELECTS["zero"])
    layout += ('<label for="calc-sequence-parallel">sequence parallel</label>'
               '<input id="calc-sequence-parallel" type="checkbox" checked disabled>')
    layout += _select("recompute", *SELECTS["recompute"])
    batch = _select("schedule", *SELECTS["schedule"]) + "".join(_number(*row) for row in BATCH_INPUTS)
    device = (_select("precision", *SELECTS["precision"]) + _select("reduce", *SELECTS["reduce"])
              + _number("device-memory-gb", "device memory (GB)", 80, 1, step="any")
              + _number("imbalance", "all-to-all load imbalance (1: uniform)", 1, 1, step="any"))
    results = "".join(
        f'<tr><th colspan="2">{html.escape(section)}</th></tr>'
        + "".join(f'<tr><td>{html.escape(label)}</td><td id="calc-out-{key}" data-output="{key}"></td></tr>'
                  for key, label in rows)
        for section, rows in OUTPUTS.items())
    return f"""
<div id="lmkit-calculator" class="lmkit-calculator" data-state="idle"
     data-default-preset="{html.escape(preset)}">
  <form id="calc-form" onsubmit="return false">
    <fieldset><legend>model</legend><div class="calc-grid">
      <label for="calc-preset">preset</label>
      <select id="calc-preset" disabled><option>loading</option></select>
      {model}
    </div></fieldset>
    <fieldset><legend>layout</legend><div class="calc-grid">{layout}</div></fieldset>
    <fieldset><legend>pipeline and batch</legend><div class="calc-grid">{batch}</div></fieldset>
    <fieldset><legend>device</legend><div class="calc-grid">{device}</div></fieldset>
  </form>
  <p class="lmkit-calculator-start"><button id="calc-start" type="button">Start the calculator</button></p>
  <p id="calc-status" class="lmkit-calculator-status">It runs lmkit.costs in Python inside this page:
  starting it downloads Pyodide, Python for the browser, once; the page loads nothing of it before.</p>
  <p id="calc-error" class="lmkit-calculator-error" role="alert" hidden></p>
  <div id="calc-results">
    <svg id="calc-bar" viewBox="0 0 640 90" role="img" aria-label="memory per rank"></svg>
    <table class="lmkit-calculator-table">{results}</table>
  </div>
</div>
"""


class CalculatorDirective(SphinxDirective):
    has_content = False
    option_spec = {"preset": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        node = calculator_node()
        node["preset"] = self.options.get("preset", "llama3-8b")
        return [node]


def visit_html(self, node: calculator_node) -> None:
    self.body.append(markup(node["preset"]))
    raise nodes.SkipNode


def skip(self, node: calculator_node) -> None:
    raise nodes.SkipNode


def _add_static(app: Sphinx, config: Config) -> None:
    config.html_static_path = [*config.html_static_path, str(STATIC)]


def _page_assets(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if doctree is not None and next(iter(doctree.findall(calculator_node)), None) is not None:
        app.add_css_file(STYLE)
        app.add_js_file(SCRIPT, type="module")


def _version() -> int:
    """Changes with this file and its static files, so that Sphinx re-renders the pages using it."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in sorted(STATIC.iterdir()):
        digest.update(path.read_bytes())
    return int(digest.hexdigest()[:12], 16)


def setup(app: Sphinx) -> dict:
    app.add_node(calculator_node, html=(visit_html, None), latex=(skip, None), text=(skip, None),
                 man=(skip, None), texinfo=(skip, None))
    app.add_directive("lmkit-calculator", CalculatorDirective)
    app.connect("config-inited", _add_static)
    app.connect("html-page-context", _page_assets)
    return {"version": "1.0", "env_version": _version(), "parallel_read_safe": True,
            "parallel_write_safe": True}
