"""Resuming: ``--resume auto`` starts fresh where there is nothing to resume, a changed schedule
is refused unless allowed (then it follows the documented rule), and the new options validate.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lmkit.cli import main
from lmkit.config import ConfigError, ModelConfig, TrainConfig
from lmkit.model import GPT
from lmkit.optim import lr_multiplier
from lmkit.run import seed_everything
from lmkit.train import SCHEDULE_FIELDS, Trainer

MODEL = ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=32)
TOKENS = np.random.default_rng(1).integers(0, 32, 4000).astype(np.uint16)
TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "0", "--log-interval", "1", "--corpus", "tinyshakespeare"]


def _trainer(cfg: TrainConfig) -> Trainer:
    seed_everything(cfg.seed)
    return Trainer(GPT(MODEL), cfg, TOKENS, TOKENS, model_config=MODEL)


@pytest.fixture
def saved(tmp_path):
    cfg = TrainConfig(batch_size=4, max_steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=2, eval_interval=0,
                      out_dir=str(tmp_path / "run"))
    trainer = _trainer(cfg)
    trainer.fit(max_steps=5)
    trainer.save()
    return cfg


@pytest.mark.parametrize("field, value",
                         [("max_steps", 20), ("lr", 2e-3), ("min_lr", 0.0), ("warmup_steps", 0)])
def test_a_changed_schedule_is_refused_with_the_flag_that_allows_it(saved, field, value):
    assert field in SCHEDULE_FIELDS
    trainer = _trainer(dataclasses.replace(saved, **{field: value}))
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError) as e:
        trainer.resume(saved.out_dir)
    message = str(e.value)
    assert f"{flag} {value} (checkpoint: {getattr(saved, field)})" in message
    assert "--allow-schedule-change" in message and "\n" not in message


def test_an_allowed_change_follows_the_new_schedule_from_the_checkpoint_step(saved):
    longer = dataclasses.replace(saved, max_steps=20, lr=2e-3)
    trainer = _trainer(longer)
    info = trainer.resume(saved.out_dir, allow_schedule_change=True)
    assert info.step == trainer.step == 5
    for _ in range(3):
        expected = longer.lr * lr_multiplier(trainer.step, longer)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert trainer.train_step()["lr"] == pytest.approx(expected, rel=1e-12)


def test_the_same_schedule_resumes_without_the_flag(saved):
    trainer = _trainer(saved)
    assert trainer.resume(saved.out_dir).step == 5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(saved.lr * lr_multiplier(5, saved))


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_auto_without_a_checkpoint_starts_fresh(make, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    if make == "empty":
        out.mkdir()
    assert main(["train", "--resume", "auto", "--max-steps", "2", "--out-dir", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert f"no checkpoint in {out} yet: starting from step 0" in text and "saved" in text
    assert (out / "latest").read_text().strip() == "step_000002"
    assert main(["train", "--resume", "auto", "--max-steps", "2", "--out-dir", str(out), *TINY]) == 0
    assert f"resumed from {out / 'step_000002'} at step 2" in capsys.readouterr().out


@pytest.mark.parametrize("values, fragment", [
    ({"nonfinite": "ignore"}, "train.nonfinite='ignore' is unknown; use 'stop' or 'skip'"),
    ({"max_skips": -1}, "train.max_skips must be an integer >= 0"),
    ({"timeout": 0}, "train.timeout must be a positive number of seconds"),
])
def test_new_options_validate(values, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        TrainConfig(**values).validate()
