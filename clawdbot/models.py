"""The database schema as typed SQLAlchemy models, shared by SQLite and PostgreSQL.

Changes reach a database only through Alembic migrations in `migrations/`; a test checks that the two agree.
JSON documents (context, tool calls, details) are stored as text exactly as produced, so the audit hash chain
covers the very bytes that were sent and PostgreSQL cannot reorder their keys.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

GENESIS_HASH = "0" * 64


class Role(StrEnum):
    STAFF = "staff"
    ADMIN = "admin"
    AUDITOR = "auditor"


class Status(StrEnum):
    """Status of a recorded request; `started` only until it is finalized into the chain."""

    STARTED = "started"
    OK = "ok"
    ERROR = "error"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    REJECTED_INPUT = "rejected_input"
    ABANDONED = "abandoned"


FINAL_STATUSES = frozenset(s.value for s in Status if s is not Status.STARTED)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on both databases (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated, sorted role names (see Role).
    roles: Mapped[str] = mapped_column(String(64), default="")
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def role_set(self) -> frozenset[Role]:
        return frozenset(Role(r) for r in self.roles.split())


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AgentVersion(Base):
    """An agent's configuration at one point in time; never updated, an edit adds the next version."""

    __tablename__ = "agent_versions"
    __table_args__ = (UniqueConstraint("agent_id", "version", name="uq_agent_versions_agent_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="RESTRICT"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    fallback_model: Mapped[str] = mapped_column(String(200), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    # JSON list of tool names.
    tools: Mapped[str] = mapped_column(Text, default="[]")
    context_budget: Mapped[int] = mapped_column(Integer)
    max_output_tokens: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    top_p: Mapped[float | None] = mapped_column(Float, nullable=True)
    think: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))


