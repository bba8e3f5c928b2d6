"""lmkit.lab.tables: rendered tables for the book (section conventions in DESIGN.md)."""

import pytest

from lmkit.lab.tables import table


def test_html_has_header_rows_and_right_aligned_numbers():
    t = table([("dp2", 1.5e-7, 12_000), ("tp2 <sp>", 2.0e-7, 8)], columns=["layout", "diff", "bytes"],
              formats={"diff": ".1e"}, caption="Loss difference")
    html = t._repr_html_()
    assert html.count("<tr>") == 3
    assert "<caption>Loss difference</caption>" in html
    assert '<td class="num">1.5e-07</td>' in html and '<td class="num">12,000</td>' in html
    assert "tp2 &lt;sp&gt;" in html                       # escaped, not markup
    lines = str(t).splitlines()
    assert lines[1].split()[0] == "layout" and lines[-1].endswith("8")


def test_mapping_rows_and_bad_shapes():
    t = table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}])
    assert t.columns == ["a", "b"] and t.rows == [["1", "x"], ["2", "y"]]
    with pytest.raises(ValueError, match="has 1 cells"):
        table([(1,)], columns=["a", "b"])
    with pytest.raises(ValueError, match="formats name columns"):
        table([(1,)], columns=["a"], formats={"z": ".1f"})
    with pytest.raises(ValueError, match="needs columns"):
        table([(1,)])
