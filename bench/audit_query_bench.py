"""Benchmark of the audit explorer's and the dashboard's queries over a large generated log, SQLite and PostgreSQL.

    python bench/audit_query_bench.py [--records 1000000] [--skip-postgres] [--pg-records N] [--export-records 100000]

Generates `--records` finalized requests (mixed Chinese and English prompts and responses, 50 users, 10 agents,
spread over 30 days, with realistic timings; written with the driver's executemany on SQLite and COPY on
PostgreSQL, given chain positions but not chained: neither the explorer nor the dashboard reads the chain) and
prints, with the goals of issue 7: a filtered page of 50 (user + agent, newest first; goal < 50 ms), its total
count (< 200 ms), a full-text search page (Chinese and English words; < 200 ms at p95), a 24-hour aggregate by
status, and an XLSX export of `--export-records` records (time and peak resident memory growth, VmHWM after a
reset). Then, with the goal of issue 8 (each chart refresh < 50 ms): the one-time rollup backfill, an
incremental refresh, every dashboard query per window next to a baseline computing the same figures straight
from `requests` in the same process, and the sampled history over 30 days of one-minute samples.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from clawdbot import migrate
from clawdbot.audit import AuditStore
from clawdbot.audit_query import AuditExplorer, Sort
from clawdbot.chain import utc_text
from clawdbot.db import Database
from clawdbot.export import export_records
from clawdbot.metrics import WINDOWS, Window, last_requests, refusals_last_minute, sample_history, traffic
from clawdbot.models import MetricSample, Request, Role
from clawdbot.records import AuditFilter
from clawdbot.rollups import Rollups
from clawdbot.users import UserInfo

PG_URL = os.environ.get("CLAWDBOT_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
END = datetime(2026, 11, 1, tzinfo=UTC)
AUDITOR = UserInfo(0, "bench", frozenset({Role.AUDITOR}), False, False)
ZH = [
    "合同",
    "付款",
    "条款",
    "审计",
    "报告",
    "季度",
    "收入",
    "风险",
    "客户",
    "供应商",
    "发票",
    "预算",
    "总结",
    "翻译",
]
EN = ["contract", "payment", "clause", "audit", "report", "quarter", "revenue", "risk", "customer", "invoice"]
STATUSES = ["ok"] * 90 + ["error"] * 4 + ["timeout"] * 3 + ["busy", "rate_limited", "cancelled"]


def _text(rng: random.Random, words: int) -> str:
    parts = []
    for _ in range(words):
        if rng.random() < 0.5:
            parts.append("".join(rng.choice(ZH) for _ in range(rng.randint(2, 5))) + "。")
        else:
            parts.append(" ".join(rng.choice(EN) for _ in range(rng.randint(3, 8))) + ".")
    return " ".join(parts)


_COLUMNS = (
    "started_at", "finished_at", "status", "error", "user", "client_ip", "agent", "agent_version", "backend",
    "model_requested", "model_used", "fallback_used", "retries", "prompt", "context", "response", "thinking",
    "tool_calls", "attachments", "prompt_tokens", "completion_tokens", "truncated", "dropped_messages", "queue_ms",
    "ttft_ms", "latency_ms", "tokens_per_s", "owner", "seq", "server_truncated",
)  # fmt: skip


def _rows(records: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """The generated records as tuples of _COLUMNS, oldest first; texts are drawn from a pool of 20,000 each."""
    rng = random.Random(seed)
    prompts = [_text(rng, rng.randint(1, 4)) for _ in range(20_000)]
    responses = [_text(rng, rng.randint(2, 8)) for _ in range(20_000)]
    span = 30 * 24 * 3600
    for n in range(records):
        started = END - timedelta(seconds=span * (records - n) / records)
        status = rng.choice(STATUSES)
        refused = status in ("busy", "rate_limited")
        latency = rng.uniform(0.3, 3.0) if refused else rng.lognormvariate(8.3, 0.7)
        tokens = None if refused else rng.randint(5, 800)
        yield (
            started, started + timedelta(milliseconds=latency), status, "" if status == "ok" else "bench",
            f"user{rng.randrange(50):02d}", f"10.0.{rng.randrange(4)}.{rng.randrange(250)}",
            f"agent{rng.randrange(10)}", rng.randint(1, 3), "ollama", "qwen3:32b",
            "qwen3:32b" if rng.random() < 0.95 else "qwen3:8b", False, 0,
            rng.choice(prompts), "[]", rng.choice(responses), "", "[]", "[]",
            rng.randint(20, 4000), tokens, rng.random() < 0.05, 0, rng.uniform(0, 50),
            None if refused else rng.lognormvariate(6.2, 0.5), latency,
            None if refused else rng.uniform(15, 45), "", n + 1, False,
        )  # fmt: skip


def generate(db: Database, records: int, seed: int = 7) -> None:
    """Bulk-write the records on the driver (executemany on SQLite, COPY on PostgreSQL) and move the chain
    head past them, so records the benchmark later writes through the audit store take the next positions."""
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        names = ", ".join(f'"{c}"' for c in _COLUMNS)
        if db.is_sqlite:
            statement = f"INSERT INTO requests ({names}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
            at = _COLUMNS.index("started_at"), _COLUMNS.index("finished_at")
            batch: list[tuple[Any, ...]] = []
            for row in _rows(records, seed):
                values = list(row)
                for i in at:
                    values[i] = utc_text(values[i])
                batch.append(tuple(values))
                if len(batch) == 20_000:
                    cursor.executemany(statement, batch)
                    batch.clear()
            cursor.executemany(statement, batch)
        else:
            with cursor.copy(f"COPY requests ({names}) FROM STDIN") as copy:
                for row in _rows(records, seed):
                    copy.write_row(row)
        cursor.execute(f"UPDATE chain_head SET seq = {records} WHERE id = 1")
        raw.commit()
    finally:
        raw.close()
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE" if db.is_sqlite else "ANALYZE requests"))


def timed(call: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median and p95 in milliseconds (after one warm-up run)."""
    call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.95) - 1)]


