"""The audit explorer's queries: pages of requests by keyset, counts, one record in full, a conversation, events.

Read-only: nothing here writes (exports and verifications record their events through `clawdbot.export` and
`record_verification`). Every query takes the viewer: an auditor sees every record, anyone else only their own
requests and conversations, and no events.

Pages use keyset pagination, never OFFSET: a page is "the next `limit` rows after this row" in the sort order,
so page 10,000 costs what page 1 costs and rows written meanwhile do not shift the pages. The sort key is the
sort column, then `id`, which breaks ties; nullable columns sort their NULLs after every value (before them when
descending), so one total order serves both directions and paging back is paging forward in reverse.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, column, func, or_, select, table

from clawdbot.audit import AuditStore
from clawdbot.chain import VerifyResult, verify_chain
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Agent, AgentVersion, Attachment, Event, Request, Role, Status, User
from clawdbot.records import SEARCH_TABLE, AuditFilter, indexed_phrase, search_matches, text_contains
from clawdbot.users import UserInfo

# Columns a page may be sorted by, and whether they can be NULL.
SORTABLE: dict[str, bool] = {
    "id": False,
    "started_at": False,
    "user": False,
    "agent": False,
    "status": False,
    "model_used": False,
    "latency_ms": True,
    "ttft_ms": True,
    "prompt_tokens": True,
    "completion_tokens": True,
}
# The columns of a row of a page (the table), in order.
# Sort columns that follow the order requests arrive in: an id is given out as a request starts (on SQLite in the
# same write transaction as its start time), so a full-text search can walk its index in id order for them.
ARRIVAL_ORDER = frozenset({"id", "started_at"})
SUMMARY_FIELDS: tuple[str, ...] = (
    "id", "started_at", "user", "agent", "agent_version", "model_used", "status", "truncated", "fallback_used",
    "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms", "client_ip", "conversation_id", "prompt",
)  # fmt: skip
EVENT_FIELDS: tuple[str, ...] = ("id", "at", "actor", "action", "target", "details", "hash")
MAX_LIMIT = 500
# How much of the prompt a page row shows; the detail view has all of it.
PREVIEW_CHARS = 200

Direction = Literal["next", "previous"]


@dataclass(frozen=True)
class Sort:
    """A sort column and direction; `id` always follows as the tie-break."""

    column: str = "started_at"
    descending: bool = True

    def __post_init__(self) -> None:
        if self.column not in SORTABLE:
            raise UsageError(f"cannot sort by {self.column!r}: use one of {', '.join(SORTABLE)}")


@dataclass(frozen=True)
class Cursor:
    """Where a page starts or ends: the sort column's value and the id of that row."""

    value: Any
    id: int


@dataclass(frozen=True)
class Page:
    """One page of rows (dicts of SUMMARY_FIELDS) and the cursors to the pages either side."""

    rows: list[dict[str, Any]]
    first: Cursor | None
    last: Cursor | None
    has_previous: bool
    has_next: bool


@dataclass(frozen=True)
class RecordDetail:
    """One request in full, with the agent version it used and its attachment rows."""

    request: dict[str, Any]
    agent_version: dict[str, Any] | None
    attachments: list[dict[str, Any]]


def is_auditor(viewer: UserInfo) -> bool:
    return Role.AUDITOR in viewer.roles and not viewer.disabled


def _key(sort: Sort, row: dict[str, Any]) -> Cursor:
    return Cursor(row[sort.column], int(row["id"]))


def _order(sort: Sort, descending: bool) -> list[Any]:
    column = getattr(Request, sort.column)
    order: list[Any] = []
    if SORTABLE[sort.column]:
        nulls_last = column.is_(None)
        order.append(nulls_last.desc() if descending else nulls_last.asc())
    order.append(column.desc() if descending else column.asc())
    order.append(Request.id.desc() if descending else Request.id.asc())
    return order


def _after(sort: Sort, cursor: Cursor, descending: bool) -> ColumnElement[bool]:
    """Rows strictly after `cursor` in the order (column, id), ascending or not, NULLs last when ascending."""
    column = getattr(Request, sort.column)
    beyond_id = Request.id < cursor.id if descending else Request.id > cursor.id
    if cursor.value is None:
        # Among the NULLs; before them (descending) come every value.
        tie = and_(column.is_(None), beyond_id)
        return or_(tie, column.is_not(None)) if descending else tie
    beyond = column < cursor.value if descending else column > cursor.value
    # The redundant bound (>= or <=) lets an index on the column start at the cursor.
    bound = column <= cursor.value if descending else column >= cursor.value
    after = and_(bound, or_(beyond, and_(column == cursor.value, beyond_id)))
    if SORTABLE[sort.column] and not descending:
        return or_(after, column.is_(None))
    return after


