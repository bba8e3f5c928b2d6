"""Every tensor either engine hands to a collective lives on the engine's device (issue 9, item 3).

NCCL rejects CPU tensors, gloo accepts them, so a CPU-only test suite cannot see the mistake by
running. `lmkit.parallel.instrument.DeviceAudit` makes it visible: it sees every tensor at the
``c10d`` operators (the `CommCounter`'s ``BackendSelect`` kernels) and knows which of them lmkit
created without ``device=`` (those stay on the CPU on a GPU run too). Every layout of the
loss-compare matrices of both engines is built, trained two steps, evaluated, saved and resumed
under the audit; the old ``mean_over_dp`` (a CPU tensor all-reduced) is shown to be caught.
"""

from __future__ import annotations

import dataclasses
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_native import LAYOUTS as NATIVE_LAYOUTS  # tests/ is on sys.path (pytest)
from test_parallel_equivalence import LAYOUTS, MODEL, TEXT, TRAIN, ZERO2_LAYOUTS

import lmkit
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.lab.layouts import layout_name
from lmkit.parallel.instrument import DeviceAudit
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import init_topology, single_process_topology
from lmkit.run import prepare_run
from lmkit.train import Trainer

pytestmark = pytest.mark.distributed


def old_mean_over_dp(self, value: float) -> float:
    """``ParallelEngine.mean_over_dp`` before issue 9: the tensor is created on the CPU."""
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=self.topo.dp_group)
    return float(t) / self.pcfg.dp


def _audit_worker(model: dict, train: dict, layouts: list[dict], cache_dir: str,
                  out: str) -> list[dict[str, Any]]:
    """Every layout of one world size in turn: build, 2 steps, eval, save, resume, all audited."""
    results = []
    for index, layout in enumerate(layouts):
        pc, tc = ParallelConfig(**layout), TrainConfig(**train)
        tc.out_dir = str(Path(out) / str(index))
        topo = init_topology(pc, tc.device)
        run = prepare_run(ModelConfig(**model), tc, text=TEXT, cache_dir=Path(cache_dir))
        with DeviceAudit(topo.device) as audit:
            trainer = Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                              tokenizer=run.tokenizer, parallel=pc, topology=topo)
            for _ in range(2):
                trainer.train_step()
            trainer.evaluate(1)
            path = trainer.save()
            trainer.resume(path)
        entry = {"name": layout_name(pc), "engine": pc.engine, "device": str(topo.device),
                 "kinds": Counter(r["kind"] for r in audit.records),
                 "devices": sorted({r["device"] for r in audit.records}),
                 "violations": audit.violations[:5]}
        if pc.dp > 1 and pc.engine == "lmkit":  # the defect of issue 9, put back: the audit sees it
            trainer.engine.mean_over_dp = types.MethodType(old_mean_over_dp, trainer.engine)
            with DeviceAudit(topo.device, code=(str(Path(lmkit.__file__).parent), __file__)) as old:
                trainer.engine.mean_over_dp(1.0)
            entry["old_mean_over_dp"] = old.violations
        results.append(entry)
        del trainer
    return results


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> list[dict[str, Any]]:
    cache = str(tmp_path_factory.mktemp("cache"))
    by_world: dict[int, list[ParallelConfig]] = {}
    for layout in LAYOUTS + ZERO2_LAYOUTS + NATIVE_LAYOUTS:
        by_world.setdefault(layout.world_size, []).append(layout)
    out = []
    for world, layouts in sorted(by_world.items()):
        per_rank = run_local(world, _audit_worker, to_dict(MODEL), to_dict(TRAIN),
                             [dataclasses.asdict(p) for p in layouts], cache,
                             str(tmp_path_factory.mktemp(f"world{world}")), timeout=600)
        out += [entry for rank in per_rank for entry in rank]
    return out


def test_every_collective_tensor_is_on_the_engine_device(audited):
    assert len(audited) == sum(p.world_size for p in LAYOUTS + ZERO2_LAYOUTS + NATIVE_LAYOUTS)
    for entry in audited:
        where = f"{entry['engine']} {entry['name']}"
        assert entry["kinds"]["all_reduce"] > 0, where  # the audit saw the run's collectives
        assert entry["devices"] == [entry["device"]], where
        assert entry["violations"] == [], (where, entry["violations"])
    pipelines = [e for e in audited if "pp" in e["name"]]
    assert pipelines and all(e["kinds"]["send"] + e["kinds"]["recv"] > 0 for e in pipelines)


def test_the_old_mean_over_dp_is_caught(audited):
    caught = [e["old_mean_over_dp"] for e in audited if "old_mean_over_dp" in e]
    assert len(caught) >= 4  # dp2, zero1, zero2, dp2 x tp2, ...: every rank of each
    for violations in caught:
        assert len(violations) == 1
        assert violations[0]["kind"] == "all_reduce" and violations[0]["placed_by_default"]


def test_the_audit_marks_default_placed_tensors_only():
    """In one process: lmkit-created CPU tensors are marked, ``.to(device)`` clears the mark."""
    from lmkit.parallel import engine as engine_module

    with DeviceAudit("cpu") as audit:
        made_here = torch.zeros(2)  # a test file is not lmkit: torch's or the user's business
        # code of lmkit itself: evaluated with an lmkit file name, as if written there
        scope = {"torch": torch}
        exec(compile("a = torch.zeros(2)\nb = a * 2\nc = torch.ones(2).to('cpu')\n"
                     "d = torch.zeros(2, device='cpu')",
                     engine_module.__file__, "exec"), scope)
        marks = {k: audit.is_marked(scope[k]) for k in "abcd"}
    assert not audit.is_marked(made_here)
    assert marks == {"a": True, "b": True, "c": False, "d": False}
    assert single_process_topology().device == torch.device("cpu")
