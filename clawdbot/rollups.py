"""Per-minute, 10-minute and hourly rollups of finished requests, so dashboard charts never scan `requests`.

Why: a chart over a week at a million records cannot sort latencies on every refresh, so each time bucket
keeps counts per agent, model and status (`request_rollups`) and log-bucket histograms of latency, time to
first token and tokens per second (`timing_rollups`). Percentiles over any window merge a few hundred
histograms: exact counts, percentiles within `Histogram.RELATIVE_ERROR` of the true value.

How they stay current: every finalized request gets the next chain position (`requests.seq`), and
finalizations commit in that order, so "what finished since the last refresh" is `seq > rollup_state.seq`.
`refresh()` finds the hours those requests finished in and recomputes those hours' buckets from `requests`
(an index on `finished_at`), then moves the mark. A recomputation gives the same rows whoever runs it, so
several processes refreshing at once only repeat work. Buckets go by when a request *finished*, which is when
its figures exist; only `ok` requests enter the timing histograms (a busy refusal's 1 ms is not a latency).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from clawdbot.db import Database
from clawdbot.models import Request, RequestRollup, RollupState, Status, TimingRollup, utcnow

BUCKET_SIZES = (60, 600, 3600)
"""Widths in seconds of the buckets kept: a minute, 10 minutes, an hour."""
RETENTION = timedelta(days=30)
"""Metric samples and the longest-kept rollups older than this are pruned (and not rebuilt)."""
KEPT: dict[int, timedelta] = {60: timedelta(days=1), 600: timedelta(days=8), 3600: RETENTION}
"""How long buckets of each width are kept: a little more than the longest window that charts them (1 h, 24 h,
7 d), so a first backfill of a month of records writes minutes for one day only."""
READ_BATCH = 50_000
"""Most newly finished requests looked at per step of `refresh()`, which bounds memory on a first backfill."""


class Histogram:
    """Counts of positive values in log-spaced buckets: bucket i holds [GROWTH**i, GROWTH**(i + 1)).

    Mergeable by adding counts and stored as a small JSON list, which is what lets hourly and per-minute
    buckets be summed into any window. A quantile is read as its bucket's geometric middle, so it is within
    `RELATIVE_ERROR` of the exact nearest-rank value; values at or below `FLOOR` share the lowest bucket.
    """

    GROWTH = 1.04
    RELATIVE_ERROR = math.sqrt(GROWTH) - 1  # about 2 %
    FLOOR = 1e-3

    __slots__ = ("counts",)

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    @classmethod
    def index(cls, value: float) -> int:
        return math.floor(math.log(max(value, cls.FLOOR)) / math.log(cls.GROWTH))

    def add(self, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        i = self.index(value)
        self.counts[i] = self.counts.get(i, 0) + 1

    def merge(self, other: Histogram) -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> float | None:
        """The nearest-rank `q` quantile (0 < q <= 1), or None when empty."""
        return self.quantiles(q)[0]

    def quantiles(self, *qs: float) -> list[float | None]:
        """Several nearest-rank quantiles in one pass over the buckets (ascending `qs` are cheapest)."""
        total = self.total
        if not total:
            return [None] * len(qs)
        ranks = sorted((max(1, math.ceil(q * total)), n) for n, q in enumerate(qs))
        found: list[float | None] = [None] * len(qs)
        seen, k = 0, 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            while k < len(ranks) and seen >= ranks[k][0]:
                found[ranks[k][1]] = float(self.GROWTH ** (i + 0.5))
                k += 1
            if k == len(ranks):
                break
        return found

    def to_json(self) -> str:
        """A flat JSON list [index, count, index, count, …] (integers parse faster than object keys)."""
        return json.dumps([x for item in sorted(self.counts.items()) for x in item], separators=(",", ":"))

    @classmethod
    def merged(cls, texts: Iterable[str | None]) -> Histogram:
        """The sum of many stored histograms, parsed as one JSON list (the window-wide percentiles' hot path)."""
        flat = json.loads("[" + ",".join(t[1:-1] for t in texts if t and len(t) > 2) + "]")
        counts: dict[int, int] = {}
        get = counts.get
        for i, n in zip(flat[::2], flat[1::2], strict=True):
            counts[i] = get(i, 0) + n
        histogram = cls()
        histogram.counts = counts
        return histogram

    @classmethod
    def from_json(cls, text: str | None) -> Histogram:
        flat = json.loads(text or "[]")
        histogram = cls()
        histogram.counts = dict(zip(flat[::2], flat[1::2], strict=True))
        return histogram


@dataclass
class _Bucket:
    requests: int = 0
    ok: int = 0
    completion_tokens: int = 0
    latency_ms: Histogram = field(default_factory=Histogram)
    ttft_ms: Histogram = field(default_factory=Histogram)
    tokens_per_s: Histogram = field(default_factory=Histogram)
    # (agent, model, status) → [requests, completion tokens]
    groups: defaultdict[tuple[str, str, str], list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0])
    )


def bucket_start(at: datetime, size: int) -> datetime:
    """The start of the `size`-second bucket holding `at` (buckets are aligned to the Unix epoch, in UTC)."""
    epoch = int(at.timestamp())
    return datetime.fromtimestamp(epoch - epoch % size, UTC)


