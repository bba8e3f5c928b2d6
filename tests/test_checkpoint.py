"""Checkpoints: round trips, bit-for-bit resume, integrity errors, atomicity under a crash."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from lmkit.checkpoint import format as checkpoint_format
from lmkit.checkpoint import single
from lmkit.checkpoint.format import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    find_latest,
    list_checkpoints,
    prune_checkpoints,
    restore_rng_state,
    sha256_of,
    step_dir_name,
    update_latest,
)
from lmkit.checkpoint.single import load_checkpoint, load_model_state, save_checkpoint
from lmkit.config import ModelConfig, TrainConfig
from lmkit.tokenizer import CharTokenizer

VOCAB, DIM = 11, 8


class Tiny(nn.Module):
    """Embedding -> dropout -> linear head tied to the embedding (like GPT's)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.drop = nn.Dropout(0.3)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.drop(self.emb(idx)))) * self.scale)


def make(seed: int = 0, dim: int = DIM):
    torch.manual_seed(seed)
    model = Tiny(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def train_step(model, opt, sched) -> torch.Tensor:
    # Consumes all three global RNGs: python (batch size), numpy (offset) and torch (data, dropout).
    b = random.randint(2, 4)
    offset = int(np.random.randint(0, 3))
    idx = (torch.randint(0, VOCAB - 3, (b, 5)) + offset) % VOCAB
    logits = model(idx[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_round_trip_model_optimizer_scheduler(tmp_path):
    model, opt, sched = make()
    seed_all(1)
    for _ in range(3):
        train_step(model, opt, sched)
    cfgs = {"model": ModelConfig(vocab_size=VOCAB), "train": TrainConfig(lr=1e-2)}
    tok = CharTokenizer.train("abc我喜欢编程")
    path = save_checkpoint(
        tmp_path / "run" / step_dir_name(3), model=model, optimizer=opt, scheduler=sched, step=3,
        configs=cfgs, tokenizer=tok, extra={"best_val": 1.25, "tokens": torch.tensor([7, 8])},
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json", "meta.json.sha256", "model.safetensors", "state.pt", "tokenizer.json"
    ]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["step"] == 3
    assert meta["model"]["aliases"] == {"head.weight": "emb.weight"}  # tied weight stored once
    assert set(meta["files"]) == {"model.safetensors", "state.pt", "tokenizer.json"}

    model2, opt2, sched2 = make(seed=99)
    info = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert info.step == 3 and info.extra["best_val"] == 1.25
    assert torch.equal(info.extra["tokens"], torch.tensor([7, 8]))
    assert info.config("model", ModelConfig) == cfgs["model"]
    assert info.config("train", TrainConfig) == cfgs["train"]
    assert info.load_tokenizer().encode("我喜欢编程") == tok.encode("我喜欢编程")
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert model2.head.weight is model2.emb.weight  # still tied after loading
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name in s1[k]:
            assert torch.equal(s1[k][name], s2[k][name])
    sd = load_model_state(path)
    assert set(sd) == set(model.state_dict())
    # A tokenizer given by path is copied into the checkpoint.
    again = save_checkpoint(tmp_path / "copy", model=model, step=3, tokenizer=path / "tokenizer.json")
    assert load_checkpoint(again).load_tokenizer().to_dict() == tok.to_dict()


def test_resume_is_bit_for_bit(tmp_path):
    """6 uninterrupted steps == 3 steps, save, fresh process state, load, 3 more steps."""
    seed_all(0)
    model, opt, sched = make()
    reference = [train_step(model, opt, sched) for _ in range(6)]

    seed_all(0)
    model, opt, sched = make()
    first = [train_step(model, opt, sched) for _ in range(3)]
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=3)
    del model, opt, sched
    seed_all(12345)  # scramble every RNG, as a new process would
    model, opt, sched = make(seed=7)
    info = load_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, restore_rng=True)
    assert info.step == 3
    resumed = first + [train_step(model, opt, sched) for _ in range(3)]
    for a, b in zip(reference, resumed, strict=True):
        assert torch.equal(a, b), (reference, resumed)


def test_rng_state_round_trip():
    seed_all(3)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    seed_all(4)
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_missing_directory_suggests_find_latest(tmp_path):
    model, _, _ = make()
    save_checkpoint(tmp_path / "step_000002", model=model, step=2)
    with pytest.raises(CheckpointError, match=r"step_000005 does not exist.*newest checkpoint.*step_000002"):
        load_checkpoint(tmp_path / "step_000005")
    with pytest.raises(CheckpointError, match="find_latest"):
        load_checkpoint(tmp_path / "nowhere" / "x")


def test_truncated_weights_are_reported_by_name(tmp_path):
    model, _, _ = make()
    path = save_checkpoint(tmp_path / "c", model=model, step=1)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    msg = r"model\.safetensors.*truncated or corrupt.*earlier checkpoint"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path, model=make()[0])


def test_corrupt_bytes_fail_sha256(tmp_path):
    model, opt, _ = make()
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, step=1)
    f = path / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"state\.pt fails its sha256 check.*truncated or corrupt"):
        load_checkpoint(path)


