"""The tamper-evident hash chain over finalized requests and events, and its verification.

Requests and events share one sequence (`seq`, 1, 2, 3, …). Each record's hash is SHA-256 over its canonical
content (sorted-key JSON of every audited column, its kind and its position) and the previous record's hash; the
`chain_head` row holds the last position and hash. Editing a record changes its hash; deleting, inserting or
reordering breaks a position or a previous-hash link; removing records from the end disagrees with the head.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, Row, select

from clawdbot.db import Database
from clawdbot.models import GENESIS_HASH, ChainHead, Event, Request, Status

Kind = Literal["request", "event"]

# The contract's export columns, in its order.
REQUEST_EXPORT_FIELDS: tuple[str, ...] = (
    "id", "started_at", "finished_at", "status", "error", "user", "client_ip", "conversation_id", "agent",
    "agent_version", "backend", "model_requested", "model_used", "fallback_used", "retries", "prompt", "context",
    "response", "thinking", "tool_calls", "attachments", "prompt_tokens", "prompt_eval_count",
    "completion_tokens", "context_tokens_before", "context_tokens_after", "truncated", "dropped_messages",
    "queue_ms", "ttft_ms", "latency_ms", "tokens_per_s", "prev_hash", "hash",
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

# What the hash covers: every exported column but the links themselves, and the agent version row used.
REQUEST_HASHED_FIELDS: tuple[str, ...] = (
    *(f for f in REQUEST_EXPORT_FIELDS if f not in ("prev_hash", "hash")),
    "agent_version_id",
)
EVENT_HASHED_FIELDS: tuple[str, ...] = tuple(f for f in EVENT_EXPORT_FIELDS if f not in ("prev_hash", "hash"))
FLOAT_FIELDS = frozenset({"queue_ms", "ttft_ms", "latency_ms", "tokens_per_s"})


def _canonical_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if name in FLOAT_FIELDS:
        return float(value)
    return value


def record_hash(kind: Kind, seq: int, prev_hash: str, record: Mapping[Any, Any]) -> str:
    """The hash of one record at position `seq` after `prev_hash`."""
    fields = REQUEST_HASHED_FIELDS if kind == "request" else EVENT_HASHED_FIELDS
    content = {name: _canonical_value(name, record[name]) for name in fields}
    content["kind"] = kind
    content["seq"] = seq
    content["prev_hash"] = prev_hash
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def _chained_rows(conn: Connection, kind: Kind, batch: int) -> Iterator[tuple[int, Kind, Row[Any]]]:
    model: type[Request] | type[Event] = Request if kind == "request" else Event
    fields = REQUEST_HASHED_FIELDS if kind == "request" else EVENT_HASHED_FIELDS
    columns = [getattr(model, f) for f in fields] + [model.seq, model.prev_hash, model.hash]
    query = select(*columns).where(model.seq.is_not(None)).order_by(model.seq)
    for row in conn.execution_options(yield_per=batch).execute(query):
        yield row.seq, kind, row


def verify_chain(
    db: Database, progress: Callable[[int, int], None] | None = None, batch: int = 5000
) -> VerifyResult:
    """Walk the whole chain in order and report the first record that breaks it, if any."""
    with db.engine.connect() as conn:
        if not db.is_sqlite:
            # One snapshot for the head and both tables, so records appended meanwhile are not seen at all.
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            return _verify(conn, progress, batch)


def _verify(conn: Connection, progress: Callable[[int, int], None] | None, batch: int) -> VerifyResult:
    head = conn.execute(select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == 1)).one()
    total = head.seq
    unchained = conn.execute(
        select(Request.id)
        .where(Request.seq.is_(None), Request.status != Status.STARTED.value)
        .order_by(Request.id)
        .limit(1)
    ).scalar()
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    before_prev: str = GENESIS_HASH
    last: tuple[Kind, int] | None = None
    first_break: ChainBreak | None = None
    merged = heapq.merge(
        _chained_rows(conn, "request", batch), _chained_rows(conn, "event", batch), key=lambda item: item[0]
    )
    for seq, kind, row in merged:
        record = row._mapping
        if seq != expected_seq:
            if seq < expected_seq:
                # Two records claim this position: the intruder is the one the next record does not link to.
                intruder: tuple[Kind, int] = (kind, record["id"])
                genuine_alike = (
                    record["prev_hash"] == before_prev
                    and record_hash(kind, seq, before_prev, record) == record["hash"]
                )
                following = next(merged, None)
                if (
                    genuine_alike
                    and last is not None
                    and following is not None
                    and following[2]._mapping["prev_hash"] == record["hash"]
                ):
                    intruder = last
                first_break = ChainBreak(
                    intruder[0], intruder[1], seq, f"chain position {seq} is taken twice"
                )
            else:
                first_break = ChainBreak(
                    kind,
                    record["id"],
                    seq,
                    f"records at chain positions {expected_seq}–{seq - 1} are missing",
                )
            break
        if record["prev_hash"] != prev_hash:
            first_break = ChainBreak(
                kind, record["id"], seq, "its previous-hash link does not match the record before it"
            )
            break
        if record_hash(kind, seq, prev_hash, record) != record["hash"]:
            first_break = ChainBreak(kind, record["id"], seq, "its content was changed after it was recorded")
            break
        before_prev, last = prev_hash, (kind, record["id"])
        prev_hash, expected_seq, checked = record["hash"], seq + 1, checked + 1
        if progress is not None and checked % batch == 0:
            progress(checked, total)
    if first_break is None and (head.seq != expected_seq - 1 or head.hash != prev_hash):
        first_break = ChainBreak(
            "chain head",
            None,
            head.seq,
            f"the chain ends at position {expected_seq - 1} but its head says {head.seq}: "
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
        progress(checked, total)
    return VerifyResult(first_break is None, checked, head.seq, head.hash, first_break)
