"""What the operations dashboard shows, read from the rollups, the metric samples and a few indexed queries.

Every figure here costs a bounded number of rows whatever the size of the audit log: charts read
`timing_rollups` and `request_rollups` at a bucket width chosen per window (at most 168 buckets),
sampled history reads `metric_samples` grouped to the same width, and the live figures use the
`finished_at` index or the primary key. See `clawdbot.rollups` for how the rollups are kept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, cast, func, select

from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.models import MetricSample, Request, RequestRollup, Status, TimingRollup, utcnow
from clawdbot.rollups import Histogram, bucket_start
from clawdbot.sampler import Snapshot


@dataclass(frozen=True)
class Window:
    """A chart window: how far back, and the width of each point."""

    label: str
    span: timedelta
    bucket_s: int

    @property
    def points(self) -> int:
        return int(self.span.total_seconds()) // self.bucket_s


WINDOWS: dict[str, Window] = {
    w.label: w
    for w in (
        Window("15 min", timedelta(minutes=15), 60),
        Window("1 h", timedelta(hours=1), 60),
        Window("24 h", timedelta(hours=24), 600),
        Window("7 d", timedelta(days=7), 3600),
    )
}
LIVE_HISTORY = timedelta(hours=1)
"""Windows up to this long chart the sampler's in-memory readings (every few seconds); longer ones the stored
one-minute samples."""
REFUSED = (Status.BUSY.value, Status.RATE_LIMITED.value)
LAST_REQUEST_FIELDS = (
    "id", "started_at", "user", "agent", "model_used", "status", "queue_ms", "ttft_ms", "latency_ms",
    "completion_tokens", "tokens_per_s",
)  # fmt: skip


@dataclass(frozen=True)
class TrafficPoint:
    """One bucket of a chart; percentiles are None when no request finished `ok` in it."""

    start: datetime
    requests: int
    requests_per_s: float
    tokens_per_s: float
    """Output tokens of the bucket's requests per second of the bucket: the GPU's throughput."""
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    decode_p50: float | None
    """The median request's own generation speed (tokens per second)."""


@dataclass(frozen=True)
class Traffic:
    """The charts of one window: a point per bucket, counts per status per bucket, totals per agent and model."""

    window: Window
    points: list[TrafficPoint]
    by_status: dict[str, list[int]]
    """Status → requests per point, aligned with `points`."""
    by_agent: dict[str, int]
    by_model: dict[str, int]
    requests: int
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p95: float | None


def window(label: str) -> Window:
    """The window named `label`; a name not offered is a usage error with the ones that are."""
    try:
        return WINDOWS[label]
    except KeyError:
        raise UsageError(f"there is no {label!r} window; choose one of {', '.join(WINDOWS)}") from None


def _first_bucket(w: Window, now: datetime) -> datetime:
    return bucket_start(now, w.bucket_s) - timedelta(seconds=w.bucket_s * (w.points - 1))


def traffic(db: Database, w: Window, now: datetime | None = None) -> Traffic:
    """Requests per second, latency and TTFT percentiles, throughput and outcomes over the window ending now."""
    now = now or utcnow()
    first = _first_bucket(w, now)
    starts = [first + timedelta(seconds=w.bucket_s * i) for i in range(w.points)]
    index = {s: i for i, s in enumerate(starts)}
    rollups = (RequestRollup.bucket_s == w.bucket_s, RequestRollup.bucket_start >= first)
    with db.engine.connect() as conn:
        timings = conn.execute(
            select(
                TimingRollup.bucket_start,
                TimingRollup.requests,
                TimingRollup.completion_tokens,
                TimingRollup.latency_ms,
                TimingRollup.ttft_ms,
                TimingRollup.latency_p50,
                TimingRollup.latency_p95,
                TimingRollup.latency_p99,
                TimingRollup.ttft_p50,
                TimingRollup.ttft_p95,
                TimingRollup.decode_p50,
            ).where(TimingRollup.bucket_s == w.bucket_s, TimingRollup.bucket_start >= first)
        ).all()
        statuses = conn.execute(
            select(RequestRollup.bucket_start, RequestRollup.status, func.sum(RequestRollup.requests))
            .where(*rollups)
            .group_by(RequestRollup.bucket_start, RequestRollup.status)
        ).all()
        groups = conn.execute(
            select(RequestRollup.agent, RequestRollup.model, func.sum(RequestRollup.requests))
            .where(*rollups)
            .group_by(RequestRollup.agent, RequestRollup.model)
        ).all()
    rows = {row[0]: row for row in timings}
    points = []
    for start in starts:
        # The current bucket has lasted only until now.
        seconds = max(1.0, min(float(w.bucket_s), (now - start).total_seconds()))
        row = rows.get(start)
        if row is None:
            points.append(TrafficPoint(start, 0, 0.0, 0.0, None, None, None, None, None, None))
            continue
        _, requests, tokens, _latency, _ttft, *percentiles = row
        points.append(
            TrafficPoint(start, int(requests), requests / seconds, int(tokens) / seconds, *percentiles)
        )
    by_status: dict[str, list[int]] = {}
    for start, status, count in statuses:
        if start in index:
            by_status.setdefault(status, [0] * len(starts))[index[start]] += int(count)
    by_agent: defaultdict[str, int] = defaultdict(int)
    by_model: defaultdict[str, int] = defaultdict(int)
    for agent, model, count in groups:
        by_agent[agent or "(none)"] += int(count)
        by_model[model or "(none)"] += int(count)
    # Percentiles over the whole window merge the buckets' histograms; each point has its own stored.
    window_latency = Histogram.merged(row[3] for row in timings).quantiles(0.5, 0.95, 0.99)
    window_ttft = Histogram.merged(row[4] for row in timings).quantiles(0.5, 0.95)
    return Traffic(
        window=w,
        points=points,
        by_status=dict(sorted(by_status.items())),
        by_agent=dict(sorted(by_agent.items(), key=lambda kv: -kv[1])),
        by_model=dict(sorted(by_model.items(), key=lambda kv: -kv[1])),
        requests=sum(p.requests for p in points),
        latency_p50=window_latency[0],
        latency_p95=window_latency[1],
        latency_p99=window_latency[2],
        ttft_p50=window_ttft[0],
        ttft_p95=window_ttft[1],
    )


