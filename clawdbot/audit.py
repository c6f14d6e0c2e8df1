"""The audit store: every request is recorded before the model is called and finalized exactly once.

`start_request` writes a `started` record; `finish_request` completes it and appends it to the hash chain in the
same transaction; `record_event` appends an event. Appending locks the chain head (`BEGIN IMMEDIATE` on SQLite,
`SELECT … FOR UPDATE` on PostgreSQL), so concurrent writers in any number of threads and processes take turns and
the chain never forks or skips a position.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Mapping
from datetime import datetime, timedelta
from functools import cache
from typing import Any, TypedDict

from sqlalchemy import Connection, insert, select, update

from clawdbot.chain import REQUEST_HASHED_FIELDS, record_hash
from clawdbot.db import Database
from clawdbot.errors import AlreadyFinalizedError, NotFoundError, UsageError
from clawdbot.models import FINAL_STATUSES, ChainHead, Event, Request, Status, UTCDateTime, utcnow

log = logging.getLogger(__name__)

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


_SETTABLE = frozenset(RequestFields.__annotations__)
_PYTHON_TYPES: dict[str, type] = {
    c.name: datetime if isinstance(c.type, UTCDateTime) else c.type.python_type
    for c in Request.__table__.columns
}


def _coerce(name: str, value: Any) -> Any:
    """The value as the database will give it back, so the hash computed now matches the stored row."""
    if value is None:
        return None
    kind = _PYTHON_TYPES[name]
    if kind is str:
        # PostgreSQL refuses NUL characters in text.
        return str(value).replace("\x00", "\ufffd")
    if kind is float:
        number = float(value)
        return number if math.isfinite(number) else None
    if kind is datetime:
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise UsageError(f"{name} must be a timezone-aware datetime")
        return value
    return kind(value)


def _clean(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check the names and coerce each value to its column's type."""
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise UsageError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    return {k: _coerce(k, v) for k, v in fields.items()}


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


class AuditStore:
    """Writes request records and events; the only code that writes to the hash chain."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def start_request(self, **fields: Any) -> int:
        """Record a request as `started` before the model is called; returns its id."""
        values = _clean(fields)
        values.setdefault("started_at", utcnow())
        values["status"] = Status.STARTED.value
        values["owner"] = process_owner()
        with self.db.write_connection() as conn:
            return int(conn.execute(insert(Request).values(**values).returning(Request.id)).scalar_one())

    def finish_request(self, request_id: int, status: str, **fields: Any) -> str:
        """Finalize a started request with its outcome and enter it into the chain; returns its hash."""
        if status not in FINAL_STATUSES:
            raise UsageError(
                f"{status!r} is not a final status; use one of {', '.join(sorted(FINAL_STATUSES))}"
            )
        values = _clean(fields)
        values.setdefault("finished_at", utcnow())
        values["status"] = status
        with self.db.write_connection() as conn:
            seq, prev_hash = _lock_head(conn)
            columns = [getattr(Request, f) for f in REQUEST_HASHED_FIELDS]
            row = conn.execute(select(*columns, Request.seq).where(Request.id == request_id)).first()
            if row is None:
                raise NotFoundError(f"there is no request {request_id}")
            if row.seq is not None:
                raise AlreadyFinalizedError(f"request {request_id} was already finalized")
            record = {**row._mapping, **values}
            digest = record_hash("request", seq, prev_hash, record)
            conn.execute(
                update(Request)
                .where(Request.id == request_id)
                .values(**values, seq=seq, prev_hash=prev_hash, hash=digest)
            )
            _move_head(conn, seq, digest)
        return digest

    def record_event(
        self, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None
    ) -> int:
        """Append an event (sign-in, admin change, export, verification) to the chain; returns its id."""
        with self.db.write_connection() as conn:
            return append_event(conn, actor, action, target, details)

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


def _lock_head(conn: Connection) -> tuple[int, str]:
    """Lock the chain head until the transaction ends; returns the next position and the hash before it."""
    head = conn.execute(
        select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == 1).with_for_update()
    ).one()
    return int(head.seq) + 1, str(head.hash)


def _move_head(conn: Connection, seq: int, digest: str) -> None:
    conn.execute(update(ChainHead).where(ChainHead.id == 1).values(seq=seq, hash=digest))


def append_event(
    conn: Connection, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None
) -> int:
    """Append an event inside the caller's write transaction, so a change and its event commit together."""
    values: dict[str, Any] = {
        "at": utcnow(),
        "actor": actor.replace("\x00", "\ufffd"),
        "action": action.replace("\x00", "\ufffd"),
        "target": target.replace("\x00", "\ufffd"),
        "details": to_json(dict(details or {})).replace("\x00", "\ufffd"),
    }
    seq, prev_hash = _lock_head(conn)
    # The id is part of the hash, so the row is inserted first and its hash set once the id is known.
    event_id = int(
        conn.execute(
            insert(Event).values(**values, seq=seq, prev_hash=prev_hash, hash="").returning(Event.id)
        ).scalar_one()
    )
    digest = record_hash("event", seq, prev_hash, {**values, "id": event_id})
    conn.execute(update(Event).where(Event.id == event_id).values(hash=digest))
    _move_head(conn, seq, digest)
    return event_id
