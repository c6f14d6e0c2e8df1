"""Plotly charts drawn from a table for the `make_chart` tool, kept as figure JSON with the answer.

Why figure JSON: the chat page draws it with `st.plotly_chart` now and after every reload, and the conversation
keeps exactly what was shown. Every text in a figure (title, labels, categories) comes from a spreadsheet or a
model, and Plotly renders a few HTML tags in text, so `<`, `>` and `&` are written as entities: a label reading
`<img onerror=…>` shows as those characters and never becomes markup. Figures use Plotly's empty "none"
template, so they stay small in the database and Streamlit's theme styles them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from clawdbot.documents import Cell, Table
from clawdbot.errors import ClawdbotError
from clawdbot.table_query import to_number

CHART_KINDS = ("bar", "line", "pie")
MAX_POINTS = 500
MAX_SLICES = 50
MAX_SERIES = 6
MAX_LABEL_CHARS = 80


class ChartError(ClawdbotError):
    """The chart cannot be drawn as asked (unknown column, nothing numeric); the message says what would work."""


@dataclass(frozen=True)
class Chart:
    """A drawn chart: what it shows, in words, and its Plotly figure as JSON-ready data."""

    title: str
    kind: str
    figure: dict[str, Any]
    points: int

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "kind": self.kind, "figure": self.figure}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chart:
        figure = data.get("figure") or {}
        points = sum(len(trace.get("x") or trace.get("labels") or ()) for trace in figure.get("data", ()))
        return cls(str(data.get("title", "")), str(data.get("kind", "")), figure, points)


def plain(text: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """Text safe inside a Plotly figure: one line, at most `limit` characters, no markup."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _column(table: Table, name: str) -> int:
    wanted = " ".join(name.split()).casefold()
    for index, column in enumerate(table.columns):
        if " ".join(str(column).split()).casefold() == wanted:
            return index
    listed = ", ".join(repr(str(c)) for c in table.columns[:40])
    raise ChartError(f"the table {table.name!r} has no column {name!r}; its columns are: {listed}")


def _numeric(table: Table, index: int) -> bool:
    values = [row[index] for row in table.rows[:200] if index < len(row) and row[index] not in (None, "")]
    return bool(values) and all(to_number(v) is not None for v in values)


def build_chart(
    table: Table, kind: str, x: str | None = None, y: list[str] | None = None, title: str = ""
) -> Chart:
    """A `kind` chart of `table`: categories from column `x`, values from the `y` columns.

    Without `x` the first non-numeric column is used; without `y`, the last numeric column.
    """
    if kind not in CHART_KINDS:
        raise ChartError(f"unknown chart kind {kind!r}: use one of {', '.join(CHART_KINDS)}")
    if not table.rows:
        raise ChartError(f"the table {table.name!r} has no rows to draw")
    columns = range(len(table.columns))
    x_index = _column(table, x) if x else next((i for i in columns if not _numeric(table, i)), 0)
    if y:
        y_indexes = [_column(table, name) for name in y[:MAX_SERIES]]
    else:
        numeric = [i for i in columns if i != x_index and _numeric(table, i)]
        if not numeric:
            raise ChartError(f"the table {table.name!r} has no numeric column to draw: name one with y")
        y_indexes = [numeric[-1]]
    limit = MAX_SLICES if kind == "pie" else MAX_POINTS
    if len(table.rows) > limit:
        raise ChartError(
            f"the table has {len(table.rows)} rows, more than a {kind} chart shows ({limit}): "
            "group or limit it with query_table first"
        )
    labels = [plain(_cell(row, x_index)) for row in table.rows]
    traces: list[go.Bar | go.Scatter | go.Pie] = []
    for index in y_indexes:
        values = [to_number(_cell(row, index)) for row in table.rows]
        if all(v is None for v in values):
            raise ChartError(f"the column {table.columns[index]!r} holds no numbers to draw")
        name = plain(table.columns[index])
        if kind == "bar":
            traces.append(go.Bar(x=labels, y=values, name=name))
        elif kind == "line":
            traces.append(go.Scatter(x=labels, y=values, name=name, mode="lines+markers"))
        else:
            traces.append(go.Pie(labels=labels, values=values, name=name, sort=False))
            break  # one pie per chart
    shown_title = title.strip() or f"{table.columns[y_indexes[0]]} by {table.columns[x_index]}"
    layout: dict[str, Any] = {"template": "none", "title": {"text": plain(shown_title, 120)}}
    if kind != "pie":
        layout["xaxis"] = {"title": {"text": plain(table.columns[x_index])}, "type": "category"}
        layout["yaxis"] = {"title": {"text": plain(table.columns[y_indexes[0]])}}
        layout["showlegend"] = len(traces) > 1
    figure = go.Figure(data=traces, layout=layout)
    data: dict[str, Any] = json.loads(figure.to_json())
    return Chart(" ".join(shown_title.split())[:120], kind, data, len(labels))


def _cell(row: list[Cell], index: int) -> Cell:
    return row[index] if index < len(row) else None
