"""One command starts and restarts a run: a rank SIGKILLed mid-run under ``torchrun
--max-restarts 1`` is restarted with its group, resumes from ``latest`` and ends on the same loss
as an uninterrupted run; a hung rank makes its peers fail after ``--timeout`` with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmkit.config import ParallelConfig
from lmkit.parallel.launch import run_local

ARGS = ["--corpus", "tinyshakespeare", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size",
        "32", "--batch-size", "8", "--max-steps", "60", "--log-interval", "1", "--eval-interval", "0",
        "--checkpoint-interval", "10", "--dp", "2", "--resume", "auto"]

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def _rank_pid(launcher: int, rank: int, attempt: int) -> int | None:
    """PID of the worker with this RANK in this torchrun attempt, or None (not started yet)."""
    want = {f"RANK={rank}".encode(), f"TORCHELASTIC_RESTART_COUNT={attempt}".encode()}
    for pid in _children(launcher):
        with contextlib.suppress(OSError):
            if want <= set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                return pid
    return None


def _logged_steps(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def _cli_worker(argv: list[str]) -> int:
    from lmkit.cli import main

    return main(argv)


def test_sigkill_of_one_rank_restarts_and_ends_on_the_same_loss(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMKIT_CACHE": str(tmp_path / "cache")}
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    # the uninterrupted run: the same code on 2 forked ranks (no torchrun start-up to pay)
    with_cache = {"LMKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    reference_argv = ["train", *ARGS, "--out-dir", str(reference_dir)]
    assert run_local(2, _cli_worker, reference_argv, env=with_cache) == [0, 0]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "--max-restarts", "1", "-m", "lmkit", "train",
         *ARGS, "--out-dir", str(killed_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and launcher.poll() is None:
            steps = [e["step"] for e in _logged_steps(killed_dir / "metrics.jsonl") if e["kind"] == "train"]
            if steps and steps[-1] >= 15:  # past the checkpoint of step 10, before the one of step 20
                victim = _rank_pid(launcher.pid, rank=1, attempt=0)
            time.sleep(0.01)
        assert victim is not None, "the run ended (or stalled) before rank 1 could be killed"
        os.kill(victim, signal.SIGKILL)
        killed_at = max(e["step"] for e in _logged_steps(killed_dir / "metrics.jsonl")
                        if e["kind"] == "train")
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-3000:]
    assert "no checkpoint in" in output, output[-3000:]  # attempt 0 started fresh with --resume auto
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", output)
    assert resumed, output[-3000:]  # attempt 1 continued from latest
    assert 10 <= int(resumed.group(2)) <= killed_at < 60 and int(resumed.group(2)) % 10 == 0
    final = [e for e in _logged_steps(killed_dir / "metrics.jsonl")
             if e["kind"] == "train" and e["step"] == 60]
    reference = [e for e in _logged_steps(reference_dir / "metrics.jsonl") if e["kind"] == "train"
                 and e["step"] == 60]
    assert len(final) == 1 and len(reference) == 1
    assert abs(final[0]["loss"] - reference[0]["loss"]) <= 1e-6 * reference[0]["loss"], (final, reference)
    assert (killed_dir / "latest").read_text().strip() == "step_000060"
    print(f"killed rank 1 at step {killed_at}: final loss {final[0]['loss']:.8f} vs uninterrupted "
          f"{reference[0]['loss']:.8f}")


def _hung_worker(argv: list[str]) -> tuple[int, str]:
    """Rank 0 trains; rank 1 joins the process groups and then hangs (never enters a collective)."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        from lmkit.parallel.mesh import init_topology

        init_topology(ParallelConfig(dp=2), "cpu", timeout_s=30)
        time.sleep(12)
        return 0, ""
    from lmkit.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_a_hung_rank_makes_its_peers_fail_after_the_timeout_with_one_line(tmp_path):
    env = {"LMKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    argv = ["train", *ARGS, "--out-dir", str(tmp_path / "hung"), "--timeout", "3"]
    started = time.monotonic()
    (code, err), _ = run_local(2, _hung_worker, argv, env=env, timeout=120)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lmkit: error: rank 0: a collective failed (") and "past --timeout 3 s" in err, err
    assert "Traceback" not in err and time.monotonic() - started < 60


def _subgroup_timeout_worker(layout: dict, group: str) -> float | None:
    """Rank 1 never joins; rank 0 reports how long its collective on `group` waited before failing."""
    import torch
    import torch.distributed as dist

    from lmkit.parallel.mesh import init_topology

    topo = init_topology(ParallelConfig(**layout), "cpu", timeout_s=2)
    if topo.rank == 1:
        time.sleep(5)
        return None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=getattr(topo, group))
    except RuntimeError:
        return time.monotonic() - started
    raise AssertionError("the collective succeeded without rank 1")


@pytest.mark.parametrize("layout, group", [({"dp": 2}, "dp_group"), ({"tp": 2}, "tp_group"),
                                           ({"pp": 2, "microbatches": 2}, "pp_group")])
def test_the_timeout_holds_for_every_process_group(layout, group):
    """``new_group`` defaults to 30 minutes on gloo; every group of the layout gets ``--timeout``."""
    waited, _ = run_local(2, _subgroup_timeout_worker, layout, group, timeout=60)
    assert 1.5 < waited < 5, waited
