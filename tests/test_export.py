"""Tests of the audit export (`clawdbot audit export`, `clawdbot.export.export_records`) on real files and databases.

What is proven, on SQLite and (when configured) PostgreSQL: CSV, XLSX and JSONL carry the contract's columns in
its order and every stored value, converted as documented (times ISO 8601 UTC with a trailing Z; booleans
"true"/"false" in CSV and XLSX; JSON columns parsed in JSONL); text a spreadsheet would run as a formula is
prefixed with an apostrophe in CSV and XLSX but left alone in JSONL; XLSX cells over Excel's limit (in UTF-16
units) are cut with a marker while JSONL keeps the full text, and have LF for CR LF and CR and U+FFFD for what XML
cannot hold; every filter selects exactly the records it should (search matches % _ and
backslash literally); each export is recorded as an `audit.export` event and the chain still verifies; a failed
export leaves no file behind (nor openpyxl's spool file); and every CLI error is one line on stderr with a non-zero
exit code, naming the output as given.

Records are written through the real `AuditStore`, files are opened back with openpyxl, csv and json.
"""

from __future__ import annotations

import codecs
import csv
import errno
import gc
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from openpyxl import load_workbook
from sqlalchemy import func, insert, select

from clawdbot.audit import AuditStore, to_json
from clawdbot.chain import EVENT_EXPORT_FIELDS, REQUEST_EXPORT_FIELDS, verify_chain
from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.export import export_records
from clawdbot.models import Event, Request, utcnow
from clawdbot.records import AuditFilter

# The contract's columns, written out here rather than imported, so a change in the code cannot go unnoticed; then
# the columns added since, at the end, so that readers of the contract's columns by position are not disturbed.
CONTRACT_REQUEST_COLUMNS = [
    "id", "started_at", "finished_at", "status", "error", "user", "client_ip", "conversation_id", "agent",
    "agent_version", "backend", "model_requested", "model_used", "fallback_used", "retries", "prompt", "context",
    "response", "thinking", "tool_calls", "attachments", "prompt_tokens", "prompt_eval_count",
    "completion_tokens", "context_tokens_before", "context_tokens_after", "truncated", "dropped_messages",
    "queue_ms", "ttft_ms", "latency_ms", "tokens_per_s", "prev_hash", "hash",
    "server_truncated",
]  # fmt: skip
CONTRACT_EVENT_COLUMNS = ["id", "at", "actor", "action", "target", "details", "prev_hash", "hash"]
JSON_COLUMNS = frozenset({"context", "tool_calls", "attachments", "details"})
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
XLSX_CELL_LIMIT = 32_767  # UTF-16 code units, as Excel counts them
# Characters XML 1.0 forbids (openpyxl refuses the control characters; the others make an unreadable workbook):
# the export writes U+FFFD instead.
XLSX_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
FORMATS = ("csv", "xlsx", "jsonl")

T0 = datetime(2026, 3, 1, 9, 0, 0, 123456, tzinfo=UTC)
LONG_PROMPT = "审计日志 audit log 🚀 مرحبا\n" * 2_500  # 57,500 characters, over the XLSX cell limit
LONG_RESPONSE = "=" + "x" * 40_000  # a formula start and over the limit: neutralized, then cut


# --- the records ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request to record: its start fields, and its final status and fields (None: left `started`)."""

    start: Mapping[str, Any]
    status: str | None = None
    finish: Mapping[str, Any] | None = None


SPECS: tuple[Spec, ...] = (
    # 1. Chinese, full metadata, JSON columns with nested values.
    Spec(
        start={
            "started_at": T0,
            "user": "张伟",
            "client_ip": "10.0.0.7",
            "conversation_id": 42,
            "agent": "助手",
            "agent_version": 3,
            "backend": "ollama",
            "model_requested": "qwen3:32b",
            "prompt": "请总结这份报告。\n重点：第二季度",
            "context": to_json([{"role": "system", "content": "你是审计助手"}, {"role": "user", "content": "你好"}]),
            "attachments": to_json([{"name": "报告.pdf", "sha256": "ab" * 32, "pages": 3}]),
            "context_tokens_before": 900,
            "context_tokens_after": 812,
        },
        status="ok",
        finish={
            "finished_at": T0 + timedelta(seconds=2, microseconds=345678),
            "model_used": "qwen3:32b",
            "fallback_used": False,
            "retries": 0,
            "response": "好的，报告要点如下：\n1. 收入增长 12%",
            "thinking": "先读报告……",
            "tool_calls": to_json([{"function": {"name": "search", "arguments": {"q": "报告", "n": 3}}}]),
            "prompt_tokens": 812,
            "prompt_eval_count": 640,
            "completion_tokens": 120,
            "truncated": False,
            "dropped_messages": 0,
            "queue_ms": 0.25,
            "ttft_ms": 153.5,
            "latency_ms": 2345.678901,
            "tokens_per_s": 51.2,
        },
    ),
    # 2. Arabic, CRLF, booleans true, awkward floats, a start time given in another zone.
    Spec(
        start={
            "started_at": (T0 + timedelta(hours=1)).astimezone(timezone(timedelta(hours=8))),
            "user": "مريم",
            "client_ip": "::1",
            "agent": "مساعد",
            "agent_version": 1,
            "backend": "embedded",
            "model_requested": "qwen3:32b",
            "prompt": "مرحبا، كيف حالك؟ 123",
        },
        status="error",
        finish={
            "finished_at": T0 + timedelta(hours=1, seconds=9),
            "error": "model unavailable: connection refused",
            "model_used": "smollm2",
            "fallback_used": True,
            "retries": 2,
            "response": "أنا بخير، شكرا!\r\nسطر ثان",
            "truncated": True,
            "dropped_messages": 3,
            "server_truncated": True,
            "queue_ms": 1e-7,
            "ttft_ms": 3.0,
            "latency_ms": 12345.678901234,
            "tokens_per_s": 0.1,
        },
    ),
    # 3. Emoji (with joiners), blank lines, a Unicode line separator inside the text.
    Spec(
        start={
            "started_at": T0 + timedelta(hours=2),
            "user": "alice",
            "agent": "助手",
            "prompt": "🚀 launch\n\nline three 👩‍👩‍👧 end\u2028after the separator",
        },
        status="timeout",
        finish={
            "finished_at": T0 + timedelta(hours=2, minutes=2),
            "response": "done ✅",
            "thinking": "multi\nline\nthinking",
        },
    ),
    # 4. Formula payloads in every kind of text column.
    Spec(
        start={
            "started_at": T0 + timedelta(hours=3),
            "user": "=cmd|' /C calc'!A0",
            "client_ip": "+1",
            "agent": "@agent",
            "backend": "-",
            "model_requested": "\tx",
            "prompt": '=HYPERLINK("http://x","y")',
        },
        status="rejected_input",
        finish={
            "finished_at": T0 + timedelta(hours=3, seconds=1),
            "model_used": "\rx",
            "error": "-2+3",
            "response": "+1",
            "thinking": "@SUM(A1)",
        },
    ),
    # 5. Text over the XLSX cell limit.
    Spec(
        start={"started_at": T0 + timedelta(hours=4), "user": "bob", "prompt": LONG_PROMPT},
        status="ok",
        finish={"finished_at": T0 + timedelta(hours=4, minutes=1), "response": LONG_RESPONSE},
    ),
    # 6. Control characters openpyxl refuses, and a NUL (which the store turns into U+FFFD).
    Spec(
        start={
            "started_at": T0 + timedelta(hours=5),
            "user": "carol",
            "prompt": "bell\x07 and \x01 start\x1f end",
        },
        status="cancelled",
        finish={
            "finished_at": T0 + timedelta(hours=5, seconds=3),
            "error": "\x01",
            "response": "nul\x00here",
            "thinking": "\x0bvt\x0cff",
        },
    ),
    # 7. Empty and missing values everywhere they are allowed.
    Spec(
        start={
            "started_at": T0 + timedelta(hours=6),
            "user": "dave",
            "conversation_id": None,
            "agent_version": None,
            "prompt": "",
        },
        status="busy",
        finish={
            "finished_at": T0 + timedelta(hours=6, seconds=1),
            "error": "",
            "response": "",
            "prompt_tokens": None,
            "prompt_eval_count": None,
            "completion_tokens": None,
            "queue_ms": None,
            "ttft_ms": None,
            "latency_ms": None,
            "tokens_per_s": None,
        },
    ),
    # 8 and 9. Text for the search filter: % _ and backslash must match literally; case does not matter.
    Spec(
        start={
            "started_at": T0 + timedelta(days=1), "user": "erin", "agent": "writer",
            "prompt": "I am 100% sure about a_b",
        },
        status="ok",
        finish={"finished_at": T0 + timedelta(days=1, seconds=1), "response": "saved to C:\\temp\\file.txt"},
    ),
    Spec(
        start={
            "started_at": T0 + timedelta(days=1, hours=1), "user": "erin", "agent": "writer",
            "prompt": "I am 1000 sure about axb",
        },
        status="ok",
        finish={"finished_at": T0 + timedelta(days=1, hours=1, seconds=1), "response": "Hello World"},
    ),
    # 10. Still running: no finish time, not yet in the chain.
    Spec(start={"started_at": T0 + timedelta(days=2), "user": "frank", "prompt": "still running"}),
)  # fmt: skip