def refusals_last_minute(db: Database, now: datetime | None = None) -> dict[str, int]:
    """Busy and rate-limited answers recorded in the last 60 s, by every process sharing the database."""
    since = (now or utcnow()) - timedelta(seconds=60)
    with db.engine.connect() as conn:
        # Only the `finished_at` range, no status condition and no GROUP BY: with either, SQLite picked the
        # status index and went through every refusal ever (43 ms), or the whole index in order (over 500 ms),
        # at a million records. The last minute holds a few hundred rows at most; they are counted here.
        statuses = conn.execute(select(Request.status).where(Request.finished_at >= since)).scalars()
        counts = dict.fromkeys(REFUSED, 0)
        for status in statuses:
            if status in counts:
                counts[status] += 1
    return counts


def last_requests(db: Database, limit: int = 10) -> list[dict[str, Any]]:
    """The newest requests, those still generating (`started`) included."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(*(getattr(Request, f) for f in LAST_REQUEST_FIELDS))
            .order_by(Request.id.desc())
            .limit(limit)
        )
        return [dict(row._mapping) for row in rows]


# On SQLite a UTC datetime is stored as 'YYYY-MM-DD HH:MM:SS.ffffff': the first 16, 15 or 13 characters name its
# minute, 10 minutes or hour, which groups far faster than converting every row with strftime().
_SQLITE_PREFIX = {60: (16, ":00"), 600: (15, "0:00"), 3600: (13, ":00:00")}


def _step(db: Database, column: Any, size: int) -> ColumnElement[Any]:
    """`column` (a UTC datetime) as the `size`-second bucket holding it, in SQL: see `_step_start`."""
    if db.is_sqlite:
        return func.substr(column, 1, _SQLITE_PREFIX[size][0])
    return cast(func.floor(func.extract("epoch", column)), BigInteger) // size


def _step_start(value: str | int, size: int) -> datetime:
    """The start of a bucket as `_step` gives it: a text prefix (SQLite) or a bucket number (PostgreSQL)."""
    if isinstance(value, str):
        return datetime.fromisoformat(value + _SQLITE_PREFIX[size][1]).replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(value) * size, UTC)


def combine_sources(metric: str, values: Sequence[float]) -> float:
    """One figure from several processes' readings of the same minute: gateway counts add up (each process
    has its own gateway), GPU readings are the same device seen twice (the highest is kept)."""
    return sum(values) if metric.startswith("gateway.") else max(values)


def sample_history(
    db: Database, w: Window, metrics: Sequence[str], now: datetime | None = None
) -> dict[str, list[tuple[datetime, float, float]]]:
    """Stored one-minute samples over the window, grouped to its bucket width: metric → (start, mean, peak)."""
    now = now or utcnow()
    first = _first_bucket(w, now)
    step = _step(db, MetricSample.at, w.bucket_s).label("step")
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(
                MetricSample.metric,
                MetricSample.source,
                step,
                func.avg(MetricSample.mean),
                func.max(MetricSample.peak),
            )
            .where(
                MetricSample.metric.in_(list(metrics)),
                # a week reads the hourly rows the sampler keeps beside the minutes
                MetricSample.bucket_s == (3600 if w.bucket_s >= 3600 else 60),
                MetricSample.at >= first,
            )
            .group_by(MetricSample.metric, MetricSample.source, step)
        ).all()
    per_step: defaultdict[tuple[str, datetime], list[tuple[float, float]]] = defaultdict(list)
    for metric, _source, value, mean, peak in rows:
        per_step[(metric, _step_start(value, w.bucket_s))].append((float(mean), float(peak)))
    history: dict[str, list[tuple[datetime, float, float]]] = {m: [] for m in metrics}
    for (metric, start), readings in sorted(per_step.items()):
        history[metric].append(
            (
                start,
                combine_sources(metric, [r[0] for r in readings]),
                combine_sources(metric, [r[1] for r in readings]),
            )
        )
    return history


def history(
    db: Database,
    w: Window,
    metrics: Sequence[str],
    recent: Sequence[Snapshot],
    now: datetime | None = None,
) -> dict[str, list[tuple[datetime, float, float]]]:
    """Sampled figures over the window: this process's readings in memory (every few seconds) for windows up
    to LIVE_HISTORY, the stored one-minute samples of every process beyond."""
    now = now or utcnow()
    if w.span > LIVE_HISTORY:
        return sample_history(db, w, metrics, now)
    since = now - w.span
    series: dict[str, list[tuple[datetime, float, float]]] = {m: [] for m in metrics}
    for snapshot in recent:
        if snapshot.at < since:
            continue
        figures = snapshot.figures()
        for metric in metrics:
            value = figures.get(metric)
            if value is not None:
                series[metric].append((snapshot.at, value, value))
    return series
