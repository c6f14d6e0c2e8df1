"""Benchmark of the audit store: chained writes, chain verification and large exports, on SQLite and PostgreSQL.

    python bench/audit_bench.py [--records N] [--export-records N] [--skip-postgres] [--profile]

Every figure is printed next to a baseline measured in the same process on the same database, so the ratio shows
what the audit machinery costs rather than how fast this machine happens to be:

- writes: finalized records per second through `AuditStore` (start_request + finish_request, two transactions
  and the chain-head lock), against plain INSERTs of the same finished rows with no chain, one transaction each,
  built by SQLAlchemy (`insert(Request).values(...)`) as ordinary code would; the audit store runs prepared SQL on
  the driver instead, so it can beat this baseline (ratio above 1);
- verification: records per second through `verify_chain`, against reading the same rows in the same order
  through SQLAlchemy; `verify_chain` reads through the driver, so here too the ratio can exceed 1;
- export: time and peak memory of exporting `--export-records` rows to XLSX, CSV and JSONL, each in a child
  process that reports how far its resident set grew during the export: the kernel's high-water mark (VmHWM in
  /proc/self/status) is reset just before the export and read after it. (getrusage's ru_maxrss would not do: a
  child inherits the high-water mark of the parent it was forked from, so it starts at the parent's size.)
  A tenth of the rows is exported to XLSX too, to show that memory does not grow with the row count.

The export rows are bulk-inserted (not chained: the export reads every row, chained or not). PostgreSQL runs in a
schema of its own, created and dropped here, like the test suite does.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from report import log, markdown_table, verdict
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from clawdbot import migrate
from clawdbot.audit import AuditStore, process_owner, to_json
from clawdbot.chain import EVENT_HASHED_FIELDS, REQUEST_HASHED_FIELDS, verify_chain
from clawdbot.db import Database
from clawdbot.models import Event, Request

PG_URL = os.environ.get("CLAWDBOT_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
WRITE_GOAL = 2_000.0  # finalized records/s on SQLite
VERIFY_GOAL = 25_000.0  # records/s
XLSX_MEMORY_GOAL_MB = 100.0  # peak RSS increase of a 100,000-record XLSX export

# --- realistic content ---------------------------------------------------------------------------------------

_ZH = "审计日志记录每一次请求的提示、上下文和回复，以便事后核查。模型可能会调用工具并引用附件中的内容。"
_EN = (
    "The audit log keeps every prompt, context and response so that auditors can check them later; "
    "the model may call tools and quote the attachments. "
)


def mixed_text(length: int, seed: int) -> str:
    """About `length` characters alternating Chinese and English sentences, varied by `seed`."""
    parts: list[str] = [f"[{seed}] "]
    size, n = len(parts[0]), seed
    while size < length:
        piece = _ZH if n % 2 else _EN
        piece = piece[n % 7 :] + piece[: n % 7]
        parts.append(piece)
        size += len(piece)
        n += 1
    return "".join(parts)[:length]


def context_json(target: int, seed: int) -> str:
    """A chat history as JSON text of about `target` characters."""
    messages: list[dict[str, str]] = [{"role": "system", "content": mixed_text(300, seed)}]
    n = seed
    while len(to_json(messages)) < target:
        role = "user" if n % 2 else "assistant"
        messages.append({"role": role, "content": mixed_text(350 + 40 * (n % 5), n)})
        n += 1
    return to_json(messages)


@dataclass(frozen=True)
class Content:
    start: dict[str, Any]
    finish: dict[str, Any]


def make_contents(variants: int = 16) -> list[Content]:
    contents = []
    for v in range(variants):
        start: dict[str, Any] = {
            "user": f"user{v % 8}",
            "client_ip": f"10.0.{v}.{v * 7 % 250}",
            "conversation_id": 1000 + v,
            "agent": ("助手", "writer", "analyst")[v % 3],
            "agent_version": 1 + v % 4,
            "backend": "ollama",
            "model_requested": "qwen3:32b",
            "prompt": mixed_text(500, v),
            "context": context_json(4096, v),
            "attachments": to_json([{"name": f"报告{v}.pdf", "sha256": f"{v:02x}" * 32, "pages": 3 + v}]),
            "context_tokens_before": 2100 + v,
            "context_tokens_after": 1900 + v,
        }
        finish: dict[str, Any] = {
            "model_used": "qwen3:32b",
            "fallback_used": v % 5 == 0,
            "retries": v % 3,
            "response": mixed_text(1500, v + 100),
            "thinking": mixed_text(300, v + 200),
            "tool_calls": to_json([{"function": {"name": "search", "arguments": {"q": mixed_text(20, v)}}}]),
            "prompt_tokens": 1900 + v,
            "prompt_eval_count": 1500 + v,
            "completion_tokens": 400 + v,
            "truncated": v % 4 == 0,
            "dropped_messages": v % 4,
            "queue_ms": 0.5 * v,
            "ttft_ms": 150.0 + v,
            "latency_ms": 4200.0 + 13 * v,
            "tokens_per_s": 48.5 + v / 10,
        }
        contents.append(Content(start, finish))
    return contents


def full_row(content: Content, i: int, at: datetime) -> dict[str, Any]:
    """The finished request as one row, as the baseline and the export data insert it (no chain)."""
    return {
        **content.start,
        **content.finish,
        "prompt": f"#{i} " + content.start["prompt"],
        "started_at": at,
        "finished_at": at + timedelta(seconds=4),
        "status": "ok",
        "owner": process_owner(),
    }


# --- databases -----------------------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    cleanup: Callable[[], None]


def sqlite_backend(workdir: Path, label: str) -> Backend:
    path = workdir / f"{label}.db"
    return Backend("SQLite", f"sqlite:///{path}", lambda: None)


def postgres_backend(label: str) -> Backend:
    schema = f"bench_{label}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return Backend("PostgreSQL", url.render_as_string(hide_password=False), drop)


def open_db(url: str) -> Database:
    db = Database(url)
    migrate.upgrade(db)
    return db


# --- measurements --------------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    measure: str
    result: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def store_records(store: AuditStore, contents: list[Content], first: int, count: int, base: datetime) -> None:
    for i in range(first, first + count):
        content = contents[i % len(contents)]
        start = {**content.start, "prompt": f"#{i} " + content.start["prompt"]}
        request_id = store.start_request(**start, started_at=base + timedelta(milliseconds=i))
        store.finish_request(request_id, "ok", **content.finish)


def time_store_single(db: Database, contents: list[Content], count: int) -> float:
    store = AuditStore(db)
    store_records(store, contents, 0, min(20, count), datetime.now(UTC))  # warm-up: connections, statements
    started = time.perf_counter()
    store_records(store, contents, 100_000, count, datetime.now(UTC))
    return rate(count, time.perf_counter() - started)


def time_store_threads(db: Database, contents: list[Content], count: int, threads: int) -> float:
    store = AuditStore(db)
    per_thread = count // threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    base = datetime.now(UTC)

    def work(n: int) -> None:
        barrier.wait()
        try:
            store_records(store, contents, 200_000 + n * per_thread, per_thread, base)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return rate(per_thread * threads, elapsed)


def time_plain_inserts(db: Database, contents: list[Content], count: int) -> float:
    """The same finished rows as single INSERTs, one write transaction each, no chain."""
    base = datetime.now(UTC)
    rows = [full_row(contents[i % len(contents)], i, base + timedelta(milliseconds=i)) for i in range(count)]
    for row in rows[:20]:  # warm-up
        with db.write_connection() as conn:
            conn.execute(insert(Request).values(**row))
    started = time.perf_counter()
    for row in rows:
        with db.write_connection() as conn:
            conn.execute(insert(Request).values(**row))
    return rate(count, time.perf_counter() - started)


def read_chain_rows(db: Database, batch: int = 5000) -> int:
    """What verify_chain reads, in its order, without hashing: the baseline of the verification."""

    def rows(conn: Any, model: Any, fields: tuple[str, ...]) -> Iterator[tuple[int, Any]]:
        columns = [getattr(model, f) for f in fields] + [model.seq, model.prev_hash, model.hash]
        query = select(*columns).where(model.seq.is_not(None)).order_by(model.seq)
        for row in conn.execution_options(yield_per=batch).execute(query):
            yield row.seq, row

    count = 0
    with db.engine.connect() as conn:
        merged = heapq.merge(
            rows(conn, Request, REQUEST_HASHED_FIELDS),
            rows(conn, Event, EVENT_HASHED_FIELDS),
            key=lambda item: item[0],
        )
        for _seq, row in merged:
            _ = row._mapping["hash"]
            count += 1
    return count


def best_of(runs: int, func: Callable[[], int]) -> tuple[int, float]:
    """The count and the shortest time of `runs` calls."""
    best, count = float("inf"), 0
    for _ in range(runs):
        started = time.perf_counter()
        count = func()
        best = min(best, time.perf_counter() - started)
    return count, best


EXPORT_BASE = datetime(2026, 1, 1, tzinfo=UTC)  # the bulk rows start one second apart from here


def bulk_insert(db: Database, contents: list[Content], count: int, batch: int = 1000) -> float:
    """Insert `count` finished rows (not chained) in large batches; returns the seconds taken."""
    base = EXPORT_BASE
    started = time.perf_counter()
    for first in range(0, count, batch):
        rows = [
            full_row(contents[i % len(contents)], i, base + timedelta(seconds=i))
            for i in range(first, min(first + batch, count))
        ]
        with db.write_connection() as conn:
            conn.execute(insert(Request), rows)
    return time.perf_counter() - started


def export_in_child(url: str, fmt: str, out: Path, first: int) -> dict[str, Any]:
    """Export the first `first` bulk rows to `out` in a fresh process; returns what it measured."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child-export", url, fmt, str(out), str(first)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"export child failed: {result.stderr.strip()}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Start the kernel's high-water mark of this process's resident set afresh (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def child_export(url: str, fmt: str, out: str, first: str) -> None:
    """Run one export and print its time and memory as JSON (this process is the child)."""
    import openpyxl  # noqa: F401 - loaded before the measurement: its import is not the export's memory

    from clawdbot.export import export_records
    from clawdbot.records import AuditFilter

    db = Database(url)
    db.check()
    audit_filter = AuditFilter(until=EXPORT_BASE + timedelta(seconds=int(first)))
    _reset_peak_rss()
    before_kb = _proc_status_kb("VmRSS")
    started = time.perf_counter()
    rows = export_records(db, Path(out), fmt, actor="bench", audit_filter=audit_filter)
    seconds = time.perf_counter() - started
    peak_kb = _proc_status_kb("VmHWM")
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": seconds,
                "rss_before_mb": before_kb / 1024,
                "rss_peak_mb": peak_kb / 1024,
                "bytes": Path(out).stat().st_size,
            }
        )
    )


