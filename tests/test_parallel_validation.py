"""Layout errors are found before any process communicates, each with one clear message."""

from __future__ import annotations

import pytest

from lmkit.config import ConfigError, ParallelConfig, TrainConfig
from lmkit.parallel.engine import validate_layout
from lmkit.parallel.mesh import coords_of, rank_of

MODEL = dict(n_layer=4, n_head=4, vocab_size=64, block_size=16)


@pytest.mark.parametrize(
    "parallel, train, world, fragment",
    [
        (ParallelConfig(dp=2, tp=2), TrainConfig(batch_size=8), 2, "the world has 2 processes but dp*tp*pp"),
        (ParallelConfig(tp=3), TrainConfig(batch_size=8), 3, "n_head=4 is not divisible by parallel.tp=3"),
        (ParallelConfig(tp=4), TrainConfig(batch_size=8), None, None),
        (ParallelConfig(pp=8, microbatches=8), TrainConfig(batch_size=8), None, "but model.n_layer=4"),
        (ParallelConfig(pp=2, virtual_stages=4, schedule="interleaved", microbatches=4),
         TrainConfig(batch_size=8), None, "pp=2 x virtual_stages=4"),
        (ParallelConfig(pp=4, microbatches=2), TrainConfig(batch_size=8), None, "microbatches=2 < pp=4"),
        (ParallelConfig(pp=2, microbatches=3, schedule="interleaved", virtual_stages=2),
         TrainConfig(batch_size=12), None, "divisible by pp"),
        (ParallelConfig(dp=2, microbatches=4), TrainConfig(batch_size=12), None, "2 x 1 x 4 = 8"),
        (ParallelConfig(dp=1, zero=1), TrainConfig(batch_size=8), None, "zero=1 shards over data-parallel"),
        (ParallelConfig(tp=2, sequence_parallel=True), TrainConfig(batch_size=8), None, None),
        (ParallelConfig(sequence_parallel=True), TrainConfig(batch_size=8), None, "sequence_parallel needs"),
    ],
)
def test_layout_errors(parallel, train, world, fragment):
    if fragment is None:
        validate_layout(parallel, train, **MODEL, world_size=world)
        return
    with pytest.raises(ConfigError) as err:
        validate_layout(parallel, train, **MODEL, world_size=world)
    assert fragment in str(err.value)


def test_vocab_not_divisible_by_tp():
    with pytest.raises(ConfigError, match="vocabulary .65 tokens. is not divisible by parallel.tp=2"):
        validate_layout(ParallelConfig(tp=2), TrainConfig(batch_size=8), n_layer=2, n_head=2, vocab_size=65,
                        block_size=16)


def test_rank_order_is_tp_fastest_then_dp_then_pp():
    dp, tp, pp = 2, 2, 2
    ranks = [rank_of(p, d, t, dp, tp) for p in range(pp) for d in range(dp) for t in range(tp)]
    assert ranks == list(range(8))
    assert all(coords_of(rank_of(p, d, t, dp, tp), dp, tp) == (p, d, t)
               for p in range(pp) for d in range(dp) for t in range(tp))
