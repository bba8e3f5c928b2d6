"""lmkit.lab.positions: sinusoidal and rotary positions from their formulas (chapter 1)."""

import pytest
import torch

from lmkit.lab.positions import offset_spread, rotate, score_grid, sinusoidal
from lmkit.model import apply_rope, rope_tables


def test_sinusoidal_table():
    pe = sinusoidal(50, 16)
    assert pe.shape == (50, 16)
    assert torch.equal(pe[0, 0::2], torch.zeros(8)) and torch.equal(pe[0, 1::2], torch.ones(8))
    assert torch.allclose(pe[7, 2], torch.sin(torch.tensor(7 / 10000 ** (2 / 16))))
    # PE(p) . PE(p + k) = sum_i cos(k w_i): the same for every p
    dots = torch.stack([pe[p] @ pe[p + 5] for p in range(40)])
    assert (dots - dots[0]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="even"):
        sinusoidal(4, 3)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rotate_is_lmkits_rope(base):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 8)
    pos = torch.arange(11)
    ours = rotate(x, pos, base)
    theirs = apply_rope(x, *rope_tables(pos, 8, base))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    assert torch.equal(rotate(x[..., :1, :], torch.zeros(1, dtype=torch.long)), x[..., :1, :])
    with pytest.raises(ValueError, match="even"):
        rotate(torch.randn(2, 3), torch.arange(2))


def test_rotary_scores_depend_on_the_offset_only():
    torch.manual_seed(1)
    d = 16
    x_q, x_k, w_q, w_k = torch.randn(d), torch.randn(d), torch.randn(d, d), torch.randn(d, d)
    rotary = score_grid(x_q, x_k, w_q, w_k, 20, rotary=True)
    added = score_grid(x_q, x_k, w_q, w_k, 20, table=sinusoidal(20, d))
    assert rotary.shape == added.shape == (20, 20)
    assert offset_spread(rotary) < 1e-4 < 0.1 < offset_spread(added)
    with pytest.raises(ValueError, match="either"):
        score_grid(x_q, x_k, w_q, w_k, 4)