def record_all(store: AuditStore) -> list[int]:
    """Write SPECS through the audit store; returns the ids in order."""
    ids = []
    for spec in SPECS:
        request_id = store.start_request(**spec.start)
        if spec.status is not None:
            store.finish_request(request_id, spec.status, **(spec.finish or {}))
        ids.append(request_id)
    return ids


def record_events(store: AuditStore) -> list[int]:
    return [
        store.record_event(
            "管理员",
            "user.add",
            "=evil()",
            {"name": "张伟", "roles": ["staff"], "note": "报告 100% 完成\n第二行", "emoji": "🚀"},
        ),
        store.record_event(
            "root",
            "agent.edit",
            "助手",
            {"diff": {"model": ["qwen3:8b", "qwen3:32b"]}, "ok": True, "ratio": 0.5, "none": None},
        ),
        store.record_event("auditor", "audit.verify", "chain", {"ok": True, "checked": 10}),
    ]


@pytest.fixture
def request_ids(store: AuditStore) -> list[int]:
    return record_all(store)


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """An empty directory for exports (tmp_path itself holds the SQLite database)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


# --- what the database holds, and what each format must show for it ----------------------------------------


def stored_requests(db: Database) -> list[dict[str, Any]]:
    with db.read() as session:
        rows = session.scalars(select(Request).order_by(Request.id)).all()
        return [{name: getattr(row, name) for name in CONTRACT_REQUEST_COLUMNS} for row in rows]


def stored_events(db: Database) -> list[dict[str, Any]]:
    with db.read() as session:
        rows = session.scalars(select(Event).order_by(Event.id)).all()
        return [{name: getattr(row, name) for name in CONTRACT_EVENT_COLUMNS} for row in rows]


def export_events(db: Database) -> list[Event]:
    with db.read() as session:
        return list(
            session.scalars(select(Event).where(Event.action == "audit.export").order_by(Event.id)).all()
        )


def iso_z(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def neutralized(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def cut_note(length: int) -> str:
    return f"… [cut: {length} characters in all; the JSONL export has the full text]"


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def utf16_cut(text: str, units: int) -> str:
    """The longest start of `text`, in whole characters, of at most `units` UTF-16 code units."""
    used = 0
    for i, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > units:
            return text[:i]
    return text


def xlsx_cut(text: str) -> str:
    """Text as an XLSX cell holds it: cut to Excel's limit in UTF-16 units, with the note of its full length."""
    if utf16_len(text) <= XLSX_CELL_LIMIT:
        return text
    note = cut_note(len(text))
    return utf16_cut(text, XLSX_CELL_LIMIT - utf16_len(note)) + note


def csv_expected(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, str):
        return neutralized(value)
    return repr(value)  # int or float: the shortest text that reads back as the same number


def xlsx_expected(value: Any) -> Any:
    if value is None or value == "":
        return None  # openpyxl reads an empty text cell back as no value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, str):
        # Line breaks become LF (see test_xlsx_line_breaks_are_lf), then illegal characters U+FFFD, then the cut.
        text = neutralized(value).replace("\r\n", "\n").replace("\r", "\n")
        return xlsx_cut(XLSX_ILLEGAL.sub("\ufffd", text))
    return value


