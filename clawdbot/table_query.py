"""Filter, group, aggregate, sort and top-N over an attached sheet, computed by clawdbot itself.

Why not let the model write code: a spreadsheet comes from anyone and the model's arguments are untrusted, so a
query is plain data (the `query_table` tool's JSON arguments, validated against `QUERY_SCHEMA`) interpreted by
the few operations below, with no expression language and no code execution. Column names match without regard
to letter case or surrounding spaces; numbers written as text ("1,234.50", "$12", "7%") count as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clawdbot.documents import Cell, Table
from clawdbot.errors import ClawdbotError

MAX_RESULT_ROWS = 1000
AGGREGATES = ("sum", "count", "mean", "min", "max")
OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "contains", "in")

QUERY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "document": {"type": "string", "description": "Name of the attached file; default: the first one"},
        "table": {"type": "string", "description": "Sheet name; default: the first sheet"},
        "filters": {
            "type": "array",
            "maxItems": 20,
            "description": "Keep only rows matching every filter",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["column", "op", "value"],
                "properties": {
                    "column": {"type": "string"},
                    "op": {"enum": list(OPERATORS)},
                    "value": {
                        "description": "A number or text; a list for 'in'",
                        "type": ["string", "number", "boolean", "array", "null"],
                        "items": {"type": ["string", "number", "boolean", "null"]},
                        "maxItems": 200,
                    },
                },
            },
        },
        "group_by": {
            "type": "array",
            "items": {"type": "string"},
            "maxItems": 5,
            "description": "Columns to group rows by",
        },
        "aggregate": {"enum": list(AGGREGATES), "description": "How to combine each group; default sum"},
        "value_column": {"type": "string", "description": "The column to aggregate (not needed for count)"},
        "columns": {
            "type": "array",
            "items": {"type": "string"},
            "maxItems": 50,
            "description": "Columns to return when not grouping; default: all",
        },
        "sort_by": {"type": "string", "description": "A column of the result to sort by"},
        "descending": {"type": "boolean", "description": "Sort largest first; default true"},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_RESULT_ROWS, "description": "Top N rows"},
    },
}


class TableQueryError(ClawdbotError):
    """The query does not fit the table (unknown column, no numbers to add up); the message says what does."""


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    value: Any


@dataclass(frozen=True)
class TableQuery:
    """A query as plain data; build it from tool arguments with `from_arguments`."""

    filters: tuple[Filter, ...] = ()
    group_by: tuple[str, ...] = ()
    aggregate: str | None = None
    value_column: str | None = None
    columns: tuple[str, ...] = ()
    sort_by: str | None = None
    descending: bool = True
    limit: int | None = None

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> TableQuery:
        """The query from `query_table` arguments already validated against QUERY_SCHEMA."""
        group_by = tuple(arguments.get("group_by") or ())
        aggregate = arguments.get("aggregate")
        if aggregate is None and (group_by or arguments.get("value_column")):
            aggregate = "sum"
        return cls(
            filters=tuple(Filter(f["column"], f["op"], f["value"]) for f in arguments.get("filters") or ()),
            group_by=group_by,
            aggregate=aggregate,
            value_column=arguments.get("value_column"),
            columns=tuple(arguments.get("columns") or ()),
            sort_by=arguments.get("sort_by"),
            descending=bool(arguments.get("descending", True)),
            limit=arguments.get("limit"),
        )


def to_number(cell: Cell) -> float | None:
    """The cell as a number, or None: text such as "1,234.5", "$12" or "7%" counts; booleans do not."""
    if isinstance(cell, bool) or cell is None:
        return None
    if isinstance(cell, int | float):
        return float(cell) if math.isfinite(cell) else None
    text = cell.strip().replace(",", "").replace(" ", "").replace("\u00a0", "")
    text = text.lstrip("$€£¥").rstrip("%")
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _Columns:
    """Finds columns by name the way people write them (any case, extra spaces)."""

    def __init__(self, table: Table) -> None:
        self.names = table.columns
        self._index = {
            " ".join(str(n).split()).casefold(): i for i, n in reversed(list(enumerate(table.columns)))
        }

    def index(self, name: str, what: str = "column") -> int:
        found = self._index.get(" ".join(name.split()).casefold())
        if found is None:
            listed = ", ".join(repr(str(n)) for n in self.names[:40])
            raise TableQueryError(f"there is no {what} {name!r}; the columns are: {listed}")
        return found


def _compare(op: str, cell: Cell, value: Any) -> bool:
    if op == "in":
        options = value if isinstance(value, list) else [value]
        return any(_compare("=", cell, option) for option in options)
    if op == "contains":
        return cell is not None and str(value).casefold() in str(cell).casefold()
    left, right = to_number(cell), to_number(value) if not isinstance(value, list) else None
    if left is not None and right is not None:
        a: Any
        b: Any
        a, b = left, right
    else:
        if cell is None:
            return op == "!=" and value is not None
        a, b = str(cell).strip().casefold(), str(value).strip().casefold()
    tests: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda x, y: x == y,
        "!=": lambda x, y: x != y,
        ">": lambda x, y: x > y,
        ">=": lambda x, y: x >= y,
        "<": lambda x, y: x < y,
        "<=": lambda x, y: x <= y,
    }
    return tests[op](a, b)


def _aggregate(kind: str, values: Sequence[Cell]) -> Cell:
    if kind == "count":
        return len(values)
    numbers = [n for n in (to_number(v) for v in values) if n is not None]
    if not numbers:
        return None
    result: float
    if kind == "sum":
        result = sum(numbers)
    elif kind == "mean":
        result = sum(numbers) / len(numbers)
    else:
        result = min(numbers) if kind == "min" else max(numbers)
    return int(result) if float(result).is_integer() and abs(result) < 2**53 else round(result, 6)


def _sort_key(cell: Cell) -> tuple[int, float, str]:
    number = to_number(cell)
    if number is not None:
        return (0, number, "")
    return (1 if cell is not None else 2, 0.0, str(cell).casefold() if cell is not None else "")


def run_query(table: Table, query: TableQuery, name: str = "result") -> Table:
    """The query's result as a new table called `name` (at most MAX_RESULT_ROWS rows)."""
    columns = _Columns(table)
    rows: list[list[Cell]] = table.rows
    for flt in query.filters:
        index = columns.index(flt.column)
        rows = [row for row in rows if _compare(flt.op, row[index] if index < len(row) else None, flt.value)]

    result_columns: list[str]
    result_rows: list[list[Cell]]
    if query.aggregate is not None:
        keys = [columns.index(c, "column to group by") for c in query.group_by]
        value_index: int | None = None
        if query.aggregate != "count":
            if not query.value_column:
                raise TableQueryError(f"say which column to {query.aggregate} with value_column")
            value_index = columns.index(query.value_column)
        groups: dict[tuple[Cell, ...], list[Cell]] = {}
        for row in rows:
            key = tuple(row[k] if k < len(row) else None for k in keys)
            cell = row[value_index] if value_index is not None and value_index < len(row) else None
            groups.setdefault(key, []).append(cell if value_index is not None else 1)
        label = "count" if value_index is None else f"{query.aggregate} of {table.columns[value_index]}"
        if (
            value_index is not None
            and rows
            and all(to_number(v) is None for values in groups.values() for v in values)
        ):
            raise TableQueryError(
                f"the column {table.columns[value_index]!r} holds no numbers to {query.aggregate}"
            )
        result_columns = [*(str(table.columns[k]) for k in keys), label]
        result_rows = [[*key, _aggregate(query.aggregate, values)] for key, values in groups.items()]
        if not keys and not result_rows:
            result_rows = [[_aggregate(query.aggregate, [])]]
    else:
        picked = (
            [columns.index(c) for c in query.columns] if query.columns else list(range(len(table.columns)))
        )
        result_columns = [str(table.columns[i]) for i in picked]
        result_rows = [[row[i] if i < len(row) else None for i in picked] for row in rows]

    if query.sort_by:
        position = _Columns(Table(name, result_columns, [])).index(query.sort_by, "column of the result")
        present = [r for r in result_rows if r[position] is not None]
        empty = [r for r in result_rows if r[position] is None]
        present.sort(key=lambda r: _sort_key(r[position]), reverse=query.descending)
        result_rows = present + empty  # empty cells last, whichever the direction
    limit = min(query.limit or MAX_RESULT_ROWS, MAX_RESULT_ROWS)
    return Table(name, result_columns, result_rows[:limit])


def render_table(table: Table, max_rows: int = 50) -> str:
    """The table as Markdown for the model to read, with a line saying how many rows were left out."""
    header = "| " + " | ".join(_cell_text(c) for c in table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    lines = [header, rule]
    lines += ["| " + " | ".join(_cell_text(c) for c in row) + " |" for row in table.rows[:max_rows]]
    if len(table.rows) > max_rows:
        lines.append(f"({len(table.rows) - max_rows} more rows not shown)")
    return "\n".join(lines)


def _cell_text(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, float):
        return f"{cell:.6g}" if abs(cell) < 1e15 else str(cell)
    return " ".join(str(cell).split()).replace("|", "\\|")[:200]
