"""Reading attached files (PDF, XLSX/XLSM, CSV, plain text) without letting a hostile one hurt the server.

Every attachment is hostile until parsed. So the parsers (pypdf, openpyxl over defusedxml) never run in the app's
process: `extract` hands the bytes to a child Python (`python -I -B -m clawdbot.extraction`) with a wall-clock
limit, and the child caps its own address space, CPU time and file writes (`resource.setrlimit`) before it
touches them. A parser that loops, explodes or crashes takes down one child, and the person gets one plain
sentence (`RejectedInputError`) while the app keeps serving everyone else.

Limits beyond memory and time are checked as the file is read, never trusting what it says about itself: bytes
before anything else, the zip's central directory (sizes, ratio, entry count) before openpyxl opens a workbook,
pages before their text is extracted, and rows and cells as they are counted, so a lying `<dimension>` tag or
a bomb is refused early.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import PurePath
from typing import Any

from clawdbot.documents import Cell, Document, DocumentKind, Table
from clawdbot.errors import BusyError, RejectedInputError

log = logging.getLogger(__name__)

MB = 1024 * 1024
# Zip members of a workbook that are XML; a DTD in any of them is refused (OOXML never needs one).
_XML_MEMBER = re.compile(r"\.(xml|rels|vml)$", re.IGNORECASE)
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".log", ".text", ".rst", ".json", ".yaml", ".yml"})
_CSV_SUFFIXES = frozenset({".csv", ".tsv"})
_WORKBOOK_SUFFIXES = frozenset({".xlsx", ".xlsm"})
_OFFICE_SUFFIXES = {
    ".docx": "Word",
    ".doc": "Word",
    ".pptx": "PowerPoint",
    ".ppt": "PowerPoint",
    ".odt": "ODF",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INT = re.compile(r"[-+]?(0|[1-9]\d{0,17})")
_FLOAT = re.compile(r"[-+]?((0|[1-9]\d*)(\.\d+)?|\.\d+)([eE][-+]?\d+)?")
# Plain-text attachments are cut into pages of about this many characters, so `read_document` can page them.
TEXT_PAGE_CHARS = 4_000
# Table rows shown per page of a sheet's text rendering (the typed cells stay whole in `Document.tables`).
TABLE_ROWS_PER_PAGE = 60
SUPPORTED = "PDF, Excel workbooks (.xlsx, .xlsm), CSV and plain text"
# What the chat's file picker offers (the content decides what a file is; these only guide the picker).
ACCEPTED_SUFFIXES = (
    "pdf",
    *(suffix[1:] for suffix in sorted(_WORKBOOK_SUFFIXES | _CSV_SUFFIXES | _TEXT_SUFFIXES)),
)

# Extractions at once in this process: each child may use up to `memory_mb`, so many at once could exhaust the
# machine; the rest wait (each child ends within `seconds`).
_running = threading.BoundedSemaphore(2)
_WAIT_FOR_SLOT_S = 30.0


@dataclass(frozen=True)
class Limits:
    """What one attachment may cost; the defaults are documented in docs/attachments.md."""

    max_bytes: int = 25 * MB
    max_pages: int = 1_000
    max_rows: int = 100_000
    max_cells: int = 500_000
    max_text_chars: int = 5_000_000
    max_inflated_bytes: int = 200 * MB
    max_inflation_ratio: int = 100
    max_zip_entries: int = 10_000
    seconds: float = 10.0
    memory_mb: int = 450


@dataclass(frozen=True)
class Extracted:
    """A file that was read: its content, and what the reader wants the person to know (e.g. macros ignored)."""

    kind: DocumentKind
    pages: list[str]
    tables: list[Table]
    notes: list[str] = field(default_factory=list)

    def document(self, name: str, sha256: str) -> Document:
        return Document(name=name, sha256=sha256, kind=self.kind, pages=self.pages, tables=self.tables)

    @property
    def rows(self) -> int | None:
        return sum(len(t.rows) for t in self.tables) if self.kind in ("xlsx", "csv") else None

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "pages": self.pages, "tables": [asdict(t) for t in self.tables],
             "notes": self.notes},
            ensure_ascii=False, allow_nan=False,
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Extracted:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Extracted:
        tables = [Table(t["name"], list(t["columns"]), [list(r) for r in t["rows"]]) for t in raw["tables"]]
        return cls(raw["kind"], list(raw["pages"]), tables, list(raw.get("notes", [])))


class _Refused(Exception):
    """Raised in the child: the file breaks a limit or cannot be read; the message is for the person."""


def detect_kind(name: str, data: bytes) -> DocumentKind:
    """What the file is, from its first bytes and then its name's suffix; refuses what is not supported."""
    suffix = PurePath(name).suffix.lower()
    if not data:
        raise RejectedInputError("the file is empty (0 bytes)")
    if b"%PDF-" in data[:1024]:
        return "pdf"
    if suffix == ".pdf":
        raise RejectedInputError("this file is not a PDF: it does not start with %PDF-")
    if data.startswith(b"\xd0\xcf\x11\xe0"):
        raise RejectedInputError(
            "old Excel (.xls) and Office 97-2003 files are not supported: save it as .xlsx and attach it again"
        )
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")) or suffix in _WORKBOOK_SUFFIXES:
        if suffix in _WORKBOOK_SUFFIXES:
            if not data.startswith(b"PK"):
                raise RejectedInputError("this file is not an Excel workbook: it is not a zip archive")
            return "xlsx"
        what = _OFFICE_SUFFIXES.get(suffix, "zip archives and other")
        raise RejectedInputError(f"{what} files are not supported: attach {SUPPORTED}")
    if suffix in _CSV_SUFFIXES:
        return "csv"
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RejectedInputError(f"this kind of file is not supported: attach {SUPPORTED}")
    return "text"


