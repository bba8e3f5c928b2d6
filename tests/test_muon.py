"""Muon (`lmkit.optim.Muon`): torch's update, bit for bit, and why it cannot run on a shard."""

from __future__ import annotations

import copy

import pytest
import torch

from lmkit.checkpoint.sharded import optimizer_meta
from lmkit.config import ModelConfig, TrainConfig, model_preset
from lmkit.model import GPT
from lmkit.optim import Muon, MuonAdamW, muon_lr_scale, orthogonalize, shardwise_error
from lmkit.parallel.plan import part_shard_rows


def _step_twice(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    for _ in range(2):
        optimizer.zero_grad()
        model(x, x)[1].backward()
        optimizer.step()


def test_muon_equals_torch_muon_bit_for_bit():
    """Momentum, Nesterov mix, bf16 Newton-Schulz, "original" lr scaling, decoupled weight decay."""
    torch.manual_seed(0)
    model = GPT(model_preset("llama", n_layer=2, n_head=4, d_model=32, vocab_size=64, block_size=16))
    twin = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    ours = Muon([p for n, p in model.named_parameters() if n in names], lr=0.02, weight_decay=0.1,
                momentum=0.95)
    theirs = torch.optim.Muon([p for n, p in twin.named_parameters() if n in names], lr=0.02,
                              weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
    x = torch.randint(0, 64, (4, 16))
    _step_twice(model, ours, x)
    _step_twice(twin, theirs, x)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(ours.state.values(), theirs.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_fp32_newton_schulz_is_the_same_iteration_in_more_bits():
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    bf16, fp32 = orthogonalize(g), orthogonalize(g, "float32")
    assert 1e-4 < float((bf16 - fp32).norm() / fp32.norm()) < 0.05  # bf16 rounding, not another result
    s = torch.linalg.svdvals(fp32)
    assert 0.5 < float(s.min()) and float(s.max()) < 1.5  # Muon's "approximately orthogonal"
    assert muon_lr_scale((48, 32)) == pytest.approx((48 / 32) ** 0.5) and muon_lr_scale((32, 48)) == 1.0


@pytest.mark.parametrize("tp", [2, 4])
def test_orthogonalising_each_shard_is_the_classic_mistake(tp):
    """A column-parallel qkv (whole heads of q, k and v per rank) orthogonalised shard by shard lands far from
    the whole matrix's direction; gathered first, it is the same."""
    config = model_preset("llama", n_head=8, n_kv_head=4, d_model=64)
    parts = (config.n_head * config.head_dim,) + (config.kv_heads * config.head_dim,) * 2
    g = torch.randn(sum(parts), config.d_model, generator=torch.Generator().manual_seed(tp))
    rows = [part_shard_rows(parts, r, tp) for r in range(tp)]

    def assemble(pieces: list[torch.Tensor]) -> torch.Tensor:
        full = torch.empty_like(g)
        for index, piece in zip(rows, pieces, strict=True):
            full[index] = piece
        return full

    assert shardwise_error(g, [g[r] for r in rows], assemble) > 0.2
    assert shardwise_error(g, [g], lambda pieces: pieces[0]) == 0.0


def test_muon_adamw_groups_and_state():
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, vocab_size=32, block_size=8))
    opt = MuonAdamW(model, TrainConfig(optimizer="muon", muon_precision="float32"))
    # qkv, proj, fc, proj | token and position tables | 4 biases and 3 LayerNorms' gains and biases
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2, 10]
    model(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8)))[1].backward()
    opt.step()
    state = opt.state_dict()["state"]
    assert len(opt.state) == len(state) == 16 and state[0].keys() == {"momentum_buffer"}
    assert state[4].keys() == {"step", "exp_avg", "exp_avg_sq"}
    # looking an AdamW parameter up finds AdamW's state and leaves Muon's alone (both are defaultdicts)
    table = opt.adamw.param_groups[0]["params"][0]
    assert opt.state.get(table).keys() == {"step", "exp_avg", "exp_avg_sq"} and table not in opt.muon.state
    assert optimizer_meta(opt)["step"] == 1.0  # what a sharded checkpoint keeps beside the moments
    opt.state_dict()
