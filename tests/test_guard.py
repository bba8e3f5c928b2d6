"""The numerical guard: a non-finite step is never applied or saved, and stops or is skipped
the same way on every rank of a layout.

A NaN is injected into one gradient at a chosen step (a tensor hook), which is exactly what
an exploding step looks like to the trainer: the loss is finite, the global norm is not.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkit.checkpoint.format import find_latest, list_checkpoints
from lmkit.checkpoint.single import load_checkpoint
from lmkit.config import ModelConfig, ParallelConfig, TrainConfig
from lmkit.model import GPT
from lmkit.parallel.launch import run_local
from lmkit.parallel.mesh import init_topology
from lmkit.run import seed_everything
from lmkit.train import NonFiniteError, Trainer

MODEL = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=32)
TOKENS = np.random.default_rng(0).integers(0, 32, 5000).astype(np.uint16)


def _cfg(out_dir: Path | str, **overrides) -> TrainConfig:
    values = dict(batch_size=8, max_steps=6, lr=1e-3, warmup_steps=1, eval_interval=0, log_interval=1,
                  out_dir=str(out_dir), seed=3)
    return TrainConfig(**{**values, **overrides})


def _poison(trainer: Trainer, at_step: int, name_part: str = "blocks.0.mlp") -> None:
    """Make one gradient NaN during the step that ends at `at_step` (1-based, as the logs)."""
    for name, param in trainer.model.named_parameters():
        if name_part in name and param.dim() == 2:
            param.register_hook(lambda g: g * float("nan") if trainer.step == at_step - 1 else g)
            return
    raise AssertionError(f"no parameter matching {name_part}")


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _trainer(tmp_path: Path, **overrides) -> Trainer:
    seed_everything(3)
    return Trainer(GPT(MODEL), _cfg(tmp_path, **overrides), TOKENS, TOKENS, model_config=MODEL)


def test_stop_keeps_the_weights_and_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, checkpoint_interval=1)
    _poison(trainer, at_step=3)
    trainer.fit(max_steps=2)  # saves step 1 on the interval; the end of a fit() is saved by its caller
    trainer.save()
    before = _weights(trainer)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit()
    message = str(e.value)
    assert message.startswith("step 3: the global gradient norm is nan;") and "\n" not in message
    assert f"the last good checkpoint is {tmp_path / 'step_000002'}" in message
    assert all(torch.equal(before[n], p) for n, p in _weights(trainer).items())  # the update was dropped
    assert find_latest(tmp_path) == tmp_path / "step_000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]


def test_skip_drops_the_update_and_goes_on(tmp_path):
    trainer = _trainer(tmp_path, nonfinite="skip", max_skips=1)
    _poison(trainer, at_step=3)
    trainer.fit(max_steps=2)
    before = _weights(trainer)
    trainer.fit(max_steps=3)
    assert trainer.skipped_steps == 1 and trainer.step == 3
    assert all(torch.equal(before[n], p) for n, p in _weights(trainer).items())
    skips = [e for e in trainer.history if e["kind"] == "skip"]
    assert [(e["step"], e["problem"]) for e in skips] == [(3, "the global gradient norm is nan")]
    trainer.fit()
    assert trainer.step == 6
    assert all(math.isfinite(e["loss"]) for e in trainer.history if e["kind"] == "train")
    path = trainer.save()
    info = load_checkpoint(path)
    assert info.extra["skipped_steps"] == 1


def test_skip_stops_after_max_skips(tmp_path):
    trainer = _trainer(tmp_path, nonfinite="skip", max_skips=0)
    _poison(trainer, at_step=2)
    with pytest.raises(NonFiniteError, match=r"^step 2: .*1 skipped steps > train.max_skips=0"):
        trainer.fit()


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(max_steps=1)
    first = trainer.save()
    trainer.fit(max_steps=2)
    with torch.no_grad():
        dict(trainer.model.named_parameters())["blocks.1.attn.qkv.weight"][0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="blocks.1.attn.qkv.weight are non-finite, so no checkpoint"):
        trainer.save()
    assert find_latest(tmp_path) == first and not (tmp_path / "step_000002").exists()


def test_resume_refuses_a_poisoned_checkpoint(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(max_steps=1)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("nan"))
    trainer.nonfinite_weights = lambda: []  # what a run before the guard saved
    trainer.save()
    fresh = _trainer(tmp_path)
    with pytest.raises(NonFiniteError, match="step_000001 holds non-finite weights"):
        fresh.resume(tmp_path)


# --------------------------------------------------------------------------- layouts


def _poison_forward(trainer: Trainer, at_step: int) -> None:
    """Make this rank's first block output NaN in step `at_step`: a local blow-up that the
    reductions after it (tensor-parallel all-reduce, pipeline send, gradient reduction) spread."""

    def hook(module, args, out):
        if trainer.step == at_step - 1 and module.training:
            return out * float("nan")
        return out

    blocks = trainer.engine.stages[0].blocks
    first = next(iter(blocks.values())) if isinstance(blocks, torch.nn.ModuleDict) else blocks[0]
    first.register_forward_hook(hook)


def _layout_worker(layout: dict, out_dir: str) -> dict:
    """Two 4-step runs on one process group: with ``skip`` rank 1 alone computes NaNs in step 2,
    with ``stop`` rank 0 does (its peers learn it by reduction)."""
    pcfg = ParallelConfig(**layout)
    topo = init_topology(pcfg, "cpu")
    results = {}
    for policy, poison_rank in (("skip", 1), ("stop", 0)):
        seed_everything(3)
        cfg = _cfg(f"{out_dir}/{policy}", max_steps=4, nonfinite=policy, max_skips=2)
        trainer = Trainer(GPT(MODEL), cfg, TOKENS, TOKENS, model_config=MODEL, parallel=pcfg, topology=topo)
        if topo.rank == poison_rank:
            _poison_forward(trainer, at_step=2)
        try:
            trainer.fit()
            error = None
        except NonFiniteError as e:
            error = str(e)
        results[policy] = {
            "step": trainer.step, "skipped": trainer.skipped_steps, "error": error,
            "losses": [e["loss"] for e in trainer.history if e["kind"] == "train"],
            "skips": [(e["step"], e["problem"]) for e in trainer.history if e["kind"] == "skip"]}
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [{"dp": 2}, {"tp": 2}, {"pp": 2, "microbatches": 2},
                                    {"dp": 2, "zero": 2}, {"dp": 2, "engine": "native"}])
def test_every_rank_decides_the_same(layout, tmp_path):
    """One rank's NaN makes the global loss and norm NaN, so all ranks skip (or stop) together."""
    ranks = run_local(2, _layout_worker, layout, str(tmp_path))
    skip = [r["skip"] for r in ranks]
    assert [r["skipped"] for r in skip] == [1, 1] and [r["step"] for r in skip] == [4, 4]
    assert all(r["error"] is None for r in skip)
    both = "the loss is nan and the global gradient norm is nan"
    assert skip[0]["skips"] == skip[1]["skips"] == [(2, both)]
    assert len(skip[0]["losses"]) == 3 and all(math.isfinite(x) for x in skip[0]["losses"])
    assert skip[0]["losses"] == skip[1]["losses"]
    stop = [r["stop"] for r in ranks]
    assert [r["step"] for r in stop] == [2, 2]
    assert all(r["error"] and r["error"].startswith("step 2: the loss is nan") for r in stop), stop
