"""Process groups for a ``dp x cp x tp x pp`` layout of the torchrun world.

Rank order (documented, and relied on everywhere): **tp fastest, then cp, then dp, then pp**::

    global_rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

Tensor-parallel peers therefore have consecutive ranks, so on a GPU cluster they share a node
and its fast NVLink (tensor parallelism communicates inside every layer, twice per block);
context-parallel peers (ring attention: K/V blocks every layer, `lmkit.parallel.context_parallel`)
come next; pipeline stages, which exchange only one activation per microbatch, are the farthest
apart. This is Megatron-LM's default order (tp-cp-dp-pp).

Example, dp=2, tp=2, pp=2, cp=1 (8 ranks)::

    pp stage 0:  dp0 = [0, 1]  dp1 = [2, 3]      tp groups: [0,1] [2,3] [4,5] [6,7]
    pp stage 1:  dp0 = [4, 5]  dp1 = [6, 7]      dp groups: [0,2] [1,3] [4,6] [5,7]
                                                 pp groups: [0,4] [1,5] [2,6] [3,7]

With cp=2, dp=2 (4 ranks) the cp groups are [0,1] [2,3] and the dp groups [0,2] [1,3]. The
parameters are replicated over cp like over dp, so their gradients are averaged over the
``grad_group``, dp x cp ranks ([0,1,2,3] here); every other group keeps its meaning.

Every process must create every group in the same order (``new_group`` is collective), so
`init_topology` builds all of them and keeps the ones this rank belongs to.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lmkit.config import ConfigError, ParallelConfig
from lmkit.parallel.experts import expert_group_lists

__all__ = ["Topology", "init_topology", "elastic_attempt_store", "rank_of", "coords_of", "cp_rank_of",
           "single_process_topology"]


def rank_of(pp_rank: int, dp_rank: int, tp_rank: int, dp: int, tp: int, cp_rank: int = 0, cp: int = 1) -> int:
    """Global rank of the process at (pp_rank, dp_rank, cp_rank, tp_rank)."""
    return ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank


def coords_of(rank: int, dp: int, tp: int, cp: int = 1) -> tuple[int, int, int]:
    """(pp_rank, dp_rank, tp_rank) of a global rank: with `cp_rank_of`, the inverse of `rank_of`."""
    return rank // (dp * cp * tp), (rank // (cp * tp)) % dp, rank % tp


def cp_rank_of(rank: int, tp: int, cp: int) -> int:
    """The context-parallel rank of a global rank."""
    return (rank // tp) % cp


@dataclass
class Topology:
    """Where this process sits in the layout, and the process groups it belongs to.

    Groups are ``None`` when the process group is not initialised (a single process); code
    that communicates checks the size first, so single-process runs never touch
    ``torch.distributed``.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None
    dp_group: object = None
    pp_group: object = None
    embedding_group: object = None  # first and last pipeline stage (tied embedding gradients)
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    cp: int = 1
    cp_rank: int = 0
    cp_group: object = None  # the ring of context parallelism
    grad_group: object = None  # dp x cp: the ranks that average the parameters' gradients
    grad_ranks: list[int] = field(default_factory=lambda: [0])
    # experts (`lmkit.parallel.experts`): ep groups inside dp x cp, their replicas (edp) and, under
    # sequence parallelism, every rank of the stage (all hold different tokens)
    ep: int = 1
    ep_rank: int = 0
    ep_group: object = None
    edp_group: object = None
    edp_ranks: list[int] = field(default_factory=lambda: [0])
    stage_group: object = None

    @property
    def token_group(self) -> object:
        """The ranks whose tokens differ within one pipeline stage (dp x cp, x tp under SP)."""
        if self.stage_group is not None:
            return self.stage_group
        return self.grad_group if self.cp > 1 else self.dp_group

    def expert_view(self) -> Topology:
        """This topology with the edp ranks as its data-parallel group (what the experts'
        `DataParallel` reduces over). Without expert parallelism that is the dense parameters' group,
        dp x cp (`gradient_view`)."""
        if self.ep == 1:
            return self.gradient_view()
        j = self.dp_rank * self.cp + self.cp_rank
        return dataclasses.replace(self, dp=self.dp * self.cp // self.ep, dp_rank=j // self.ep,
                                   dp_group=self.edp_group, dp_ranks=list(self.edp_ranks), cp=1, cp_rank=0)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    def gradient_view(self) -> Topology:
        """This topology with the dp x cp ranks as its data-parallel group (what `DataParallel`
        averages and ZeRO shards over: context parallelism is an extra data dimension for the
        parameters); the same object when cp = 1."""
        if self.cp == 1:
            return self
        return dataclasses.replace(self, dp=self.dp * self.cp, dp_rank=self.dp_rank * self.cp + self.cp_rank,
                                   dp_group=self.grad_group, dp_ranks=list(self.grad_ranks), cp=1, cp_rank=0)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 prints, logs and writes checkpoints' files."""
        return self.rank == 0

    def pp_peer(self, pp_rank: int) -> int:
        """Global rank of the stage `pp_rank` process with this process's dp and tp ranks."""
        return rank_of(pp_rank, self.dp_rank, self.tp_rank, self.dp, self.tp, self.cp_rank, self.cp)


