"""The tamper-evident hash chain over finalized requests and events, and its verification.

Requests and events share one sequence (`seq`, 1, 2, 3, …). Each record's hash is SHA-256 over its canonical
content and the previous record's hash; the `chain_head` row holds the last position and hash. Editing a record
changes its hash; deleting, inserting or reordering breaks a position or a previous-hash link; removing records
from the end disagrees with the head.

The canonical content is a sequence of items, each encoded on its own and the encodings concatenated: the kind
(`"request"` or `"event"`), the position, the previous hash, then every hashed column (`REQUEST_HASHED_FIELDS`
or `EVENT_HASHED_FIELDS`, in that order). An item is encoded by its type, so that a value and its type are both
covered (`None`, `""`, `0` and `False` all differ):

    None               N
    True / False       T / F
    int                I<n>:<decimal digits>
    float              R<n>:<repr(x), the shortest text that reads back as the same float>
    str                S<n>:<the text as UTF-8>
    datetime           D<n>:<the time in UTC as YYYY-MM-DD HH:MM:SS.ffffff>
    bytes              X<n>:<the bytes>  (a SQLite BLOB, never written by the audit store)

where <n> is the number of bytes after the colon, in decimal ASCII. Every item says where it ends, so no two
different records give the same input. `record_hash` encodes the values as SQLAlchemy reads them back.

Columns added after chains were first written (`OPTIONAL_HASHED_FIELDS`: so far the requests' `server_truncated`,
migration 0002) come last and are hashed only when they differ from their default, the value every record written
before them holds: then as two items, the column's name (S) and its value. A record that leaves them at the
default hashes byte for byte as it did before the column existed, so an existing chain still verifies after the
upgrade without a format version or a rewrite; a record that sets one is covered like any other column (setting it
afterwards, or clearing it, changes the hash). The name item keeps the input unambiguous when several such columns
exist and only some are set.

The audit store and `verify_chain` hash the values as the database driver returns them (`stored_values_hash`),
which saves decoding text only to encode it again: text may come as its UTF-8 bytes, and on SQLite a datetime
column holds the text SQLAlchemy wrote (the UTC form above, so D<n>:<that text>) and a boolean column 0 or 1
(F or T). For every row the product writes this gives the same hash as `record_hash`; a datetime rewritten by
hand in another text form, or a boolean column set to another number, counts as a change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Boolean, Connection, select
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from clawdbot.db import Database
from clawdbot.models import GENESIS_HASH, ChainHead, Event, Request, Status, UTCDateTime

Kind = Literal["request", "event"]

# The contract's export columns, in its order; columns added since come at the end.
REQUEST_EXPORT_FIELDS: tuple[str, ...] = (
    "id", "started_at", "finished_at", "status", "error", "user", "client_ip", "conversation_id", "agent",
    "agent_version", "backend", "model_requested", "model_used", "fallback_used", "retries", "prompt", "context",
    "response", "thinking", "tool_calls", "attachments", "prompt_tokens", "prompt_eval_count",
    "completion_tokens", "context_tokens_before", "context_tokens_after", "truncated", "dropped_messages",
    "queue_ms", "ttft_ms", "latency_ms", "tokens_per_s", "prev_hash", "hash", "server_truncated",
)  # fmt: skip
EVENT_EXPORT_FIELDS: tuple[str, ...] = (
    "id",
    "at",
    "actor",
    "action",
    "target",
    "details",
    "prev_hash",
    "hash",
)

# Columns hashed only when they differ from their default (see the module docstring), with that default: the
# value of every record written before the column existed. New ones go at the end.
OPTIONAL_HASHED_FIELDS: dict[Kind, tuple[tuple[str, Any], ...]] = {
    "request": (("server_truncated", False),),
    "event": (),
}
# What the hash covers: every exported column but the links themselves, and the agent version row used; the
# optional columns last.
REQUEST_HASHED_FIELDS: tuple[str, ...] = (
    *(
        f
        for f in REQUEST_EXPORT_FIELDS
        if f not in ("prev_hash", "hash") and f not in dict(OPTIONAL_HASHED_FIELDS["request"])
    ),
    "agent_version_id",
    *(name for name, _default in OPTIONAL_HASHED_FIELDS["request"]),
)
EVENT_HASHED_FIELDS: tuple[str, ...] = tuple(f for f in EVENT_EXPORT_FIELDS if f not in ("prev_hash", "hash"))
HASHED_FIELDS: dict[Kind, tuple[str, ...]] = {"request": REQUEST_HASHED_FIELDS, "event": EVENT_HASHED_FIELDS}
TABLES: dict[Kind, str] = {"request": Request.__tablename__, "event": Event.__tablename__}

# --- the canonical encoding ----------------------------------------------------------------------------------

_SHA256 = hashlib.sha256
_KIND_ITEMS: dict[str, bytes] = {
    kind: b"S%d:%s" % (len(kind), kind.encode()) for kind in ("request", "event")
}


def utc_text(value: datetime) -> str:
    """A datetime as the chain hashes it, and exactly as SQLAlchemy stores a DateTime on SQLite: the UTC time as
    YYYY-MM-DD HH:MM:SS.ffffff, with no zone."""
    if value.tzinfo is not None and value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # isoformat always gives a 4-digit year and, with this timespec, 6 digits of microseconds; cut any "+00:00".
    return value.isoformat(" ", "microseconds")[:26]


def _put(parts: list[bytes], value: Any) -> None:
    """Append the encoding of one value as SQLAlchemy returns it (see the module docstring)."""
    if value is None:
        parts.append(b"N")
        return
    if isinstance(value, str):
        tag, payload = b"S", value.encode("utf-8")
    elif isinstance(value, bool):
        parts.append(b"T" if value else b"F")
        return
    elif isinstance(value, int):
        tag, payload = b"I", b"%d" % value
    elif isinstance(value, float):
        tag, payload = b"R", float.__repr__(value).encode("ascii")
    elif isinstance(value, datetime):
        tag, payload = b"D", utc_text(value).encode("ascii")
    elif isinstance(value, bytes | bytearray | memoryview):
        tag, payload = b"X", bytes(value)
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} value")
    parts.append(b"%s%d:" % (tag, len(payload)))
    parts.append(payload)


def _header(kind: Kind, seq: int, prev_hash: str) -> list[bytes]:
    """The encodings of the kind, the position and the previous hash, which every record's content begins with."""
    if type(seq) is not int or type(prev_hash) is not str:
        parts: list[bytes] = [_KIND_ITEMS[kind]]
        _put(parts, seq)
        _put(parts, prev_hash)
        return parts
    seq_text = b"%d" % seq
    prev = prev_hash.encode("utf-8")
    return [_KIND_ITEMS[kind], b"I%d:" % len(seq_text), seq_text, b"S%d:" % len(prev), prev]


