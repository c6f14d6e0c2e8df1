"""Files built to hurt a reader, and well-formed ones to compare with, made in memory in a fraction of a second.

Each maker returns the file's bytes. PDFs are written by hand (objects, xref table, trailer) so a test controls
every byte: a text layer pypdf can extract, a lying xref, a stream that inflates far beyond its size. Workbooks
start from a small one openpyxl writes, with parts replaced or added by zipfile.

Run `python -m tests.hostile_files DIR` to write them all to DIR (to try them in the browser by hand).
"""

from __future__ import annotations

import io
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from openpyxl import Workbook

MB = 1024 * 1024
SHEET = "xl/worksheets/sheet1.xml"
SHEET_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"


def _pdf_string(text: str) -> bytes:
    return b"(" + text.encode("latin-1", "replace").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(
        b")", b"\\)"
    ) + b")"  # fmt: skip


def _content(lines: Sequence[str]) -> bytes:
    body = [b"BT /F1 11 Tf 14 TL 72 770 Td"]
    body += [_pdf_string(line) + b" '" for line in lines]
    body.append(b"ET")
    return b"\n".join(body)


def build_pdf(
    streams: Sequence[bytes],
    *,
    filters: Sequence[str] | None = None,
    encrypt_dict: bytes = b"",
    prev: int = -1,
) -> bytes:
    """A PDF with one page per content stream (each `filters[i]` names its /Filter, if any).

    `prev` >= 0 adds `/Prev prev` to the trailer; `prev == -2` points it at this very xref (a loop).
    """
    n = len(streams)
    # Objects: 1 catalog, 2 pages, 3 font, then for each page its page object and its content stream.
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n))
        + b"] /Count %d >>" % n,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, stream in enumerate(streams):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (5 + 2 * i)
        )
        flt = b" /Filter /%s" % filters[i].encode() if filters and filters[i] else b""
        objects.append(b"<< /Length %d%s >>\nstream\n" % (len(stream), flt) + stream + b"\nendstream")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"<< /Size %d /Root 1 0 R" % (len(objects) + 1) + encrypt_dict
    if prev == -2:
        trailer += b" /Prev %d" % xref
    elif prev >= 0:
        trailer += b" /Prev %d" % prev
    out.write(b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def text_pdf(pages: Sequence[Sequence[str]]) -> bytes:
    """A well-formed PDF whose pages hold these lines of text (Latin-1 only: the standard Helvetica font)."""
    return build_pdf([_content(lines) for lines in pages])


def report_pdf(page_count: int = 23) -> bytes:
    """A report of `page_count` pages: a heading and a dozen distinct sentences on each page."""
    topics = ["revenue", "staffing", "logistics", "security", "customers", "energy", "suppliers", "training"]
    pages = []
    for number in range(1, page_count + 1):
        topic = topics[number % len(topics)]
        lines = [f"Chapter {number}: {topic.title()} review"]
        for line in range(1, 40):
            lines.append(
                f"In section {number}.{line} the team discusses {topic} figures, risks and next steps "
                f"for quarter {line % 4 + 1}."
            )
        if number == 17:
            lines.append("The warehouse in Rotterdam flooded in March and stock worth 2.4 million was lost.")
        pages.append(lines)
    return text_pdf(pages)


def encrypted_pdf() -> bytes:
    """Protected by the user password `secret` (RC4, which pypdf reads without extra packages)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf([["Top secret plans"]]))))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def owner_only_pdf(algorithm: str = "RC4-128") -> bytes:
    """Encrypted with an empty user password (only copying rules): readable without asking for one.

    AES (what current office suites write) needs the `cryptography` package, which `pypdf[crypto]` brings.
    """
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf([["Readable despite the rules"]]))))
    writer.encrypt(user_password="", owner_password="owner", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def truncated_pdf() -> bytes:
    whole = report_pdf(3)
    return whole[: len(whole) // 2]


def not_a_pdf() -> bytes:
    return b"<html><body><script>alert(1)</script>This is a web page saved as report.pdf</body></html>"


def circular_xref_pdf() -> bytes:
    """The trailer's /Prev points back at its own xref table, so a naive reader follows it forever."""
    return build_pdf([_content(["Round and round"])], prev=-2)


def many_pages_pdf(pages: int = 5_000) -> bytes:
    return build_pdf([b"" for _ in range(pages)])


def bomb_pdf(inflated_mb: int = 200) -> bytes:
    """One page whose 200 KB content stream inflates to `inflated_mb` MB of spaces."""
    compressor = zlib.compressobj(9)
    chunk = b" " * MB
    stream = b"".join(compressor.compress(chunk) for _ in range(inflated_mb)) + compressor.flush()
    return build_pdf([stream], filters=["FlateDecode"])


def _workbook(
    extra: dict[str, bytes] | None = None, sheet: bytes | None = None, macro: bool = False
) -> bytes:
    """A small workbook (City, Sales; three rows), with parts replaced or added."""
    wb = Workbook()
    ws = wb.active
    assert ws is not None
    ws.title = "Sales"
    ws.append(["City", "Sales"])
    for row in (["Berlin", 120], ["Paris", 95.5], ["Madrid", 80]):
        ws.append(row)
    saved = io.BytesIO()
    wb.save(saved)
    parts = dict(extra or {})
    if sheet is not None:
        parts[SHEET] = sheet
    out = io.BytesIO()
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = parts.pop(item.filename, None)
            body = data if data is not None else src.read(item)
            if macro and item.filename == "[Content_Types].xml":
                body = body.replace(
                    b"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml",
                    b"application/vnd.ms-excel.sheet.macroEnabled.main+xml",
                ).replace(
                    b"<Default Extension=\"xml\"",
                    b"<Default Extension=\"bin\" ContentType=\"application/vnd.ms-office.vbaProject\"/>"
                    b"<Default Extension=\"xml\"",
                )  # fmt: skip
            dst.writestr(item, body)
        for name, body in parts.items():
            dst.writestr(name, body)
    return out.getvalue()


def small_workbook() -> bytes:
    return _workbook()


def sheet_xml(rows: Sequence[Sequence[object]], dimension: str = "") -> bytes:
    """Worksheet XML with inline strings and numbers, and the given <dimension> tag (none when empty)."""
    out = [f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{SHEET_NS}">']
    if dimension:
        out.append(f'<dimension ref="{dimension}"/>')
    out.append("<sheetData>")
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(value, int | float):
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
            else:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{escape(str(value))}</t></is></c>')
        out.append(f'<row r="{r}">{"".join(cells)}</row>')
    out.append("</sheetData></worksheet>")
    return "".join(out).encode()


def lying_dimension_workbook() -> bytes:
    """Claims A1:XFD1048576 (17 billion cells) and holds four rows."""
    rows: list[list[object]] = [["City", "Sales"], ["Oslo", 7], ["Lima", 9], ["Pune", 11]]
    return _workbook(sheet=sheet_xml(rows, dimension="A1:XFD1048576"))


def understated_dimension_workbook() -> bytes:
    """Claims A1:A1 and holds 500 rows of two columns."""
    rows: list[list[object]] = [["Item", "Count"], *([f"item {i}", i] for i in range(1, 500))]
    return _workbook(sheet=sheet_xml(rows, dimension="A1:A1"))


def many_rows_workbook(rows: int = 300_000) -> bytes:
    head = f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{SHEET_NS}"><sheetData>'
    body = "".join(
        f'<row r="{r}"><c r="A{r}"><v>{r}</v></c><c r="B{r}"><v>{r * 2}</v></c></row>'
        for r in range(1, rows + 1)
    )
    return _workbook(sheet=(head + body + "</sheetData></worksheet>").encode())


def many_rows_csv(rows: int = 300_000) -> bytes:
    return ("n,double\n" + "".join(f"{r},{r * 2}\n" for r in range(rows))).encode()


def zip_bomb_workbook(inflated_mb: int = 100) -> bytes:
    """A worksheet of `inflated_mb` MB of whitespace that deflates to about 0.1 % of that."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{SHEET_NS}"><sheetData>'.encode()
    tail = b"</sheetData></worksheet>"
    chunk = b" " * MB
    raw_size = len(head) + inflated_mb * MB + len(tail)
    crc = zlib.crc32(head)
    parts = [compressor.compress(head)]
    for _ in range(inflated_mb):
        parts.append(compressor.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(compressor.compress(tail))
    crc = zlib.crc32(tail, crc)
    parts.append(compressor.flush())
    return _replace_raw(small_workbook(), SHEET, b"".join(parts), raw_size, crc)


def _replace_raw(workbook: bytes, member: str, deflated: bytes, size: int, crc: int) -> bytes:
    """The workbook with `member` replaced by already-deflated bytes (zipfile cannot write those directly)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(workbook)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename != member:
                dst.writestr(item, src.read(item))
    # Append the member by hand: local header, data, then rebuild the central directory with it.
    with zipfile.ZipFile(out, "a") as dst:
        info = zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size, info.compress_size, info.CRC = size, len(deflated), crc
        dst.fp.seek(dst.start_dir)  # type: ignore[union-attr]
        info.header_offset = dst.start_dir
        dst.fp.write(info.FileHeader(zip64=size > 0xFFFFFFFF))  # type: ignore[union-attr]
        dst.fp.write(deflated)  # type: ignore[union-attr]
        dst.start_dir = dst.fp.tell()  # type: ignore[union-attr]
        dst.filelist.append(info)
        dst.NameToInfo[member] = info
        dst._didModify = True  # type: ignore[attr-defined]
    return out.getvalue()


def huge_declared_workbook() -> bytes:
    """Tiny, but its central directory says the worksheet inflates to 3 GB."""
    deflated = zlib.compress(b"<worksheet/>")[2:-4]
    return _replace_raw(small_workbook(), SHEET, deflated, 3 * 1024 * MB, zlib.crc32(b"<worksheet/>"))


LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    + "]>\n"
)


def entity_workbook(hidden: bool = False) -> bytes:
    """Shared strings with a billion-laughs DTD; `hidden` pushes the DTD past 64 KB behind a comment."""
    filler = f"<!--{'x' * 70_000}-->\n" if hidden else ""
    declaration, doctype = LAUGHS.split("\n", 1)
    strings = (
        f"{declaration}\n{filler}{doctype}"
        f'<sst xmlns="{SHEET_NS}" count="1" uniqueCount="1"><si><t>&lol9;</t></si></sst>'
    )
    sheet = (
        f'<?xml version="1.0"?><worksheet xmlns="{SHEET_NS}"><sheetData>'
        '<row r="1"><c r="A1" t="s"><v>0</v></c></row></sheetData></worksheet>'
    )
    rels_ct = (
        b'<Override PartName="/xl/sharedStrings.xml" ContentType="application/'
        b'vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>'
    )
    rel = (
        b'<Relationship Id="rIdS" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        b'relationships/sharedStrings" Target="sharedStrings.xml"/>'
    )
    base = _workbook()
    with zipfile.ZipFile(io.BytesIO(base)) as src:
        types = src.read("[Content_Types].xml").replace(b"</Types>", rels_ct + b"</Types>")
        wb_rels = src.read("xl/_rels/workbook.xml.rels").replace(
            b"</Relationships>", rel + b"</Relationships>"
        )
    return _workbook(
        extra={
            "[Content_Types].xml": types,
            "xl/_rels/workbook.xml.rels": wb_rels,
            "xl/sharedStrings.xml": strings.encode(),
        },
        sheet=sheet.encode(),
    )


def corrupt_zip_workbook() -> bytes:
    """A real workbook with its middle overwritten: the central directory survives, the members do not."""
    data = bytearray(many_rows_workbook(2_000))
    middle = len(data) // 3
    data[middle : middle + 2_000] = b"\x00" * 2_000
    return bytes(data)


def garbage_zip() -> bytes:
    return b"PK\x03\x04" + b"\x17" * 5_000


def macro_workbook() -> bytes:
    """An .xlsm with a VBA project part: its cells must be read and its macros never run."""
    return _workbook(
        extra={"xl/vbaProject.bin": b"\xd0\xcf\x11\xe0" + b'Attribute VB_Name = "Evil"' * 20}, macro=True
    )


HOSTILE: dict[str, tuple[str, Callable[[], bytes]]] = {
    "encrypted": ("secret.pdf", encrypted_pdf),
    "owner_password_rc4": ("rules.pdf", owner_only_pdf),
    "owner_password_aes": ("rules-aes.pdf", lambda: owner_only_pdf("AES-256")),
    "truncated": ("truncated.pdf", truncated_pdf),
    "not_a_pdf": ("report.pdf", not_a_pdf),
    "circular_xref": ("circle.pdf", circular_xref_pdf),
    "thousands_of_pages": ("pages.pdf", many_pages_pdf),
    "decompression_bomb": ("bomb.pdf", bomb_pdf),
    "zero_bytes": ("empty.pdf", lambda: b""),
    "zip_bomb": ("bomb.xlsx", zip_bomb_workbook),
    "huge_declared": ("declared.xlsx", huge_declared_workbook),
    "entity_expansion": ("laughs.xlsx", entity_workbook),
    "entity_expansion_hidden": ("laughs2.xlsx", lambda: entity_workbook(hidden=True)),
    "lying_dimension": ("dimension.xlsx", lying_dimension_workbook),
    "understated_dimension": ("understated.xlsx", understated_dimension_workbook),
    "rows_300k": ("rows.xlsx", many_rows_workbook),
    "rows_300k_csv": ("rows.csv", many_rows_csv),
    "corrupt_zip": ("corrupt.xlsx", corrupt_zip_workbook),
    "garbage_zip": ("garbage.xlsx", garbage_zip),
    "macro": ("macros.xlsm", macro_workbook),
}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-files")
    target.mkdir(parents=True, exist_ok=True)
    for key, (name, make) in HOSTILE.items():
        (target / f"{key}-{name}").write_bytes(make())
    (target / "report-23-pages.pdf").write_bytes(report_pdf())
