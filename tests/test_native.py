"""The native engine (FSDP2, DTensor TP/SP, torch.distributed.pipelining) reproduces the single process.

The same loss-compare as ``test_parallel_equivalence.py``: fp32, fixed seed, the same global batch of
16 sequences, clipping that bites; every layout's loss at every step must be within 1e-5 (relative)
of the single-process run's. Two networks: GPT-2's, and the Llama-style one (rotary positions, RMSNorm,
SwiGLU, 2 key/value heads for 4 query heads, an untied head, QK-norm), the latter with AdamW and with
Muon (fp32 Newton-Schulz). Checkpoints move between the two engines in both directions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The same corpus, model and optimisation as the lmkit engine's loss-compare.
from test_parallel_equivalence import LLAMA, MODEL, STEPS, TEXT  # tests/ is on sys.path (pytest)
from test_parallel_equivalence import TRAIN as _TRAIN

from lmkit.checkpoint.sharded import is_sharded
from lmkit.config import ConfigError, ParallelConfig, TrainConfig
from lmkit.lab.layouts import layout_losses, layout_name, max_relative_difference
from lmkit.parallel.engine import validate_layout
from lmkit.parallel.mesh import single_process_topology
from lmkit.parallel.native import qkv_permutation
from lmkit.parallel.native_plan import fused_permutation
from lmkit.run import prepare_run
from lmkit.train import Trainer

EXTRA = (3, 2)  # steps after the first resume (lmkit engine), after the second (native again)
TRAIN = TrainConfig(**{**_TRAIN.__dict__, "out_dir": "/tmp/lmkit-native"})
MUON = TrainConfig(**{**TRAIN.__dict__, "optimizer": "muon", "muon_precision": "float32"})


def native(**kwargs) -> ParallelConfig:
    return ParallelConfig(engine="native", **kwargs)


LAYOUTS = [
    native(dp=2, zero=3),
    native(tp=2, sequence_parallel=True),
    native(pp=2, schedule="1f1b", microbatches=4),
    native(dp=2, tp=2, pp=2, zero=3, sequence_parallel=True, microbatches=2),
]
# The Llama-style model with AdamW: the layouts above and those of the checkpoint test below.
LLAMA_LAYOUTS = LAYOUTS + [native(dp=2, tp=2, zero=3),
                           native(dp=2, pp=2, schedule="interleaved", virtual_stages=2, microbatches=2)]
# ... and with Muon: FSDP2 shards, tp + SP shards, pipeline stages, all three on a 2-D dp x tp mesh.
MUON_LAYOUTS = [
    native(dp=2, zero=2),
    native(tp=2, sequence_parallel=True),
    native(pp=2, schedule="1f1b", microbatches=4),
    native(dp=2, tp=2, pp=2, zero=3, sequence_parallel=True, microbatches=2),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return layout_losses(MODEL, TRAIN, None, STEPS + sum(EXTRA), text=TEXT, cache_dir=cache), cache


def assert_matches(got: dict, ref: dict, start: int, label: str) -> float:
    end = start + len(got["losses"])
    diff = max_relative_difference(got["losses"], ref["losses"][start:end])
    print(f"{label}: max relative loss difference {diff:.2e}")
    assert diff < 1e-5, f"{label}: {got['losses']} vs {ref['losses'][start:end]}"
    assert max_relative_difference(got["grad_norms"], ref["grad_norms"][start:end]) < 1e-4
    return diff


def test_qkv_permutation_gives_each_tp_rank_its_heads_of_q_k_and_v():
    d, tp = 8, 2  # 4 heads of head_dim 2: rank 0 has heads 0-1, rank 1 heads 2-3
    perm = qkv_permutation(d, tp)
    rows = torch.arange(3 * d)  # row i of the fused weight: [q | k | v], each heads x head_dim
    blocks = rows[perm].view(tp, 3 * d // tp)
    assert blocks[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    assert blocks[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
    assert torch.equal(rows[perm][torch.argsort(perm)], rows)


def test_fused_permutation_gives_each_tp_rank_its_share_of_every_part():
    """Grouped-query qkv (4 query heads, 2 key/value heads of head_dim 2) and a SwiGLU fc ([gate | up])."""
    tp = 2
    qkv = torch.arange(16)[fused_permutation((8, 4, 4), tp)].view(tp, -1)
    assert qkv.tolist() == [[0, 1, 2, 3, 8, 9, 12, 13], [4, 5, 6, 7, 10, 11, 14, 15]]  # [q_r | k_r | v_r]
    fc = torch.arange(12)[fused_permutation((6, 6), tp)].view(tp, -1)
    assert fc.tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]  # [gate_r | up_r]
    assert torch.equal(qkv_permutation(8, tp), fused_permutation((8, 8, 8), tp))


def test_native_validation_maps_zero_levels():
    small = dict(n_layer=4, n_head=4, vocab_size=64, block_size=16)
    train = TrainConfig(batch_size=8)
    for zero in (0, 2, 3):
        validate_layout(native(dp=2, zero=zero), train, **small)
    with pytest.raises(ConfigError, match="zero=1 does not exist in engine='native'"):
        validate_layout(native(dp=2, zero=1), train, **small)
    with pytest.raises(ConfigError, match="zero=3 .* needs engine='native'"):
        validate_layout(ParallelConfig(dp=2, zero=3), train, **small)
    with pytest.raises(ConfigError, match="zero=3 shards over data-parallel ranks but dp=1"):
        validate_layout(native(zero=3), train, **small)


def test_native_engine_in_one_process_is_the_plain_model(reference):
    """World size 1 (no process group): no mesh, no wrappers, the reference curve exactly."""
    ref, cache = reference
    run = prepare_run(MODEL, TRAIN, text=TEXT, cache_dir=Path(cache))
    trainer = Trainer(run.model, TRAIN, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      parallel=native(), topology=single_process_topology())
    assert type(trainer.engine).__name__ == "NativeEngine"
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert max_relative_difference(losses, ref["losses"][:3]) < 1e-6


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout_name(p) for p in LAYOUTS])
def test_native_layout_reproduces_single_process_losses(layout, reference):
    ref, cache = reference
    got = layout_losses(MODEL, TRAIN, layout, STEPS, text=TEXT, cache_dir=cache)
    assert_matches(got, ref, 0, f"native {layout_name(layout)}")
    assert ref["grad_norms"][0] > TRAIN.grad_clip  # clipping was active, so the global norm mattered


@pytest.mark.distributed
def test_checkpoints_move_between_the_engines(reference, tmp_path):
    """native dp2 x tp2 (FSDP2 x DTensor) trains 10 steps and saves; the lmkit engine resumes it
    under pp2 and saves; the native engine resumes that under dp2 (replicate) x pp2 interleaved:
    one unbroken reference curve."""
    ref, cache = reference
    train = TrainConfig(**{**TRAIN.__dict__, "out_dir": str(tmp_path / "run")})
    first = layout_losses(MODEL, train, native(dp=2, tp=2, zero=3), STEPS, text=TEXT, cache_dir=cache,
                          save=True)
    assert_matches(first, ref, 0, "native dp2 zero3 x tp2")
    assert first["checkpoint"].endswith(f"step_{STEPS:06d}")
    assert is_sharded(first["checkpoint"])  # each rank wrote its own DTensor shards (DCP)
    second = layout_losses(MODEL, train, ParallelConfig(pp=2, microbatches=2), EXTRA[0], text=TEXT,
                           cache_dir=cache, resume=first["checkpoint"], save=True)
    assert_matches(second, ref, STEPS, "lmkit pp2 resumed from native")
    third = layout_losses(MODEL, train, native(dp=2, pp=2, schedule="interleaved", virtual_stages=2,
                                               microbatches=2), EXTRA[1], text=TEXT, cache_dir=cache,
                          resume=second["checkpoint"])
    assert_matches(third, ref, STEPS + EXTRA[0], "native dp2 x pp2 interleaved resumed from lmkit")


@pytest.fixture(scope="module")
def llama_references(reference):
    """The Llama-style model's single-process curves: AdamW, and Muon over the checkpoint test's steps."""
    _, cache = reference
    adamw = layout_losses(LLAMA, TRAIN, None, STEPS, text=TEXT, cache_dir=cache)
    muon = layout_losses(LLAMA, MUON, None, STEPS + sum(EXTRA), text=TEXT, cache_dir=cache)
    return {"adamw": adamw, "muon": muon}, cache


LLAMA_CASES = [("adamw", p) for p in LLAMA_LAYOUTS] + [("muon", p) for p in MUON_LAYOUTS]


@pytest.mark.distributed
@pytest.mark.parametrize("optimizer,layout", LLAMA_CASES,
                         ids=[f"{o}-{layout_name(p)}" for o, p in LLAMA_CASES])
def test_native_llama_style_layout_reproduces_single_process_losses(optimizer, layout, llama_references):
    """Key/value heads and SwiGLU halves split over tp (`fused_permutation`), QK-norm gains summed over tp,
    rotary tables per stage, an untied head; Muon orthogonalising each gathered matrix, not its shards."""
    refs, cache = llama_references
    train = MUON if optimizer == "muon" else TRAIN
    got = layout_losses(LLAMA, train, layout, STEPS, text=TEXT, cache_dir=cache)
    assert_matches(got, refs[optimizer], 0, f"native llama {optimizer} {layout_name(layout)}")
    assert refs[optimizer]["grad_norms"][0] > TRAIN.grad_clip


@pytest.mark.distributed
def test_llama_style_muon_checkpoints_move_between_the_engines(llama_references, tmp_path):
    """The Llama-style model with Muon: native dp2 x tp2 (FSDP2 x DTensor, permuted qkv and fc rows) saves
    at step 10 (weights, Muon's momentum, AdamW's moments); the lmkit engine resumes under tp2 x pp2 and
    saves; native dp2 x pp2 interleaved resumes that: one unbroken single-process curve."""
    refs, cache = llama_references
    ref = refs["muon"]
    train = TrainConfig(**{**MUON.__dict__, "out_dir": str(tmp_path / "run")})
    first = layout_losses(LLAMA, train, native(dp=2, tp=2, zero=3), STEPS, text=TEXT, cache_dir=cache,
                          save=True)
    assert_matches(first, ref, 0, "native llama muon dp2 zero3 x tp2")
    assert is_sharded(first["checkpoint"])
    second = layout_losses(LLAMA, train, ParallelConfig(tp=2, pp=2, microbatches=2), EXTRA[0], text=TEXT,
                           cache_dir=cache, resume=first["checkpoint"], save=True)
    assert_matches(second, ref, STEPS, "lmkit llama muon tp2 x pp2 resumed from native")
    third = layout_losses(LLAMA, train, native(dp=2, pp=2, schedule="interleaved", virtual_stages=2,
                                               microbatches=2), EXTRA[1], text=TEXT, cache_dir=cache,
                          resume=second["checkpoint"])
    assert_matches(third, ref, STEPS + EXTRA[0], "native llama muon dp2 x pp2 interleaved resumed from lmkit")
