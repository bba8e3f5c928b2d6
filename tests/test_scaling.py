"""lmkit.lab.scaling: the budget arithmetic, the fits, and one tiny sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.lab import scaling


def test_tokens_for_budget_is_c_over_6n():
    assert scaling.tokens_for_budget(6e9, 1000) == pytest.approx(1e6)
    # Chinchilla's rule D = 20 N spends C = 6 N D = 120 N^2
    n = 70e9
    assert scaling.tokens_for_budget(120 * n**2, n) == pytest.approx(20 * n)
    with pytest.raises(ValueError):
        scaling.tokens_for_budget(0, 10)


def test_parabola_recovers_a_known_minimum():
    n_opt, loss_min, a = 3.0e4, 2.1, 0.07
    n = np.geomspace(3e3, 3e5, 7)
    losses = a * (np.log(n) - math.log(n_opt)) ** 2 + loss_min
    fit = scaling.fit_parabola(n, losses)
    assert fit.n_opt == pytest.approx(n_opt, rel=1e-9)
    assert fit.loss_min == pytest.approx(loss_min, abs=1e-12)
    assert fit.a == pytest.approx(a, rel=1e-9)
    assert fit(n_opt) == pytest.approx(loss_min, abs=1e-12)


def test_parabola_without_a_minimum_is_refused():
    with pytest.raises(ValueError, match="downwards"):
        scaling.fit_parabola([1e3, 1e4, 1e5], [2.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit_parabola([1e3, 1e4], [2.0, 3.0])


def test_power_law_recovers_its_exponent():
    c = np.geomspace(1e18, 1e22, 5)
    a, k = scaling.fit_power_law(c, 0.3 * c**0.5)
    assert a == pytest.approx(0.5, abs=1e-12) and k == pytest.approx(0.3, rel=1e-9)


def test_batch_for_aims_at_a_number_of_steps():
    assert scaling.batch_for(64 * 300 * 10, 64, 300) == 10
    assert scaling.batch_for(1e9, 64, 300) == 512 and scaling.batch_for(10, 64, 300) == 2


def test_isoflop_fits_need_three_runs_and_a_minimum():
    points = [scaling.SweepPoint(1e9, "s", n, 1, 1, 1, 0.1 * (math.log(n) - math.log(2e4)) ** 2 + 2, 0.0)
              for n in (5e3, 1e4, 4e4, 1e5)]
    points += [scaling.SweepPoint(2e9, "s", n, 1, 1, 1, 2.0, 0.0) for n in (5e3, 1e4)]   # too few runs
    fits = scaling.isoflop_fits(points)
    assert [f.budget for f in fits] == [1e9]
    assert fits[0].n_opt == pytest.approx(2e4, rel=1e-6)
    assert fits[0].tokens_opt == pytest.approx(1e9 / (6 * 2e4), rel=1e-6)


def test_a_tiny_sweep_trains_on_its_budget():
    torch.set_num_threads(1)
    ids = torch.randint(0, 16, (20_000,))
    shapes = [ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, d_model=d) for d in (8, 16)]
    points = scaling.compute_sweep(shapes, [2e7], ids[:15_000], ids[15_000:], steps=20, smallest_batch=1,
                                   largest_batch=4, min_steps=2)
    assert len(points) == 2
    for p in points:
        assert p.tokens == p.steps * p.batch_size * 16 and 1 <= p.batch_size <= 4
        assert abs(6 * p.n_params * p.tokens - p.budget) <= 6 * p.n_params * p.batch_size * 16   # one step
        assert math.isfinite(p.val_loss) and p.val_loss < math.log(16) + 0.5


def test_every_run_of_a_sweep_takes_about_the_same_number_of_steps():
    torch.set_num_threads(1)
    ids = torch.randint(0, 16, (40_000,))
    shapes = [ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, d_model=d) for d in (8, 16)]
    points = scaling.compute_sweep(shapes, [1e7, 4e7], ids[:30_000], ids[30_000:], steps=12, smallest_batch=1,
                                   largest_batch=512, min_steps=2, eval_windows=8)
    assert len(points) == 4
    assert all(abs(p.steps - 12) <= 2 for p in points), [(p.steps, p.batch_size) for p in points]
