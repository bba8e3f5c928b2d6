"""Chapter 6 plots a results folder of any size of torchrun launch (its parameter RESULTS).

A GPU reader may have one launch of the chapter's program, not the 1-, 2-, 4- and 8-process ones
that add up to all its layouts. The notebook must then plot and check what the folder holds, say in
one line which layouts it lacks and the launches that add them, and skip (saying so) the parts
that need them. Two folders are made with the real program under torchrun (gloo on the CPU,
``--smoke --steps 6``): one launch of 2 processes (all of the smoke set but the 8-process 3-D
layout) and one of 1 process (the single-process reference alone, no checkpoint experiment).
The line itself is checked first on hand-made results, without launching anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from execute import execute_notebook  # book/tools, put on sys.path by conftest

from lmkit.lab.experiments import chapter6_command, chapter6_layouts, missing_layouts, missing_notice
from lmkit.lab.layouts import label

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_hybrid_parallel_practice.ipynb"
STEPS = 6
#: What the notebook records (lmkit.lab.report) when the folder holds every layout it needs.
ALL_FIGURES = {"layouts_run", "loss_diff_neglog10", "resume_diff_neglog10", "bytes_exact_fraction",
               "memory_exact_fraction", "ideal_bubble_interleaved", "cp_loss_diff_neglog10",
               "cp_bytes_exact_fraction", "cp_ring_blocks_per_pass"}


def _results(names: list[str], smoke: bool = True, checkpoint: bool = True, steps: int = STEPS,
             device: str = "auto") -> dict:
    """A `load_results` answer holding the layouts `names` (their contents do not matter here)."""
    manifest = {"runs": [{"smoke": smoke}], "steps": steps, "train": {"device": device}}
    return {"manifest": manifest, "layouts": {n: {} for n in names}, "checkpoint": {} if checkpoint else None}


def test_missing_layouts_are_named_by_the_processes_they_need():
    smoke = [label(p) for p in chapter6_layouts(smoke=True)]
    three_d = "dp2 zero1 x tp2 sp x pp2 1f1b m2"
    results = _results([n for n in smoke if n != three_d])
    assert missing_layouts(results) == {8: [three_d]}
    line = missing_notice(results, "runs/ch6")
    assert "\n" not in line and line.startswith("not in runs/ch6: 8-process layout (" + three_d + ")")
    assert f"`{chapter6_command(8, 'runs/ch6', results['manifest'])}`" in line
    assert "--nproc_per_node=8" in line and "--smoke --steps 6" in line  # adds up: the folder's own options
    assert missing_notice(_results(smoke), "runs/ch6") == ""


def test_a_folder_without_the_reference_says_the_loss_comparisons_are_skipped():
    full = [label(p) for p in chapter6_layouts()]
    results = _results(full[1:], smoke=False, steps=20)
    assert missing_layouts(results) == {1: ["1 process"]}
    line = missing_notice(results, "out")
    assert line.startswith("not in out: 1-process layout (1 process: the reference every loss comparison is "
                           "against, so those are skipped")
    assert "`torchrun --standalone --nproc_per_node=1 -m lmkit.lab.experiments chapter6 --out out`" in line


def test_a_one_process_folder_lacks_every_other_world_and_the_checkpoint():
    results = _results(["1 process"], smoke=False, checkpoint=False, steps=20, device="cpu")
    missing = missing_layouts(results)
    assert sorted(missing) == [2, 4, 8] and sum(map(len, missing.values())) == len(chapter6_layouts()) - 1
    line = missing_notice(results, "d")
    assert "the checkpoint experiment" in line and "1-process" not in line
    for world in (2, 4, 8):
        assert f"{world}-process layouts (" in line
        assert f"--nproc_per_node={world} -m lmkit.lab.experiments chapter6 --out d --device cpu`" in line
    assert "--steps" not in line and "--smoke" not in line  # the defaults of a full run


# --------------------------------------------------------------------------- the real program and notebook


def _launch(out: Path, processes: int) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "lmkit.lab.experiments", "chapter6", "--out", str(out), "--smoke", "--steps", str(STEPS)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_folder(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("ch6-2") / "results", 2)


@pytest.fixture(scope="module")
def one_process_folder(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("ch6-1") / "results", 1)


def _run_notebook(folder: Path, target: Path) -> tuple[list[str], dict[str, float]]:
    """Execute the chapter on `folder`; its output lines (printed and displayed) and the figures it
    recorded from the folder (not those of section 6.7's memory at start, measured where it runs)."""
    result = execute_notebook(NOTEBOOK, target, smoke=True, parameters={"RESULTS": str(folder)}, timeout=300)
    lines = []
    for cell in json.loads(result.notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/markdown", "")
            lines += "".join(text).splitlines()
    return lines, {k: v for k, v in result.figures.items() if k != "start_peak_over_model"}


def _notice(lines: list[str], folder: Path) -> str:
    (line,) = [line for line in lines if line.startswith(f"not in {folder}:")]  # one line, once
    return line


@pytest.mark.distributed
@pytest.mark.notebooks
def test_the_chapter_runs_on_the_results_of_one_two_process_launch(two_process_folder, tmp_path):
    lines, figures = _run_notebook(two_process_folder, tmp_path / "ch6.ipynb")
    line = _notice(lines, two_process_folder)
    assert "8-process layout (dp2 zero1 x tp2 sp x pp2 1f1b m2)" in line
    command = (f"--nproc_per_node=8 -m lmkit.lab.experiments chapter6 --out {two_process_folder} --smoke "
               "--steps 6")
    assert command in line
    assert "1-process" not in line and "2-process" not in line and "checkpoint" not in line
    assert any(x.startswith("skipped: 6.7, the 3-D layout term by term:") for x in lines)
    # everything the folder holds was checked: every figure is there, the layouts of 2 ranks compared
    assert set(figures) == ALL_FIGURES
    assert figures["layouts_run"] == sum(1 for p in chapter6_layouts(smoke=True) if p and p.world_size == 2)
    assert figures["loss_diff_neglog10"] > 5 and figures["resume_diff_neglog10"] > 5
    assert figures["bytes_exact_fraction"] == figures["memory_exact_fraction"] == 1


@pytest.mark.distributed
@pytest.mark.notebooks
def test_the_chapter_runs_on_the_reference_of_a_one_process_launch(one_process_folder, tmp_path):
    lines, figures = _run_notebook(one_process_folder, tmp_path / "ch6.ipynb")
    line = _notice(lines, one_process_folder)
    assert "1-process" not in line and "the checkpoint experiment" in line
    for world in (2, 8):  # the smoke set has no layout of 4 ranks
        assert f"{world}-process layout" in line and f"--nproc_per_node={world} " in line
    assert "4-process" not in line
    skipped = " ".join(x for x in lines if x.startswith("skipped: "))
    for part in ("6.4, the loss curves", "6.5, the checkpoint experiment", "6.6, the pipeline schedules",
                 "6.6, the steps of ring attention", "6.7, the 3-D layout", "exercise 4"):
        assert f"skipped: {part}" in skipped, part
    assert figures == {"layouts_run": 0}  # nothing to compare with the reference
