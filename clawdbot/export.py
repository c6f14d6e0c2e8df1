"""Exports of the audit log to CSV, XLSX and JSONL: the contract's columns in order, safe to open in a spreadsheet.

Rows are streamed from the database and written as they come (XLSX in openpyxl's write-only mode), so an export
of any size runs in bounded memory. The file appears under its name only when complete; an error of the file
system names that path, never the hidden temporary file beside it. Text cells that a spreadsheet would run as a
formula (starting with = + - @, tab or CR) are prefixed with an apostrophe.

XLSX cells hold what XML and Excel allow, so their text differs from CSV and JSONL in three ways:

- line breaks are LF: CR LF and a lone CR become LF (XML readers turn a raw CR into LF anyway, so this makes
  the conversion explicit and the same whichever XML library openpyxl uses);
- characters XML 1.0 cannot hold (control characters other than tab, LF and CR; U+FFFE and U+FFFF; lone
  surrogates) become U+FFFD;
- text longer than Excel's 32,767 UTF-16 code units a cell (an emoji counts two) is cut to that, ending with a
  note of its full length in characters; the JSONL export keeps the full text.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal
from zipfile import ZIP_DEFLATED, ZipFile

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
# Characters XML 1.0 cannot hold: control characters (openpyxl refuses a cell with one), lone surrogates and the
# noncharacters U+FFFE and U+FFFF (openpyxl writes those, and the workbook then cannot be opened).
_ILLEGAL_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_LINE_BREAK = re.compile(r"\r\n?")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
XLSX_CELL_LIMIT = 32_767  # in UTF-16 code units, as Excel counts
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


def _utf16_units(text: str) -> int:
    """The length of `text` as Excel counts it: a character outside the BMP (most emoji) is two code units."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _utf16_prefix(text: str, units: int) -> str:
    """The longest start of `text` (no lone surrogates) that is at most `units` UTF-16 code units long."""
    data = text.encode("utf-16-le")[: 2 * units]
    if len(data) >= 2 and 0xD800 <= int.from_bytes(data[-2:], "little") <= 0xDBFF:
        data = data[:-2]  # half a surrogate pair: the character does not fit
    return data.decode("utf-16-le")


def _xlsx_cell(value: Any) -> Any:
    value = _cell(value)
    if isinstance(value, str):
        value = _ILLEGAL_XML.sub("\ufffd", _LINE_BREAK.sub("\n", value))
        # A character is at most two units: only longer text needs counting.
        if len(value) * 2 > XLSX_CELL_LIMIT and _utf16_units(value) > XLSX_CELL_LIMIT:
            note = _CUT_NOTE.format(n=len(value))
            value = _utf16_prefix(value, XLSX_CELL_LIMIT - _utf16_units(note)) + note
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
    # Imported here: openpyxl costs a tenth of a second at every CLI start.
    from openpyxl import Workbook
    from openpyxl.writer.excel import ExcelWriter

    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet(title)
    try:
        sheet.append(list(header))
        count = 0
        for row in rows:
            sheet.append([_xlsx_cell(v) for v in row])
            count += 1
        # What `workbook.save(path)` does, but with the archive in hand: if writing it fails, it is closed here
        # rather than by the garbage collector, whose close would fail again and print a traceback.
        archive = ZipFile(path, "w", ZIP_DEFLATED, allowZip64=True)
        try:
            workbook.properties.modified = datetime.now(UTC).replace(tzinfo=None)
            ExcelWriter(workbook, archive).save()  # closes the archive
        except BaseException:
            with suppress(Exception):
                archive.close()  # whatever fails in writing its directory, the file is closed
            raise
    except BaseException:
        _discard_write_only_sheet(sheet)
        raise
    return count


def _discard_write_only_sheet(sheet: Any) -> None:
    """Release what a write-only sheet holds after a failed export: its spool file, open and on disk.

    openpyxl (3.1) streams the rows of a write-only sheet through two generators into a temporary file: the
    sheet's `_rows` (inside the <sheetData> element) and its writer's `xf` (which holds the file open inside
    the <worksheet> element). Only `Workbook.save` closes them and deletes the file; after a failure the file
    stays until the process exits, and the garbage collector closes the generators whenever it comes to them,
    printing an "Exception ignored in generator" traceback if that close fails (a disk still full). Closing
    them here, each error of closing suppressed, leaves the export's own error the only one reported.
    """
    rows = getattr(sheet, "_rows", None)
    if rows is not None:
        with suppress(Exception):
            rows.close()
    writer = getattr(sheet, "_writer", None)
    if writer is None:
        return  # no row was appended: no spool file was made
    with suppress(Exception):
        writer.close()  # closes the `xf` generator, and with it the spool file
    with suppress(Exception):
        writer.cleanup()  # deletes the spool file, and forgets it in openpyxl's list for deletion at exit


def _naming(exc: OSError, target: Path) -> OSError:
    """`exc` again (same errno, same class), naming `target` rather than the file the call failed on."""
    return OSError(exc.errno, exc.strerror or str(exc), str(target))


def _filenames(exc: OSError) -> set[str]:
    return {os.fspath(name) for name in (exc.filename, exc.filename2) if isinstance(name, str | os.PathLike)}


def _make_parent(target: Path) -> None:
    """Create the directory `target` goes in, with its parents; an error names `target`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        # A regular file (or a dangling link) where a directory should be: name it rather than just "File exists".
        blocker = next(
            (p for p in (target.parent, *target.parent.parents) if p.is_symlink() or p.exists()),
            None,
        )
        if blocker is None or blocker.is_dir():
            raise _naming(exc, target) from exc
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot create the directory for {target}: a file is in the way", str(blocker)
        ) from exc
    except OSError as exc:
        raise _naming(exc, target) from exc


@contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that replaces it only if the block succeeds.

    An OSError of creating the directory or the temporary file, of the final rename, or of the block on the
    temporary file names `target`: the temporary file is hidden, and the user never asked for it.
    """
    _make_parent(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise _naming(exc, target) from exc
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except OSError as exc:
            if tmp in _filenames(exc):
                raise _naming(exc, target) from exc
            raise
    finally:
        with suppress(OSError):  # gone once renamed; any other error must not hide the export's own
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
    query = audit_filter.requests(db.engine.dialect.name) if kind == "requests" else audit_filter.events()
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
