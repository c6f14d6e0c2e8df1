"""Dashboard aggregates: rollups built from records whose timings are known, read back as the charts read them."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from clawdbot.audit import AuditStore
from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.metrics import WINDOWS, last_requests, refusals_last_minute, sample_history, traffic, window
from clawdbot.models import MetricSample, RequestRollup, TimingRollup
from clawdbot.rollups import RETENTION, Histogram, Rollups

NOW = datetime(2026, 11, 1, 12, 0, 30, tzinfo=UTC)
ERR = Histogram.RELATIVE_ERROR


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def record(store: AuditStore, finished: datetime, status: str = "ok", **fields: Any) -> int:
    """A finalized request that finished at `finished` with the given timings."""
    latency = fields.get("latency_ms", 1000.0)
    request_id = store.start_request(
        user=fields.pop("user", "alice"),
        agent=fields.pop("agent", "contract"),
        model_requested="qwen3:32b",
        started_at=finished - timedelta(milliseconds=latency or 0),
    )
    fields.setdefault("model_used", "qwen3:32b")
    store.finish_request(request_id, status, finished_at=finished, **fields)
    return request_id


def test_histogram_quantiles_are_within_the_stated_error() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(6, 1.2) for _ in range(5000)]
    hist = Histogram()
    for v in values:
        hist.add(v)
    for q in (0.5, 0.95, 0.99):
        exact = nearest_rank(values, q)
        estimate = hist.quantile(q)
        assert estimate is not None and abs(estimate - exact) / exact <= ERR
    # merging two halves gives the same histogram as adding everything to one
    left, right = Histogram(), Histogram()
    for i, v in enumerate(values):
        (left if i % 2 else right).add(v)
    left.merge(Histogram.from_json(right.to_json()))
    assert left.counts == hist.counts
    assert Histogram().quantile(0.5) is None
    hist.add(None)
    hist.add(float("nan"))
    assert hist.total == 5000


def test_charts_count_and_time_known_records(db: Database, store: AuditStore) -> None:
    minute_a = datetime(2026, 11, 1, 11, 58, tzinfo=UTC)
    minute_b = datetime(2026, 11, 1, 11, 59, tzinfo=UTC)
    latencies_a = [100.0 * (i + 1) for i in range(20)]  # 100 … 2000 ms
    for i, latency in enumerate(latencies_a):
        record(
            store,
            minute_a + timedelta(seconds=i * 2),
            latency_ms=latency,
            ttft_ms=latency / 10,
            tokens_per_s=40.0 + i,
            completion_tokens=30,
            agent="contract" if i % 2 else "helpdesk",
        )
    record(store, minute_b + timedelta(seconds=1), "busy", latency_ms=1.0)
    record(store, minute_b + timedelta(seconds=2), "rate_limited", latency_ms=1.0, agent="helpdesk")
    record(store, minute_b + timedelta(seconds=3), "ok", latency_ms=5000.0, ttft_ms=800.0, completion_tokens=60,
           model_used="qwen3:8b")  # fmt: skip
    record(store, minute_b + timedelta(seconds=4), "error", latency_ms=None, completion_tokens=None)

    assert Rollups(db).refresh(NOW) == 24
    charts = traffic(db, WINDOWS["15 min"], NOW)
    assert len(charts.points) == 15
    by_start = {p.start: p for p in charts.points}
    a, b = by_start[minute_a], by_start[minute_b]
    assert a.requests == 20 and a.requests_per_s == pytest.approx(20 / 60)
    assert a.tokens_per_s == pytest.approx(20 * 30 / 60)
    for got, exact in (
        (a.latency_p50, nearest_rank(latencies_a, 0.5)),  # 1000
        (a.latency_p95, nearest_rank(latencies_a, 0.95)),  # 1900
        (a.latency_p99, nearest_rank(latencies_a, 0.99)),  # 2000
        (a.ttft_p50, 100.0),
        (a.ttft_p95, 190.0),
        (a.decode_p50, 49.0),
    ):
        assert got is not None and abs(got - exact) / exact <= ERR, (got, exact)
    # only the `ok` request of minute b has timings; refusals and errors are counted, not timed
    assert (
        b.requests == 4
        and b.latency_p50 == pytest.approx(5000, rel=ERR)
        and b.ttft_p95 == pytest.approx(800, rel=ERR)
    )
    assert b.tokens_per_s == pytest.approx(60 / 60)
    # nothing finished in the current bucket (12:00) yet
    assert by_start[datetime(2026, 11, 1, 12, 0, tzinfo=UTC)].requests == 0
    assert charts.by_status["ok"][-3:] == [20, 1, 0]
    assert charts.by_status["busy"][-2:] == [1, 0] and charts.by_status["rate_limited"][-2] == 1
    assert charts.by_status["error"][-2] == 1
    assert charts.by_agent == {"contract": 13, "helpdesk": 11}
    assert charts.by_model == {"qwen3:32b": 23, "qwen3:8b": 1}
    assert charts.requests == 24
    everything = [*latencies_a, 5000.0]
    assert charts.latency_p99 == pytest.approx(nearest_rank(everything, 0.99), rel=ERR)
    assert charts.latency_p50 == pytest.approx(nearest_rank(everything, 0.5), rel=ERR)

    # the same records through the 10-minute and hourly buckets of the longer windows
    day = traffic(db, WINDOWS["24 h"], NOW)
    assert len(day.points) == 144 and day.requests == 24
    assert day.points[-2].requests == 24  # 11:50-12:00
    assert day.latency_p95 == pytest.approx(nearest_rank(everything, 0.95), rel=ERR)
    week = traffic(db, WINDOWS["7 d"], NOW)
    assert len(week.points) == 168 and week.points[-2].requests == 24
    assert {k: sum(v) for k, v in week.by_status.items()} == {
        "ok": 21,
        "busy": 1,
        "rate_limited": 1,
        "error": 1,
    }


def test_the_current_bucket_divides_by_the_time_it_has_lasted(db: Database, store: AuditStore) -> None:
    record(store, NOW - timedelta(seconds=20), latency_ms=100.0, completion_tokens=90)  # 12:00:10
    Rollups(db).refresh(NOW)
    current = traffic(db, WINDOWS["15 min"], NOW).points[-1]
    assert current.start == datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert current.requests_per_s == pytest.approx(1 / 30) and current.tokens_per_s == pytest.approx(90 / 30)


def test_refresh_counts_each_record_once_whoever_runs_it(db: Database, store: AuditStore) -> None:
    minute = datetime(2026, 11, 1, 11, 59, tzinfo=UTC)
    for i in range(5):
        record(store, minute + timedelta(seconds=i), latency_ms=100.0)
    first, second = Rollups(db), Rollups(db)  # two processes sharing the database
    assert first.refresh(NOW) == 5
    assert second.refresh(NOW) == 0
    assert first.refresh(NOW) == 0
    for i in range(3):
        record(store, minute + timedelta(seconds=30 + i), latency_ms=300.0)
    # a started record that has not finished is not counted until it does
    pending = store.start_request(user="bob", agent="contract", model_requested="qwen3:32b")
    assert second.refresh(NOW) == 3
    assert first.refresh(NOW) == 0
    store.finish_request(pending, "cancelled", finished_at=minute + timedelta(seconds=50))
    assert first.refresh(NOW) == 1
    point = next(p for p in traffic(db, WINDOWS["1 h"], NOW).points if p.start == minute)
    assert point.requests == 9
    assert point.latency_p50 == pytest.approx(100.0, rel=ERR) and point.latency_p95 == pytest.approx(
        300.0, rel=ERR
    )
    with db.engine.connect() as conn:
        minute_rows = conn.execute(
            select(func.sum(RequestRollup.requests)).where(RequestRollup.bucket_s == 60)
        ).scalar_one()
    assert minute_rows == 9


def test_old_records_are_not_rolled_up_and_old_rollups_are_pruned(db: Database, store: AuditStore) -> None:
    record(store, NOW - RETENTION - timedelta(hours=2), latency_ms=100.0)
    record(store, NOW - timedelta(days=3), latency_ms=100.0)
    rollups = Rollups(db)
    assert rollups.refresh(NOW) == 2
    with db.engine.connect() as conn:
        oldest = conn.execute(select(func.min(TimingRollup.bucket_start))).scalar_one()
        sizes = set(conn.execute(select(TimingRollup.bucket_s)).scalars())
    assert oldest >= NOW - RETENTION
    assert sizes == {600, 3600}  # minutes are kept for a day only: the 3-day-old record has none
    rollups.prune(NOW + timedelta(days=28))
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(TimingRollup)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(RequestRollup)).scalar_one() == 0


def test_refusals_of_the_last_minute_and_the_last_requests(db: Database, store: AuditStore) -> None:
    record(store, NOW - timedelta(seconds=90), "busy", latency_ms=1.0)
    record(store, NOW - timedelta(seconds=30), "busy", latency_ms=1.0)
    record(store, NOW - timedelta(seconds=20), "rate_limited", latency_ms=1.0)
    record(store, NOW - timedelta(seconds=10), "ok")
    running = store.start_request(user="carol", agent="contract", model_requested="qwen3:32b")
    assert refusals_last_minute(db, NOW) == {"busy": 1, "rate_limited": 1}
    last = last_requests(db, limit=3)
    assert [r["id"] for r in last] == [running, running - 1, running - 2]
    assert [r["status"] for r in last] == ["started", "ok", "rate_limited"]
    assert last[0]["user"] == "carol"


def test_sampled_history_adds_gateways_and_keeps_the_highest_gpu_reading(db: Database) -> None:
    base = datetime(2026, 11, 1, 11, 0, tzinfo=UTC)
    rows = []
    for minute in range(20):  # 11:00-11:19, two processes
        at = base + timedelta(minutes=minute)
        for source, queued, memory in (("host:1", 1.0, 50.0), ("host:2", 2.0, 52.0)):
            rows.append(
                {
                    "metric": "gateway.queued",
                    "bucket_s": 60,
                    "at": at,
                    "source": source,
                    "mean": queued,
                    "peak": queued + 1,
                }
            )
            rows.append(
                {
                    "metric": "gpu0.memory_pct",
                    "bucket_s": 60,
                    "at": at,
                    "source": source,
                    "mean": memory,
                    "peak": 90.0,
                }
            )
    with db.write_connection() as conn:
        conn.execute(insert(MetricSample), rows)
    history = sample_history(
        db, WINDOWS["24 h"], ["gateway.queued", "gpu0.memory_pct", "gpu1.memory_pct"], NOW
    )
    assert [start for start, _, _ in history["gateway.queued"]] == [base, base + timedelta(minutes=10)]
    assert history["gateway.queued"][0][1:] == (3.0, 5.0)
    assert history["gpu0.memory_pct"][1][1:] == (52.0, 90.0)
    assert history["gpu1.memory_pct"] == []
    # a week reads the hourly rows only (none yet), not 10,080 minutes each
    assert sample_history(db, WINDOWS["7 d"], ["gateway.queued"], NOW) == {"gateway.queued": []}
    hours = [
        {"metric": "gateway.queued", "bucket_s": 3600, "at": base, "source": src, "mean": mean, "peak": 4.0}
        for src, mean in (("host:1", 1.0), ("host:2", 2.0))
    ]
    with db.write_connection() as conn:
        conn.execute(insert(MetricSample), hours)
    assert sample_history(db, WINDOWS["7 d"], ["gateway.queued"], NOW) == {
        "gateway.queued": [(base, 3.0, 8.0)]
    }


def test_an_unknown_window_is_refused_with_the_choices() -> None:
    assert window("1 h").bucket_s == 60
    with pytest.raises(UsageError, match="15 min, 1 h, 24 h, 7 d"):
        window("2 h")