def test_missing_file_and_meta(tmp_path):
    model, _, _ = make()
    path = save_checkpoint(tmp_path / "c", model=model, step=1)
    (path / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"state\.pt is missing"):
        load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json is missing.*not a complete"):
        load_checkpoint(path)


def test_unsupported_format_version(tmp_path):
    model, _, _ = make()
    path = save_checkpoint(tmp_path / "c", model=model, step=1)
    meta = json.loads((path / "meta.json").read_text())
    meta["format_version"] = 99
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    model, _, _ = make(dim=8)
    path = save_checkpoint(tmp_path / "c", model=model, step=1)
    msg = r"'emb\.weight' has shape \(11, 8\).*\(11, 16\).*config differs"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path, model=make(dim=16)[0])


def test_missing_and_unexpected_keys(tmp_path):
    model, _, _ = make()
    path = save_checkpoint(tmp_path / "c", model=model, step=1)
    other = Tiny()
    other.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"missing keys \['extra\.bias', 'extra\.weight'\]"):
        load_checkpoint(path, model=other)
    info = load_checkpoint(path, model=other, strict=False)
    assert info.missing_keys == ["extra.bias", "extra.weight"] and info.unexpected_keys == []
    assert torch.equal(other.mid.weight, model.mid.weight)


def test_unsafe_state_rejected_at_save_time(tmp_path):
    model, _, _ = make()
    msg = r"state\['extra'\]\['perm'\] is a numpy\.ndarray.*weights_only"
    with pytest.raises(CheckpointError, match=msg):
        save_checkpoint(tmp_path / "c", model=model, step=1, extra={"perm": np.arange(3)})
    assert not any(tmp_path.iterdir())


def test_latest_pointer_and_pruning(tmp_path):
    model, _, _ = make()
    assert find_latest(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / step_dir_name(step), model=model, step=step)
    assert find_latest(tmp_path) == tmp_path / "step_000003"  # no pointer: highest step wins
    update_latest(tmp_path, "step_000002")
    assert (tmp_path / "latest").read_text().strip() == "step_000002"
    assert find_latest(tmp_path) == tmp_path / "step_000002"
    (tmp_path / ".tmp-step_000009-abc").mkdir()  # a killed save: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002", "step_000003"]
    removed = prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in removed] == ["step_000001"]  # step_000002 kept: latest points to it
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        update_latest(tmp_path, "step_000007")


def _weights(path):
    return load_model_state(path)["mid.weight"]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = make()
    target = tmp_path / "step_000001"
    save_checkpoint(target, model=model, optimizer=opt, step=1)
    update_latest(tmp_path, target.name)
    before = _weights(target).clone()

    with torch.no_grad():
        model.mid.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(single.torch, "save", crash)  # model.safetensors already written by then
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(target, model=model, optimizer=opt, step=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]  # temp dir cleaned up
    assert torch.equal(_weights(target), before)
    assert load_checkpoint(target).step == 1
    assert find_latest(tmp_path) == target


def test_crash_between_renames_is_recovered(tmp_path, monkeypatch):
    model, _, _ = make()
    target = tmp_path / "step_000004"
    save_checkpoint(target, model=model, step=4)
    before = _weights(target).clone()
    with torch.no_grad():
        model.mid.weight.add_(1.0)

    real_rename = checkpoint_format.os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append((src, dst))
        if len(calls) >= 2:  # old moved aside, new not yet in place: the process "dies" here
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_format.os, "rename", rename_then_die)
    # Renames and deletions fail from here on, so the in-process rollback cannot run either:
    # the directory is left exactly as a hard kill (SIGKILL, power loss) would leave it.
    monkeypatch.setattr(checkpoint_format.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model=model, step=4)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "step_000004" not in names  # nothing half-written under the final name
    assert any(n.startswith(".old-step_000004-") for n in names)
    assert any(n.startswith(".tmp-step_000004-") for n in names)
    assert find_latest(tmp_path) is None  # .tmp-* / .old-* are never taken for checkpoints

    info = load_checkpoint(target)  # recovers the complete old checkpoint
    assert info.step == 4 and torch.equal(_weights(target), before)
    save_checkpoint(target, model=model, step=4)  # the next save cleans up and replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004"]
    assert torch.equal(_weights(target), model.mid.weight.detach())