def _peak_rss_growth(call: Callable[[], Any]) -> tuple[float, float]:
    """Seconds and MB of resident-set growth of `call` (VmHWM reset through clear_refs before it)."""

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
        return 0.0

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    start = time.perf_counter()
    call()
    return time.perf_counter() - start, status("VmHWM") - before


def run(name: str, db: Database, records: int, export_records_n: int) -> None:
    start = time.perf_counter()
    generate(db, records)
    print(f"\n{name}: {records:,} records generated in {time.perf_counter() - start:.0f} s")
    explorer = AuditExplorer(db)
    rng = random.Random(1)

    def filtered() -> AuditFilter:
        return AuditFilter(users=(f"user{rng.randrange(50):02d}",), agents=(f"agent{rng.randrange(10)}",))

    median, p95 = timed(lambda: explorer.page(AUDITOR, filtered(), Sort("started_at")), 30)
    print(f"  filtered page of 50 (user + agent):  median {median:7.1f} ms  p95 {p95:7.1f} ms  (goal < 50)")
    page = explorer.page(AUDITOR, AuditFilter(users=("user07",)), Sort("started_at"))
    median, p95 = timed(
        lambda: explorer.page(AUDITOR, AuditFilter(users=("user07",)), Sort("started_at"), page.last), 30
    )
    print(f"  next page by keyset (user):          median {median:7.1f} ms  p95 {p95:7.1f} ms")
    median, p95 = timed(lambda: explorer.count(AUDITOR, filtered()), 30)
    print(f"  total count (user + agent):          median {median:7.1f} ms  p95 {p95:7.1f} ms  (goal < 200)")
    median, p95 = timed(lambda: explorer.count(AUDITOR, AuditFilter(users=("user07",))), 10)
    print(f"  total count (user only):             median {median:7.1f} ms  p95 {p95:7.1f} ms")
    terms = ["付款条款", "审计报告", "风险客户", "quarter revenue", "invoice", "clause audit"]
    for term in terms:

        def search(term: str = term) -> None:
            explorer.page(AUDITOR, AuditFilter(search=term), Sort("started_at"))

        median, p95 = timed(search, 10)
        print(f"  full-text page {term!r:18}    median {median:7.1f} ms  p95 {p95:7.1f} ms  (goal < 200)")
    median, p95 = timed(
        lambda: explorer.page(AUDITOR, AuditFilter(search="付款", users=("user07",)), Sort("started_at")), 10
    )
    print(f"  2-character search + user (LIKE):   median {median:7.1f} ms  p95 {p95:7.1f} ms")
    day = AuditFilter(since=END - timedelta(hours=24), until=END)
    aggregate = (
        select(Request.status, func.count(), func.avg(Request.latency_ms))
        .where(*day.request_conditions(db.engine.dialect.name))
        .group_by(Request.status)
    )

    def aggregate_24h() -> None:
        with db.read() as session:
            session.execute(aggregate).all()

    median, p95 = timed(aggregate_24h, 10)
    print(f"  24-hour aggregate by status:         median {median:7.1f} ms  p95 {p95:7.1f} ms")
    first = db.engine.connect()
    try:
        cut = first.execute(
            select(Request.started_at).order_by(Request.id).offset(export_records_n).limit(1)
        ).scalar()
    finally:
        first.close()
    with tempfile.TemporaryDirectory() as tmp:
        seconds, mb = _peak_rss_growth(
            lambda: export_records(
                db, Path(tmp) / "x.xlsx", "xlsx", "requests", AuditFilter(until=cut), actor="bench"
            )
        )
    print(f"  XLSX export of {export_records_n:,} records:      {seconds:7.1f} s, peak memory +{mb:.0f} MB")
    dashboard(db, records)


