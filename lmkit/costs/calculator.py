"""The calculator's one entry point: `calculate`, JSON in and JSON out (chapter 5).

The in-page calculator of chapter 5 runs this package in the reader's browser (Pyodide) and calls
`calculate` and `format_bytes`; the tests call them alike, so the page shows what the tests check.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmkit.costs.bubble import bubble_fraction
from lmkit.costs.collectives import communication
from lmkit.costs.experts import all_to_all_bytes
from lmkit.costs.layout import Layout
from lmkit.costs.model import GB, PRESETS, CostError, Model, active_params, kv_cache_bytes, num_params
from lmkit.costs.per_rank import memory

__all__ = ["calculate", "format_bytes", "model_of", "SELECTIVE_UNDER_FLASH"]

#: What the calculator and ``lmkit estimate`` say of selective recomputation: it drops the ``a s^2``
#: score matrix, which flash attention (assumed by both) never stores, so it saves nothing.
SELECTIVE_UNDER_FLASH = ("selective recomputation: no effect with flash attention (it recomputes the "
                         "attention scores, which flash attention never stores)")


def format_bytes(n: float) -> str:
    """Bytes in decimal units, 3 significant digits: ``1.23 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(float(f"{n:.3g}")) >= size:  # round first: 999.7 MB is "1 GB", not "1e+03 MB"
            return f"{float(f'{n / size:.3g}'):g} {unit}"
    return f"{n:.0f} B"


_LAYOUT_FIELDS = {f.name: f.type for f in dataclasses.fields(Layout)}
_MODEL_FIELDS = {f.name: f.type for f in dataclasses.fields(Model)}  # "int", "bool", "str"


def model_of(spec: dict[str, Any]) -> Model:
    """A `Model` from JSON fields (numbers may arrive as floats or strings from a form); the fields
    left out take GPT-2's values, e.g. ``{"n_layer": 32, ..., "n_kv_head": 8, "mlp": "swiglu"}``."""
    unknown = sorted(set(spec) - set(_MODEL_FIELDS))
    if unknown:
        raise CostError(f"unknown model field(s) {unknown}; use {', '.join(_MODEL_FIELDS)}")
    convert = {"int": int, "bool": bool, "str": str}
    return Model(**{k: convert[_MODEL_FIELDS[k]](v) for k, v in spec.items()}).validate()


def calculate(inputs: dict[str, Any]) -> dict[str, Any]:
    """The calculator's one entry point (JSON in, JSON out): the page and the tests call it alike.

    `inputs`: ``preset`` (a key of `PRESETS`) or ``model`` (the fields of `Model`: the shape and the
    options, ``n_kv_head``, ``mlp``, ``d_ff``, ``tie_embeddings``, the experts' ``n_experts`` ...;
    `model_of`), the fields of `Layout` (``cp`` and ``ep`` included), ``global_batch``,
    ``precision``, ``reduce`` (the gradients' dtype under mixed precision: ``"fp32"``, the default,
    or ``"bf16"``), ``imbalance`` (the all-to-alls' load-imbalance factor, default 1) and
    ``device_memory_gb``. Returns memory per rank of the worst stage (bytes), whether it fits, bytes
    each rank sends per step by group (``dp``: the gradients' dp x cp group and the experts'
    dp x cp / ep; ``cp``: ring attention's K/V and dK/dV blocks; ``ep``: the experts' all-to-alls and
    the router's counts; ``total``), the bubble, the parameter count, the active parameters (what a
    token uses: all of a dense model's), the expert parameters one rank holds, the bytes a rank sends
    in the all-to-alls of one MoE layer and microbatch (`all_to_all_bytes`; 0 without experts or
    with ep = 1), the KV cache of one token of one sequence in
    bf16 (`kv_cache_bytes`: what decoding keeps) and ``notes`` (one line, "" when there is nothing to
    say: e.g. that selective recomputation has no effect with flash attention, which the calculator
    assumes); or ``{"error": "<one line>"}``.
    """
    try:
        if inputs.get("preset"):
            if inputs["preset"] not in PRESETS:
                raise CostError(f"unknown preset {inputs['preset']!r}; use one of {', '.join(PRESETS)}")
            model = PRESETS[inputs["preset"]]
        else:
            model = model_of(inputs.get("model") or {})
        values = {k: inputs[k] for k in _LAYOUT_FIELDS if k in inputs}
        for k in ("dp", "tp", "pp", "cp", "ep", "zero", "microbatches", "virtual_stages"):
            if k in values:
                values[k] = int(values[k])
        if "sequence_parallel" in values:
            values["sequence_parallel"] = bool(values["sequence_parallel"])
        layout = Layout(**values)
        global_batch = int(inputs.get("global_batch", layout.dp * layout.microbatches))
        precision = inputs.get("precision", "mixed")
        reduce = inputs.get("reduce", "fp32")
        device_gb = float(inputs.get("device_memory_gb", 80))
        imbalance = float(inputs.get("imbalance", 1.0))
        mem = memory(model, layout, global_batch, precision, reduce=reduce)
        sent: dict[str, float] = {"dp": 0.0, "tp": 0.0, "pp": 0.0, "cp": 0.0, "ep": 0.0}
        group = {"embedding": "pp", "edp": "dp", "router": "ep"}
        for term in communication(model, layout, global_batch, precision, mem.stage, reduce=reduce,
                                  imbalance=imbalance):
            sent[group.get(term.group, term.group)] += term.wire_bytes
        sent["total"] = sent["dp"] + sent["tp"] + sent["pp"] + sent["cp"] + sent["ep"]
        bubble = bubble_fraction(layout.pp, layout.microbatches, layout.virtual_stages, layout.schedule)
        a2a = 0.0
        if model.n_experts:
            tokens = global_batch // (layout.dp * layout.microbatches) * model.seq_len // layout.cp
            tokens //= layout.tp if layout.sequence_parallel else 1
            a2a = all_to_all_bytes(model, layout, tokens, imbalance, 4 if precision == "fp32" else 2)["total"]
        return {"model": model.name or "custom", "num_params": num_params(model),
                "active_params": active_params(model), "expert_params_per_rank": mem.expert_numel,
                "all_to_all_per_layer": a2a,
                "kv_cache_per_token": kv_cache_bytes(model, length=1), "layout": layout.name,
                "stage": mem.stage, "memory": mem.as_dict(), "device_memory": device_gb * GB,
                "fits": mem.total <= device_gb * GB, "communication": sent, "bubble": bubble,
                "notes": SELECTIVE_UNDER_FLASH if layout.recompute == "selective" else "", "error": None}
    except (CostError, TypeError, ValueError) as e:
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
