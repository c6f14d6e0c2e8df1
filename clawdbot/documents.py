"""The extracted content of an attached file, as the context planner and the tools see it.

Why a module of its own: extraction (hostile files, child process, limits) and use (outline, passages for a
question, `read_document`, `query_table`) are separate concerns that meet here. A `Document` is plain data,
built only from text that the extractor already checked, so nothing here touches the original bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Cell = str | int | float | bool | None
DocumentKind = Literal["pdf", "xlsx", "csv", "text"]


@dataclass(frozen=True)
class Table:
    """One sheet of a workbook or one CSV file: a header row and the data rows under it."""

    name: str
    columns: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Document:
    """One attachment's extracted content: text per page (a PDF; one page for other kinds) and its tables."""

    name: str
    sha256: str
    kind: DocumentKind
    pages: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n\n".join(self.pages)

    def table(self, name: str | None = None) -> Table | None:
        """The table called `name` (case-insensitive), or the first one when no name is given."""
        if not self.tables:
            return None
        if name is None:
            return self.tables[0]
        wanted = name.casefold()
        return next((table for table in self.tables if table.name.casefold() == wanted), None)
