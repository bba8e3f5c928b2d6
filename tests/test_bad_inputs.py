"""Bad inputs, one row each: exit status 2, one line on stderr naming the problem and the fix,
no traceback, and nothing already on disk changed.

The CLI runs in-process (`lmkit.cli.main`), since a subprocess costs seconds of ``import torch``;
one trained run (module fixture) serves every row that needs a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmkit.cli import main

TINY = ["--n-layer", "1", "--n-head", "2", "--d-model", "32", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "2", "--eval-interval", "0", "--log-interval", "1", "--corpus", "tinyshakespeare"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A finished 2-step run in ``run/``, with its own corpus cache."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE", str(root / "cache"))
        assert main(["train", "--max-steps", "2", "--out-dir", str(root / "run"), *TINY]) == 0
    return root


@pytest.fixture(autouse=True)
def cache(workspace, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE", str(workspace / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _copy(workspace: Path, name: str) -> Path:
    target = workspace / name
    if not target.exists():
        shutil.copytree(workspace / "run", target)
    return target


def _ckpt(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def _truncate(workspace: Path) -> Path:
    run = _copy(workspace, "truncated")
    weights = _ckpt(run) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return run


def _tamper(workspace: Path) -> Path:
    run = _copy(workspace, "tampered")
    weights = _ckpt(run) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of a tensor changed
    weights.write_bytes(bytes(data))
    return run


def _regular_file(workspace: Path) -> Path:
    blocker = workspace / "a_file"
    blocker.write_text("not a directory\n")
    return blocker / "run"


def _unwritable(workspace: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits: use a file system that refuses everyone
        return Path("/proc/self/lmkit-run")
    locked = workspace / "locked"
    locked.mkdir(exist_ok=True)
    locked.chmod(0o500)
    return locked / "run"


def _hf_without_tokenizer(workspace: Path) -> Path:
    """A transformers GPT-2 directory (exported from the run) whose tokenizer file was removed."""
    target = workspace / "hf_no_tokenizer"
    if not target.exists():
        assert main(["export", str(workspace / "run"), "--hf-dir", str(target)]) == 0
        (target / "lmkit_tokenizer.json").unlink()
    return target


def _lstm_run(workspace: Path) -> Path:
    """A 1-step run of the LSTM baseline."""
    target = workspace / "lstm"
    if not target.exists():
        assert main(["train", "--arch", "lstm", "--max-steps", "1", "--out-dir", str(target), *TINY]) == 0
    return target


def _toml(workspace: Path, text: str, name: str) -> Path:
    path = workspace / name
    path.write_text(text)
    return path


@dataclass
class Row:
    """argv (a function of the workspace), then what stderr must say: the problem and the fix."""

    argv: Callable[[Path], list[str]]
    problem: str
    fix: str
    env: dict[str, str] | None = None


def _gen(*options: str) -> Callable[[Path], list[str]]:
    return lambda w: ["generate", str(w / "run"), "--prompt", "ROMEO:", *options]


ROWS = {
    "temperature -1": Row(_gen("--temperature", "-1"), "temperature must be >= 0, got -1.0",
                          "use 0 (greedy)"),
    "top_p 0": Row(_gen("--top-p", "0"), "top-p must be in (0, 1], got 0.0", "use e.g. 0.9"),
    "top_p 1.5": Row(_gen("--top-p", "1.5"), "top-p must be in (0, 1], got 1.5", "use e.g. 0.9"),
    "top_k 0": Row(_gen("--top-k", "0"), "top-k must be >= 1, got 0", "use a positive count"),
    "max_new_tokens -5": Row(_gen("--max-new-tokens", "-5"), "max-new-tokens must be an integer >= 0, got -5",
                             "use 0 or more"),
    "prompt outside the vocabulary": Row(
        lambda w: ["generate", str(w / "run"), "--prompt", "ROMEO ☃"],
        "character '☃' (U+2603) at position 6 is not in the CharTokenizer vocabulary",
        "leave that character out, or train with --tokenizer bpe"),
    "out-dir under a regular file": Row(
        lambda w: ["train", "--max-steps", "1", "--out-dir", str(_regular_file(w)), *TINY],
        "a_file is a file, not a directory", "choose another --out-dir"),
    "unwritable out-dir": Row(
        lambda w: ["train", "--max-steps", "1", "--out-dir", str(_unwritable(w)), *TINY],
        "is not writable", "choose a directory you can write"),
    "non-finite loss": Row(
        lambda w: ["train", "--max-steps", "8", "--lr", "1e6", "--checkpoint-interval", "1", "--out-dir",
                   str(w / "exploding"), *TINY],
        "the loss is nan", "lower --lr"),
    "world size against the layout": Row(
        lambda w: ["train", "--dp", "2", "--out-dir", str(w / "layout"), *TINY],
        "the world has 1 processes but dp*cp*tp*pp = 2*1*1*1 = 2", "launch with torchrun --nproc_per_node=2"),
    "cp against the sequence length": Row(
        lambda w: ["train", "--cp", "3", "--out-dir", str(w / "cp"), *TINY],
        "model.block_size=16: sequence length 16 is not divisible by 6",
        "use a sequence length that is a multiple of 6", env={"WORLD_SIZE": "3"}),
    "tp against heads": Row(
        lambda w: ["train", "--tp", "4", "--out-dir", str(w / "tp"), *TINY],
        "n_head=2 is not divisible by parallel.tp=4", "choose tp among [1, 2]", env={"WORLD_SIZE": "4"}),
    "tp against the vocabulary": Row(
        lambda w: ["train", "--tp", "4", "--out-dir", str(w / "tp"), *TINY, "--n-head", "4"],
        "the vocabulary (66 tokens) is not divisible by parallel.tp=4",
        "choose tp dividing the vocabulary size",
        env={"WORLD_SIZE": "4"}),
    "model option under a parallel layout": Row(
        lambda w: ["train", "--tp", "2", "--n-kv-head", "1", "--out-dir", str(w / "gqa"), *TINY],
        "model.n_kv_head=1 is not divisible by parallel.tp=2", "choose tp among [1]",
        env={"WORLD_SIZE": "2"}),
    "missing checkpoint": Row(
        lambda w: ["train", "--resume", str(w / "no_such_run"), "--out-dir", str(w / "missing"), *TINY],
        "no_such_run does not exist", "or --resume auto"),
    "truncated checkpoint": Row(
        lambda w: ["generate", str(_truncate(w)), "--prompt", "ROMEO:"], "model.safetensors",
        "earlier checkpoint"),
    "tampered checkpoint": Row(
        lambda w: ["generate", str(_tamper(w)), "--prompt", "ROMEO:"], "model.safetensors", "checkpoint"),
    "checkpoint of another model config": Row(
        lambda w: ["train", "--resume", "auto", "--max-steps", "2", "--out-dir", str(w / "run"), *TINY,
                   "--n-layer", "2"],
        "holds another model: n_layer=1 (now 2)", "resume with the checkpoint's model options"),
    "generate with a checkpoint and --hf-dir": Row(
        lambda w: ["generate", str(w / "run"), "--hf-dir", str(w / "run"), "--prompt", "x"],
        "give a checkpoint directory or --hf-dir DIR", "exactly one of them"),
    "generate --hf-dir of a non-model": Row(
        lambda w: ["generate", "--hf-dir", str(w / "run"), "--prompt", "x"],
        "is not a transformers model directory (no config.json)", "lmkit export --hf-dir"),
    "generate --hf-dir without a tokenizer": Row(
        lambda w: ["generate", "--hf-dir", str(_hf_without_tokenizer(w)), "--prompt", "x"],
        "has no tokenizer", "export it with lmkit export --hf-dir"),
    "export with an out dir and --hf-dir": Row(
        lambda w: ["export", str(w / "run"), str(w / "out"), "--hf-dir", str(w / "hf")],
        "give an output directory or --hf-dir DIR", "exactly one of them"),
    "export --hf-dir over a non-model directory": Row(
        lambda w: ["export", str(w / "run"), "--hf-dir", str(w / "run")],
        "exists and is not a transformers model directory", "choose a new directory"),
    "export --hf-dir of an LSTM": Row(
        lambda w: ["export", str(_lstm_run(w)), "--hf-dir", str(w / "lstm_hf")],
        "model.arch='lstm' has no GPT-2 equivalent", "only arch='gpt' converts"),
    "unknown corpus": Row(
        lambda w: ["train", "--config", str(_toml(w, '[train]\ncorpus = "wikipedia"\n', "corpus.toml")),
                   "--out-dir", str(w / "corpus")],
        "unknown corpus 'wikipedia'", "kjv"),
    "unknown TOML key": Row(
        lambda w: ["train", "--config", str(_toml(w, "[train]\nwarmup = 10\n", "key.toml")),
                   "--out-dir", str(w / "key")],
        "key.toml: [train] has unknown key(s) ['warmup']",
        "did you mean 'warmup_steps'? known keys: corpus,"),
}


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the corpus cache (rows may fill it)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.relative_to(root).parts}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_and_changes_nothing(name, workspace, capsys, monkeypatch):
    row = ROWS[name]
    for key, value in (row.env or {}).items():
        monkeypatch.setenv(key, value)
    argv = row.argv(workspace)  # may prepare a damaged copy: that is the "before" state
    before = _snapshot(workspace)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert row.problem in lines[0] and row.fix in lines[0], lines[0]
    after = _snapshot(workspace)
    if name == "non-finite loss":  # a new run: what it saved before the blow-up must be finite
        new = {k for k in after if k not in before}
        assert all(k.startswith("exploding/") for k in new) and before.items() <= after.items()
        _assert_every_checkpoint_finite(workspace / "exploding", lines[0])
    else:
        assert after == before


def _assert_every_checkpoint_finite(run: Path, message: str) -> None:
    latest = _ckpt(run)
    assert f"the last good checkpoint is {latest}" in message
    steps = sorted(run.glob("step_*"))
    assert steps and steps[-1] == latest
    for step in steps:
        weights = load_file(str(step / "model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), step
    failed = int(message.removeprefix("lmkit: error: step ").split(":")[0])
    assert failed == int(latest.name.split("_")[1]) + 1
    assert json.loads((latest / "meta.json").read_text())["step"] == failed - 1


def test_out_dir_is_checked_before_any_training(workspace, capsys, monkeypatch):
    """The out-dir row fails before the corpus is even loaded (let alone the first step)."""
    import lmkit.run

    def forbidden(*args, **kwargs):
        raise AssertionError("prepare_run ran before the out-dir check")

    monkeypatch.setattr(lmkit.run, "prepare_run", forbidden)
    assert main(["train", "--out-dir", str(_regular_file(workspace)), *TINY]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
