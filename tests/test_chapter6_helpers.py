"""The lab helpers chapter 6 draws and prints with: process groups, rank-group figure, legends, commands."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from lmkit.config import ParallelConfig  # noqa: E402
from lmkit.lab.experiments import wrap_command  # noqa: E402
from lmkit.lab.layouts import ideal_timeline, layout_groups  # noqa: E402
from lmkit.lab.plots import gantt, rank_groups, timeline_legend  # noqa: E402
from lmkit.parallel.mesh import rank_of  # noqa: E402


def test_layout_groups_follow_the_documented_rank_order():
    groups = layout_groups(ParallelConfig(dp=2, tp=2, pp=2))
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["cp"] == [[r] for r in range(8)]
    cp = layout_groups(ParallelConfig(dp=2, cp=2))
    assert cp["cp"] == [[0, 1], [2, 3]] and cp["dp"] == [[0, 2], [1, 3]]


def test_every_rank_is_in_exactly_one_group_of_each_dimension():
    layout = ParallelConfig(dp=2, cp=2, tp=2, pp=2)
    for dim, groups in layout_groups(layout).items():
        members = sorted(r for g in groups for r in g)
        assert members == list(range(16)), dim
    assert [rank_of(1, 1, 1, 2, 2, 1, 2)] == [15]


def test_rank_groups_figure_is_legible():
    fig = rank_groups(ParallelConfig(dp=2, tp=2, pp=2), layout_groups(ParallelConfig(dp=2, tp=2, pp=2)))
    assert fig.get_figwidth() <= 9
    sizes = [t.get_fontsize() for ax in fig.axes for t in ax.texts]
    assert len(sizes) >= 8 and min(sizes) >= 9
    plt.close(fig)


def test_gantt_legend_can_be_shared_below():
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax in axes:
        gantt(ideal_timeline("1f1b", 2, 4), ax=ax, legend=False)
        assert ax.get_legend() is None
    timeline_legend(fig, ["forward", "backward"])
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["forward", "backward"]
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
    plt.close(fig)


def test_wrap_command_keeps_flags_with_their_values():
    command = ("torchrun --standalone --nproc_per_node=8 -m lmkit train --corpus kjv --dp 2 --tp 2 --pp 2 "
               "--zero 1 --sequence-parallel --schedule 1f1b --microbatches 4 --batch-size 64")
    text = wrap_command(command, width=60)
    lines = text.split("\n")
    assert len(lines) > 1 and all(len(line) <= 60 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert text.replace(" \\\n    ", " ") == command
    assert "--batch-size 64" in text
