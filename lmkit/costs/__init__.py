"""What a training layout costs, on paper: parameters, FLOPs, memory, communication, bubble, step time.

An analytical model of lmkit's GPT, every option of its network included (grouped-query attention,
SwiGLU, untied head, rotary positions, RMSNorm, QK-norm, experts), under a ``dp x cp x tp x pp``
layout (experts: ``ep`` inside ``dp x cp``), in
pure Python (no module of this package imports torch), so that the same files run in the tests, in
``lmkit estimate``, in the trainer's MFU and in the browser (chapter 5's calculator loads this folder
into Pyodide).
Chapter 5 derives every formula; the tests check them against the engines' measured bytes and
memory (``tests/test_costs_engine.py``) and against published figures (``tests/test_costs.py``).
Units: bytes, FLOPs, seconds; "GB" is 1e9.

- `model`: the model: its shape and options, presets, parameter tensors and counts, FLOPs, peak
  FLOP/s, the KV cache;
- `layout`: a layout's rules, the precision's bytes per element, what each pipeline stage holds and
  the gradient buckets the engine cuts it into;
- `experts`: what a rank holds and sends of the experts: its experts, their buckets, the all-to-all
  bytes, their activations;
- `context`: context parallelism's ring attention: work, memory and step timing per rank;
- `per_rank`: what one rank holds: memory (model states and activations);
- `collectives`: what one rank sends: every collective of a step, with its bytes on the wire;
- `bubble`: how long a pipeline schedule leaves every rank idle in a step;
- `search`: devices, the estimated step time and the ranking of every layout that fits;
- `calculator`: `calculate`, the calculator's JSON-in, JSON-out entry point;
- `report`: ``lmkit estimate``'s rows and printed table.

The cost model is one namespace: chapter 5, ``lmkit estimate`` and the calculator call
``costs.memory(...)``, ``costs.search(...)``, ``costs.calculate(...)``, so the names below are this
package's interface, each defined in the module above that holds it.
"""

from lmkit.costs.bubble import bubble_fraction, bubble_time
from lmkit.costs.calculator import SELECTIVE_UNDER_FLASH, calculate, format_bytes
from lmkit.costs.collectives import CommTerm, communication, cp_communication, wire_bytes
from lmkit.costs.context import (
    CP_LAYOUTS,
    RING_BACKWARD_COMPUTE,
    cp_attention_memory,
    cp_attention_work,
    cp_ring_step,
)
from lmkit.costs.experts import (
    all_to_all_bytes,
    expert_buckets,
    expert_states,
    moe_activation_bytes,
    stage_experts,
)
from lmkit.costs.layout import (
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTE,
    REDUCE_DTYPES,
    SCHEDULES,
    Layout,
    layer_split,
    muon_params,
    muon_tensors,
    stage_frozen,
    stage_params,
    state_bytes,
    zero_buckets,
)
from lmkit.costs.model import (
    GB,
    MLP_CHOICES,
    NORM_CHOICES,
    PEAK_FLOPS,
    POS_CHOICES,
    PRESETS,
    CostError,
    Model,
    Param,
    active_params,
    flops_per_token,
    inactive_params,
    kv_cache_bytes,
    lookup_peak_flops,
    mfu,
    num_params,
    parameter_table,
    swiglu_width,
    tp_choices,
)
from lmkit.costs.per_rank import (
    Memory,
    activation_bytes_per_layer,
    in_flight,
    memory,
    model_activation_options,
    model_states,
)
from lmkit.costs.report import estimate_lines, estimate_rows, routed_tokens
from lmkit.costs.search import DEVICES, Candidate, Cluster, search, step_time

__all__ = [
    "GB", "SCHEDULES", "RECOMPUTE", "PRECISIONS", "PEAK_FLOPS", "lookup_peak_flops",
    "MLP_CHOICES", "POS_CHOICES", "NORM_CHOICES", "swiglu_width", "tp_choices",
    "CostError", "Model", "PRESETS", "Layout", "Cluster", "DEVICES", "Memory", "CommTerm", "Candidate",
    "layer_split", "Param", "parameter_table", "stage_params", "num_params", "flops_per_token", "mfu",
    "kv_cache_bytes", "model_states", "zero_buckets", "muon_params", "muon_tensors", "OPTIMIZERS",
    "activation_bytes_per_layer", "model_activation_options", "in_flight", "memory", "communication",
    "wire_bytes", "bubble_fraction", "bubble_time",
    "step_time", "search", "calculate", "format_bytes", "REDUCE_DTYPES", "state_bytes",
    "SELECTIVE_UNDER_FLASH",
    "CP_LAYOUTS", "RING_BACKWARD_COMPUTE", "cp_attention_work", "cp_attention_memory", "cp_communication",
    "cp_ring_step",
    "active_params", "inactive_params", "stage_frozen", "stage_experts", "expert_buckets", "expert_states",
    "all_to_all_bytes",
    "moe_activation_bytes", "estimate_rows", "estimate_lines", "routed_tokens",
]