@dataclass(frozen=True)
class _Optional:
    """How one optional column enters the hash (see the module docstring)."""

    name: str
    default: Any
    name_item: bytes
    """The encoding of the column's name, put before its value."""
    default_item: list[bytes]
    """The encoding of its default: a value encoded the same is left out."""


def _optionals(kind: Kind) -> tuple[_Optional, ...]:
    optionals = []
    for name, default in OPTIONAL_HASHED_FIELDS[kind]:
        name_item: list[bytes] = []
        _put(name_item, name)
        default_item: list[bytes] = []
        _put(default_item, default)
        optionals.append(_Optional(name, default, b"".join(name_item), default_item))
    return tuple(optionals)


_OPTIONALS = {"request": _optionals("request"), "event": _optionals("event")}


def _put_optional(parts: list[bytes], optional: _Optional, item: list[bytes]) -> None:
    """Append an optional column's value `item` (already encoded) with its name, unless it is the default."""
    if item != optional.default_item:
        parts.append(optional.name_item)
        parts += item


def record_hash(kind: Kind, seq: int, prev_hash: str, record: Mapping[Any, Any]) -> str:
    """The hash of one record at position `seq` after `prev_hash` (its values as SQLAlchemy reads them).

    An optional column missing from `record` counts as holding its default, as in a row written before it existed.
    """
    parts = _header(kind, seq, prev_hash)
    optionals = _OPTIONALS[kind]
    fields = HASHED_FIELDS[kind]
    for name in fields[: len(fields) - len(optionals)]:
        _put(parts, record[name])
    for optional in optionals:
        item: list[bytes] = []
        _put(item, record.get(optional.name, optional.default))
        _put_optional(parts, optional, item)
    return _SHA256(b"".join(parts)).hexdigest()


