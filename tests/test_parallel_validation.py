"""Layout errors are found before any process communicates, each with one clear message."""

from __future__ import annotations

import pytest

from lmkit.config import ConfigError, ParallelConfig, TrainConfig
from lmkit.parallel.engine import validate_layout
from lmkit.parallel.mesh import coords_of, cp_rank_of, rank_of

MODEL = dict(n_layer=4, n_head=4, vocab_size=64, block_size=16)


@pytest.mark.parametrize(
    "parallel, train, world, fragment",
    [
        (ParallelConfig(dp=2, tp=2), TrainConfig(batch_size=8), 2, "the world has 2 processes but dp*cp"),
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
        (ParallelConfig(cp=3), TrainConfig(batch_size=8), None,
         "model.block_size=16: sequence length 16 is not divisible by 6"),
        (ParallelConfig(cp=16), TrainConfig(batch_size=8), 16, "a sequence length that is a multiple of 32"),
        (ParallelConfig(cp=8), TrainConfig(batch_size=8), 8, None),
        (ParallelConfig(cp=8, tp=4, sequence_parallel=True), TrainConfig(batch_size=8), None,
         "2 tokens per context-parallel rank is not divisible by parallel.tp=4"),
        (ParallelConfig(cp=4, tp=4, sequence_parallel=True), TrainConfig(batch_size=8), None, None),
        (ParallelConfig(cp=2, dp=2), TrainConfig(batch_size=8), 3, "dp*cp*tp*pp = 2*2*1*1 = 4"),
        (ParallelConfig(cp=2, engine="native"), TrainConfig(batch_size=8), None, "needs engine='lmkit"),
        (ParallelConfig(cp=0), TrainConfig(batch_size=8), None, "parallel.cp must be a positive integer"),
        (ParallelConfig(cp=2, dp=2, tp=2, pp=2, microbatches=2), TrainConfig(batch_size=8), 16, None),
    ],
)
def test_layout_errors(parallel, train, world, fragment):
    if fragment is None:
        validate_layout(parallel, train, **MODEL, world_size=world)
        return
    with pytest.raises(ConfigError) as err:
        validate_layout(parallel, train, **MODEL, world_size=world)
    assert fragment in str(err.value)


def test_cp_refuses_attention_dropout():
    with pytest.raises(ConfigError, match="ring attention has no attention dropout but model.dropout=0.1"):
        validate_layout(ParallelConfig(cp=2), TrainConfig(batch_size=8), **MODEL, dropout=0.1)


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


def test_rank_order_is_tp_then_cp_then_dp_then_pp():
    dp, cp, tp, pp = 2, 2, 2, 2
    grid = [(p, d, c, t) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]
    assert [rank_of(p, d, t, dp, tp, c, cp) for p, d, c, t in grid] == list(range(16))
    for p, d, c, t in grid:
        rank = rank_of(p, d, t, dp, tp, c, cp)
        assert coords_of(rank, dp, tp, cp) == (p, d, t) and cp_rank_of(rank, tp, cp) == c
