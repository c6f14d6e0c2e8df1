"""The extracted content of an attached file, as the context planner and the tools see it.

Why a module of its own: extraction (hostile files, child process, limits) and use (outline, passages for a
question, `read_document`, `query_table`) are separate concerns that meet here. A `Document` is plain data,
built only from text that the extractor already checked, so nothing here touches the original bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from clawdbot.ranking import bm25_scores

Cell = str | int | float | bool | None
DocumentKind = Literal["pdf", "xlsx", "csv", "text"]

PASSAGE_CHARS = 1_200
"""About how long a passage is: a few paragraphs, short enough that several fit beside a question."""
PAGE_MARKER = "[page {n}]"
_BREAKS = re.compile(r"\n\s*\n|(?<=[.!?。！？;；])\s+|\n")


@dataclass(frozen=True)
class Table:
    """One sheet of a workbook or one CSV file: a header row and the data rows under it."""

    name: str
    columns: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Document:
    """One attachment's extracted content: text per page and its tables.

    Pages are a PDF's pages; plain text is cut into pages of about 4,000 characters and each table is rendered
    60 rows a page (see `clawdbot.extraction`), so `read_pages` can page through any kind.
    """

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


@dataclass(frozen=True)
class Passage:
    """A piece of one page, with its BM25 score for the question it was found for."""

    page: int
    """1-based page number."""
    text: str
    score: float


def read_pages(doc: Document, first: int, last: int, *, max_chars: int = 12_000) -> str:
    """Pages `first` to `last` (1-based, inclusive, clamped to the document), each after a `[page n]` marker.

    Cut at `max_chars` with a note saying where to continue, so a tool result can never flood the context.
    """
    if not doc.pages:
        return f"{doc.name} has no text."
    first = min(max(first, 1), len(doc.pages))
    last = min(max(last, first), len(doc.pages))
    parts: list[str] = []
    used = 0
    for number in range(first, last + 1):
        block = f"{PAGE_MARKER.format(n=number)}\n{doc.pages[number - 1].strip()}"
        if used + len(block) > max_chars:
            kept = block[: max(max_chars - used, 0)]
            if kept:
                parts.append(kept)
            parts.append(f"[… cut at {max_chars:,} characters: read again from page {number} …]")
            break
        parts.append(block)
        used += len(block) + 2
    return "\n\n".join(parts)


def passages_of(doc: Document, size: int = PASSAGE_CHARS) -> list[Passage]:
    """The document cut into passages of about `size` characters, at paragraph or sentence ends where possible."""
    out: list[Passage] = []
    for number, page in enumerate(doc.pages, start=1):
        out.extend(Passage(number, text, 0.0) for text in _split(page, size))
    return out


def search_passages(doc: Document, query: str, k: int = 5) -> list[Passage]:
    """The `k` passages that best match `query` (BM25 over words and CJK bigrams), best first.

    Passages sharing no term with the query are left out, so an empty list means nothing matched.
    """
    candidates = passages_of(doc)
    scores = bm25_scores([p.text for p in candidates], query)
    ranked = sorted(
        (Passage(p.page, p.text, score) for p, score in zip(candidates, scores, strict=True) if score > 0),
        key=lambda p: -p.score,
    )
    return ranked[: max(k, 0)]


def _split(text: str, size: int) -> list[str]:
    """Whole paragraphs or sentences gathered up to `size` characters; an overlong one is cut at `size`."""
    pieces: list[str] = []
    current = ""
    start = 0
    ends = [m.end() for m in _BREAKS.finditer(text)] + [len(text)]
    for end in ends:
        piece = text[start:end]
        start = end
        if len(current) + len(piece) > size and current.strip():
            pieces.append(current.strip())
            current = ""
        current += piece
        while len(current) > size:
            pieces.append(current[:size].strip())
            current = current[size:]
    if current.strip():
        pieces.append(current.strip())
    return [p for p in pieces if p]