def jsonl_expected(name: str, value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_z(value)
    if name in JSON_COLUMNS and isinstance(value, str):
        return json.loads(value)
    return value


# --- reading the files back ------------------------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    assert path.read_bytes().startswith(codecs.BOM_UTF8), "CSV must start with a UTF-8 byte-order mark"
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def read_xlsx(path: Path, sheet: str) -> tuple[list[Any], list[list[Any]]]:
    workbook = load_workbook(path, read_only=True)
    try:
        assert workbook.sheetnames == [sheet]
        rows = [list(row) for row in workbook[sheet].iter_rows(values_only=True)]
    finally:
        workbook.close()
    width = len(rows[0])
    return rows[0], [row + [None] * (width - len(row)) for row in rows[1:]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    # One record per "\n"-ended line; other line breaks (U+2028, CR) may appear inside a record's text.
    return [json.loads(line) for line in text.split("\n")[:-1]]


def exported_ids(path: Path) -> list[int]:
    return [record["id"] for record in read_jsonl(path)]


# --- the contract's columns ------------------------------------------------------------------------------


def test_export_fields_are_the_contract_columns() -> None:
    assert list(REQUEST_EXPORT_FIELDS) == CONTRACT_REQUEST_COLUMNS
    assert list(EVENT_EXPORT_FIELDS) == CONTRACT_EVENT_COLUMNS


@pytest.mark.parametrize("kind", ["requests", "events"])
def test_empty_export_has_the_header_only(db: Database, store: AuditStore, tmp_path: Path, kind: str) -> None:
    columns = CONTRACT_REQUEST_COLUMNS if kind == "requests" else CONTRACT_EVENT_COLUMNS
    assert export_records(db, tmp_path / "e.csv", "csv", kind, actor="t", store=store) == 0
    # The first export's event now exists, so an events export would hold it: filter it out by time.
    future = AuditFilter(since=datetime(2100, 1, 1, tzinfo=UTC))
    assert export_records(db, tmp_path / "e.xlsx", "xlsx", kind, future, actor="t", store=store) == 0
    assert export_records(db, tmp_path / "e.jsonl", "jsonl", kind, future, actor="t", store=store) == 0

    assert read_csv(tmp_path / "e.csv") == (columns, [])
    assert read_xlsx(tmp_path / "e.xlsx", kind) == (columns, [])
    assert (tmp_path / "e.jsonl").read_bytes() == b""


# --- every field, every format ---------------------------------------------------------------------------


def test_store_keeps_text_as_given(db: Database, request_ids: list[int]) -> None:
    """The baseline for the export checks: what was stored is what the caller gave (NUL aside)."""
    stored = {row["id"]: row for row in stored_requests(db)}
    for request_id, spec in zip(request_ids, SPECS, strict=True):
        given = {**spec.start, **(spec.finish or {})}
        for name, value in given.items():
            expected = value.replace("\x00", "\ufffd") if isinstance(value, str) else value
            assert stored[request_id][name] == expected, name


def test_csv_has_every_field(db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    assert export_records(db, path, "csv", actor="tester", store=store) == len(SPECS)

    header, rows = read_csv(path)
    assert header == CONTRACT_REQUEST_COLUMNS
    stored = stored_requests(db)
    assert [int(row[0]) for row in rows] == request_ids
    for row, record in zip(rows, stored, strict=True):
        assert row == [csv_expected(record[name]) for name in CONTRACT_REQUEST_COLUMNS]
    # Numbers read back as the very numbers stored.
    by_id = {int(row[0]): dict(zip(header, row, strict=True)) for row in rows}
    assert float(by_id[request_ids[1]]["latency_ms"]) == 12345.678901234
    assert float(by_id[request_ids[1]]["queue_ms"]) == 1e-7
    assert by_id[request_ids[1]]["started_at"] == "2026-03-01T10:00:00.123456Z"
    assert header[-1] == "server_truncated"
    assert by_id[request_ids[1]]["server_truncated"] == "true"
    assert by_id[request_ids[0]]["server_truncated"] == "false"


def test_csv_neutralizes_formulas(
    db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "requests.csv"
    export_records(db, path, "csv", actor="tester", store=store)
    header, rows = read_csv(path)
    row = dict(zip(header, rows[3], strict=True))
    assert row["prompt"] == '\'=HYPERLINK("http://x","y")'
    assert row["response"] == "'+1"
    assert row["error"] == "'-2+3"
    assert row["thinking"] == "'@SUM(A1)"
    assert row["model_requested"] == "'\tx"
    assert row["model_used"] == "'\rx"
    assert row["user"] == "'=cmd|' /C calc'!A0"
    assert row["client_ip"] == "'+1"
    assert row["agent"] == "'@agent"
    assert row["backend"] == "'-"
    long_row = dict(zip(header, rows[4], strict=True))
    assert long_row["response"] == "'" + LONG_RESPONSE  # CSV has no cell limit: the full text
    assert long_row["prompt"] == LONG_PROMPT
    control_row = dict(zip(header, rows[5], strict=True))
    assert control_row["prompt"] == "bell\x07 and \x01 start\x1f end"  # CSV keeps control characters
    # No cell of any row starts a formula.
    for cells in rows:
        for cell in cells:
            assert not cell.startswith(FORMULA_STARTS), cell


def test_xlsx_has_every_field(
    db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "requests.xlsx"
    assert export_records(db, path, "xlsx", actor="tester", store=store) == len(SPECS)

    header, rows = read_xlsx(path, "requests")
    assert header == CONTRACT_REQUEST_COLUMNS
    assert [row[0] for row in rows] == request_ids
    for row, record in zip(rows, stored_requests(db), strict=True):
        assert row == [xlsx_expected(record[name]) for name in CONTRACT_REQUEST_COLUMNS]
    by_id = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    assert by_id[request_ids[1]]["latency_ms"] == 12345.678901234
    assert by_id[request_ids[1]]["fallback_used"] == "true"
    assert by_id[request_ids[0]]["truncated"] == "false"
    assert by_id[request_ids[0]]["prompt_tokens"] == 812
    assert by_id[request_ids[1]]["server_truncated"] == "true"
    assert by_id[request_ids[0]]["server_truncated"] == "false"


def test_xlsx_neutralizes_formulas_and_cleans_cells(
    db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "requests.xlsx"
    export_records(db, path, "xlsx", actor="tester", store=store)
    header, rows = read_xlsx(path, "requests")
    row = dict(zip(header, rows[3], strict=True))
    assert row["prompt"] == '\'=HYPERLINK("http://x","y")'
    assert (row["response"], row["error"], row["thinking"]) == ("'+1", "'-2+3", "'@SUM(A1)")
    assert row["model_requested"] == "'\tx"
    assert row["user"] == "'=cmd|' /C calc'!A0"
    for cells in rows:
        for cell in cells:
            assert not (isinstance(cell, str) and cell.startswith(FORMULA_STARTS)), cell

    # Control characters openpyxl refuses become U+FFFD; the NUL was already U+FFFD in the database.
    control = dict(zip(header, rows[5], strict=True))
    assert control["prompt"] == "bell\ufffd and \ufffd start\ufffd end"
    assert control["thinking"] == "\ufffdvt\ufffdff"
    assert control["error"] == "\ufffd"
    assert control["response"] == "nul\ufffdhere"

    # Text over the cell limit is cut to the limit in UTF-16 units (one short if the next character is an emoji,
    # which takes two), ending with a marker that gives the full length in characters.
    long = dict(zip(header, rows[4], strict=True))
    for name, text in (("prompt", LONG_PROMPT), ("response", "'" + LONG_RESPONSE)):
        cell = long[name]
        assert XLSX_CELL_LIMIT - 1 <= utf16_len(cell) <= XLSX_CELL_LIMIT
        note = cut_note(len(text))
        assert cell.endswith(note)
        assert text.startswith(cell.removesuffix(note))
    assert utf16_len(long["response"]) == XLSX_CELL_LIMIT  # no emoji: exactly the limit
    assert long["response"].startswith("'=")


def test_jsonl_has_every_field_unneutralized(
    db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    assert export_records(db, path, "jsonl", actor="tester", store=store) == len(SPECS)

    records = read_jsonl(path)
    assert len(records) == len(SPECS)
    for record, stored in zip(records, stored_requests(db), strict=True):
        assert list(record) == CONTRACT_REQUEST_COLUMNS
        assert record == {name: jsonl_expected(name, stored[name]) for name in CONTRACT_REQUEST_COLUMNS}

    first, arabic, emoji, formulas, long, control, empty = records[:7]
    # JSON columns are JSON values, not text.
    assert first["context"][0] == {"role": "system", "content": "你是审计助手"}
    assert first["tool_calls"][0]["function"]["arguments"] == {"q": "报告", "n": 3}
    assert first["attachments"][0]["name"] == "报告.pdf"
    assert first["started_at"] == "2026-03-01T09:00:00.123456Z"
    assert first["finished_at"] == "2026-03-01T09:00:02.469134Z"
    # Booleans, numbers and missing values keep their JSON types.
    assert arabic["fallback_used"] is True and arabic["truncated"] is True
    assert first["fallback_used"] is False
    assert list(first)[-1] == "server_truncated"
    assert arabic["server_truncated"] is True and first["server_truncated"] is False
    assert arabic["queue_ms"] == 1e-7 and arabic["tokens_per_s"] == 0.1
    assert arabic["response"] == "أنا بخير، شكرا!\r\nسطر ثان"
    assert (
        empty["prompt_tokens"] is None and empty["tokens_per_s"] is None and empty["conversation_id"] is None
    )
    assert empty["error"] == "" and empty["context"] == []
    # JSONL is data, not a spreadsheet: nothing is neutralized, cut or replaced.
    assert formulas["prompt"] == '=HYPERLINK("http://x","y")'
    assert (formulas["response"], formulas["error"], formulas["thinking"]) == ("+1", "-2+3", "@SUM(A1)")
    assert (formulas["model_requested"], formulas["model_used"]) == ("\tx", "\rx")
    assert long["prompt"] == LONG_PROMPT and long["response"] == LONG_RESPONSE
    assert control["prompt"] == "bell\x07 and \x01 start\x1f end"
    assert emoji["prompt"] == SPECS[2].start["prompt"]
    # The record left `started` is exported with no finish time and no place in the chain.
    assert records[-1]["status"] == "started"
    assert records[-1]["finished_at"] is None and records[-1]["hash"] is None
    assert all(len(r["hash"]) == 64 for r in records[:-1])


def test_jsonl_keeps_text_that_is_not_json(db: Database, store: AuditStore, tmp_path: Path) -> None:
    request_id = store.start_request(user="u", context="not json [", tool_calls="-1")
    store.finish_request(request_id, "ok", attachments='"a string"')
    export_records(db, tmp_path / "r.jsonl", "jsonl", actor="t", store=store)
    export_records(db, tmp_path / "r.csv", "csv", actor="t", store=store)
    (record,) = read_jsonl(tmp_path / "r.jsonl")
    assert (record["context"], record["tool_calls"], record["attachments"]) == ("not json [", -1, "a string")
    _, (row,) = read_csv(tmp_path / "r.csv")
    assert row[CONTRACT_REQUEST_COLUMNS.index("tool_calls")] == "'-1"


def test_non_finite_floats_keep_the_chain_and_jsonl_valid(
    db: Database, store: AuditStore, outdir: Path
) -> None:
    """SQLite would store NaN as NULL after it was hashed (a broken chain), and JSONL has no NaN or Infinity."""
    for value in (float("nan"), float("inf"), float("-inf")):
        request_id = store.start_request(user="u")
        try:
            store.finish_request(request_id, "ok", tokens_per_s=value)
        except UsageError:
            store.finish_request(request_id, "ok", tokens_per_s=None)  # refusing them is a fine fix too
    assert verify_chain(db).ok
    export_records(db, outdir / "r.jsonl", "jsonl", actor="t", store=store)
    for line in (outdir / "r.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_events_export_has_every_field(db: Database, store: AuditStore, tmp_path: Path) -> None:
    record_events(store)
    before = stored_events(db)
    future = AuditFilter(until=datetime(2100, 1, 1, tzinfo=UTC))
    for fmt in FORMATS:
        # Only the three events recorded above: each export's own event comes after `before`.
        ids = AuditFilter(until=before[-1]["at"] + timedelta(microseconds=1))
        count = export_records(
            db, tmp_path / f"events.{fmt}", fmt, "events", ids, actor="auditor", store=store
        )
        assert count == len(before)
    assert export_records(db, tmp_path / "all.jsonl", "jsonl", "events", future, actor="a", store=store) == 6

    header, rows = read_csv(tmp_path / "events.csv")
    assert header == CONTRACT_EVENT_COLUMNS
    assert rows == [[csv_expected(event[name]) for name in CONTRACT_EVENT_COLUMNS] for event in before]
    assert rows[0][CONTRACT_EVENT_COLUMNS.index("target")] == "'=evil()"

    header, xrows = read_xlsx(tmp_path / "events.xlsx", "events")
    assert header == CONTRACT_EVENT_COLUMNS
    assert xrows == [[xlsx_expected(event[name]) for name in CONTRACT_EVENT_COLUMNS] for event in before]

    records = read_jsonl(tmp_path / "events.jsonl")
    assert [list(r) for r in records] == [CONTRACT_EVENT_COLUMNS] * 3
    assert records == [{n: jsonl_expected(n, e[n]) for n in CONTRACT_EVENT_COLUMNS} for e in before]
    assert records[0]["actor"] == "管理员" and records[0]["target"] == "=evil()"
    assert records[0]["details"] == {
        "name": "张伟",
        "roles": ["staff"],
        "note": "报告 100% 完成\n第二行",
        "emoji": "🚀",
    }
    assert records[1]["details"]["ok"] is True and records[1]["details"]["none"] is None
    assert all(r["at"].endswith("Z") for r in records)


# --- filters ---------------------------------------------------------------------------------------------


def ids_where(db: Database, test: Any) -> list[int]:
    return [row["id"] for row in stored_requests(db) if test(row)]


def contains(needle: str) -> Any:
    return lambda row: needle.lower() in row["prompt"].lower() or needle.lower() in row["response"].lower()


@pytest.mark.parametrize(
    ("audit_filter", "test"),
    [
        pytest.param(AuditFilter(), lambda row: True, id="no filter"),
        pytest.param(
            AuditFilter(since=T0 + timedelta(hours=3)),
            lambda row: row["started_at"] >= T0 + timedelta(hours=3),
            id="since",
        ),
        pytest.param(
            # Exclusive: the record started exactly at --until is left out.
            AuditFilter(until=T0 + timedelta(hours=3)),
            lambda row: row["started_at"] < T0 + timedelta(hours=3),
            id="until",
        ),
        pytest.param(
            AuditFilter(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=5)),
            lambda row: T0 + timedelta(hours=1) <= row["started_at"] < T0 + timedelta(hours=5),
            id="since and until",
        ),
        pytest.param(
            AuditFilter(since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=2)),
            lambda row: False,
            id="empty window",
        ),
        pytest.param(AuditFilter(user="张伟"), lambda row: row["user"] == "张伟", id="user chinese"),
        pytest.param(AuditFilter(user="erin"), lambda row: row["user"] == "erin", id="user"),
        pytest.param(
            AuditFilter(user="=cmd|' /C calc'!A0"),
            lambda row: row["user"].startswith("=cmd"),
            id="user formula",
        ),
        pytest.param(AuditFilter(user="nobody"), lambda row: False, id="unknown user"),
        pytest.param(AuditFilter(agent="助手"), lambda row: row["agent"] == "助手", id="agent"),
        pytest.param(AuditFilter(status="ok"), lambda row: row["status"] == "ok", id="status ok"),
        pytest.param(
            AuditFilter(status="started"), lambda row: row["status"] == "started", id="status started"
        ),
        pytest.param(AuditFilter(status="abandoned"), lambda row: False, id="status none"),
        pytest.param(AuditFilter(search="100%"), contains("100%"), id="search percent"),
        pytest.param(AuditFilter(search="%"), contains("%"), id="search bare percent"),
        pytest.param(AuditFilter(search="a_b"), contains("a_b"), id="search underscore"),
        pytest.param(AuditFilter(search="_"), contains("_"), id="search bare underscore"),
        pytest.param(AuditFilter(search="C:\\temp\\"), contains("C:\\temp\\"), id="search backslash"),
        pytest.param(AuditFilter(search="报告"), contains("报告"), id="search chinese"),
        pytest.param(AuditFilter(search="كيف"), contains("كيف"), id="search arabic"),
        pytest.param(AuditFilter(search="HELLO world"), contains("hello world"), id="search any case"),
        pytest.param(AuditFilter(search="👩‍👩‍👧"), contains("👩‍👩‍👧"), id="search emoji"),
        pytest.param(
            AuditFilter(user="erin", search="100%", status="ok", since=T0, until=T0 + timedelta(days=3)),
            lambda row: row["user"] == "erin" and "100%" in row["prompt"],
            id="combined",
        ),
    ],
)
def test_request_filters(
    db: Database,
    store: AuditStore,
    request_ids: list[int],
    tmp_path: Path,
    audit_filter: AuditFilter,
    test: Any,
) -> None:
    expected = ids_where(db, test)
    path = tmp_path / "filtered.jsonl"
    count = export_records(db, path, "jsonl", "requests", audit_filter, actor="tester", store=store)
    assert exported_ids(path) == expected
    assert count == len(expected)


def test_search_literal_characters_select_exactly(
    db: Database, request_ids: list[int], tmp_path: Path
) -> None:
    """Pin the interesting cases by id, not only against the Python model of the filter."""
    erin_percent, erin_plain = request_ids[7], request_ids[8]

    def run(search: str) -> list[int]:
        path = tmp_path / "s.jsonl"
        export_records(db, path, "jsonl", "requests", AuditFilter(search=search), actor="t")
        return exported_ids(path)

    assert run("100%") == [erin_percent]  # not "1000"
    assert run("a_b") == [erin_percent]  # not "axb"
    assert run("\\temp") == [erin_percent]
    assert run("%") == [request_ids[0], erin_percent]  # "收入增长 12%" and "100%"
    assert run("报告") == [request_ids[0]]
    assert run("hello") == [erin_plain]


def test_events_filters(db: Database, store: AuditStore, tmp_path: Path) -> None:
    first = store.record_event("管理员", "user.add", "张伟", {"note": "报告 100% 完成"})
    middle = utcnow()
    second = store.record_event("root", "agent.edit", "助手", {"model": "qwen3_32b"})
    third = store.record_event("root", "audit.verify", "chain", {"ok": True})
    end = utcnow()

    def run(audit_filter: AuditFilter) -> list[int]:
        path = tmp_path / "ev.jsonl"
        export_records(db, path, "jsonl", "events", audit_filter, actor="tester", store=store)
        return exported_ids(path)

    assert run(AuditFilter(until=middle)) == [first]
    assert run(AuditFilter(since=middle, until=end)) == [second, third]
    assert run(AuditFilter(user="root", until=end)) == [second, third]
    assert run(AuditFilter(user="管理员")) == [first]
    assert run(AuditFilter(search="报告", until=end)) == [first]  # in details
    assert run(AuditFilter(search="100%", until=end)) == [first]
    assert run(AuditFilter(search="n3_3", until=end)) == [second]  # "qwen3_32b"; _ is literal...
    assert run(AuditFilter(search="qwen_", until=end)) == []  # ...so it does not match "qwen3"
    assert run(AuditFilter(search="AUDIT.VERIFY", until=end)) == [third]  # in action, any case
    assert run(AuditFilter(search="助手", until=end)) == [second]  # in target


@pytest.mark.parametrize("audit_filter", [AuditFilter(agent="助手"), AuditFilter(status="ok")])
def test_events_refuse_request_only_filters(db: Database, outdir: Path, audit_filter: AuditFilter) -> None:
    with pytest.raises(UsageError, match="apply to requests"):
        export_records(db, outdir / "ev.csv", "csv", "events", audit_filter, actor="t")
    assert list(outdir.iterdir()) == []
    assert export_events(db) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "done"}, "unknown status 'done'"),
        ({"since": T0 + timedelta(days=1), "until": T0}, "--since is after --until"),
    ],
)
def test_bad_filters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        AuditFilter(**kwargs)


@pytest.mark.parametrize(("fmt", "kind"), [("xml", "requests"), ("csv", "users")])
def test_unknown_format_or_kind_is_refused(
    db: Database, request_ids: list[int], outdir: Path, fmt: str, kind: str
) -> None:
    with pytest.raises(UsageError, match="unknown"):
        export_records(db, outdir / "x.out", fmt, kind, actor="t")
    assert list(outdir.iterdir()) == []
    assert export_events(db) == []


# --- the export's own event and the chain ----------------------------------------------------------------


def test_each_export_is_an_event_and_the_chain_verifies(
    db: Database, store: AuditStore, request_ids: list[int], tmp_path: Path
) -> None:
    audit_filter = AuditFilter(since=T0, until=T0 + timedelta(days=1, hours=12), user="erin", search="100%")
    runs = [
        ("csv", "requests", AuditFilter()),
        ("xlsx", "requests", audit_filter),
        ("jsonl", "requests", AuditFilter(status="ok", agent="助手")),
        ("csv", "events", AuditFilter(user="tester")),
    ]
    counts = []
    for n, (fmt, kind, f) in enumerate(runs):
        path = tmp_path / "exports" / f"export-{n}.{fmt}"
        counts.append(export_records(db, path, fmt, kind, f, actor="tester", store=store))
    assert counts == [len(SPECS), 1, 1, 3]

    events = export_events(db)
    assert len(events) == len(runs)
    for event, (fmt, kind, f), count, n in zip(events, runs, counts, range(len(runs)), strict=True):
        assert (event.actor, event.action, event.target) == ("tester", "audit.export", kind)
        assert json.loads(event.details) == {
            "format": fmt,
            "filter": f.describe(),
            "rows": count,
            "file": f"export-{n}.{fmt}",
        }
    assert json.loads(events[1].details)["filter"] == {
        "since": "2026-03-01T09:00:00.123456+00:00",
        "until": "2026-03-02T21:00:00.123456+00:00",
        "user": "erin",
        "search": "100%",
    }
    assert json.loads(events[0].details)["filter"] == {}

    result = verify_chain(db)
    assert result.ok, result.first_break
    assert result.checked == len(SPECS) - 1 + len(runs)  # the `started` record is not in the chain yet
    assert events[-1].hash == result.head_hash


def test_export_without_a_store_records_its_event(
    db: Database, request_ids: list[int], tmp_path: Path
) -> None:
    export_records(db, tmp_path / "r.csv", "csv", actor="someone")
    (event,) = export_events(db)
    assert event.actor == "someone" and json.loads(event.details)["rows"] == len(SPECS)
    assert verify_chain(db).ok


# --- atomic files ----------------------------------------------------------------------------------------


class Cancelled(Exception):
    pass


def cancel_at(row: int) -> Any:
    """A progress callback that cancels the export when it reaches `row`, as a UI's cancel button does."""

    def on_row(n: int) -> None:
        if n == row:
            raise Cancelled(f"cancelled at row {n}")

    return on_row


# Nothing is left for the garbage collector to close (an error in a close would fail the test).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_export_leaves_no_file(
    db: Database, store: AuditStore, request_ids: list[int], outdir: Path, fmt: str
) -> None:
    out = outdir
    target = out / f"requests.{fmt}"
    # Half the rows, long ones among them, are written before the failure.
    with pytest.raises(Cancelled):
        export_records(db, target, fmt, actor="t", store=store, on_row=cancel_at(len(SPECS) - 1))
    gc.collect()
    assert list(out.iterdir()) == []
    assert export_events(db) == []

    # An earlier export at the same path survives a failed one untouched.
    assert export_records(db, target, fmt, actor="t", store=store) == len(SPECS)
    before = target.read_bytes()
    with pytest.raises(Cancelled):
        export_records(db, target, fmt, actor="t", store=store, on_row=cancel_at(2))
    assert target.read_bytes() == before
    assert list(out.iterdir()) == [target]
    assert len(export_events(db)) == 1


def test_export_onto_a_directory_fails_and_leaves_it(
    db: Database, store: AuditStore, request_ids: list[int], outdir: Path
) -> None:
    target = outdir / "exports"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        export_records(db, target, "csv", actor="t", store=store)
    assert target.is_dir() and list(target.iterdir()) == []
    assert list(outdir.iterdir()) == [target]
    assert export_events(db) == []


@pytest.mark.parametrize("under", ["r.csv", "sub/r.csv"])
def test_export_under_a_regular_file_fails(
    db: Database, request_ids: list[int], outdir: Path, under: str
) -> None:
    blocker = outdir / "plain.txt"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        export_records(db, blocker / under, "csv", actor="t")
    assert list(outdir.iterdir()) == [blocker]
    assert blocker.read_text() == "not a directory"
    assert export_events(db) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories anyway")
def test_export_into_a_read_only_directory_fails(db: Database, request_ids: list[int], outdir: Path) -> None:
    locked = outdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            export_records(db, locked / "r.csv", "csv", actor="t")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_xlsx_of_thousands_of_records(db: Database, store: AuditStore, tmp_path: Path) -> None:
    """Row count of a larger XLSX (the 100,000-record export is measured by bench/audit_bench.py).

    The rows are inserted in one statement, not through the store: the export reads any rows, chained or not.
    """
    n = 3_000
    rows = [
        {
            "started_at": T0 + timedelta(seconds=i),
            "finished_at": T0 + timedelta(seconds=i, milliseconds=900),
            "status": "ok",
            "user": f"user{i % 7}",
            "agent": "助手",
            "prompt": f"问题 {i}: " + "请解释审计链。" * 20,
            "context": to_json([{"role": "user", "content": "你好 hello " * 30}]),
            "response": f"=answer {i} " + "答案 answer " * 40,
            "latency_ms": i * 1.5,
        }
        for i in range(n)
    ]
    with db.write_connection() as conn:
        conn.execute(insert(Request), rows)
    path = tmp_path / "many.xlsx"
    assert export_records(db, path, "xlsx", actor="t", store=store) == n
    workbook = load_workbook(path, read_only=True)
    try:
        sheet = workbook["requests"]
        count = 0
        last: tuple[Any, ...] = ()
        for count, row in enumerate(sheet.iter_rows(min_row=2, values_only=True), 1):  # noqa: B007
            last = row
    finally:
        workbook.close()
    assert count == n
    assert last[CONTRACT_REQUEST_COLUMNS.index("response")].startswith(f"'=answer {n - 1} ")
    assert last[CONTRACT_REQUEST_COLUMNS.index("latency_ms")] == (n - 1) * 1.5
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Request)) == n


