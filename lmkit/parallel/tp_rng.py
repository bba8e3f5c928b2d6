"""Dropout's random streams under tensor parallelism: one replicated, one per tp rank.

Megatron-LM's "model-parallel RNG tracker" (Shoeybi et al. 2019): where tp ranks hold the same
data a dropout must draw the same mask on every rank, where they hold different data (other
heads; any activation under sequence parallelism) each rank its own. The plan
(`lmkit.parallel.plan`) says which stream each dropout and the attention use. The book,
chapter 5, section 5.4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["TPRNGTracker", "get_tp_rng_tracker", "seed_tp_rng", "fork_tp_rng", "replicated_rng",
           "RegionDropout", "run_in_tp_rng"]


def _cuda_active() -> bool:
    # only a process that already uses CUDA swaps CUDA states (never create a context for it)
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _cuda_state(seed: int) -> Tensor:
    gen = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
    return gen.manual_seed(seed).get_state()


def _get_rng_states() -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_active() else None


def _set_rng_states(states: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


class TPRNGTracker:
    """Two random streams: the default one (the same on every tp rank) and a per-tp-rank one.

    Megatron's "model-parallel RNG tracker". Dropout must draw

    - the **same** mask on every tp rank where the ranks hold the same data (the residual stream
      without SP): otherwise the replicas drift apart and the model is no longer one model;
    - **different** masks where ranks hold different data (attention probabilities of different
      heads; any activation under SP): otherwise every shard gets the same pattern and the
      dropout noise is correlated in a way the single-process model's is not.

    The default generator stays in step on all tp ranks because they all seed it alike and
    draw from it identically; `fork` swaps in the per-rank state (seeded from ``(seed,
    tp_rank)``, offset 2718 as in Megatron) and swaps back, keeping the advanced state for the
    next fork. `unfork` temporarily returns to the default stream inside a fork (the residual
    dropout inside the attention module without SP).
    """

    OFFSET = 2718

    def __init__(self) -> None:
        self.states: tuple[Tensor, Tensor | None] | None = None
        self._outer: tuple[Tensor, Tensor | None] | None = None  # default state while forked
        self.seed_value: int | None = None

    @property
    def forked(self) -> bool:
        return self._outer is not None

    def seed(self, seed: int, tp_rank: int) -> None:
        value = seed + self.OFFSET + tp_rank
        cpu = torch.Generator().manual_seed(value).get_state()
        cuda = _cuda_state(value) if _cuda_active() else None
        self.states, self._outer, self.seed_value = (cpu, cuda), None, value

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Draw from this tp rank's own stream inside the block (re-entrant)."""
        if self.forked:
            yield
            return
        if self.states is None:
            raise RuntimeError("the tensor-parallel RNG is not seeded: call seed_tp_rng(seed, tp_rank) "
                               "(parallelize_stage does it)")
        if self.states[1] is None and _cuda_active():  # CUDA came into use after seeding
            self.states = (self.states[0], _cuda_state(self.seed_value))
        self._outer = _get_rng_states()
        _set_rng_states(self.states)
        try:
            yield
        finally:
            self.states = _get_rng_states()
            _set_rng_states(self._outer)
            self._outer = None

    @contextlib.contextmanager
    def unfork(self) -> Iterator[None]:
        """Draw from the default (replicated) stream inside the block, even within a fork."""
        if not self.forked:
            yield
            return
        self.states = _get_rng_states()
        _set_rng_states(self._outer)
        self._outer = None
        try:
            yield
        finally:
            self._outer = _get_rng_states()
            _set_rng_states(self.states)

    def state_dict(self) -> dict:
        return {"states": self.states, "seed_value": self.seed_value}

    def load_state_dict(self, state: dict) -> None:
        self.states, self.seed_value, self._outer = state["states"], state["seed_value"], None


_TRACKER = TPRNGTracker()


def get_tp_rng_tracker() -> TPRNGTracker:
    """The process-wide tracker (one per process, like the default generator it shadows)."""
    return _TRACKER


def seed_tp_rng(seed: int, tp_rank: int) -> None:
    """(Re)seed this rank's tensor-parallel stream from ``(seed, tp_rank)``."""
    _TRACKER.seed(seed, tp_rank)


def fork_tp_rng() -> contextlib.AbstractContextManager:
    """Context manager: dropout inside draws this tp rank's own masks."""
    return _TRACKER.fork()


def replicated_rng() -> contextlib.AbstractContextManager:
    """Context manager: dropout inside draws the masks shared by all tp ranks."""
    return _TRACKER.unfork()


class RegionDropout(nn.Dropout):
    """``nn.Dropout`` that draws from the replicated (``region="replicated"``) or the per-tp-rank
    (``region="tp"``) stream."""

    def __init__(self, p: float, region: str) -> None:
        super().__init__(p)
        if region not in ("replicated", "tp"):
            raise ValueError(f"region must be 'replicated' or 'tp', got {region!r}")
        self.region = region

    def forward(self, x: Tensor) -> Tensor:
        with fork_tp_rng() if self.region == "tp" else replicated_rng():
            return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, region={self.region}"


def run_in_tp_rng(module: nn.Module) -> None:
    """Make `module`'s forward draw from this tp rank's stream (its dropouts that must stay
    replicated escape with `replicated_rng`): forward hooks, so the module keeps its class, its
    parameters and its ``state_dict`` names."""
    forks: list[contextlib.AbstractContextManager] = []

    def enter(_module: nn.Module, _args: tuple) -> None:
        forks.append(fork_tp_rng())
        forks[-1].__enter__()

    def leave(_module: nn.Module, _args: tuple, _out: object) -> None:
        forks.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
