"""Exports of the audit log to CSV, XLSX and JSONL: the contract's columns in order, safe to open in a spreadsheet.

Rows are streamed from the database and written as they come (XLSX in openpyxl's write-only mode), so an export
of any size runs in bounded memory. The file appears under its name only when complete. Text cells that a
spreadsheet would run as a formula (starting with = + - @, tab or CR) are prefixed with an apostrophe.
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from clawdbot.audit import AuditStore
from clawdbot.chain import EVENT_EXPORT_FIELDS, REQUEST_EXPORT_FIELDS
from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.records import AuditFilter

Format = Literal["csv", "xlsx", "jsonl"]
RecordKind = Literal["requests", "events"]
FORMATS: tuple[Format, ...] = ("csv", "xlsx", "jsonl")
KINDS: tuple[RecordKind, ...] = ("requests", "events")
JSON_FIELDS = frozenset({"context", "tool_calls", "attachments", "details"})
# Control characters XML 1.0 cannot hold; openpyxl refuses a cell that contains one.
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
XLSX_CELL_LIMIT = 32_767
_CUT_NOTE = "… [cut: {n} characters in all; the JSONL export has the full text]"


def neutralize(text: str) -> str:
    """Make a text cell inert in spreadsheets: one that would start a formula gets a leading apostrophe."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return value


def _cell(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return neutralize(value)
    return value


def _xlsx_cell(value: Any) -> Any:
    value = _cell(value)
    if isinstance(value, str):
        value = _ILLEGAL_XML.sub("\ufffd", value)
        if len(value) > XLSX_CELL_LIMIT:
            note = _CUT_NOTE.format(n=len(value))
            value = value[: XLSX_CELL_LIMIT - len(note)] + note
    return value


def _json_value(name: str, value: Any) -> Any:
    if name in JSON_FIELDS and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return _plain(value)


def _write_csv(fh: IO[str], header: Sequence[str], rows: Iterator[Sequence[Any]]) -> int:
    writer = csv.writer(fh)
    writer.writerow(header)
    count = 0
    for row in rows:
        writer.writerow(["" if v is None else _cell(v) for v in row])
        count += 1
    return count


def _write_jsonl(fh: IO[str], header: Sequence[str], rows: Iterator[Sequence[Any]]) -> int:
    count = 0
    for row in rows:
        record = {name: _json_value(name, value) for name, value in zip(header, row, strict=True)}
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def _write_xlsx(path: Path, header: Sequence[str], rows: Iterator[Sequence[Any]], title: str) -> int:
    from openpyxl import Workbook  # imported here: it costs a tenth of a second at every CLI start

    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet(title)
    sheet.append(list(header))
    count = 0
    for row in rows:
        sheet.append([_xlsx_cell(v) for v in row])
        count += 1
    workbook.save(path)
    return count


@contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that replaces it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_records(
    db: Database,
    path: Path,
    fmt: str,
    kind: str = "requests",
    audit_filter: AuditFilter | None = None,
    *,
    actor: str,
    store: AuditStore | None = None,
    on_row: Callable[[int], None] | None = None,
) -> int:
    """Write the matching records to `path` and record the export as an event; returns the row count."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise UsageError(f"unknown record kind {kind!r}: use one of {', '.join(KINDS)}")
    audit_filter = audit_filter or AuditFilter()
    query = audit_filter.requests() if kind == "requests" else audit_filter.events()
    header = REQUEST_EXPORT_FIELDS if kind == "requests" else EVENT_EXPORT_FIELDS

    with db.engine.connect() as conn, _atomic_path(path) as tmp:
        result = conn.execution_options(yield_per=2000).execute(query)

        def rows() -> Iterator[Sequence[Any]]:
            for n, row in enumerate(result, 1):
                if on_row is not None:
                    on_row(n)
                yield tuple(row)

        if fmt == "xlsx":
            count = _write_xlsx(tmp, header, rows(), kind)
        else:
            # A byte-order mark lets spreadsheet programs read CSV as UTF-8 (Chinese text stays legible).
            encoding = "utf-8-sig" if fmt == "csv" else "utf-8"
            with tmp.open("w", encoding=encoding, newline="") as fh:
                count = (_write_csv if fmt == "csv" else _write_jsonl)(fh, header, rows())
    (store or AuditStore(db)).record_event(
        actor,
        "audit.export",
        target=kind,
        details={"format": fmt, "filter": audit_filter.describe(), "rows": count, "file": path.name},
    )
    return count