def upsert_rows(conn: Connection, table: Any, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Insert rows, replacing the ones whose primary key is taken (same statement on SQLite and PostgreSQL)."""
    if not rows:
        return
    insert = sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert
    statement = insert(table)
    values = {c: statement.excluded[c] for c in rows[0] if c not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=values), list(rows))


class Rollups:
    """Keeps the rollup tables in step with `requests`; see the module docstring."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def mark(self) -> int:
        """The highest chain position already counted."""
        with self.db.engine.connect() as conn:
            return int(conn.execute(select(RollupState.seq).where(RollupState.id == 1)).scalar_one())

    def refresh(self, now: datetime | None = None) -> int:
        """Count every request finalized since the last refresh; returns how many were new."""
        cutoff = (now or utcnow()) - RETENTION
        new = 0
        while True:
            mark = self.mark()
            with self.db.engine.connect() as conn:
                rows = conn.execute(
                    select(Request.seq, Request.finished_at)
                    .where(Request.seq > mark)
                    .order_by(Request.seq)
                    .limit(READ_BATCH)
                ).all()
            if not rows:
                return new
            hours = {bucket_start(f, 3600) for _, f in rows if f is not None and f >= cutoff}
            for hour in sorted(hours):
                self._rebuild_hour(hour, now or utcnow())
            top = int(rows[-1][0] or 0)
            with self.db.write_connection() as conn:
                conn.execute(
                    update(RollupState).where(RollupState.id == 1, RollupState.seq < top).values(seq=top)
                )
            new += len(rows)
            if len(rows) < READ_BATCH:
                return new

    def prune(self, now: datetime | None = None) -> None:
        """Drop buckets older than their width is KEPT."""
        now = now or utcnow()
        with self.db.write_connection() as conn:
            for size, kept in KEPT.items():
                for table in (RequestRollup, TimingRollup):
                    conn.execute(delete(table).where(table.bucket_s == size, table.bucket_start < now - kept))

    def _rebuild_hour(self, hour: datetime, now: datetime) -> None:
        end = hour + timedelta(hours=1)
        query = select(
            Request.finished_at,
            Request.agent,
            Request.model_used,
            Request.model_requested,
            Request.status,
            Request.latency_ms,
            Request.ttft_ms,
            Request.tokens_per_s,
            Request.completion_tokens,
        ).where(Request.finished_at >= max(hour, now - RETENTION), Request.finished_at < end)
        with self.db.engine.connect() as conn:
            buckets = aggregate(conn.execute(query), now)
        with self.db.write_connection() as conn:
            write_buckets(conn, buckets)


def aggregate(rows: Iterable[Sequence[Any]], now: datetime) -> dict[tuple[int, datetime], _Bucket]:
    """Fold rows of (finished_at, agent, model_used, model_requested, status, latency_ms, ttft_ms,
    tokens_per_s, completion_tokens) into buckets of every width still KEPT at `now`, keyed by (width, start)."""
    buckets: dict[tuple[int, datetime], _Bucket] = {}
    ok = Status.OK.value
    oldest = {size: (now - KEPT[size]).timestamp() for size in BUCKET_SIZES}
    for finished, agent, model_used, model_requested, status, latency, ttft, tps, tokens in rows:
        epoch = int(finished.timestamp())
        for size in BUCKET_SIZES:
            start = epoch - epoch % size
            if start < oldest[size]:
                continue
            key = (size, datetime.fromtimestamp(start, UTC))
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket()
            bucket.requests += 1
            bucket.completion_tokens += tokens or 0
            group = bucket.groups[(agent or "", model_used or model_requested or "", status)]
            group[0] += 1
            group[1] += tokens or 0
            if status == ok:
                bucket.ok += 1
                bucket.latency_ms.add(latency)
                bucket.ttft_ms.add(ttft)
                bucket.tokens_per_s.add(tps)
    return buckets


def write_buckets(conn: Connection, buckets: Mapping[tuple[int, datetime], _Bucket]) -> None:
    """Store buckets computed by `aggregate`, replacing what those buckets held before."""
    timings = [
        {
            "bucket_s": size,
            "bucket_start": start,
            "requests": b.requests,
            "ok": b.ok,
            "completion_tokens": b.completion_tokens,
            "latency_ms": b.latency_ms.to_json(),
            "ttft_ms": b.ttft_ms.to_json(),
            "tokens_per_s": b.tokens_per_s.to_json(),
            **dict(
                zip(
                    ("latency_p50", "latency_p95", "latency_p99"),
                    b.latency_ms.quantiles(0.5, 0.95, 0.99),
                    strict=True,
                )
            ),
            **dict(zip(("ttft_p50", "ttft_p95"), b.ttft_ms.quantiles(0.5, 0.95), strict=True)),
            "decode_p50": b.tokens_per_s.quantile(0.5),
        }
        for (size, start), b in buckets.items()
    ]
    groups = [
        {
            "bucket_s": size,
            "bucket_start": start,
            "agent": agent,
            "model": model,
            "status": status,
            "requests": counts[0],
            "completion_tokens": counts[1],
        }
        for (size, start), b in buckets.items()
        for (agent, model, status), counts in b.groups.items()
    ]
    upsert_rows(conn, TimingRollup.__table__, timings, ("bucket_s", "bucket_start"))
    upsert_rows(
        conn, RequestRollup.__table__, groups, ("bucket_s", "bucket_start", "agent", "model", "status")
    )
