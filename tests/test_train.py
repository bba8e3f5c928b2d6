"""The trainer: schedule, optimizer groups, accumulation, resume bit for bit, autocast, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmkit.config import ConfigError, ModelConfig, TrainConfig
from lmkit.optim import configure_optimizer, lr_multiplier
from lmkit.run import prepare_run
from lmkit.train import Trainer

TEXT = "".join(f"The {w} sat on the mat number {i}.\n" for i, w in enumerate(["cat", "dog", "bird"] * 200))


def tiny(tmp_path, arch="gpt", dropout=0.0, **train):
    mc = ModelConfig(n_layer=2, n_head=2, d_model=32, block_size=16, dropout=dropout, arch=arch)
    options = dict(batch_size=8, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=10,
                   eval_iters=2, log_interval=1, out_dir=str(tmp_path / "run"), seed=7)
    options.update(train)
    tc = TrainConfig(**options)
    run = prepare_run(mc, tc, text=TEXT, cache_dir=tmp_path / "cache")
    trainer = Trainer(run.model, tc, run.train_tokens, run.val_tokens, model_config=run.model_config,
                      tokenizer=run.tokenizer)
    return run, trainer


def losses(trainer, steps):
    return [trainer.train_step()["loss"] for _ in range(steps)]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [cfg.lr * lr_multiplier(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert lrs[110] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_weight_decay_only_on_matrices(tmp_path):
    run, _ = tiny(tmp_path)
    opt = configure_optimizer(run.model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(run.model.parameters()))


def test_loss_goes_down_and_history_is_logged(tmp_path):
    seen = []
    run, trainer = tiny(tmp_path, max_steps=40)
    trainer.callbacks.append(seen.append)
    history = trainer.fit()
    evals = [e for e in history if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert evals[0]["val_loss"] == pytest.approx(math.log(run.tokenizer.vocab_size), rel=0.15)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == history == seen
    assert all(e["tokens_per_s"] > 0 for e in history if e["kind"] == "train")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    _, one = tiny(tmp_path, grad_accum=1)
    _, four = tiny(tmp_path, grad_accum=4)
    a, b = losses(one, 8), losses(four, 8)
    assert a == pytest.approx(b, rel=1e-5)


def test_resume_is_bit_for_bit(tmp_path):
    _, straight = tiny(tmp_path / "a", dropout=0.1)
    expected = losses(straight, 6)

    _, first = tiny(tmp_path / "b", dropout=0.1)
    head = losses(first, 3)
    first.save()
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    _, second = tiny(tmp_path / "b", dropout=0.1)
    info = second.resume(tmp_path / "b" / "run")
    assert info.step == 3 and second.step == 3
    tail = losses(second, 3)
    assert head + tail == expected  # exact equality of floats


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    _, plain = tiny(tmp_path)
    _, ckpt = tiny(tmp_path, activation_checkpointing=True)
    assert losses(plain, 4) == pytest.approx(losses(ckpt, 4), rel=1e-6)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    _, fp32 = tiny(tmp_path)
    _, bf16 = tiny(tmp_path, dtype="bfloat16")
    a, b = losses(fp32, 5), losses(bf16, 5)
    assert b == pytest.approx(a, abs=0.05)


def test_float16_on_cpu_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="bfloat16"):
        tiny(tmp_path, dtype="float16")


def test_lstm_baseline_trains_with_the_same_trainer(tmp_path):
    _, trainer = tiny(tmp_path, arch="lstm", max_steps=60)
    curve = losses(trainer, 60)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(batch_size=10, grad_accum=3).validate()
    with pytest.raises(ConfigError, match="tokenizer"):
        TrainConfig(tokenizer="word").validate()
