"""The chapters read as a book: checks on the source notebooks that need no execution.

These are the conventions of DESIGN.md that a reader sees on the page (the built site is checked
by tests/test_site.py):
- prose is markdown; a code cell that builds a paragraph (``Markdown(...)``) hides its input;
- every figure is numbered, captioned and named (cell metadata ``mystnb.figure``) and referred to
  by that name (``{numref}``) in the chapter's text;
- sections carry labels, are referred to by label rather than typed numbers, and the chapter's
  opening lists every numbered section by its label;
- no history of the code ("earlier versions ...").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HIDDEN = {"hide-input", "remove-input", "remove-cell", "hide-cell"}
SECTION = re.compile(r"^## (\d+)\.(\d+) ", re.M)
LABEL_THEN_SECTION = re.compile(r"^\(([\w-]+)\)=\s*\n## (\d+\.\d+) ", re.M)
TYPED_SECTION = re.compile(r"\b[Ss]ections? \d+\.\d+|§\s*\d")
HISTORY = re.compile(r"\b[Ee]arlier versions?\b|\bused to (fall|be|do|send|run)\b|\bno longer\b")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def markdown(path: Path) -> str:
    return "\n\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")


def hidden(cell: dict) -> bool:
    return bool(HIDDEN & set(cell.get("metadata", {}).get("tags", [])))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_visible_code_cell_builds_prose(path):
    offenders = [i for i, c in enumerate(cells(path))
                 if c["cell_type"] == "code" and "Markdown(" in source(c) and not hidden(c)]
    assert not offenders, (f"{path.name}: code cells {offenders} build prose with Markdown(...) in view; "
                           "write the paragraph as a markdown cell with glued values, or tag the cell "
                           "hide-input")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_is_captioned_named_and_referred_to(path):
    text = markdown(path)
    missing, unreferenced = [], []
    for i, c in enumerate(cells(path)):
        if c["cell_type"] != "code" or "plt.show()" not in source(c):
            continue
        figure = c.get("metadata", {}).get("mystnb", {}).get("figure", {})
        if not figure.get("caption") or not figure.get("name"):
            missing.append(i)
        elif f"`{figure['name']}`" not in text:
            unreferenced.append(figure["name"])
    assert not missing, (f"{path.name}: figure cells {missing} lack metadata mystnb.figure "
                         "{caption, name}; the caption says what to see")
    assert not unreferenced, f"{path.name}: figures {unreferenced} are never referred to with {{numref}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_are_labelled_and_listed_in_the_opening(path):
    text = markdown(path)
    sections = SECTION.findall(text)
    labelled = dict((number, label) for label, number in LABEL_THEN_SECTION.findall(text))
    unlabelled = [f"{a}.{b}" for a, b in sections if f"{a}.{b}" not in labelled]
    assert not unlabelled, f"{path.name}: sections {unlabelled} have no (label)= line above the heading"
    opening = text.split("\n## ", 1)[0]
    unlisted = [number for number, label in labelled.items() if f"`{label}`" not in opening]
    assert not unlisted, f"{path.name}: the chapter's opening does not list sections {unlisted} by label"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_are_referred_to_by_label_and_no_history(path):
    text = markdown(path)
    # The source document's own sections ("the source's section 4.1") are cited by its numbers.
    typed = [m.group(0) for m in TYPED_SECTION.finditer(text)
             if not re.search(r"source|seed|原文", text[max(0, m.start() - 30):m.start()])]
    assert not typed, f"{path.name}: typed section numbers {typed}; refer to sections with {{ref}}`label`"
    history = HISTORY.findall(text)
    assert not history, f"{path.name}: history of the code {history} does not belong in the book"