class _Blob(bytes):
    """A BLOB found in a column SQLite returned as bytes: hashed as bytes (X), not as text."""


@dataclass(frozen=True)
class _Layout:
    """Per hashed column, in order: the prefix format of its text (D for datetime columns, S otherwise) and
    whether it is a boolean column; the optional columns apart, last."""

    text_formats: tuple[bytes, ...]
    booleans: tuple[bool, ...]
    optionals: tuple[tuple[_Optional, bytes, bool], ...]

    @property
    def size(self) -> int:
        return len(self.text_formats) + len(self.optionals)


def _stored_layout(kind: Kind) -> _Layout:
    table = (Request if kind == "request" else Event).__table__
    types = [table.c[name].type for name in HASHED_FIELDS[kind]]
    text_formats = tuple(b"D%d:" if isinstance(t, UTCDateTime) else b"S%d:" for t in types)
    booleans = tuple(isinstance(t, Boolean) for t in types)
    required = len(types) - len(_OPTIONALS[kind])
    return _Layout(
        text_formats[:required],
        booleans[:required],
        tuple(zip(_OPTIONALS[kind], text_formats[required:], booleans[required:], strict=True)),
    )


_STORED_LAYOUTS = {"request": _stored_layout("request"), "event": _stored_layout("event")}


def stored_values_hash(kind: Kind, seq: int, prev_hash: str, values: Sequence[Any]) -> str:
    """`record_hash` of a record given as its hashed columns' values in `HASHED_FIELDS[kind]` order, as a driver
    returns them: text as str or as its UTF-8 bytes, a datetime as a datetime or as the text SQLAlchemy stores on
    SQLite, a boolean as a bool or as SQLite's 0/1. This is how the audit store and `verify_chain` hash rows."""
    parts = _header(kind, seq, prev_hash)
    layout = _STORED_LAYOUTS[kind]
    if not layout.optionals:
        _put_stored(parts, values, layout.text_formats, layout.booleans)
        return _SHA256(b"".join(parts)).hexdigest()
    if len(values) != layout.size:
        raise ValueError(f"{len(values)} values given for the {layout.size} hashed columns of a {kind}")
    required = len(layout.text_formats)
    _put_stored(parts, values[:required], layout.text_formats, layout.booleans)
    for value, (optional, text_format, boolean) in zip(values[required:], layout.optionals, strict=True):
        item: list[bytes] = []
        # Encoded as any column, so SQLite's 0 in a boolean column is F, the default, and left out.
        _put_stored(item, (value,), (text_format,), (boolean,))
        _put_optional(parts, optional, item)
    return _SHA256(b"".join(parts)).hexdigest()


def _put_stored(
    parts: list[bytes], values: Sequence[Any], text_formats: Sequence[bytes], booleans: Sequence[bool]
) -> None:
    """Append the encodings of driver-returned values (see `stored_values_hash`); the hot loop of verification."""
    put = parts.append
    for value, text_format, boolean in zip(values, text_formats, booleans, strict=True):
        cls = type(value)
        if cls is bytes:
            put(text_format % len(value))
            put(value)
        elif value is None:
            put(b"N")
        elif cls is int:
            if boolean and (value == 0 or value == 1):
                put(b"T" if value else b"F")
            else:
                payload = b"%d" % value
                put(b"I%d:" % len(payload))
                put(payload)
        elif cls is str:
            payload = value.encode("utf-8")
            put(text_format % len(payload))
            put(payload)
        elif cls is float:
            payload = float.__repr__(value).encode("ascii")
            put(b"R%d:" % len(payload))
            put(payload)
        else:
            _put(parts, bytes(value) if cls is _Blob else value)


def wrap_driver_error(dialect: Dialect, exc: Exception, statement: str | None) -> Exception:
    """The driver's exception as SQLAlchemy raises it (e.g. `sqlalchemy.exc.IntegrityError`), parameters hidden."""
    return DBAPIError.instance(
        statement, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
    )


