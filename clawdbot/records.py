"""Reading the audit log: the filters auditors and exports use, turned into SQL once, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, or_, select

from clawdbot.chain import EVENT_EXPORT_FIELDS, REQUEST_EXPORT_FIELDS
from clawdbot.errors import UsageError
from clawdbot.models import Event, Request, Status


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


@dataclass(frozen=True)
class AuditFilter:
    """Which records to read; every field is optional and they combine with AND."""

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    agent: str | None = None
    status: str | None = None
    search: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in {s.value for s in Status}:
            allowed = ", ".join(s.value for s in Status)
            raise UsageError(f"unknown status {self.status!r}: use one of {allowed}")
        if self.since and self.until and self.since > self.until:
            raise UsageError("--since is after --until: nothing can match")

    def describe(self) -> dict[str, Any]:
        """The filter as plain values, for the event that records an export."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items() if v}

    def requests(self) -> Select[Any]:
        """SELECT of the export columns of matching requests, oldest first."""
        query = select(*(getattr(Request, f) for f in REQUEST_EXPORT_FIELDS)).order_by(Request.id)
        if self.since:
            query = query.where(Request.started_at >= self.since)
        if self.until:
            query = query.where(Request.started_at < self.until)
        if self.user:
            query = query.where(Request.user == self.user)
        if self.agent:
            query = query.where(Request.agent == self.agent)
        if self.status:
            query = query.where(Request.status == self.status)
        if self.search:
            pattern = _like_pattern(self.search)
            query = query.where(
                or_(Request.prompt.ilike(pattern, escape="\\"), Request.response.ilike(pattern, escape="\\"))
            )
        return query

    def events(self) -> Select[Any]:
        """SELECT of the export columns of matching events, oldest first (user = actor, search = details)."""
        if self.agent or self.status:
            raise UsageError("--agent and --status apply to requests, not to events")
        query = select(*(getattr(Event, f) for f in EVENT_EXPORT_FIELDS)).order_by(Event.id)
        if self.since:
            query = query.where(Event.at >= self.since)
        if self.until:
            query = query.where(Event.at < self.until)
        if self.user:
            query = query.where(Event.actor == self.user)
        if self.search:
            pattern = _like_pattern(self.search)
            query = query.where(
                or_(
                    Event.action.ilike(pattern, escape="\\"),
                    Event.target.ilike(pattern, escape="\\"),
                    Event.details.ilike(pattern, escape="\\"),
                )
            )
        return query