def single_process_topology(device: torch.device | None = None) -> Topology:
    return Topology(device=device or torch.device("cpu"))


def elastic_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store seen through a prefix of this restart attempt; else None.

    torchrun (c10d rendezvous, torch 2.13) hosts one TCPStore in its agent for the whole job and
    hands every attempt of ``--max-restarts`` the same ``MASTER_ADDR:MASTER_PORT``
    (``TORCHELASTIC_USE_AGENT_STORE=True``). ``init_process_group`` keys the group's addresses
    by group name only, so a restarted rank can read the address a killed rank published in
    the previous attempt and gloo's ``connectFullMesh`` fails ("Connection refused"; NCCL gets
    a stale unique id, pytorch#135712). Keying by ``TORCHELASTIC_RESTART_COUNT`` gives every
    attempt fresh keys. The count is per agent: on several nodes where only one restarts,
    launch torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` instead (a new store each time).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"lmkit/attempt_{attempt}/", store)


def init_topology(cfg: ParallelConfig, device: str = "auto", timeout_s: float = 300.0) -> Topology:
    """Initialise ``torch.distributed`` from torchrun's environment and build the groups.

    Backend: NCCL when CUDA is present (one GPU per process, ``LOCAL_RANK``), gloo otherwise.
    The layout is validated against ``WORLD_SIZE`` *before* any collective, so a wrong launch
    fails at once on every rank with the same message instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.validate(world_size=world)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world == 1:
        return single_process_topology(dev)
    timeout = datetime.timedelta(seconds=timeout_s)  # every group's: new_group defaults to 30 min, not this
    if not dist.is_initialized():
        store = elastic_attempt_store(timeout)
        kwargs: dict = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                                 "world_size": world}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **kwargs)
    rank = dist.get_rank()
    dp, tp, pp, cp = cfg.dp, cfg.tp, cfg.pp, cfg.cp
    pp_rank, dp_rank, tp_rank = coords_of(rank, dp, tp, cp)
    topo = Topology(dp, tp, pp, rank, dp_rank, tp_rank, pp_rank, dev, cp=cp, cp_rank=cp_rank_of(rank, tp, cp))

    def build(groups: list[list[int]]) -> tuple[object, list[int]]:
        mine, ranks_of_mine = None, [rank]
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine, ranks_of_mine = group, ranks
        return mine, ranks_of_mine

    def at(p: int, d: int, c: int, t: int) -> int:
        return rank_of(p, d, t, dp, tp, c, cp)

    ev = [(p, d, c, t) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]
    topo.tp_group, topo.tp_ranks = build([[at(p, d, c, t) for t in range(tp)] for p, d, c, t in ev if t == 0])
    topo.dp_group, topo.dp_ranks = build([[at(p, d, c, t) for d in range(dp)] for p, d, c, t in ev if d == 0])
    topo.pp_group, topo.pp_ranks = build([[at(p, d, c, t) for p in range(pp)] for p, d, c, t in ev if p == 0])
    if pp > 1:
        topo.embedding_group, _ = build([[at(0, d, c, t), at(pp - 1, d, c, t)]
                                         for p, d, c, t in ev if p == 0])
    if cfg.ep > 1:
        topo.ep, topo.ep_rank = cfg.ep, (dp_rank * cp + topo.cp_rank) % cfg.ep
        ep_lists, edp_lists = expert_group_lists(dp, cp, cfg.ep)
        for lists, attr in ((ep_lists, "ep"), (edp_lists, "edp")):
            group, ranks = build([[at(p, j // cp, j % cp, t) for j in js]
                                  for p in range(pp) for t in range(tp) for js in lists])
            setattr(topo, f"{attr}_group", group)
            if attr == "edp":
                topo.edp_ranks = ranks
    if cfg.sequence_parallel:  # (a stage is one dp x cp slice: its tp group)
        topo.stage_group = build([[at(p, d, c, t) for d in range(dp) for c in range(cp) for t in range(tp)]
                                  for p in range(pp)])[0] if dp * cp > 1 else topo.tp_group
    if cp > 1:
        topo.cp_group, _ = build([[at(p, d, c, t) for c in range(cp)] for p, d, c, t in ev if c == 0])
        topo.grad_group, topo.grad_ranks = build(
            [[at(p, d, c, t) for d in range(dp) for c in range(cp)] for p, d, c, t in ev if d == c == 0])
    return topo