class AuditExplorer:
    """The audit explorer's read queries over one database, each for a given viewer."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.dialect = db.engine.dialect.name

    def _scope(self, viewer: UserInfo) -> list[ColumnElement[bool]]:
        return [] if is_auditor(viewer) else [Request.user == viewer.name]

    def page(
        self,
        viewer: UserInfo,
        audit_filter: AuditFilter,
        sort: Sort = Sort(),
        cursor: Cursor | None = None,
        direction: Direction = "next",
        limit: int = 50,
    ) -> Page:
        """The `limit` rows after `cursor` (direction "next") or before it ("previous"); the first page without."""
        limit = max(1, min(limit, MAX_LIMIT))
        backwards = direction == "previous" and cursor is not None
        descending = sort.descending != backwards
        columns = [getattr(Request, f) for f in SUMMARY_FIELDS]
        if sort.column not in SUMMARY_FIELDS:
            columns.append(getattr(Request, sort.column))
        phrase = indexed_phrase(audit_filter.search or "", self.dialect)
        if phrase is not None and sort.column in ARRIVAL_ORDER:
            rows = self._search_in_arrival_order(
                viewer, audit_filter, phrase, columns, cursor, descending, limit
            )
        else:
            query = (
                select(*columns)
                .where(*audit_filter.request_conditions(self.dialect), *self._scope(viewer))
                .order_by(*_order(sort, descending))
                .limit(limit + 1)
            )
            if cursor is not None:
                query = query.where(_after(sort, cursor, descending))
            with self.db.read() as session:
                rows = [dict(row._mapping) for row in session.execute(query)]
        more = len(rows) > limit
        rows = rows[:limit]
        if backwards:
            rows.reverse()
        for row in rows:
            prompt = row["prompt"] or ""
            row["prompt"] = prompt if len(prompt) <= PREVIEW_CHARS else prompt[:PREVIEW_CHARS] + "…"
        first = _key(sort, rows[0]) if rows else None
        last = _key(sort, rows[-1]) if rows else None
        if backwards:
            return Page(rows, first, last, has_previous=more, has_next=True)
        return Page(rows, first, last, has_previous=cursor is not None, has_next=more)

    def _search_in_arrival_order(
        self,
        viewer: UserInfo,
        audit_filter: AuditFilter,
        phrase: str,
        columns: list[Any],
        cursor: Cursor | None,
        descending: bool,
        limit: int,
    ) -> list[dict[str, Any]]:
        """A page of a full-text search walked in the index's own rowid order (SQLite), stopping at `limit`.

        Asking "id IN (every match)" would first collect every match: half a second for a word found in most of
        a million records. Walking the index from the cursor in rowid (= id, = arrival) order stops after one
        page, whatever the word. Requests still running are not in the index yet; the few of them are matched by
        LIKE and merged in.
        """
        others = replace(audit_filter, search="")
        conditions = [*others.request_conditions(self.dialect), *self._scope(viewer)]
        hits = table(SEARCH_TABLE, column("rowid"))
        rowid = hits.c.rowid
        indexed = (
            select(*columns)
            .select_from(hits.join(Request, Request.id == rowid))
            .where(search_matches(phrase), *conditions)
            .order_by(rowid.desc() if descending else rowid.asc())
            .limit(limit + 1)
        )
        running = (
            select(*columns)
            .where(
                Request.status == Status.STARTED.value, text_contains(audit_filter.search or ""), *conditions
            )
            .order_by(Request.id.desc() if descending else Request.id.asc())
            .limit(limit + 1)
        )
        if cursor is not None:
            indexed = indexed.where(rowid < cursor.id if descending else rowid > cursor.id)
            running = running.where(Request.id < cursor.id if descending else Request.id > cursor.id)
        with self.db.read() as session:
            rows = [dict(row._mapping) for query in (indexed, running) for row in session.execute(query)]
        rows.sort(key=lambda row: int(row["id"]), reverse=descending)
        return rows[: limit + 1]

    def count(self, viewer: UserInfo, audit_filter: AuditFilter) -> int:
        """How many requests match the filter (what the viewer may see)."""
        query = select(func.count()).select_from(Request)
        query = query.where(*audit_filter.request_conditions(self.dialect), *self._scope(viewer))
        with self.db.read() as session:
            return int(session.execute(query).scalar_one())

    def detail(self, viewer: UserInfo, request_id: int) -> RecordDetail:
        """Every column of one request, its agent version (system prompt included) and its attachment rows."""
        with self.db.read() as session:
            request = session.execute(
                select(Request).where(Request.id == request_id, *self._scope(viewer))
            ).scalar_one_or_none()
            if request is None:
                raise NotFoundError(f"there is no request {request_id} you may see")
            values = {
                c.name: getattr(request, c.name) for c in Request.__table__.columns if c.name != "owner"
            }
            version: dict[str, Any] | None = None
            if request.agent_version_id is not None:
                row = session.execute(
                    select(AgentVersion, Agent.name)
                    .join(Agent, Agent.id == AgentVersion.agent_id)
                    .where(AgentVersion.id == request.agent_version_id)
                ).one_or_none()
                if row is not None:
                    agent_version, agent_name = row
                    version = {c.name: getattr(agent_version, c.name) for c in AgentVersion.__table__.columns}
                    version["agent"] = agent_name
            attachments = [
                {"name": a.name, "media_type": a.media_type, "sha256": a.sha256, "size": a.size}
                for a in session.scalars(
                    select(Attachment).where(Attachment.request_id == request_id).order_by(Attachment.id)
                )
            ]
        return RecordDetail(values, version, attachments)

    def conversation(self, viewer: UserInfo, conversation_id: int) -> list[dict[str, Any]]:
        """Every recorded turn of a conversation, oldest first, with prompt, response and thinking in full."""
        fields = ("id", "started_at", "user", "agent", "agent_version", "model_used", "status", "prompt",
                  "response", "thinking", "tool_calls", "latency_ms")  # fmt: skip
        query = (
            select(*(getattr(Request, f) for f in fields))
            .where(Request.conversation_id == conversation_id, *self._scope(viewer))
            .order_by(Request.started_at, Request.id)
        )
        with self.db.read() as session:
            return [dict(row._mapping) for row in session.execute(query)]

    def events(
        self, viewer: UserInfo, audit_filter: AuditFilter, before_id: int | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Events, newest first, `limit` of them older than `before_id` (keyset on id); auditors only."""
        if not is_auditor(viewer):
            raise UsageError("only auditors may read the events")
        query = select(*(getattr(Event, f) for f in EVENT_FIELDS)).where(*audit_filter.event_conditions())
        if before_id is not None:
            query = query.where(Event.id < before_id)
        query = query.order_by(Event.id.desc()).limit(max(1, min(limit, MAX_LIMIT)))
        with self.db.read() as session:
            return [dict(row._mapping) for row in session.execute(query)]

    def choices(self) -> dict[str, list[Any]]:
        """Values the filters offer: user names, agent names with their versions, models (small tables only)."""
        with self.db.read() as session:
            users = list(session.scalars(select(User.name).order_by(User.name)))
            versions = session.execute(
                select(Agent.name, AgentVersion.version, AgentVersion.model, AgentVersion.fallback_model)
                .join(AgentVersion, AgentVersion.agent_id == Agent.id)
                .order_by(Agent.name, AgentVersion.version)
            ).all()
        models = sorted({m for row in versions for m in (row[2], row[3]) if m})
        return {
            "users": users,
            "agents": sorted({row[0] for row in versions}),
            "agent_versions": [(row[0], int(row[1])) for row in versions],
            "models": models,
        }


def record_verification(
    db: Database,
    store: AuditStore,
    actor: str,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Check the whole chain and record the check as an `audit.verify` event, as `clawdbot audit verify` does."""
    result = verify_chain(db, progress)
    details = {
        "ok": result.ok,
        "checked": result.checked,
        "head_seq": result.head_seq,
        "first_break": result.first_break.describe() if result.first_break else None,
    }
    store.record_event(actor, "audit.verify", "chain", details)
    return result


def record_download(store: AuditStore, actor: str, request_id: int, attachment: dict[str, Any]) -> None:
    """An auditor took a copy of a file someone attached: which record, which file, as an `audit.download` event."""
    details = {"request_id": request_id, "name": attachment.get("name"), "sha256": attachment.get("sha256")}
    store.record_event(actor, "audit.download", f"request {request_id}", details)


def pretty_json(text: str) -> Any:
    """A stored JSON column as data for display; text that is not JSON is returned as it is."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text