class Tool(Base):
    """A tool agents may use: built-in (implemented in clawdbot) or an admin-defined HTTP call."""

    __tablename__ = "tools"
    __table_args__ = (CheckConstraint("kind IN ('builtin', 'http')", name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, default="")
    # JSON schema of the arguments.
    parameters: Mapped[str] = mapped_column(Text, default="{}")
    url: Mapped[str] = mapped_column(Text, default="")
    method: Mapped[str] = mapped_column(String(8), default="GET")
    # JSON object of header name to value; values may be secrets and are masked wherever shown.
    headers: Mapped[str] = mapped_column(Text, default="{}")
    timeout_s: Mapped[float] = mapped_column(Float, default=10.0)
    max_response_bytes: Mapped[int] = mapped_column(Integer, default=1_000_000)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="RESTRICT"))
    title: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Deleting hides a conversation from its owner; its audit records stay.
    deleted_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    thinking: Mapped[str] = mapped_column(Text, default="")
    # JSON list, as exchanged with the model.
    tool_calls: Mapped[str] = mapped_column(Text, default="[]")
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("requests.id", ondelete="SET NULL"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # JSON list of the charts tools drew for this answer, each {"title", "kind", "figure"} (Plotly figure JSON),
    # so the conversation shows them again after a reload (migration 0007).
    charts: Mapped[str] = mapped_column(Text, default="[]", server_default="[]")


class Attachment(Base):
    """A file given with a request; its bytes and extracted text are stored once by sha256 in the data dir."""

    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[int | None] = mapped_column(
        ForeignKey("requests.id", ondelete="SET NULL"), nullable=True, index=True
    )
    conversation_id: Mapped[int | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL"), nullable=True, index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(100), default="")
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    pages: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    text_path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Request(Base):
    """The audit record of one request to a model (columns of the contract's export, in its order)."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_started_at", "started_at"),
        Index("ix_requests_user_started_at", "user", "started_at"),
        Index("ix_requests_agent_started_at", "agent", "started_at"),
        Index("ix_requests_status", "status"),
        # The dashboard's rollups and "refused in the last minute" read requests by when they finished.
        Index("ix_requests_finished_at", "finished_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=Status.STARTED.value)
    error: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64))
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    conversation_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    agent: Mapped[str] = mapped_column(String(64), default="")
    agent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backend: Mapped[str] = mapped_column(String(16), default="")
    model_requested: Mapped[str] = mapped_column(String(200), default="")
    model_used: Mapped[str] = mapped_column(String(200), default="")
    fallback_used: Mapped[bool] = mapped_column(Boolean, default=False)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text, default="")
    context: Mapped[str] = mapped_column(Text, default="[]")
    response: Mapped[str] = mapped_column(Text, default="")
    thinking: Mapped[str] = mapped_column(Text, default="")
    tool_calls: Mapped[str] = mapped_column(Text, default="[]")
    attachments: Mapped[str] = mapped_column(Text, default="[]")
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_eval_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    context_tokens_before: Mapped[int | None] = mapped_column(Integer, nullable=True)
    context_tokens_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    dropped_messages: Mapped[int] = mapped_column(Integer, default=0)
    queue_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Which process wrote the record while it is `started` (host:pid:start-time), for the abandoned sweep.
    owner: Mapped[str] = mapped_column(String(200), default="")
    agent_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("agent_versions.id", ondelete="RESTRICT"), nullable=True
    )
    # Position in the hash chain, given when the record is finalized.
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The server counted more prompt tokens than we sent, so it may have cut the prompt (migration 0002; hashed
    # only when true, so records from before it still verify).
    server_truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Event(Base):
    """Something a person did that auditors must see: sign-ins, admin changes, exports, verifications."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_at", "at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    # JSON object.
    details: Mapped[str] = mapped_column(Text, default="{}")
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHead(Base):
    """The single row that holds the end of the hash chain; appending locks it, so the chain never forks."""

    __tablename__ = "chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64), default=GENESIS_HASH)


class UserSession(Base):
    """A browser sign-in; the cookie holds a signed random token whose sha256 is the key here.

    Keeping sessions server-side lets sign-out, disabling a user and a password reset end them at once.
    """

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(255), default="")


class ApiKey(Base):
    """A key for the HTTP API, owned by one user; only its sha256 is kept (see clawdbot.api_keys)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    # The key's first characters, so people can tell their keys apart without the key itself.
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_ip: Mapped[str] = mapped_column(String(64), default="")
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(64), default="")


class RequestRollup(Base):
    """Finished requests counted per time bucket, agent, model and status, for the dashboard's traffic charts.

    Rebuilt from `requests` by `clawdbot.rollups` (never by hand); `bucket_s` is the bucket's width (60, 600 or
    3600 s), so a chart over a week reads 168 hourly buckets instead of 10,080 minutes.
    """

    __tablename__ = "request_rollups"
    # On SQLite the rows live in the primary key's b-tree, so a window is one range read (no row lookups).
    __table_args__ = ({"sqlite_with_rowid": False},)

    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    agent: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    requests: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class TimingRollup(Base):
    """Timings of the requests that finished in one time bucket: counts, sums and log-bucket histograms.

    Histograms (JSON lists of bucket index and count, see `clawdbot.rollups.Histogram`) merge by adding, so
    percentiles over any set of buckets come from a few hundred rows whatever the number of requests.
    """

    __tablename__ = "timing_rollups"
    __table_args__ = ({"sqlite_with_rowid": False},)

    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(primary_key=True)
    requests: Mapped[int] = mapped_column(Integer)
    ok: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    latency_ms: Mapped[str] = mapped_column(Text, default="[]")
    ttft_ms: Mapped[str] = mapped_column(Text, default="[]")
    tokens_per_s: Mapped[str] = mapped_column(Text, default="[]")
    # The bucket's own percentiles, computed when it is written, so that a chart point costs no decoding.
    latency_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p95: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_p99: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_p95: Mapped[float | None] = mapped_column(Float, nullable=True)
    decode_p50: Mapped[float | None] = mapped_column(Float, nullable=True)


class RollupState(Base):
    """How far the rollups have read: the highest chain position (`requests.seq`) already counted."""

    __tablename__ = "rollup_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)


class MetricSample(Base):
    """One minute (`bucket_s` 60) or hour (3600) of one sampled figure (GPU memory, queue length…) from one
    process: mean and peak. Hours are kept beside minutes so that a week's chart reads 168 rows, not 10,080.

    `source` is the process (host:pid) for gateway figures, since each process has its own gateway; GPU
    figures from several processes on one host are the same device read twice, and the reader takes the max.
    """

    __tablename__ = "metric_samples"
    __table_args__ = (Index("ix_metric_samples_at", "at"),)

    metric: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    mean: Mapped[float] = mapped_column(Float)
    peak: Mapped[float] = mapped_column(Float)
