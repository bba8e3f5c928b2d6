"""Tables a notebook shows as rendered HTML, not as printed text.

A chapter builds ``table(rows, columns)`` and leaves it as the cell's last expression: Jupyter and
the book render its HTML (class ``lmkit-table``, styled in ``book/_static/outputs.css`` to fit the
text column), a terminal prints its aligned text. Numbers are formatted per column with ordinary
format specs, so a cell states its precision once.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Table", "table"]


def _cell(value: Any, spec: str | None) -> str:
    if value is None:
        return ""
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, int) and not isinstance(value, bool):
        return format(value, ",")
    return str(value)


class Table:
    """Rows of cells with a header; ``_repr_html_`` for notebooks, ``str`` for terminals."""

    def __init__(self, rows: Sequence[Sequence[Any]], columns: Sequence[str],
                 formats: Mapping[str, str] | None = None, caption: str | None = None):
        formats = dict(formats or {})
        unknown = set(formats) - set(columns)
        if unknown:
            raise ValueError(f"formats name columns the table lacks: {sorted(unknown)}; "
                             f"columns are {list(columns)}")
        self.columns = list(columns)
        self.caption = caption
        self.rows: list[list[str]] = []
        for row in rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {list(row)!r} has {len(row)} cells; the table has "
                                 f"{len(self.columns)} columns {self.columns}")
            self.rows.append([_cell(v, formats.get(c)) for v, c in zip(row, self.columns, strict=True)])
        self._numeric = [all(_looks_numeric(r[i]) for r in self.rows if r[i]) and any(r[i] for r in self.rows)
                         for i in range(len(self.columns))]

    def _repr_html_(self) -> str:
        def align(i: int) -> str:
            return ' class="num"' if self._numeric[i] else ""

        head = "".join(f"<th{align(i)}>{html.escape(c)}</th>" for i, c in enumerate(self.columns))
        body = "".join("<tr>" + "".join(f"<td{align(i)}>{html.escape(v)}</td>" for i, v in enumerate(row))
                       + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (f'<table class="lmkit-table">{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")

    def __str__(self) -> str:
        widths = [max([len(c)] + [len(r[i]) for r in self.rows]) for i, c in enumerate(self.columns)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(v.rjust(w) if self._numeric[i] else v.ljust(w)
                             for i, (v, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

        out = [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in self.rows]
        return ((self.caption + "\n") if self.caption else "") + "\n".join(out)

    def __repr__(self) -> str:
        return str(self)


def _looks_numeric(text: str) -> bool:
    cleaned = text.replace(",", "").replace("%", "").replace("x", "").replace("×", "").strip()
    try:
        float(cleaned)
    except ValueError:
        return False
    return True


def table(rows: Sequence[Sequence[Any]] | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
          formats: Mapping[str, str] | None = None, caption: str | None = None) -> Table:
    """A rendered table of ``rows`` (sequences, or mappings keyed by column name).

    ``columns`` defaults to the first mapping's keys; ``formats`` maps a column to a format spec
    (``".3f"``, ``",d"``, ``".1%"``).
    """
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        columns = list(columns or rows[0].keys())
        rows = [[r.get(c) for c in columns] for r in rows]  # type: ignore[union-attr]
    if columns is None:
        raise ValueError("table() needs columns= when rows are sequences")
    return Table(rows, columns, formats, caption)  # type: ignore[arg-type]
