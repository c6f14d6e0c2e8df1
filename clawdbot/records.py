"""Reading the audit log: the filters auditors and exports use, turned into SQL once, in one place.

Full-text search (`AuditFilter.search`) is a case-insensitive substring of the prompt or the response. On SQLite a
text of three characters or more goes through the FTS5 trigram index of migration 0004, which finds Chinese words
inside unspaced sentences as well as English ones; a shorter text (one or two CJK characters, say) has no trigram
to look up, so it falls back to LIKE over the rows the other filters leave. Requests still `started` enter the
index only when finalized, so they are matched by LIKE, which is cheap: there are few of them. On PostgreSQL the
query is always ILIKE, which the pg_trgm GIN indexes of migration 0004 serve.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, literal_column, or_, select, table

from clawdbot.chain import EVENT_EXPORT_FIELDS, REQUEST_EXPORT_FIELDS
from clawdbot.errors import UsageError
from clawdbot.models import Event, Request, Status

SEARCH_TABLE = "requests_fts"
# Shortest text the trigram index can look up; shorter ones are matched with LIKE.
MIN_INDEXED_SEARCH = 3
# What migration 0004 creates beside the models: FTS5 table and its shadow tables, triggers (SQLite), and the
# trigram indexes (PostgreSQL). Not SQLAlchemy models, so the model/migration comparison leaves them out.
SEARCH_OBJECTS = frozenset(
    {
        SEARCH_TABLE,
        *(f"{SEARCH_TABLE}_{shadow}" for shadow in ("data", "idx", "docsize", "config")),
        "ix_requests_prompt_trgm",
        "ix_requests_response_trgm",
    }
)
# Filters that only requests have: refused for events.
_REQUEST_ONLY = (
    "agent", "status", "agents", "agent_versions", "models", "statuses", "truncated", "fallback_used",
    "min_latency_ms", "max_latency_ms", "min_prompt_tokens", "max_prompt_tokens", "min_completion_tokens",
    "max_completion_tokens", "client_ip", "conversation_id",
)  # fmt: skip
_STATUSES = frozenset(s.value for s in Status)


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 date or time; one without a zone is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{name} {value!r} is not an ISO 8601 time: use e.g. 2026-11-01 or 2026-11-01T09:30:00Z"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class AuditFilter:
    """Which records to read; every field is optional and they combine with AND.

    A single value and its plural (`user` and `users`, …) are one set of allowed values. `agents` allows every
    version of an agent, `agent_versions` one (agent, version) pair each. `models` matches the model asked for or
    the one that answered. `client_ip` is exact, or a prefix when it ends with `*`. Ranges include both ends.
    """

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    agent: str | None = None
    status: str | None = None
    search: str | None = None
    users: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    agent_versions: tuple[tuple[str, int], ...] = ()
    models: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    truncated: bool | None = None
    fallback_used: bool | None = None
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_completion_tokens: int | None = None
    max_completion_tokens: int | None = None
    client_ip: str | None = None
    conversation_id: int | None = None

    def __post_init__(self) -> None:
        for status in (self.status, *self.statuses):
            if status is not None and status not in _STATUSES:
                allowed = ", ".join(s.value for s in Status)
                raise UsageError(f"unknown status {status!r}: use one of {allowed}")
        if self.since and self.until and self.since > self.until:
            raise UsageError("--since is after --until: nothing can match")
        for name in ("latency_ms", "prompt_tokens", "completion_tokens"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if low is not None and high is not None and low > high:
                raise UsageError(f"the smallest {name} is above the largest: nothing can match")

    def describe(self) -> dict[str, Any]:
        """The filter as plain JSON values (the ones set), for the event that records an export."""
        described = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and value != () and value != "":
                described[field.name] = _plain(value)
        return described

    def _users(self) -> set[str]:
        return {*self.users, *([self.user] if self.user else [])}

    def request_conditions(self, dialect: str | None = None) -> list[ColumnElement[bool]]:
        """The WHERE terms for requests; `dialect` "sqlite" lets the search use the FTS5 index."""
        terms: list[ColumnElement[bool]] = []
        if self.since:
            terms.append(Request.started_at >= self.since)
        if self.until:
            terms.append(Request.started_at < self.until)
        users = self._users()
        if users:
            terms.append(Request.user.in_(sorted(users)))
        agents = {*self.agents, *([self.agent] if self.agent else [])}
        if agents or self.agent_versions:
            terms.append(
                or_(
                    Request.agent.in_(sorted(agents)),
                    *(and_(Request.agent == a, Request.agent_version == v) for a, v in self.agent_versions),
                )
            )
        statuses = {*self.statuses, *([self.status] if self.status else [])}
        if statuses:
            terms.append(Request.status.in_(sorted(statuses)))
        if self.models:
            models = sorted(set(self.models))
            terms.append(or_(Request.model_used.in_(models), Request.model_requested.in_(models)))
        if self.truncated is not None:
            terms.append(Request.truncated.is_(self.truncated))
        if self.fallback_used is not None:
            terms.append(Request.fallback_used.is_(self.fallback_used))
        for column, low, high in (
            (Request.latency_ms, self.min_latency_ms, self.max_latency_ms),
            (Request.prompt_tokens, self.min_prompt_tokens, self.max_prompt_tokens),
            (Request.completion_tokens, self.min_completion_tokens, self.max_completion_tokens),
        ):
            if low is not None:
                terms.append(column >= low)
            if high is not None:
                terms.append(column <= high)
        if self.client_ip:
            if self.client_ip.endswith("*"):
                prefix = _like_pattern(self.client_ip[:-1])[1:]
                terms.append(Request.client_ip.like(prefix, escape="\\"))
            else:
                terms.append(Request.client_ip == self.client_ip)
        if self.conversation_id is not None:
            terms.append(Request.conversation_id == self.conversation_id)
        if self.search:
            terms.append(_search_condition(self.search, dialect))
        return terms

    def requests(self, dialect: str | None = None) -> Select[Any]:
        """SELECT of the export columns of matching requests, oldest first."""
        query = select(*(getattr(Request, f) for f in REQUEST_EXPORT_FIELDS)).order_by(Request.id)
        return query.where(*self.request_conditions(dialect))

    def events(self) -> Select[Any]:
        """SELECT of the export columns of matching events, oldest first (user = actor, search = details)."""
        if any(getattr(self, name) not in (None, ()) for name in _REQUEST_ONLY):
            raise UsageError("--agent and --status apply to requests, not to events")
        query = select(*(getattr(Event, f) for f in EVENT_EXPORT_FIELDS)).order_by(Event.id)
        return query.where(*self.event_conditions())

    def event_conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE terms for events: time, actor (the users), and text in action, target or details."""
        terms: list[ColumnElement[bool]] = []
        if self.since:
            terms.append(Event.at >= self.since)
        if self.until:
            terms.append(Event.at < self.until)
        users = self._users()
        if users:
            terms.append(Event.actor.in_(sorted(users)))
        if self.search:
            pattern = _like_pattern(self.search)
            terms.append(
                or_(
                    Event.action.ilike(pattern, escape="\\"),
                    Event.target.ilike(pattern, escape="\\"),
                    Event.details.ilike(pattern, escape="\\"),
                )
            )
        return terms


