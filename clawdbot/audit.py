"""The audit store: every request is recorded before the model is called and finalized exactly once.

`start_request` writes a `started` record; `finish_request` completes it and appends it to the hash chain in the
same transaction; `record_event` appends an event. Appending locks the chain head (`BEGIN IMMEDIATE` on SQLite,
`SELECT … FOR UPDATE` on PostgreSQL), so concurrent writers in any number of threads and processes take turns and
the chain never forks or skips a position.

These are the product's hot paths (two transactions per request), so they bypass SQLAlchemy's statement
building, which cost about three quarters of their time: their SQL is written out once per dialect and run on
the driver's cursor, the transaction begun and committed on the driver's connection. Values are bound as
SQLAlchemy binds them (on SQLite, datetimes as SQLAlchemy's DateTime text in UTC), so every row reads back
through the models exactly as if SQLAlchemy had written it, and driver errors are raised as SQLAlchemy's
exceptions. On SQLite, the threads of a process share transactions, each write in a savepoint of its own, and
commits (`_SqliteWriter`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from functools import cache
from typing import Any, TypedDict, TypeVar, cast

from sqlalchemy import Connection, Engine, select
from sqlalchemy.engine import Dialect

from clawdbot.chain import (
    EVENT_HASHED_FIELDS,
    REQUEST_HASHED_FIELDS,
    stored_values_hash,
    utc_text,
    wrap_driver_error,
)
from clawdbot.db import Database
from clawdbot.errors import AlreadyFinalizedError, NotFoundError, UsageError
from clawdbot.models import FINAL_STATUSES, Request, Status, UTCDateTime, utcnow

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Records left `started` by a process on another machine are taken as abandoned after this long.
FOREIGN_OWNER_GRACE = timedelta(hours=24)


class RequestFields(TypedDict, total=False):
    """Columns a caller may set on a request record (the contract's fields, less id, status and the links)."""

    started_at: datetime
    finished_at: datetime
    error: str
    user: str
    client_ip: str
    conversation_id: int | None
    agent: str
    agent_version: int | None
    agent_version_id: int | None
    backend: str
    model_requested: str
    model_used: str
    fallback_used: bool
    retries: int
    prompt: str
    context: str
    response: str
    thinking: str
    tool_calls: str
    attachments: str
    prompt_tokens: int | None
    prompt_eval_count: int | None
    completion_tokens: int | None
    context_tokens_before: int | None
    context_tokens_after: int | None
    truncated: bool
    dropped_messages: int
    queue_ms: float | None
    ttft_ms: float | None
    latency_ms: float | None
    tokens_per_s: float | None
    server_truncated: bool


_SETTABLE = frozenset(RequestFields.__annotations__)
_COLUMN_TYPES: dict[str, type] = {
    c.name: datetime if isinstance(c.type, UTCDateTime) else c.type.python_type
    for c in Request.__table__.columns
}
_DATETIME_FIELDS = tuple(name for name, kind in _COLUMN_TYPES.items() if kind is datetime)
# A final status as the plain string stored (a `Status` member is given as often as its value).
_FINAL_STATUSES = {str(status): str(status) for status in FINAL_STATUSES}


def _text(name: str, value: Any) -> str:
    # PostgreSQL refuses NUL characters in text.
    return str(value).replace("\x00", "\ufffd")


def _float(name: str, value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _datetime(name: str, value: Any) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise UsageError(f"{name} must be a timezone-aware datetime")
    return value


def _converter(kind: type) -> Callable[[str, Any], Any]:
    return {str: _text, float: _float, datetime: _datetime}.get(kind) or (lambda _name, value: kind(value))


# How each column's value is turned into what the database will give back, so the hash computed now matches the
# stored row.
_COERCE = {name: _converter(kind) for name, kind in _COLUMN_TYPES.items()}


def _clean(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the names and coerce each value to its column's type."""
    if not _SETTABLE.issuperset(fields):
        unknown = set(fields) - _SETTABLE
        raise UsageError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    return {name: None if value is None else _COERCE[name](name, value) for name, value in fields.items()}


def to_json(value: Any) -> str:
    """JSON text as stored in the record: UTF-8 kept readable, key order as given."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _process_start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@cache
def process_owner() -> str:
    """This process as host:pid:start-time, so a later process can tell it has gone."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start_ticks(pid)}"


def _owner_alive(owner: str, started_at: datetime, now: datetime) -> bool:
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname():
        return now - started_at < FOREIGN_OWNER_GRACE
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if ticks:
        return _process_start_ticks(pid) == ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- statements ----------------------------------------------------------------------------------------------

# Every column of a new request record, with the value it gets when the caller gives none (the models' defaults).
_INSERTED: dict[str, Any] = {
    c.name: None if c.default is None or callable(c.default.arg) else c.default.arg
    for c in Request.__table__.columns
    if c.name not in ("id", "seq", "prev_hash", "hash")
}
_HASHED_INDEX = {name: i for i, name in enumerate(REQUEST_HASHED_FIELDS)}


def _names(names: Sequence[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


class _Statements:
    """The audit store's SQL for one dialect and driver, written out once."""

    def __init__(self, dialect: Dialect) -> None:
        if dialect.paramstyle == "qmark":
            mark = "?"
        elif dialect.paramstyle in ("format", "pyformat"):
            mark = "%s"
        else:
            raise NotImplementedError(f"the audit store does not support the {dialect.paramstyle} paramstyle")
        self.dialect = dialect
        self.error: type[Exception] = dialect.loaded_dbapi.Error
        self.is_sqlite = dialect.name == "sqlite"
        self.mark = mark
        # On SQLite the write transaction already holds the database's write lock (BEGIN IMMEDIATE).
        self.lock_head = "SELECT seq, hash FROM chain_head WHERE id = 1" + (
            "" if self.is_sqlite else " FOR UPDATE"
        )
        self.move_head = f"UPDATE chain_head SET seq = {mark}, hash = {mark} WHERE id = 1"
        self.insert_request = (
            f"INSERT INTO requests ({_names(list(_INSERTED))}) "
            f"VALUES ({', '.join(mark for _ in _INSERTED)}) RETURNING id"
        )
        self.select_request = f"SELECT seq, {_names(REQUEST_HASHED_FIELDS)} FROM requests WHERE id = {mark}"
        event_columns = [*EVENT_HASHED_FIELDS[1:], "seq", "prev_hash", "hash"]
        self.insert_event = (
            f"INSERT INTO events ({_names(event_columns)}) "
            f"VALUES ({', '.join(mark for _ in event_columns)}) RETURNING id"
        )
        self.set_event_hash = f"UPDATE events SET hash = {mark} WHERE id = {mark}"
        self._updates: dict[tuple[str, ...], str] = {}

    def update_request(self, names: tuple[str, ...]) -> str:
        """UPDATE of the given columns and the chain links of one request (one statement per set of columns)."""
        statement = self._updates.get(names)
        if statement is None:
            assignments = ", ".join(
                f'"{name}" = {self.mark}' for name in (*names, "seq", "prev_hash", "hash")
            )
            statement = f"UPDATE requests SET {assignments} WHERE id = {self.mark}"
            self._updates[names] = statement
        return statement

    def bind_datetime(self, value: datetime) -> Any:
        """A datetime as SQLAlchemy binds it to a UTCDateTime column."""
        return utc_text(value) if self.is_sqlite else value

    def bound(self, values: dict[str, Any]) -> dict[str, Any]:
        """Request column values with their datetimes as SQLAlchemy binds them (changed in place)."""
        if self.is_sqlite:
            for name in _DATETIME_FIELDS:
                value = values.get(name)
                if value is not None:
                    values[name] = utc_text(value)
        return values

    def execute(self, cursor: Any, statement: str, params: Sequence[Any] = ()) -> Any:
        try:
            return cursor.execute(statement, params)
        except self.error as exc:
            raise wrap_driver_error(self.dialect, exc, statement) from exc


_BUILT: dict[tuple[str, str, str], _Statements] = {}


def _statements(dialect: Dialect) -> _Statements:
    key = (dialect.name, dialect.driver, dialect.paramstyle)
    statements = _BUILT.get(key)
    if statements is None:
        statements = _BUILT.setdefault(key, _Statements(dialect))
    return statements


def _fetch_request(cursor: Any, sql: _Statements, request_id: int) -> Any:
    """The request's position and hashed columns; on SQLite with text as its UTF-8 bytes, which the hash takes."""
    if not sql.is_sqlite:
        return sql.execute(cursor, sql.select_request, (request_id,)).fetchone()
    driver = cursor.connection
    text_factory = driver.text_factory
    driver.text_factory = bytes
    try:
        return sql.execute(cursor, sql.select_request, (request_id,)).fetchone()
    finally:
        driver.text_factory = text_factory


def _lock_head(cursor: Any, sql: _Statements) -> tuple[int, str]:
    """Lock the chain head until the transaction ends; returns the next position and the hash before it."""
    seq, digest = sql.execute(cursor, sql.lock_head).fetchone()
    return int(seq) + 1, str(digest)


def _move_head(cursor: Any, sql: _Statements, seq: int, digest: str) -> None:
    sql.execute(cursor, sql.move_head, (seq, digest))


@contextmanager
def _driver_transaction(sql: _Statements, driver: Any, broken: Callable[[], None]) -> Iterator[Any]:
    """A cursor of `driver` in a transaction, committed at the end or rolled back on error; `broken` is called
    when even the rollback fails, so that the connection is not used again."""
    cursor = driver.cursor()
    failed = False
    try:
        if sql.is_sqlite:
            # Take SQLite's write lock now, where the busy timeout applies (see clawdbot.db).
            sql.execute(cursor, "BEGIN IMMEDIATE")
        yield cursor
        try:
            driver.commit()
        except sql.error as exc:
            raise wrap_driver_error(sql.dialect, exc, "COMMIT") from exc
    except BaseException:
        try:
            driver.rollback()
        except Exception:
            failed = True
        raise
    finally:
        with suppress(Exception):
            cursor.close()
        if failed:
            broken()


class _Pending:
    """One write waiting for its turn: the work to run in a transaction, then its result or its error."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[Any], Any]) -> None:
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class _SqliteWriter:
    """How one process writes the audit chain of one SQLite database, which admits one writer at a time.

    Threads queue their writes and take turns on a lock. The thread that holds it runs every write queued so far
    in one transaction, each write in a savepoint of its own so that a failing write is undone alone, and commits
    once (group commit); a thread writing alone gets a transaction of its own. Every caller returns only once its
    write is committed, so a `started` record is still stored before the model is called. Sharing commits
    matters because a commit is about half the cost of a write, and because handing the lock from thread to thread
    costs a wake-up each time: without it, 4 threads wrote about a quarter fewer records a second than 1.

    A thread waiting on the lock is woken as soon as the writer before it is done, where SQLite's busy handler
    would poll with sleeps of up to 100 ms (other processes do wait there). The connection is kept for these
    writes, which saves a pool check-out and check-in per transaction.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._connection: Any = None

    def run(self, sql: _Statements, work: Callable[[Any], _T]) -> _T:
        """`work(cursor)` run in a write transaction; returns its result once that is committed."""
        pending = _Pending(work)
        self._queue.append(pending)
        with self.lock:
            if not pending.done:
                # Still queued, so it is among the writes taken now: only the lock's holder takes from the queue.
                self._commit([self._queue.popleft() for _ in range(len(self._queue))], sql)
        if pending.error is not None:
            raise pending.error
        return cast(_T, pending.result)

    def _commit(self, batch: list[_Pending], sql: _Statements) -> None:
        try:
            with _driver_transaction(sql, self._connected(), self._discard) as cursor:
                if len(batch) == 1:
                    batch[0].result = batch[0].work(cursor)
                else:
                    for pending in batch:
                        sql.execute(cursor, "SAVEPOINT audit_write")
                        try:
                            pending.result = pending.work(cursor)
                        except Exception as exc:
                            pending.error = exc
                            sql.execute(cursor, "ROLLBACK TO audit_write")
                        sql.execute(cursor, "RELEASE audit_write")
        except BaseException as exc:
            # Nothing was committed: each write fails with its own error, or else with this one.
            for pending in batch:
                if pending.error is None:
                    pending.error = (
                        exc if isinstance(exc, Exception) else RuntimeError("the write was interrupted")
                    )
            if not isinstance(exc, Exception):
                raise
        finally:
            for pending in batch:
                pending.done = True

    def _connected(self) -> Any:
        if self._connection is None:
            pooled = self.engine.raw_connection()
            pooled.detach()  # ours from now on: closed when discarded or garbage-collected, never pooled
            self._connection = pooled.dbapi_connection
        return self._connection

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with suppress(Exception):
                connection.close()


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Database, _SqliteWriter] = weakref.WeakKeyDictionary()
_SQLITE_WRITERS_GUARD = threading.Lock()


def _sqlite_writer(db: Database) -> _SqliteWriter:
    """The writer of `db` in this process, shared by all its audit stores (a forked child makes its own)."""
    with _SQLITE_WRITERS_GUARD:
        writer = _SQLITE_WRITERS.get(db)
        if writer is None or writer.pid != os.getpid():
            writer = _SQLITE_WRITERS[db] = _SqliteWriter(db.engine)
        return writer


class AuditStore:
    """Writes request records and events; the only code that writes to the hash chain."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._sql = _statements(db.engine.dialect)
        # An in-memory SQLite database lives in its connection, so it keeps going through the pool.
        in_memory = (db.engine.url.database or ":memory:") == ":memory:" or "mode=memory" in db.url
        self._writer = _sqlite_writer(db) if self._sql.is_sqlite and not in_memory else None

    def _write(self, work: Callable[[Any], _T]) -> _T:
        """`work(cursor)` run in a write transaction (on SQLite perhaps shared with other threads' writes, see
        `_SqliteWriter`), committed before this returns, or rolled back on error."""
        writer = self._writer
        if writer is not None:
            if writer.pid != os.getpid():
                writer = self._writer = _sqlite_writer(self.db)
            return writer.run(self._sql, work)
        pooled = self.db.engine.raw_connection()
        try:
            with _driver_transaction(self._sql, pooled.driver_connection, pooled.invalidate) as cursor:
                return work(cursor)
        finally:
            pooled.close()

    def start_request(self, **fields: Any) -> int:
        """Record a request as `started` before the model is called; returns its id."""
        values = _clean(fields)
        values.setdefault("started_at", utcnow())
        values["status"] = Status.STARTED.value
        values["owner"] = process_owner()
        sql = self._sql
        params = list(sql.bound({**_INSERTED, **values}).values())
        return self._write(
            lambda cursor: int(sql.execute(cursor, sql.insert_request, params).fetchall()[0][0])
        )

    def finish_request(self, request_id: int, status: str, **fields: Any) -> str:
        """Finalize a started request with its outcome and enter it into the chain; returns its hash."""
        final = _FINAL_STATUSES.get(status) if isinstance(status, str) else None
        if final is None:
            raise UsageError(
                f"{status!r} is not a final status; use one of {', '.join(sorted(FINAL_STATUSES))}"
            )
        values = _clean(fields)
        values.setdefault("finished_at", utcnow())
        values["status"] = final
        sql = self._sql
        values = sql.bound(values)
        update = sql.update_request(tuple(values))

        def finish(cursor: Any) -> str:
            seq, prev_hash = _lock_head(cursor, sql)
            row = _fetch_request(cursor, sql, request_id)
            if row is None:
                raise NotFoundError(f"there is no request {request_id}")
            if row[0] is not None:
                raise AlreadyFinalizedError(f"request {request_id} was already finalized")
            record = list(row[1:])
            for name, value in values.items():
                record[_HASHED_INDEX[name]] = value
            digest = stored_values_hash("request", seq, prev_hash, record)
            sql.execute(cursor, update, (*values.values(), seq, prev_hash, digest, request_id))
            _move_head(cursor, sql, seq, digest)
            return digest

        return self._write(finish)

    def record_event(
        self, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None
    ) -> int:
        """Append an event (sign-in, admin change, export, verification) to the chain; returns its id."""
        return self._write(lambda cursor: _append_event(cursor, self._sql, actor, action, target, details))

    def sweep_abandoned(self) -> int:
        """Finalize as `abandoned` the started records whose process has gone; returns how many."""
        now = utcnow()
        with self.db.read() as session:
            started = session.execute(
                select(Request.id, Request.owner, Request.started_at).where(
                    Request.status == Status.STARTED.value
                )
            ).all()
        swept = 0
        for request_id, owner, started_at in started:
            if _owner_alive(owner, started_at, now):
                continue
            try:
                self.finish_request(
                    request_id,
                    Status.ABANDONED.value,
                    error="the process serving this request stopped before it finished",
                )
            except AlreadyFinalizedError:
                continue
            swept += 1
        if swept:
            log.warning("marked %d request(s) abandoned by a stopped process", swept)
        return swept


def _append_event(
    cursor: Any, sql: _Statements, actor: str, action: str, target: str, details: Mapping[str, Any] | None
) -> int:
    at = utcnow()
    values = [
        actor.replace("\x00", "\ufffd"),
        action.replace("\x00", "\ufffd"),
        target.replace("\x00", "\ufffd"),
        to_json(dict(details or {})).replace("\x00", "\ufffd"),
    ]
    seq, prev_hash = _lock_head(cursor, sql)
    # The id is part of the hash, so the row is inserted first and its hash set once the id is known.
    event_id = int(
        sql.execute(
            cursor, sql.insert_event, (sql.bind_datetime(at), *values, seq, prev_hash, "")
        ).fetchall()[0][0]
    )
    digest = stored_values_hash("event", seq, prev_hash, (event_id, at, *values))
    sql.execute(cursor, sql.set_event_hash, (digest, event_id))
    _move_head(cursor, sql, seq, digest)
    return event_id


def append_event(
    conn: Connection, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None
) -> int:
    """Append an event inside the caller's write transaction, so a change and its event commit together."""
    if not conn.in_transaction():
        conn.begin()
    driver: Any = conn.connection.driver_connection
    cursor = driver.cursor()
    try:
        return _append_event(cursor, _statements(conn.dialect), actor, action, target, details)
    finally:
        cursor.close()