def test_overwrite_replaces_atomically(tmp_path):
    model, _, _ = make()
    target = tmp_path / "c"
    save_checkpoint(target, model=model, step=1)
    with torch.no_grad():
        model.mid.weight.mul_(2)
    save_checkpoint(target, model=model, step=2)
    assert load_checkpoint(target).step == 2
    assert torch.equal(_weights(target), model.mid.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_state_dict_mapping_and_views(tmp_path):
    """A gathered state dict (what parallel wrappers pass) with tied names and overlapping views."""
    base = torch.arange(12.0)
    sd = {"a": base[:6].view(2, 3), "b": base[6:], "tied": base[:6].view(2, 3), "c": torch.ones(2)}
    path = save_checkpoint(tmp_path / "c", model=sd, step=0)
    out = load_model_state(path)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k


def test_gpt_round_trip_with_tied_embeddings(tmp_path):
    model_mod = pytest.importorskip("lmkit.model")
    cfg = ModelConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, dropout=0.1)
    torch.manual_seed(0)
    gpt = model_mod.GPT(cfg)
    assert gpt.head.weight is gpt.tok_emb.weight
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    idx = torch.randint(0, 32, (2, 9))
    _, loss = gpt(idx[:, :-1], idx[:, 1:])
    loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path / "gpt", model=gpt, optimizer=opt, step=1, configs={"model": cfg})
    meta = json.loads((path / "meta.json").read_text())
    assert meta["model"]["aliases"] == {"head.weight": "tok_emb.weight"}

    torch.manual_seed(1)
    info_cfg = load_checkpoint(path).config("model", ModelConfig)
    gpt2 = model_mod.GPT(info_cfg)
    opt2 = torch.optim.AdamW(gpt2.parameters(), lr=1e-3)
    load_checkpoint(path, model=gpt2, optimizer=opt2)
    assert gpt2.head.weight is gpt2.tok_emb.weight
    gpt.eval()
    gpt2.eval()
    with torch.no_grad():
        assert torch.equal(gpt(idx)[0], gpt2(idx)[0])


# ---------------------------------------------------------------------- integrity of the manifest


def _edit_meta(path, change, rehash: bool = False) -> None:
    """Edit meta.json; with `rehash`, also rewrite its recorded sha256 (a careful forger)."""
    import hashlib

    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    data = json.dumps(meta).encode()
    (path / "meta.json").write_bytes(data)
    if rehash:
        (path / "meta.json.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


@pytest.mark.parametrize("field", ["step", "configs", "whitespace"])
def test_an_edited_manifest_is_refused_in_one_line(tmp_path, field):
    model, opt, sched = make()
    configs = {"train": TrainConfig(max_steps=7)}
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=3,
                           configs=configs)
    changes = {"step": lambda m: m.update(step=999),
               "configs": lambda m: m["configs"]["train"].update(max_steps=70),
               "whitespace": lambda m: None}  # even re-serialising changes the bytes
    _edit_meta(path, changes[field])
    for load in (load_checkpoint, load_model_state):
        with pytest.raises(CheckpointError, match=r"meta\.json\.sha256 does not match meta\.json: the "
                                                  r"manifest .* was edited") as err:
            load(path)
        assert "\n" not in str(err.value)
    (path / "meta.json.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json\.sha256 is missing"):
        load_checkpoint(path)


def test_step_and_configs_are_cross_checked_against_the_state(tmp_path):
    """Even with its hash rewritten, a manifest that disagrees with state.pt / the weights is refused."""
    model, opt, sched = make()
    configs = {"train": TrainConfig(max_steps=7)}
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=3,
                           configs=configs)
    assert load_checkpoint(path).step == 3
    _edit_meta(path, lambda m: m.update(step=999), rehash=True)
    with pytest.raises(CheckpointError, match=r"state\.pt disagrees with meta\.json about the step \(3 in "
                                              r"the file, 999 in the manifest\)"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors disagrees with meta\.json about the step"):
        load_model_state(path)
    _edit_meta(path, lambda m: m.update(step=3), rehash=True)
    _edit_meta(path, lambda m: m["configs"]["train"].update(max_steps=70), rehash=True)
    with pytest.raises(CheckpointError, match=r"state\.pt disagrees with meta\.json about the configs"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"safetensors disagrees with meta\.json about the configs"):
        load_model_state(path)


def test_format_1_checkpoints_stay_readable(tmp_path):
    """A checkpoint written before the manifest hash (format 1) loads; its step is still cross-checked."""
    from safetensors.torch import load_file, save_file

    model, opt, sched = make()
    path = save_checkpoint(tmp_path / "c", model=model, optimizer=opt, scheduler=sched, step=3)
    weights = load_file(str(path / "model.safetensors"))  # rewrite the files as lmkit 1 wrote them
    save_file(weights, str(path / "model.safetensors"), metadata={"lmkit.aliases": json.dumps(
        {"head.weight": "emb.weight"}), "format": "pt"})
    state = torch.load(path / "state.pt", weights_only=True)
    del state["configs_sha256"]
    torch.save(state, path / "state.pt")
    (path / "meta.json.sha256").unlink()

    def as_format_1(meta):
        meta["format_version"] = 1
        for name in ("model.safetensors", "state.pt"):
            meta["files"][name] = {"sha256": sha256_of(path / name), "bytes": (path / name).stat().st_size}

    _edit_meta(path, as_format_1)
    other, opt2, sched2 = make(seed=5)
    info = load_checkpoint(path, model=other, optimizer=opt2, scheduler=sched2)
    assert info.step == 3 and info.meta["format_version"] == 1
    assert torch.equal(other.emb.weight, model.emb.weight)
    _edit_meta(path, lambda m: m.update(step=999))
    with pytest.raises(CheckpointError, match="about the step"):
        load_checkpoint(path)