# --- the command line ------------------------------------------------------------------------------------


def clawdbot_command() -> str:
    found = shutil.which("clawdbot") or str(Path(sys.executable).parent / "clawdbot")
    assert Path(found).is_file(), "the clawdbot script is not installed: pip install -e ."
    return found


def cli_env(db_url: str, spool: Path) -> dict[str, str]:
    """The environment of a CLI run: only this database, and temporary files kept where the test can see them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWDBOT_") and k != "OLLAMA_HOST"}
    spool.mkdir(exist_ok=True)
    env.update(CLAWDBOT_DATABASE_URL=db_url, TMPDIR=str(spool), PYTHONUTF8="1")
    return env


def cli_export(
    db: Database, cwd: Path, *args: str, max_file_bytes: int | None = None
) -> subprocess.CompletedProcess[str]:
    """`clawdbot audit export ARGS` in `cwd`; with max_file_bytes, no file may grow past it (a full disk)."""

    def limit_file_size() -> None:
        # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG ("File too large").
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes or 0, max_file_bytes or 0))

    return subprocess.run(
        [clawdbot_command(), "audit", "export", *args],
        cwd=cwd,
        env=cli_env(db.url, cwd.parent / "spool"),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
        preexec_fn=limit_file_size if max_file_bytes is not None else None,
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def test_cli_exports(db: Database, store: AuditStore, request_ids: list[int], outdir: Path) -> None:
    result = cli_export(db, outdir, "--format", "csv", "-o", "exports/张伟.csv", "--user", "张伟")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exported 1 requests to exports/张伟.csv\n"
    assert result.stderr == ""
    header, rows = read_csv(outdir / "exports" / "张伟.csv")
    assert header == CONTRACT_REQUEST_COLUMNS
    assert [int(row[0]) for row in rows] == [request_ids[0]]
    assert rows[0] == [csv_expected(value) for value in stored_requests(db)[0].values()]

    result = cli_export(
        db, outdir, "--format", "xlsx", "--output", "some.xlsx",
        "--since", "2026-03-01T10:00:00.123456+00:00", "--until", "2026-03-03", "--search", "%",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exported 1 requests to some.xlsx\n"
    _, xrows = read_xlsx(outdir / "some.xlsx", "requests")
    assert [row[0] for row in xrows] == [request_ids[7]]  # "100%" (the "12%" record started before --since)

    result = cli_export(db, outdir, "--format", "jsonl", "--agent", "助手", "--status", "ok", "-o", "a.jsonl")
    assert result.returncode == 0, result.stderr
    assert exported_ids(outdir / "a.jsonl") == [request_ids[0]]

    result = cli_export(db, outdir, "--format", "jsonl", "--kind", "events", "-o", "events.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exported 3 events to events.jsonl\n"
    events = read_jsonl(outdir / "events.jsonl")
    assert [e["action"] for e in events] == ["audit.export"] * 3
    assert events[0]["actor"].startswith("cli:")
    assert events[0]["details"] == {
        "format": "csv",
        "filter": {"user": "张伟"},
        "rows": 1,
        "file": "张伟.csv",
    }
    assert events[1]["details"]["filter"] == {
        "since": "2026-03-01T10:00:00.123456+00:00",
        "until": "2026-03-03T00:00:00+00:00",
        "search": "%",
    }
    assert events[2]["details"]["filter"] == {"agent": "助手", "status": "ok"}
    assert len(export_events(db)) == 4
    assert verify_chain(db).ok


CLI_USAGE_ERRORS = {
    "unknown format": (["--format", "xml", "-o", "a.xml"], "unknown export format 'xml'"),
    "unknown kind": (["--format", "csv", "--kind", "users", "-o", "b.csv"], "unknown record kind 'users'"),
    "bad since": (["--format", "csv", "--since", "yesterday", "-o", "c.csv"], "--since 'yesterday'"),
    "bad until": (["--format", "csv", "--until", "2026-13-01", "-o", "d.csv"], "--until '2026-13-01'"),
    "unknown status": (["--format", "csv", "--status", "done", "-o", "e.csv"], "unknown status 'done'"),
    "since after until": (
        ["--format", "csv", "--since", "2026-03-02", "--until", "2026-03-01", "-o", "f.csv"],
        "--since is after --until",
    ),
    "agent with events": (
        ["--format", "csv", "--kind", "events", "--agent", "助手", "-o", "g.csv"],
        "--agent and --status apply to requests",
    ),
    "status with events": (
        ["--format", "jsonl", "--kind", "events", "--status", "ok", "-o", "h.jsonl"],
        "--agent and --status apply to requests",
    ),
    "missing format": (["-o", "i.csv"], "Missing option '--format'"),
    "missing output": (["--format", "csv"], "Missing option '-o' / '--output'"),
}


def test_cli_usage_errors(db: Database, request_ids: list[int], outdir: Path) -> None:
    """Each bad invocation: one line on stderr starting with "error:", exit code 2, no file, no event."""
    env = cli_env(db.url, outdir.parent / "spool")
    # Started together, to save time: each is its own process, and none of them writes.
    procs = {
        name: subprocess.Popen(
            [clawdbot_command(), "audit", "export", *args],
            cwd=outdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        for name, (args, _) in CLI_USAGE_ERRORS.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert CLI_USAGE_ERRORS[name][1] in one_error_line(stderr), (name, stderr)
        assert stdout == "", name
    assert list(outdir.iterdir()) == []
    assert export_events(db) == []


def test_cli_unwritable_output(db: Database, request_ids: list[int], outdir: Path) -> None:
    """An output the process cannot create: one line, exit code 1, nothing written, no event."""
    blocker = outdir / "plain.txt"
    blocker.write_text("x")
    (outdir / "adir").mkdir()
    # Each message names the output as given (never the hidden temporary file) and, if any, the file in the way.
    expected = {
        "plain.txt/r.csv": "error: cannot create the directory for plain.txt/r.csv: a file is in the way: plain.txt",
        "plain.txt/sub/r.xlsx": (
            "error: cannot create the directory for plain.txt/sub/r.xlsx: a file is in the way: plain.txt"
        ),
        "adir": "error: Is a directory: adir",
    }
    for output, message in expected.items():
        fmt = output.rsplit(".", 1)[-1] if "." in output else "jsonl"
        result = cli_export(db, outdir, "--format", fmt, "-o", output)
        assert result.returncode == 1, (output, result.stdout)
        assert result.stdout == ""
        assert one_error_line(result.stderr) == message
    assert sorted(p.name for p in outdir.iterdir()) == ["adir", "plain.txt"]
    assert list((outdir / "adir").iterdir()) == []
    assert blocker.read_text() == "x"
    assert export_events(db) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_disk_full_while_writing(
    db: Database, store: AuditStore, request_ids: list[int], outdir: Path, fmt: str
) -> None:
    """A write that fails half-way (the file size limit stands in for a full disk): one line, no file."""
    limit = 64 * 1024
    target = outdir / "out" / f"r.{fmt}"
    result = cli_export(db, outdir, "--format", fmt, "-o", f"out/r.{fmt}", max_file_bytes=limit)
    assert result.returncode == 1, result.stdout
    assert "File too large" in one_error_line(result.stderr)
    assert list((outdir / "out").iterdir()) == []
    assert list((outdir.parent / "spool").iterdir()) == []  # no temporary files left either
    assert export_events(db) == []
    # The same export without the limit writes more than the limit: the failure came in mid-write.
    done = cli_export(db, outdir, "--format", fmt, "-o", f"out/r.{fmt}")
    assert done.returncode == 0, done.stderr
    if fmt == "xlsx":
        # The rows are spooled uncompressed before they are zipped: that is where the limit struck.
        with zipfile.ZipFile(target) as archive:
            assert sum(info.file_size for info in archive.infolist()) > limit
    else:
        assert target.stat().st_size > limit


# --- what XLSX cells can hold --------------------------------------------------------------------------------


def test_xlsx_line_breaks_are_lf(db: Database, store: AuditStore, outdir: Path) -> None:
    """XLSX cells get LF for CR LF and a lone CR (as documented); CSV and JSONL keep the text as stored."""
    request_id = store.start_request(user="u", prompt="line one\r\nline two")
    store.finish_request(request_id, "ok", response="a\rb", thinking="\r\n\r\r\n", error="\r=1+1")
    export_records(db, outdir / "r.xlsx", "xlsx", actor="t", store=store)
    header, (row,) = read_xlsx(outdir / "r.xlsx", "requests")
    cells = dict(zip(header, row, strict=True))
    assert (cells["prompt"], cells["response"]) == ("line one\nline two", "a\nb")
    assert (cells["thinking"], cells["error"]) == ("'\n\n\n", "'\n=1+1")  # CR first: still neutralized
    # No CR is written at all: the text does not depend on how an XML reader treats a raw one.
    with zipfile.ZipFile(outdir / "r.xlsx") as archive:
        assert all(b"\r" not in archive.read(name) for name in archive.namelist())

    export_records(db, outdir / "r.jsonl", "jsonl", actor="t", store=store)
    (record,) = read_jsonl(outdir / "r.jsonl")
    assert (record["prompt"], record["response"]) == ("line one\r\nline two", "a\rb")


def test_xlsx_with_xml_noncharacters_opens(db: Database, store: AuditStore, outdir: Path) -> None:
    request_id = store.start_request(user="u", prompt="odd \uffff and \ufffe text")
    store.finish_request(request_id, "ok")
    export_records(db, outdir / "r.xlsx", "xlsx", actor="t", store=store)
    header, (row,) = read_xlsx(outdir / "r.xlsx", "requests")
    assert dict(zip(header, row, strict=True))["prompt"] == "odd \ufffd and \ufffd text"


def test_xlsx_cell_with_lone_surrogates_opens(tmp_path: Path) -> None:
    """No database stores a lone surrogate (they are not UTF-8), but a str can hold one: the cell still opens."""
    from openpyxl import Workbook

    from clawdbot.export import _xlsx_cell

    value = _xlsx_cell("a\ud800b\udfffc \U0001f680")
    # Compared as ASCII: a lone surrogate in a failure report could not be sent back by pytest-xdist.
    assert ascii(value) == ascii("a\ufffdb\ufffdc \U0001f680")
    workbook = Workbook(write_only=True)
    workbook.create_sheet("s").append([value])
    workbook.save(tmp_path / "s.xlsx")
    assert read_xlsx(tmp_path / "s.xlsx", "s")[0] == [value]


@pytest.mark.parametrize("lead", ["", "a"])
def test_xlsx_cuts_emoji_text_at_the_utf16_limit(
    db: Database, store: AuditStore, outdir: Path, lead: str
) -> None:
    """Excel counts a cell in UTF-16 code units: 20,000 emoji are 40,000 units, over the limit though 20,000
    characters are not. With and without a lead character, so one of the two cuts falls inside a surrogate pair."""
    text = lead + "🚀" * 10_000 + "审计" * 5_000 + "😀" * 10_000
    assert len(text) < XLSX_CELL_LIMIT < utf16_len(text)
    request_id = store.start_request(user="u", prompt=text)
    store.finish_request(request_id, "ok")
    export_records(db, outdir / "r.xlsx", "xlsx", actor="t", store=store)
    header, (row,) = read_xlsx(outdir / "r.xlsx", "requests")
    cell = dict(zip(header, row, strict=True))["prompt"]
    assert XLSX_CELL_LIMIT - 1 <= utf16_len(cell) <= XLSX_CELL_LIMIT  # utf16_len fails on a lone surrogate
    note = cut_note(len(text))
    assert cell.endswith(note)
    assert cell == utf16_cut(text, XLSX_CELL_LIMIT - len(note)) + note


# --- what a failed XLSX export leaves behind ----------------------------------------------------------------


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_failed_xlsx_export_leaves_no_spool_file(
    db: Database, store: AuditStore, request_ids: list[int], outdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = outdir / "spool"
    spool.mkdir()
    # Where openpyxl's write-only sheets spool their rows.
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    with pytest.raises(Cancelled):
        export_records(db, outdir / "r.xlsx", "xlsx", actor="t", store=store, on_row=cancel_at(len(SPECS)))
    assert list(spool.iterdir()) == []  # at once, not when the garbage collector comes to it
    gc.collect()  # nothing left for it to close either: an error in a close would fail this test
    assert list(spool.iterdir()) == []
    assert sorted(p.name for p in outdir.iterdir()) == ["spool"]


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes: every later write fails, as on a full disk."""

    room = 0

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
# The archive of these records is about 8 KB: its first part, the theme, the rows (about 2-6 KB), the small
# parts after them, and the central directory at its end. (A close by the garbage collector writes the directory
# over the part that failed; only at 6,600 does that fail too, and print a traceback, without the fix.)
@pytest.mark.parametrize("room", [100, 1_000, 4_000, 6_600, 8_000])
def test_xlsx_archive_write_fails_cleanly(
    db: Database,
    store: AuditStore,
    request_ids: list[int],
    outdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    room: int,
) -> None:
    """The disk of the output fills up while the workbook is zipped (its rows spooled fine elsewhere): the error
    comes back, no file is left, and the archive is closed then, not by the garbage collector, whose close
    would fail again and print a traceback."""
    import clawdbot.export

    spool = outdir / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    opened: list[FullDisk] = []

    def zip_on_a_full_disk(file: Any, *args: Any, **kwargs: Any) -> zipfile.ZipFile:
        raw = FullDisk(file, "w+b")
        raw.room = room
        opened.append(raw)
        return zipfile.ZipFile(raw, *args, **kwargs)

    monkeypatch.setattr(clawdbot.export, "ZipFile", zip_on_a_full_disk)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            export_records(db, outdir / "out" / "r.xlsx", "xlsx", actor="t", store=store)
        gc.collect()
    finally:
        for raw in opened:
            raw.close()
    assert len(opened) == 1
    assert list((outdir / "out").iterdir()) == []
    assert list(spool.iterdir()) == []
    assert export_events(db) == []


