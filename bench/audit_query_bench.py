"""Benchmark of the audit explorer's queries over a large generated log, on SQLite and PostgreSQL.

    python bench/audit_query_bench.py [--records 1000000] [--skip-postgres] [--export-records 100000]

Generates `--records` finalized requests (mixed Chinese and English prompts and responses, 50 users, 10 agents,
spread over 30 days; bulk-inserted, not chained: the explorer's queries do not read the chain) and prints, with
the goals of issue 7: a filtered page of 50 (user + agent, newest first; goal < 50 ms), its total count
(< 200 ms), a full-text search page (Chinese and English words; < 200 ms at p95), a 24-hour aggregate by status,
and an XLSX export of `--export-records` records (time and peak resident memory growth, VmHWM after a reset).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from clawdbot import migrate
from clawdbot.audit_query import AuditExplorer, Sort
from clawdbot.db import Database
from clawdbot.export import export_records
from clawdbot.models import Request, Role
from clawdbot.records import AuditFilter
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


def generate(db: Database, records: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    span = 30 * 24 * 3600
    batch: list[dict[str, Any]] = []
    with db.engine.begin() as conn:
        for n in range(records):
            started = END - timedelta(seconds=span * (records - n) / records)
            agent = rng.randrange(10)
            batch.append(
                {
                    "started_at": started,
                    "finished_at": started + timedelta(seconds=2),
                    "status": rng.choice(STATUSES),
                    "user": f"user{rng.randrange(50):02d}",
                    "client_ip": f"10.0.{rng.randrange(4)}.{rng.randrange(250)}",
                    "agent": f"agent{agent}",
                    "agent_version": rng.randint(1, 3),
                    "model_requested": "qwen3:32b",
                    "model_used": "qwen3:32b" if rng.random() < 0.95 else "qwen3:8b",
                    "prompt": _text(rng, rng.randint(1, 4)),
                    "response": _text(rng, rng.randint(2, 8)),
                    "prompt_tokens": rng.randint(20, 4000),
                    "completion_tokens": rng.randint(5, 800),
                    "latency_ms": rng.uniform(200, 20000),
                    "truncated": rng.random() < 0.05,
                }
            )
            if len(batch) == 5000:
                conn.execute(insert(Request), batch)
                batch.clear()
        if batch:
            conn.execute(insert(Request), batch)
    if not db.is_sqlite:
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE requests"))
    else:
        with db.engine.begin() as conn:
            conn.execute(text("ANALYZE"))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--export-records", type=int, default=100_000)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
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
            run("PostgreSQL", db, args.records, args.export_records)
        finally:
            db.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