# --- verification --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainBreak:
    """The first place where the chain is not what the audit store wrote."""

    kind: str  # "request", "event", or "chain head"
    id: int | None
    seq: int | None
    reason: str

    def describe(self) -> str:
        name = self.kind if self.id is None else f"{self.kind} {self.id}"
        where = f" at chain position {self.seq}" if self.seq is not None and self.id is not None else ""
        return f"{name}{where}: {self.reason}"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    first_break: ChainBreak | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["first_break"] = (
            None
            if self.first_break is None
            else {**asdict(self.first_break), "description": self.first_break.describe()}
        )
        return data


# One chained record as read for verification: position, kind, id, previous hash, hash, hashed column values.
_Link = tuple[Any, Kind, Any, Any, Any, Sequence[Any]]


def _select_chained(kind: Kind, mask: str) -> str:
    columns = ", ".join(f'"{name}"' for name in HASHED_FIELDS[kind])
    return f'SELECT seq, prev_hash, hash, {mask}, {columns} FROM "{TABLES[kind]}" WHERE seq IS NOT NULL ORDER BY seq'


# SQLite: a bit mask of the columns that hold a BLOB, which the driver returns as bytes just like text here.
_BLOB_MASKS = {
    kind: " | ".join(f"((typeof(\"{name}\") = 'blob') << {i})" for i, name in enumerate(HASHED_FIELDS[kind]))
    for kind in ("request", "event")
}


def _text(value: Any) -> Any:
    return value.decode("latin-1") if type(value) is bytes else value


def _links(rows: Iterator[Sequence[Any]], kind: Kind, dialect: Dialect, statement: str) -> Iterator[_Link]:
    """The rows of `_select_chained` as links; driver errors are raised as SQLAlchemy's."""
    try:
        for row in rows:
            values = row[4:]
            if row[3]:
                mask = row[3]
                values = tuple(_Blob(v) if mask >> i & 1 else v for i, v in enumerate(values))
            yield row[0], kind, values[0], _text(row[1]), _text(row[2]), values
    except dialect.loaded_dbapi.Error as exc:
        raise wrap_driver_error(dialect, exc, statement) from exc


def _sqlite_links(driver: Any, dialect: Dialect, kind: Kind) -> Generator[_Link]:
    """Chained rows of one table in order, through the sqlite3 connection (its text factory set to bytes)."""
    statement = _select_chained(kind, _BLOB_MASKS[kind])
    cursor = driver.cursor()
    try:
        yield from _links(_executed(cursor, statement), kind, dialect, statement)
    finally:
        cursor.close()


def _executed(cursor: Any, statement: str) -> Iterator[Sequence[Any]]:
    cursor.execute(statement)
    yield from cursor


def _psycopg_links(driver: Any, dialect: Dialect, kind: Kind) -> Generator[_Link]:
    """Chained rows of one table in order, streamed by psycopg in binary form, text as its UTF-8 bytes."""
    from psycopg import pq
    from psycopg.types.string import ByteaBinaryLoader

    statement = _select_chained(kind, "0")
    cursor = driver.cursor(binary=True)
    if driver.info.encoding == "utf-8":
        for text_type in ("text", "varchar"):
            cursor.adapters.register_loader(text_type, ByteaBinaryLoader)
    # Rows arrive while earlier ones are checked; in chunks of 50 where libpq can (17 and later), which measured
    # about a third faster than one by one, and than larger chunks.
    rows = cursor.stream(statement, binary=True, size=50 if pq.version() >= 170000 else 1)
    try:
        yield from _links(rows, kind, dialect, statement)
    finally:
        rows.close()  # cancels the query if it was not read to the end
        cursor.close()


def _merged(requests: Iterator[_Link], events: Iterator[_Link]) -> Iterator[_Link]:
    """Both tables in position order; of two records at one position, the request comes first."""
    request, event = next(requests, None), next(events, None)
    while request is not None and event is not None:
        if request[0] <= event[0]:
            yield request
            request = next(requests, None)
        else:
            yield event
            event = next(events, None)
    if request is not None:
        yield request
        yield from requests
    if event is not None:
        yield event
        yield from events