# --- error messages name the output -------------------------------------------------------------------------


def test_cli_write_error_names_the_output(db: Database, outdir: Path) -> None:
    (outdir / "adir").mkdir()
    result = cli_export(db, outdir, "--format", "csv", "-o", "adir")
    line = one_error_line(result.stderr)
    assert ".part" not in line and "adir" in line


@pytest.mark.parametrize("under", ["r.csv", "sub/r.csv", "sub/deeper/r.csv"])
def test_export_under_a_regular_file_names_it(
    db: Database, request_ids: list[int], outdir: Path, under: str
) -> None:
    blocker = outdir / "plain.txt"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError) as caught:
        export_records(db, blocker / under, "csv", actor="t")
    assert caught.value.strerror == f"cannot create the directory for {blocker / under}: a file is in the way"
    assert caught.value.filename == str(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories anyway")
def test_export_into_a_read_only_directory_names_the_output(
    db: Database, request_ids: list[int], outdir: Path
) -> None:
    locked = outdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for target in (locked / "r.csv", locked / "sub" / "r.csv"):
            with pytest.raises(PermissionError) as caught:
                export_records(db, target, "csv", actor="t")
            assert caught.value.filename == str(target)
    finally:
        locked.chmod(0o755)


def test_export_onto_a_directory_names_it(db: Database, request_ids: list[int], outdir: Path) -> None:
    target = outdir / "adir"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        export_records(db, target, "xlsx", actor="t")
    assert (caught.value.filename, caught.value.filename2) == (str(target), None)
    assert list(target.iterdir()) == [] and sorted(p.name for p in outdir.iterdir()) == ["adir"]
