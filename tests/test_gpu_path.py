"""The GPU path's decisions, checked on a CPU: TF32 on or off, the peak MFU divides by (never a
guess), and MFU in the trainer's logged events. The CUDA queries are stubbed; nothing here needs
a GPU (benchmarks/gpu.py measures one)."""

from __future__ import annotations

import pytest
import torch

from lmkit import costs
from lmkit.config import ModelConfig, TrainConfig
from lmkit.run import configure_cuda_matmul, peak_flops_of, prepare_run
from lmkit.train import Trainer

CUDA = torch.device("cuda", 0)
TEXT = "".join(f"line {i} of a small corpus.\n" for i in range(300))


@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32 = before[1]


def _gpu(monkeypatch, name: str = "NVIDIA H100 80GB HBM3", capability: tuple[int, int] = (9, 0)) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_tf32_is_left_alone_on_a_cpu(restore_precision):
    torch.set_float32_matmul_precision("highest")
    assert configure_cuda_matmul(torch.device("cpu"), torch.bfloat16, allow_tf32=True) is False
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("capability, dtype, allow, on", [
    ((9, 0), torch.bfloat16, None, True),   # mixed precision on Hopper: TF32 for the fp32 leftovers
    ((8, 0), torch.float16, None, True),    # Ampere
    ((9, 0), None, None, False),            # float32 stays IEEE fp32 (the loss-compare tests)
    ((9, 0), None, True, True),             # ... unless asked
    ((9, 0), torch.bfloat16, False, False),
    ((7, 0), torch.bfloat16, True, False),  # Volta has no TF32
])
def test_tf32_on_ampere_and_later(capability, dtype, allow, on, monkeypatch, restore_precision):
    _gpu(monkeypatch, capability=capability)
    assert configure_cuda_matmul(CUDA, dtype, allow) is on
    assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
    assert torch.backends.cudnn.allow_tf32 is on


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989e12),
    ("NVIDIA H200", torch.bfloat16, True, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, True, 312e12),
    ("NVIDIA L4", torch.float16, True, 121e12),
    ("NVIDIA A100-SXM4-80GB", None, False, 19.5e12),  # plain fp32
    ("NVIDIA A100-SXM4-80GB", None, True, None),      # TF32: not in the table, so unknown
    ("NVIDIA Mystery GPU 9000", torch.bfloat16, True, None),
])
def test_peak_is_looked_up_by_device_name_or_unknown(name, dtype, tf32, peak, monkeypatch):
    _gpu(monkeypatch, name=name)
    assert peak_flops_of(CUDA, dtype, tf32) == peak
    if peak is not None:  # the same table the instruments of chapter 6 read
        assert costs.lookup_peak_flops(name, dtype or torch.float32) == peak


def test_peak_is_unknown_on_a_cpu():
    assert peak_flops_of(torch.device("cpu"), torch.bfloat16, False) is None


def test_trainer_logs_mfu_from_flops_per_token_and_the_peak(tmp_path):
    mc = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16)
    tc = TrainConfig(batch_size=4, max_steps=3, eval_interval=0, log_interval=1, device="cpu",
                     out_dir=str(tmp_path / "run"))
    run = prepare_run(mc, tc, text=TEXT, cache_dir=tmp_path / "cache")
    expected_flops = run.model.flops_per_token(training=True)
    trainer = Trainer(run.model, tc, run.train_tokens, model_config=run.model_config)
    assert trainer.tf32 is False and trainer.peak_flops is None
    events = [e for e in trainer.fit() if e["kind"] == "train"]
    assert events and all(e["mfu"] is None and e["tokens_per_s"] > 0 for e in events)  # CPU: unknown
    assert trainer.flops_per_token == expected_flops
    trainer.peak_flops = 1e12  # what a GPU of 1 TFLOP/s would give
    mfu = trainer.mfu(5e4)
    assert mfu == pytest.approx(5e4 * expected_flops / 1e12)
    assert mfu == costs.mfu(5e4, costs.flops_per_token(costs.Model.from_config(run.model_config)), 1, 1e12)