@contextmanager
def _chained_records(db: Database, conn: Connection) -> Iterator[Iterator[_Link]]:
    """Every chained record in position order, read in the snapshot of `conn`'s transaction.

    The rows are read through the driver rather than SQLAlchemy, about twice as fast, and with text as its UTF-8
    bytes, which are what the hash covers, so no text is decoded only to be encoded again. SQLite reads both
    tables in the one connection. psycopg streams each table in a connection of its own (one connection streams
    one query at a time), the second one importing the first one's snapshot (`pg_export_snapshot`).
    """
    dialect = conn.dialect
    driver: Any = conn.connection.driver_connection
    if dialect.name == "sqlite":
        text_factory = driver.text_factory
        driver.text_factory = bytes
        requests = _sqlite_links(driver, dialect, "request")
        events = _sqlite_links(driver, dialect, "event")
        try:
            yield _merged(requests, events)
        finally:
            requests.close()
            events.close()
            driver.text_factory = text_factory
        return
    if dialect.driver != "psycopg":
        raise NotImplementedError(
            f"verify_chain supports SQLite and PostgreSQL through psycopg, not {dialect.driver}"
        )
    from psycopg import sql

    snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one()
    pooled = db.engine.raw_connection()
    other: Any = pooled.driver_connection
    try:
        with other.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        requests = _psycopg_links(driver, dialect, "request")
        events = _psycopg_links(other, dialect, "event")
        try:
            yield _merged(requests, events)
        finally:
            requests.close()
            events.close()
    finally:
        with suppress(Exception):
            other.rollback()
        pooled.close()


def verify_chain(
    db: Database, progress: Callable[[int, int], None] | None = None, batch: int = 5000
) -> VerifyResult:
    """Walk the whole chain in order and report the first record that breaks it, if any."""
    with db.engine.connect() as conn:
        if not db.is_sqlite:
            # One snapshot for the head and both tables, so records appended meanwhile are not seen at all.
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            head = conn.execute(select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == 1)).one()
            unchained = conn.execute(
                select(Request.id)
                .where(Request.seq.is_(None), Request.status != Status.STARTED.value)
                .order_by(Request.id)
                .limit(1)
            ).scalar()
            with _chained_records(db, conn) as records:
                return _verify(records, head.seq, head.hash, unchained, progress, batch)


def _verify(
    records: Iterator[_Link],
    head_seq: int,
    head_hash: str,
    unchained: int | None,
    progress: Callable[[int, int], None] | None,
    batch: int,
) -> VerifyResult:
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    before_prev: str = GENESIS_HASH
    last: tuple[Kind, int] | None = None
    first_break: ChainBreak | None = None
    for seq, kind, record_id, record_prev, record_digest, values in records:
        if seq != expected_seq:
            if seq < expected_seq:
                # Two records claim this position: the intruder is the one the next record does not link to.
                intruder: tuple[Kind, int] = (kind, record_id)
                genuine_alike = (
                    record_prev == before_prev
                    and stored_values_hash(kind, seq, before_prev, values) == record_digest
                )
                following = next(records, None)
                if (
                    genuine_alike
                    and last is not None
                    and following is not None
                    and following[3] == record_digest
                ):
                    intruder = last
                first_break = ChainBreak(
                    intruder[0], intruder[1], seq, f"chain position {seq} is taken twice"
                )
            else:
                first_break = ChainBreak(
                    kind, record_id, seq, f"records at chain positions {expected_seq}–{seq - 1} are missing"
                )
            break
        if record_prev != prev_hash:
            first_break = ChainBreak(
                kind, record_id, seq, "its previous-hash link does not match the record before it"
            )
            break
        if stored_values_hash(kind, seq, prev_hash, values) != record_digest:
            first_break = ChainBreak(kind, record_id, seq, "its content was changed after it was recorded")
            break
        before_prev, last = prev_hash, (kind, record_id)
        prev_hash, expected_seq, checked = record_digest, seq + 1, checked + 1
        if progress is not None and checked % batch == 0:
            progress(checked, head_seq)
    if first_break is None and (head_seq != expected_seq - 1 or head_hash != prev_hash):
        first_break = ChainBreak(
            "chain head",
            None,
            head_seq,
            f"the chain ends at position {expected_seq - 1} but its head says {head_seq}: "
            "records were removed from the end, or the head was altered",
        )
    if first_break is None and unchained is not None:
        first_break = ChainBreak(
            "request",
            unchained,
            None,
            "it is finalized but was never entered into the chain (inserted by hand)",
        )
    if progress is not None:
        progress(checked, head_seq)
    return VerifyResult(first_break is None, checked, head_seq, head_hash, first_break)
