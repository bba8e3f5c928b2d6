"""The pipeline's bubble: how long every rank idles in one step, per schedule, in closed form.

Pure Python like the rest of `lmkit.costs`; `lmkit.parallel.pipeline.ideal_timeline` replays the
engine's schedules, and the tests check that the two agree exactly. The book, chapter 5 (pipeline
parallelism, zero-bubble pipelines).
"""

from __future__ import annotations

from lmkit.costs.layout import SCHEDULES
from lmkit.costs.model import CostError

__all__ = ["bubble_time", "bubble_fraction"]


def bubble_time(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1, t_f: float = 1.0,
                t_b: float = 1.0, t_w: float = 1.0) -> float:
    """Idle time of every rank in one pipeline step, with a forward taking `t_f`, the input gradient
    `t_b` and the weight gradients `t_w` per stage (a whole backward: ``t_b + t_w``), free messages,
    and an optimizer step that waits for all stages.

    GPipe, 1F1B: ``(p-1)(t_F + t_B + t_W)``; interleaved: the same over ``v`` (Narayanan et al. 2021);
    ZB-H1: ``(p-1) max(t_F, t_F + t_B - t_W)`` (Qi et al. 2024: the W's wait in 1F1B's bubble; its
    floor ``(p-1) t_F`` is the first forward's way to the last stage). Checked against
    `lmkit.parallel.pipeline.ideal_timeline` in the tests.
    """
    if min(pp, microbatches, virtual_stages) < 1:
        raise CostError("pp, microbatches and virtual_stages must be >= 1")
    if schedule not in SCHEDULES:
        raise CostError(f"schedule={schedule!r} has no bubble formula here; use one of "
                        f"{', '.join(SCHEDULES)}")
    if schedule == "zb-h1":
        return (pp - 1) * max(t_f, t_f + t_b - t_w)
    return (pp - 1) * (t_f + t_b + t_w) / (virtual_stages if schedule == "interleaved" else 1)


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1, schedule: str | None = None,
                    t_f: float = 1.0, t_b: float = 1.0, t_w: float = 1.0) -> float:
    """Idle fraction of a pipeline step, `bubble_time` over the step: ``(p-1) / (v m + p - 1)`` for
    GPipe, 1F1B (``v = 1``) and interleaved 1F1B with equal times (Huang et al. 2019; Narayanan et al.
    2021, section 2.2); ``(p-1) / (3 m + p - 1)`` for ZB-H1 with ``t_F = t_B = t_W``. Without a
    `schedule`: 1F1B, or the interleaved schedule when ``virtual_stages > 1``."""
    schedule = schedule or ("interleaved" if virtual_stages > 1 else "1f1b")
    idle = bubble_time(schedule, pp, microbatches, virtual_stages, t_f, t_b, t_w)
    return idle / (idle + microbatches * (t_f + t_b + t_w))