def indexed_phrase(text: str, dialect: str | None) -> str | None:
    """The FTS5 query for `text` when the SQLite trigram index can answer it, else None (LIKE it is).

    A quoted FTS5 string is one phrase: with the trigram tokenizer, a substring match of the whole text.
    """
    if dialect != "sqlite" or len(text) < MIN_INDEXED_SEARCH:
        return None
    return '"' + text.replace('"', '""') + '"'


def search_matches(phrase: str) -> ColumnElement[bool]:
    """The WHERE term that asks the full-text index (its table must be in the FROM clause)."""
    return literal_column(SEARCH_TABLE).op("MATCH")(phrase)


def text_contains(text: str) -> ColumnElement[bool]:
    """`text` in the prompt or the response, any case, by LIKE: what the index answers for finalized requests."""
    pattern = _like_pattern(text)
    return or_(Request.prompt.ilike(pattern, escape="\\"), Request.response.ilike(pattern, escape="\\"))


def _search_condition(text: str, dialect: str | None) -> ColumnElement[bool]:
    like = text_contains(text)
    phrase = indexed_phrase(text, dialect)
    if phrase is None:
        return like
    matches: Select[Any] = (
        select(literal_column("rowid")).select_from(table(SEARCH_TABLE)).where(search_matches(phrase))
    )
    # The index holds finalized requests (a trigger adds each as it is finalized); requests still running are
    # few and are matched by LIKE.
    return or_(Request.id.in_(matches), and_(Request.status == Status.STARTED.value, like))