def _direct_window(db: Database, w: Window) -> None:
    """Baseline: the figures of one window straight from `requests` (statuses counted in SQL, latencies and
    TTFTs fetched and sorted for their percentiles), as a dashboard without rollups would compute them."""
    since = END - w.span
    with db.engine.connect() as conn:
        conn.execute(
            select(Request.status, Request.agent, Request.model_used, func.count())
            .where(Request.finished_at >= since, Request.finished_at < END)
            .group_by(Request.status, Request.agent, Request.model_used)
        ).all()
        rows = conn.execute(
            select(Request.latency_ms, Request.ttft_ms).where(
                Request.finished_at >= since, Request.finished_at < END, Request.status == "ok"
            )
        ).all()
    for column in (0, 1):
        values: list[float] = sorted(v for r in rows if (v := r[column]) is not None)
        statistics.quantiles(values, n=100) if len(values) > 1 else None


def _samples(db: Database) -> int:
    """30 days of one-minute samples from one process (2 gateway figures and 4 of one GPU), with the hourly
    rows the sampler keeps beside them."""
    rng = random.Random(5)
    metrics = ["gateway.generating", "gateway.queued", *(f"gpu0.{m}" for m in ("memory_pct", "utilization_pct",
               "temperature_c", "power_w"))]  # fmt: skip
    rows = []
    for hour in range(30 * 24):
        hour_start = END - timedelta(hours=hour + 1)
        for metric in metrics:
            values = [rng.uniform(0, 100) for _ in range(60)]
            for minute, value in enumerate(values):
                at = hour_start + timedelta(minutes=minute)
                rows.append({"metric": metric, "bucket_s": 60, "at": at, "source": "bench:1", "mean": value,
                             "peak": value + 1})  # fmt: skip
            rows.append({"metric": metric, "bucket_s": 3600, "at": hour_start, "source": "bench:1",
                         "mean": sum(values) / 60, "peak": max(values) + 1})  # fmt: skip
    with db.write_connection() as conn:
        for i in range(0, len(rows), 50_000):
            conn.execute(insert(MetricSample), rows[i : i + 50_000])
    return len(rows)


def dashboard(db: Database, records: int) -> None:
    """The dashboard's queries at `records` records, each against the goal of < 50 ms per chart refresh."""
    start = time.perf_counter()
    counted = Rollups(db).refresh(END)
    print(f"  rollup backfill (once, in the sampler's thread): {counted:,} records in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    store = AuditStore(db)
    for i in range(200):
        request_id = store.start_request(user="bench", agent="agent0", model_requested="qwen3:32b")
        store.finish_request(
            request_id, "ok", finished_at=END - timedelta(seconds=i % 50), latency_ms=900.0, ttft_ms=300.0
        )
    start = time.perf_counter()
    Rollups(db).refresh(END)
    new_ms = (time.perf_counter() - start) * 1000
    idle_ms, _ = timed(lambda: Rollups(db).refresh(END), 5)  # nothing new: most of the sampler's rounds
    print(f"  incremental refresh, 200 new records:    {new_ms:7.1f} ms; with nothing new {idle_ms:.1f} ms")
    print(
        f"  {'dashboard query':38} {'median':>8} {'p95':>8}   {'baseline (direct) median':>26}  ratio  goal"
    )
    for w in WINDOWS.values():
        median, p95 = timed(partial(traffic, db, w, END), 20)
        base, _ = timed(partial(_direct_window, db, w), 3)
        verdict = "PASS" if p95 < 50 else "MISS"
        print(f"  charts over {w.label:6} ({w.points:3} points)      {median:8.1f} {p95:8.1f}   "
              f"{base:26.1f}  {median / base:5.3f}  < 50 ms {verdict}")  # fmt: skip
    median, p95 = timed(lambda: refusals_last_minute(db, END), 20)
    print(f"  refusals in the last minute            {median:8.1f} {p95:8.1f}")
    median, p95 = timed(lambda: last_requests(db, 10), 20)
    print(f"  last 10 requests                       {median:8.1f} {p95:8.1f}")
    start = time.perf_counter()
    samples = _samples(db)
    print(
        f"  {samples:,} one-minute and hourly samples (30 days) written in {time.perf_counter() - start:.1f} s"
    )
    names = ["gateway.generating", "gateway.queued", "gpu0.memory_pct", "gpu0.utilization_pct"]
    for label in ("24 h", "7 d"):
        median, p95 = timed(partial(sample_history, db, WINDOWS[label], names, END), 20)
        verdict = "PASS" if p95 < 50 else "MISS"
        print(f"  sampled history over {label:5} (4 figures)   {median:8.1f} {p95:8.1f}   "
              f"{'':26}         < 50 ms {verdict}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--export-records", type=int, default=100_000)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--pg-records", type=int, default=None, help="records on PostgreSQL (default: --records)"
    )
    args = parser.parse_args()
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            db = Database(f"sqlite:///{tmp}/bench.db")
            migrate.upgrade(db)
            try:
                run("SQLite", db, args.records, args.export_records)
            finally:
                db.dispose()
    if args.skip_postgres:
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        db = Database(url.render_as_string(hide_password=False))
        migrate.upgrade(db)
        try:
            run("PostgreSQL", db, args.pg_records or args.records, args.export_records)
        finally:
            db.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