def extract(name: str, data: bytes, limits: Limits) -> Extracted:
    """Read `data` in a confined child process; raises `RejectedInputError` with a plain sentence when refused."""
    if len(data) > limits.max_bytes:
        raise RejectedInputError(
            f"the file is {len(data) / MB:.1f} MB; the limit is {limits.max_bytes // MB} MB per file"
        )
    kind = detect_kind(name, data)
    if not _running.acquire(timeout=_WAIT_FOR_SLOT_S):
        raise BusyError("too many files are being read right now: try again in a minute", retry_after=30)
    try:
        return _run_child(kind, data, limits)
    finally:
        _running.release()


def _run_child(kind: DocumentKind, data: bytes, limits: Limits) -> Extracted:
    command = [sys.executable, "-I", "-B", "-m", "clawdbot.extraction", kind, json.dumps(asdict(limits))]
    # No inherited secrets (database URL, keys); openpyxl pinned to defusedxml even if lxml gets installed.
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "OPENPYXL_LXML": "False", "OPENPYXL_DEFUSEDXML": "True"}
    too_slow = RejectedInputError(
        f"reading this file took longer than {limits.seconds:g} seconds, so it was stopped: it may be damaged "
        "or built to overload the reader"
    )
    try:
        done = subprocess.run(
            command, input=data, capture_output=True, timeout=limits.seconds, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise too_slow from None
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        raise too_slow
    try:
        payload = json.loads(done.stdout)
    except ValueError:
        log.warning(
            "attachment reader (%s) ended with %d and no result: %s",
            kind, done.returncode, done.stderr[-500:].decode("utf-8", "replace"),
        )  # fmt: skip
        raise RejectedInputError(
            "this file could not be read: the reader stopped unexpectedly (it may be damaged)"
        ) from None
    if "refused" in payload:
        if payload.get("detail"):
            log.info("attachment refused (%s): %s", kind, payload["detail"])
        raise RejectedInputError(str(payload["refused"]))
    return Extracted.from_dict(payload)


# ----- The child process: everything below runs confined, on untrusted bytes. -----


def _confine(limits: Limits) -> None:
    import resource

    memory = limits.memory_mb * MB
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = math.ceil(limits.seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # it writes no file; stdout is a pipe
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # and starts no process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _clean(text: str) -> str:
    """Text fit to store and show: no control characters, no lone surrogates, Unix line ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text).encode("utf-8", "replace").decode("utf-8")


def _read_pdf(data: bytes, limits: Limits) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                # Only an owner password (rules for printing or copying): readable without asking anyone.
                opened = bool(reader.decrypt(""))
            except (DependencyError, NotImplementedError):
                opened = False
            if not opened:
                raise _Refused(
                    "this PDF is password-protected: save or print it as a PDF without a password and attach "
                    "that"
                )
        count = len(reader.pages)
        if count > limits.max_pages:
            raise _Refused(
                f"this PDF has {count:,} pages; the limit is {limits.max_pages:,}: attach only the pages "
                "you need"
            )
        pages: list[str] = []
        total = 0
        for page in reader.pages:
            text = _clean(page.extract_text() or "")
            total += len(text)
            if total > limits.max_text_chars:
                raise _Refused(
                    f"this PDF has more than {limits.max_text_chars:,} characters of text: attach only the "
                    "pages you need"
                )
            pages.append(text)
    except FileNotDecryptedError:
        raise _Refused("this PDF is password-protected: save it without a password and attach that") from None
    except LimitReachedError as exc:
        raise _Refused(
            "this PDF is built to expand beyond safe limits (a decompression bomb or an endless structure), "
            "so it was not read"
        ) from exc
    if not pages:
        raise _Refused("this PDF has no pages")
    if not any(p.strip() for p in pages):
        raise _Refused(
            "this PDF has no text to read (it may be scanned images): attach a PDF with selectable text"
        )
    return Extracted("pdf", pages, [])


def _check_zip(archive: zipfile.ZipFile, size: int, limits: Limits) -> None:
    """Refuse a zip bomb from its central directory alone, before any member is inflated.

    Safe to trust the declared sizes: `zipfile` never returns more than a member's declared size (a member
    that inflates further fails its CRC check), so the declared total bounds what openpyxl can read.
    """
    members = archive.infolist()
    if len(members) > limits.max_zip_entries:
        raise _Refused(f"this workbook has more than {limits.max_zip_entries:,} parts, so it was not opened")
    inflated = sum(m.file_size for m in members)
    if inflated > limits.max_inflated_bytes:
        raise _Refused(
            f"this workbook expands to more than {limits.max_inflated_bytes // MB} MB, so it was not opened"
        )
    if inflated > 10 * MB and inflated > limits.max_inflation_ratio * max(size, 1):
        raise _Refused(
            f"this workbook expands {inflated // max(size, 1):,} times its size (the limit is "
            f"{limits.max_inflation_ratio} times): it looks like a zip bomb, so it was not opened"
        )


def _check_no_dtd(archive: zipfile.ZipFile) -> None:
    """Refuse XML with a document type declaration: OOXML never has one, entity-expansion bombs do."""
    for member in archive.infolist():
        if _XML_MEMBER.search(member.filename):
            with archive.open(member) as fh:
                head = fh.read(64 * 1024)
            if b"<!DOCTYPE" in head or b"<!ENTITY" in head:
                raise _Refused(
                    "this workbook declares XML entities (a trick to make files expand in memory), so it was "
                    "not opened"
                )


def _count_cells(archive: zipfile.ZipFile, limits: Limits) -> None:
    """Count the rows and cells really in the worksheets (a fast byte scan), before openpyxl parses them.

    The row and cell limits are checked again while the rows are read; this makes a sheet far over them fail in
    a fraction of a second instead of after seconds of XML parsing.
    """
    counter = _Counter(limits, "workbook")
    for member in archive.infolist():
        name = member.filename
        if not (name.startswith("xl/worksheets/") and name.endswith(".xml")):
            continue
        rows = cells = 0
        tail = b""
        with archive.open(member) as fh:
            while chunk := fh.read(MB):
                scanned = tail + chunk
                # Matches wholly inside `tail` were counted with the previous chunk.
                rows += scanned.count(b"<row") - tail.count(b"<row")
                cells += sum(scanned.count(tag) - tail.count(tag) for tag in (b"<c ", b"<c>"))
                tail = scanned[-3:]
        counter.check("", rows, cells)


def _cell(value: Any) -> Cell:
    if value is None or isinstance(value, bool | int | str):
        return _clean(value) if isinstance(value, str) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return str(value)
    return _clean(str(value))


def _table(name: str, rows: list[list[Cell]]) -> Table:
    """First row as the header (blank or repeated names made unique), rows padded to the same width."""
    width = max((len(r) for r in rows), default=0)
    header = [str(c).strip() if c is not None else "" for c in (rows[0] if rows else [])]
    header += [""] * (width - len(header))
    columns: list[str] = []
    for index, title in enumerate(header, start=1):
        title = title or f"column {index}"
        while title in columns:
            title = f"{title} ({index})"
        columns.append(title)
    body = [r + [None] * (width - len(r)) for r in rows[1:]]
    return Table(name, columns, body)


def _table_pages(table: Table) -> list[str]:
    """A sheet as text, `TABLE_ROWS_PER_PAGE` rows a page, each page under the header, for reading and search."""
    header = " | ".join(table.columns)
    title = f"Sheet {table.name} ({len(table.rows):,} rows)"
    if not table.rows:
        return [f"{title}\n{header}"]
    pages = []
    for start in range(0, len(table.rows), TABLE_ROWS_PER_PAGE):
        chunk = table.rows[start : start + TABLE_ROWS_PER_PAGE]
        lines = [" | ".join("" if c is None else str(c) for c in row) for row in chunk]
        pages.append(f"{title}, rows {start + 1}-{start + len(chunk)}\n{header}\n" + "\n".join(lines))
    return pages


class _Counter:
    """Rows and cells read so far across a workbook, refused as soon as a limit is passed."""

    def __init__(self, limits: Limits, what: str) -> None:
        self.limits = limits
        self.what = what
        self.rows = 0
        self.cells = 0

    def add(self, sheet: str, cells: int) -> None:
        self.check(sheet, 1, cells)

    def check(self, sheet: str, rows: int, cells: int) -> None:
        self.rows += rows
        self.cells += cells
        where = f" (at {sheet})" if sheet else ""
        if self.rows > self.limits.max_rows:
            raise _Refused(
                f"this {self.what} has more than {self.limits.max_rows:,} rows{where}: keep the rows you need "
                "in a smaller file"
            )
        if self.cells > self.limits.max_cells:
            raise _Refused(
                f"this {self.what} has more than {self.limits.max_cells:,} cells{where}: keep the part you "
                "need in a smaller file"
            )


def _read_xlsx(data: bytes, limits: Limits) -> Extracted:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError):
        raise _Refused("this workbook is damaged: its zip structure cannot be read") from None
    _check_zip(archive, len(data), limits)
    _check_no_dtd(archive)
    _count_cells(archive, limits)
    notes = []
    if any(m.filename.lower().endswith("vbaproject.bin") for m in archive.infolist()):
        notes.append("this workbook contains macros: they were ignored, only the cell values were read")

    from defusedxml import DefusedXmlException  # type: ignore[import-untyped]
    from openpyxl import load_workbook

    counter = _Counter(limits, "workbook")
    tables: list[Table] = []
    try:
        workbook = load_workbook(
            io.BytesIO(data), read_only=True, data_only=True, keep_vba=False, keep_links=False
        )
        for sheet in workbook.worksheets:
            sheet.reset_dimensions()  # never trust the <dimension> tag: read the rows that are really there
            rows: list[list[Cell]] = []
            for values in sheet.iter_rows(values_only=True):
                counter.add(repr(sheet.title), len(values))
                row = [_cell(v) for v in values]
                while row and row[-1] in (None, ""):
                    row.pop()
                if row:
                    rows.append(row)
            tables.append(_table(_clean(sheet.title), rows))
        workbook.close()
    except Exception as exc:
        if not _caused_by(exc, DefusedXmlException):
            raise
        raise _Refused(
            "this workbook declares XML entities (a trick to make files expand in memory), so it was not opened"
        ) from None

    if not any(t.rows or t.columns for t in tables):
        raise _Refused("this workbook has no cells with values")
    pages = [page for t in tables for page in _table_pages(t)]
    return Extracted("xlsx", pages, tables, notes)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether `exc` or an exception it was raised from is a `kind` (openpyxl wraps parser errors)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _decode(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with a BOM, else GB 18030 (Chinese), else Windows-1252."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("cp1252", "replace")


def _number(text: str) -> Cell:
    """A CSV field as a number when it is one (leading zeros, as in postcodes, stay text); blank is None."""
    stripped = text.strip()
    if not stripped:
        return None
    if _INT.fullmatch(stripped):
        return int(stripped)
    if _FLOAT.fullmatch(stripped):
        return float(stripped)
    return text


def _read_csv(data: bytes, limits: Limits) -> Extracted:
    text = _clean(_decode(data))
    if not text.strip():
        raise _Refused("this CSV file has no data")
    try:
        dialect: Any = csv.Sniffer().sniff(text[:20_000], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    counter = _Counter(limits, "CSV file")
    rows: list[list[Cell]] = []
    csv.field_size_limit(1 * MB)
    try:
        for index, fields in enumerate(csv.reader(io.StringIO(text), dialect)):
            counter.add(f"line {index + 1}", len(fields))
            if any(f.strip() for f in fields):
                rows.append([f.strip() if index == 0 else _number(f) for f in fields])
    except csv.Error as exc:
        raise _Refused(f"this CSV file cannot be read: {exc}") from None
    table = _table("data", rows)
    return Extracted("csv", _table_pages(table), [table])


def _read_text(data: bytes, limits: Limits) -> Extracted:
    text = _clean(_decode(data))
    if len(text) > limits.max_text_chars:
        raise _Refused(f"this text has more than {limits.max_text_chars:,} characters: attach a shorter one")
    if not text.strip():
        raise _Refused("this file has no text")
    pages: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size + len(line) > TEXT_PAGE_CHARS and current:
            pages.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    pages.append("".join(current))
    return Extracted("text", [p for p in pages if p.strip()] or [text], [])


_READERS = {"pdf": _read_pdf, "xlsx": _read_xlsx, "csv": _read_csv, "text": _read_text}
_DAMAGED = {
    "pdf": "this PDF is damaged and could not be read",
    "xlsx": "this workbook is damaged and could not be read",
    "csv": "this CSV file could not be read",
    "text": "this text file could not be read",
}


def _child(kind: str, limits: Limits, data: bytes) -> str:
    """The result as JSON: the extracted content, or `{"refused": sentence, "detail": for the log}`."""
    refusal: dict[str, str]
    try:
        return _READERS[kind](data, limits).to_json()
    except _Refused as exc:
        refusal = {"refused": str(exc)}
    except MemoryError:
        refusal = {
            "refused": f"reading this file needs more than {limits.memory_mb} MB of memory, so it was stopped"
        }
    except RecursionError:
        refusal = {"refused": f"{_DAMAGED[kind]}: it is nested too deeply"}
    except Exception as exc:
        refusal = {"refused": _DAMAGED[kind], "detail": f"{type(exc).__name__}: {exc}"[:500]}
    return json.dumps(refusal, ensure_ascii=False)


def main() -> None:
    """The child: read the file from stdin, write the result (or the refusal) as JSON to stdout."""
    kind, limits = sys.argv[1], Limits(**json.loads(sys.argv[2]))
    logging.disable(logging.WARNING)  # pypdf's warnings about damaged files would only fill stderr
    # The parser is imported before the limits apply: its own code is trusted, only the input is not.
    if kind == "pdf":
        import pypdf  # noqa: F401
    elif kind == "xlsx":
        import defusedxml  # noqa: F401
        import openpyxl  # noqa: F401
    data = sys.stdin.buffer.read()
    _confine(limits)
    sys.stdout.write(_child(kind, limits, data))


if __name__ == "__main__":
    main()