def profile_store(db: Database, contents: list[Content], count: int) -> str:
    store = AuditStore(db)
    profiler = cProfile.Profile()
    profiler.enable()
    store_records(store, contents, 500_000, count, datetime.now(UTC))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def profile_verify(db: Database) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    verify_chain(db)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


# --- one backend ---------------------------------------------------------------------------------------------


def meets(value: float, goal: float, higher_is_better: bool = True) -> str:
    return verdict(value >= goal if higher_is_better else value <= goal)


def bench_backend(
    make: Callable[[str], Backend], args: argparse.Namespace, contents: list[Content], workdir: Path
) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    profiles: list[str] = []
    chain_backend, plain_backend, export_backend = make("chain"), make("plain"), make("export")
    name = chain_backend.name
    is_sqlite = name == "SQLite"
    try:
        log(f"{name}: writes through the audit store ({args.records} records, 1 and {args.threads} threads)")
        chain_db, plain_db = open_db(chain_backend.url), open_db(plain_backend.url)
        single = time_store_single(chain_db, contents, args.records)
        threaded = time_store_threads(chain_db, contents, args.records, args.threads)
        plain = time_plain_inserts(plain_db, contents, args.records)
        write_goal = f">= {WRITE_GOAL:,.0f}/s" if is_sqlite else ""
        for label, value in (("1 thread", single), (f"{args.threads} threads", threaded)):
            rows.append(
                Row(
                    name,
                    f"chained writes, {label} (records/s)",
                    f"{value:,.0f}",
                    f"{plain:,.0f}",
                    f"{value / plain:.2f}",
                    write_goal,
                    meets(value, WRITE_GOAL) if is_sqlite else "",
                )
            )

        log(f"{name}: verifying the chain")
        result = verify_chain(chain_db)
        if not result.ok:
            raise RuntimeError(f"the benchmark's chain does not verify: {result.first_break}")
        checked, verify_s = best_of(3, lambda: verify_chain(chain_db).checked)
        read, read_s = best_of(3, lambda: read_chain_rows(chain_db))
        assert read == checked, (read, checked)
        verify_rate, read_rate = rate(checked, verify_s), rate(read, read_s)
        rows.append(
            Row(
                name,
                f"verify_chain, {checked:,} records (records/s)",
                f"{verify_rate:,.0f}",
                f"{read_rate:,.0f}",
                f"{verify_rate / read_rate:.2f}",
                f">= {VERIFY_GOAL:,.0f}/s",
                meets(verify_rate, VERIFY_GOAL),
            )
        )
        if args.profile:
            profiles.append(f"== {name}: cProfile of {min(args.records, 500)} chained writes ==\n")
            profiles.append(profile_store(chain_db, contents, min(args.records, 500)))
            profiles.append(f"== {name}: cProfile of verify_chain ==\n")
            profiles.append(profile_verify(chain_db))
        chain_db.dispose()
        plain_db.dispose()

        if args.export_records:
            n = args.export_records
            log(f"{name}: bulk-inserting {n:,} records for the export")
            export_db = open_db(export_backend.url)
            insert_s = bulk_insert(export_db, contents, n)
            log(f"{name}: inserted in {insert_s:.1f} s; exporting")
            export_db.dispose()
            runs = [("csv", n), ("jsonl", n), ("xlsx", n), ("xlsx", max(1, n // 10))]
            results: dict[tuple[str, int], dict[str, Any]] = {}
            for fmt, count in runs:
                out = workdir / f"{name}.{fmt}"
                data = export_in_child(export_backend.url, fmt, out, count)
                out.unlink()
                if data["rows"] != count:
                    raise RuntimeError(f"{fmt} export wrote {data['rows']} rows, not {count}")
                results[fmt, count] = data
                log(
                    f"  {fmt}, {count:,} rows: {data['seconds']:.1f} s, {data['bytes'] / 1e6:.0f} MB file, "
                    f"RSS {data['rss_before_mb']:.0f} -> peak {data['rss_peak_mb']:.0f} MB"
                )
            csv_run, small_xlsx = results["csv", n], results["xlsx", max(1, n // 10)]
            for (fmt, count), data in results.items():
                grown = data["rss_peak_mb"] - data["rss_before_mb"]
                if count == n:
                    rows.append(
                        Row(
                            name,
                            f"export {count:,} to {fmt}: seconds",
                            f"{data['seconds']:.1f}",
                            f"{csv_run['seconds']:.1f} (csv)",
                            f"{data['seconds'] / csv_run['seconds']:.2f}",
                        )
                    )
                is_goal = fmt == "xlsx" and count == n
                small_grown = small_xlsx["rss_peak_mb"] - small_xlsx["rss_before_mb"]
                rows.append(
                    Row(
                        name,
                        f"export {count:,} to {fmt}: peak RSS growth (MB)",
                        f"{grown:.0f}",
                        f"{small_grown:.0f} ({small_xlsx['rows']:,} to xlsx)" if is_goal else "",
                        f"{grown / small_grown:.2f}" if is_goal and small_grown > 0 else "",
                        f"<= {XLSX_MEMORY_GOAL_MB:.0f} MB" if is_goal else "",
                        meets(grown, XLSX_MEMORY_GOAL_MB, higher_is_better=False) if is_goal else "",
                    )
                )
    finally:
        for backend in (chain_backend, plain_backend, export_backend):
            backend.cleanup()
    return rows, profiles


# --- output --------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    header = ("Backend", "Measure", "Result", "Baseline", "Ratio", "Goal", "")
    cells = [(r.backend, r.measure, r.result, r.baseline, r.ratio, r.goal, r.verdict) for r in rows]
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=2_000, help="records written per write measurement")
    parser.add_argument("--threads", type=int, default=4, help="writer threads for the concurrent run")
    parser.add_argument(
        "--export-records", type=int, default=100_000, help="records exported (0 skips the export)"
    )
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--postgres-export-records",
        type=int,
        default=None,
        help="records exported on PostgreSQL (default: as --export-records)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile of the writes and verification"
    )
    parser.add_argument(
        "--child-export", nargs=4, metavar=("URL", "FORMAT", "PATH", "ROWS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child_export:
        child_export(*args.child_export)
        return 0

    contents = make_contents()
    sizes = contents[0]
    log(
        f"record content: prompt {len(sizes.start['prompt'])} chars, context {len(sizes.start['context'])} "
        f"chars, response {len(sizes.finish['response'])} chars"
    )
    started = time.perf_counter()
    rows: list[Row] = []
    profiles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="clawdbot-bench-") as tmp:
        workdir = Path(tmp)
        got, prof = bench_backend(lambda label: sqlite_backend(workdir, label), args, contents, workdir)
        rows += got
        profiles += prof
        if not args.skip_postgres:
            pg_args = argparse.Namespace(**vars(args))
            if args.postgres_export_records is not None:
                pg_args.export_records = args.postgres_export_records
            got, prof = bench_backend(postgres_backend, pg_args, contents, workdir)
            rows += got
            profiles += prof
    print(table(rows))
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"{time.perf_counter() - started:.0f} s in all. Baselines: plain INSERT of the same rows (one transaction "
        "each, no chain, through SQLAlchemy) for writes; reading the same rows in chain order through SQLAlchemy "
        "for verify_chain; the CSV export for export times; a tenth of the rows for XLSX memory. Peak RSS growth: "
        "the exporting child's VmHWM (reset just before the export) minus its VmRSS when the export began."
    )
    for text_block in profiles:
        print(text_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
