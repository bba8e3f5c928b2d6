"""Sharded checkpoints (issue 9, item 5): each rank writes and reads only its own boxes.

dp2 x tp2 with ZeRO-2 trains 3 steps and saves through ``torch.distributed.checkpoint``; tp2 x pp2
resumes it (DCP reshards) and continues the single-process curve to 1e-5; ``lmkit export`` turns it
into today's single directory, which ``lmkit generate`` loads. Measured per rank: the collective
bytes of a save against the full-gather path, and the bytes a resume reads against the old path
(which read and hashed the whole checkpoint on every rank).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_parallel_equivalence import MODEL, TEXT, TRAIN  # tests/ is on sys.path (pytest)
from torch.distributed.checkpoint import FileSystemReader

from lmkit.checkpoint.format import META_FILE, CheckpointError
from lmkit.checkpoint.sharded import SHARDS_DIR, is_sharded, load_sharded_full
from lmkit.checkpoint.single import load_checkpoint, load_model_state
from lmkit.cli import main
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig, to_dict
from lmkit.lab.layouts import layout_losses, max_relative_difference
from lmkit.parallel.instrument import CommCounter, DeviceAudit
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import init_topology
from lmkit.run import prepare_run
from lmkit.train import Trainer

pytestmark = pytest.mark.distributed

SAVE = ParallelConfig(dp=2, tp=2, zero=2)
RESUME = ParallelConfig(tp=2, pp=2, microbatches=2)
STEPS = 3


def _tensor_bytes(values: Any) -> int:
    if torch.is_tensor(values):
        return values.numel() * values.element_size()
    if isinstance(values, dict):
        return sum(_tensor_bytes(v) for v in values.values())
    return 0


def _worker(model: dict, train: dict, layout: dict, cache: str, resume: str | None) -> dict[str, Any]:
    pc, tc = ParallelConfig(**layout), TrainConfig(**train)
    topo = init_topology(pc, tc.device)
    run = prepare_run(ModelConfig(**model), tc, text=TEXT, cache_dir=Path(cache))
    trainer = Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      tokenizer=run.tokenizer, parallel=pc, topology=topo)
    out: dict[str, Any] = {"rank": topo.rank}
    if resume:
        trainer.resume(resume)
        out["resume"] = trainer.last_resume_stats
    out["losses"] = [trainer.train_step()["loss"] for _ in range(STEPS)]
    if resume:
        return out
    pieces, _ = trainer.engine.sharded_state()
    out["written_bytes"] = sum(_tensor_bytes(p.tensor) for p in pieces if p.write)
    with CommCounter() as sharded, DeviceAudit(topo.device) as audit:
        out["checkpoint"] = str(trainer.save())
    with CommCounter() as full, DeviceAudit(topo.device) as full_audit:  # the single-directory path
        weights, optimizer = trainer.engine.full_state_dict(), trainer.engine.full_optimizer_state()
    out["held_full_bytes"] = _tensor_bytes(weights) + _tensor_bytes(optimizer["state"])
    out["comm_sharded"] = sum(v["bytes"] for v in sharded.summary().values())
    out["comm_full"] = sum(v["bytes"] for v in full.summary().values())
    out["float_sharded"] = sum(r["bytes"] for r in audit.records if r["dtype"].startswith("float"))
    out["float_full"] = sum(r["bytes"] for r in full_audit.records if r["dtype"].startswith("float"))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    train = TrainConfig(**{**TRAIN.__dict__, "out_dir": str(tmp_path_factory.mktemp("run"))})
    ref = layout_losses(MODEL, train, None, 2 * STEPS, text=TEXT, cache_dir=cache)
    args = (to_dict(MODEL), to_dict(train))
    saved = run_local(SAVE.world_size, _worker, *args, dataclasses.asdict(SAVE), cache, None)
    resumed = run_local(RESUME.world_size, _worker, *args, dataclasses.asdict(RESUME), cache,
                        saved[0]["checkpoint"])
    return {"ref": ref, "saved": saved, "resumed": resumed, "checkpoint": Path(saved[0]["checkpoint"])}


def test_each_rank_writes_its_own_boxes_and_nothing_is_gathered(runs):
    path = runs["checkpoint"]
    assert is_sharded(path)
    shards = sorted(p.name for p in (path / SHARDS_DIR).glob("*.distcp"))
    assert shards == [f"__{r}_0.distcp" for r in range(SAVE.world_size)]
    # every global tensor is covered exactly once by the saved boxes: no replica written twice
    metadata = FileSystemReader(path / SHARDS_DIR).read_metadata().state_dict_metadata
    n_params = sum(math.prod(md.size) for fqn, md in metadata.items() if fqn.startswith("model."))
    for fqn, md in metadata.items():
        if hasattr(md, "chunks"):
            assert sum(math.prod(c.sizes) for c in md.chunks) == math.prod(md.size), fqn
    assert sum(r["written_bytes"] for r in runs["saved"]) == 3 * 4 * n_params  # weights + 2 moments, fp32
    for r in runs["saved"]:
        # the save exchanges pickled names, hashes and DCP's plans (bytes), never a weight or moment;
        # the full path all-gathers float tensors and holds the whole model and optimizer on every rank
        assert r["float_sharded"] == 0 and r["float_full"] > 0, r
        assert r["written_bytes"] < r["held_full_bytes"] / 2, r
        print(f"save, rank {r['rank']}: writes {r['written_bytes']:,} B of tensors, sends "
              f"{r['comm_sharded']:,} B of plans and hashes; the full-gather path holds "
              f"{r['held_full_bytes']:,} B and its collectives carry {r['comm_full']:,} B "
              f"({r['float_full']:,} B of float tensors in and out)")


def test_another_layout_resumes_on_the_single_process_curve(runs):
    losses = runs["saved"][0]["losses"] + runs["resumed"][0]["losses"]
    assert max_relative_difference(losses, runs["ref"]["losses"]) < 1e-5


def test_a_resume_reads_only_its_share(runs):
    path = runs["checkpoint"]
    meta = json.loads((path / META_FILE).read_text())
    total = sum(f["bytes"] for f in meta["files"].values())
    old_path = 2 * total + meta["files"]["state.pt"]["bytes"] + 3 * 4 * sum(  # 2 hashes + 2 reads
        p.numel() for p in load_sharded_full(path)[0].values()) // 3
    for r in runs["resumed"]:
        read = r["resume"]["bytes_read"] + r["resume"]["bytes_hashed"]
        print(f"resume, rank {r['rank']}: reads {r['resume']['bytes_read']:,} B of tensors and hashes "
              f"{r['resume']['bytes_hashed']:,} B of shard files; the single-directory path read about "
              f"{old_path:,} B on every rank")
        assert 0 < r["resume"]["bytes_read"] < 0.5 * total
        assert read < old_path / 2


def test_export_gives_the_single_directory_that_generate_loads(runs, tmp_path, capsys):
    path, out = runs["checkpoint"], tmp_path / "exported"
    assert main(["export", str(path.parent), str(out)]) == 0  # a run directory: its latest
    assert "exported the sharded checkpoint" in capsys.readouterr().out
    weights, optimizer, info = load_sharded_full(path)
    single = load_model_state(out)
    assert set(single) == set(weights) and all(torch.equal(single[k], weights[k]) for k in weights)
    loaded = load_checkpoint(out)
    assert loaded.step == info.step == STEPS and not is_sharded(out)
    assert set(loaded.optimizer_state["state"]) == set(optimizer["state"])
    assert main(["generate", str(out), "--prompt", "the cat", "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert main(["export", str(path), str(path)]) == 2  # one line, nothing written
    # generate (and eval) also read a sharded checkpoint directly, whole, in their one process
    assert main(["generate", str(path), "--prompt", "the cat", "--max-new-tokens", "4", "--seed", "1"]) == 0


def test_a_corrupt_shard_is_refused_by_the_rank_that_reads_it(runs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(runs["checkpoint"], copy)
    shard = copy / SHARDS_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp fails its sha256 check"):
        load_sharded_full(copy)
