"""The audit store and its hash chain, on SQLite and (when configured) PostgreSQL.

Requests are recorded before the model is called and finalized exactly once; records left `started` by a process
that died are swept as `abandoned`; finalized requests and events form one hash chain that concurrent writers in
threads and processes never fork or gap; `verify_chain` names the first record that raw-SQL tampering affected.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing import get_context
from typing import Any

import pytest
from sqlalchemy import func, select, text

from clawdbot.audit import AuditStore, process_owner
from clawdbot.chain import REQUEST_HASHED_FIELDS, VerifyResult, record_hash, verify_chain
from clawdbot.db import Database
from clawdbot.errors import AlreadyFinalizedError, NotFoundError, UsageError
from clawdbot.models import GENESIS_HASH, ChainHead, Event, Request

# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One record of the chain as stored."""

    kind: str
    id: int
    seq: int
    prev_hash: str
    hash: str


def _sql(db: Database, statement: str, **params: Any) -> None:
    """Run one raw SQL statement in its own transaction, as someone with database access would."""
    with db.engine.begin() as conn:
        conn.execute(text(statement), params)


def _sql_returning_id(db: Database, statement: str, **params: Any) -> int:
    with db.engine.begin() as conn:
        return int(conn.execute(text(statement), params).scalar_one())


def _links(db: Database) -> list[Link]:
    """Every chained record (requests and events), ordered by position."""
    with db.read() as session:
        rows = [
            Link("request", r.id, r.seq, r.prev_hash, r.hash)
            for r in session.execute(
                select(Request.id, Request.seq, Request.prev_hash, Request.hash).where(
                    Request.seq.is_not(None)
                )
            )
        ]
        rows += [
            Link("event", e.id, e.seq, e.prev_hash, e.hash)
            for e in session.execute(select(Event.id, Event.seq, Event.prev_hash, Event.hash))
        ]
    return sorted(rows, key=lambda link: link.seq)


def _head(db: Database) -> tuple[int, str]:
    with db.read() as session:
        head = session.execute(select(ChainHead.seq, ChainHead.hash).where(ChainHead.id == 1)).one()
    return int(head.seq), str(head.hash)


def _request_row(db: Database, request_id: int) -> dict[str, Any]:
    with db.read() as session:
        row = session.execute(select(Request.__table__).where(Request.id == request_id)).one()
    return dict(row._mapping)


def _assert_break(result: VerifyResult, kind: str, record_id: int | None, seq: int | None) -> None:
    assert result.ok is False
    assert result.first_break is not None
    found = (result.first_break.kind, result.first_break.id, result.first_break.seq)
    assert found == (kind, record_id, seq), result.first_break.describe()


def _finished(store: AuditStore, status: str = "ok", **fields: Any) -> int:
    request_id = store.start_request(user=fields.pop("user", "alice"), prompt=fields.pop("prompt", "hello"))
    store.finish_request(request_id, status, **fields)
    return request_id


def _build_chain(store: AuditStore) -> list[Link]:
    """R1 E1 R2 R3 E2 R4 E3 R5 at positions 1–8, with one request left `started` in between."""
    _finished(store, response="first answer", model_used="qwen3:8b", latency_ms=12.5)
    store.record_event("alice", "sign_in", target="alice", details={"ip": "10.0.0.1"})
    _finished(store, prompt="second", response="second answer", completion_tokens=7)
    store.start_request(user="bob", prompt="still running")
    _finished(store, "error", prompt="third", error="model unavailable")
    store.record_event("admin", "agent_update", target="helper", details={"model": "qwen3:8b", "version": 2})
    _finished(store, prompt="fourth", response="fourth answer", tokens_per_s=31.25)
    store.record_event("carol", "export", target="requests", details={"rows": 4})
    _finished(store, prompt="fifth", response="fifth answer")
    chain = _links(store.db)
    assert [(link.kind, link.seq) for link in chain] == [
        ("request", 1), ("event", 2), ("request", 3), ("request", 4),
        ("event", 5), ("request", 6), ("event", 7), ("request", 8),
    ]  # fmt: skip
    result = verify_chain(store.db)
    assert result.ok, result.first_break
    assert result.checked == 8
    return chain


REQUEST_COLUMNS = [c.name for c in Request.__table__.columns if c.name != "id"]


def _copy_request_sql(overrides: dict[str, str]) -> str:
    """INSERT … SELECT copying request :src, with some columns replaced by SQL expressions."""
    target = ", ".join(f'"{name}"' for name in REQUEST_COLUMNS)
    source = ", ".join(overrides.get(name, f'"{name}"') for name in REQUEST_COLUMNS)
    return f"INSERT INTO requests ({target}) SELECT {source} FROM requests WHERE id = :src RETURNING id"


def _forge_request_hash(db: Database, request_id: int) -> None:
    """Give a hand-inserted request the hash the audit store would have given it (the algorithm is public)."""
    columns = [getattr(Request, name) for name in REQUEST_HASHED_FIELDS]
    with db.read() as session:
        row = session.execute(
            select(*columns, Request.seq, Request.prev_hash).where(Request.id == request_id)
        ).one()
    digest = record_hash("request", row.seq, row.prev_hash, row._mapping)
    _sql(db, "UPDATE requests SET hash = :h WHERE id = :id", h=digest, id=request_id)


def _forge_event_hash(db: Database, event_id: int) -> None:
    with db.read() as session:
        row = session.execute(select(Event.__table__).where(Event.id == event_id)).one()
    digest = record_hash("event", row.seq, row.prev_hash, row._mapping)
    _sql(db, "UPDATE events SET hash = :h WHERE id = :id", h=digest, id=event_id)


def _set_seq(db: Database, link: Link, seq: int, prev_hash: str) -> None:
    table = "requests" if link.kind == "request" else "events"
    _sql(
        db,
        f"UPDATE {table} SET seq = :seq, prev_hash = :prev WHERE id = :id",
        seq=seq,
        prev=prev_hash,
        id=link.id,
    )


# ---------------------------------------------------------------------------------------------------------------
# Recording requests: started first, finalized exactly once
# ---------------------------------------------------------------------------------------------------------------


def test_request_is_recorded_as_started_before_it_is_finalized(store: AuditStore) -> None:
    request_id = store.start_request(user="alice", prompt="What is 2+2?", model_requested="qwen3:8b")

    row = _request_row(store.db, request_id)
    assert row["status"] == "started"
    assert row["prompt"] == "What is 2+2?"
    assert row["seq"] is None and row["prev_hash"] is None and row["hash"] is None
    assert row["finished_at"] is None
    assert row["owner"] == process_owner()
    assert row["started_at"].tzinfo is not None
    assert _head(store.db) == (0, GENESIS_HASH)

    digest = store.finish_request(request_id, "ok", response="4", completion_tokens=1, queue_ms=5)

    row = _request_row(store.db, request_id)
    assert row["status"] == "ok"
    assert row["response"] == "4"
    assert row["queue_ms"] == 5.0
    assert row["finished_at"] is not None and row["finished_at"] >= row["started_at"]
    assert (row["seq"], row["prev_hash"], row["hash"]) == (1, GENESIS_HASH, digest)
    assert digest == record_hash("request", 1, GENESIS_HASH, row)
    assert _head(store.db) == (1, digest)


def test_a_request_is_finalized_only_once(store: AuditStore) -> None:
    request_id = store.start_request(user="alice", prompt="hi")
    digest = store.finish_request(request_id, "ok", response="hello")
    before = _request_row(store.db, request_id)

    with pytest.raises(AlreadyFinalizedError):
        store.finish_request(request_id, "error", error="second try", response="changed")

    assert _request_row(store.db, request_id) == before
    assert _head(store.db) == (1, digest)
    assert verify_chain(store.db).ok


def test_finishing_an_unknown_request_raises_not_found_and_leaves_the_chain(store: AuditStore) -> None:
    _finished(store)
    head = _head(store.db)

    with pytest.raises(NotFoundError):
        store.finish_request(999_999, "ok")

    assert _head(store.db) == head
    assert verify_chain(store.db).ok


@pytest.mark.parametrize("status", ["started", "done", "", "OK"])
def test_finishing_with_a_non_final_status_is_refused(store: AuditStore, status: str) -> None:
    request_id = store.start_request(user="alice")

    with pytest.raises(UsageError) as excinfo:
        store.finish_request(request_id, status)

    assert not isinstance(excinfo.value, NotFoundError)
    row = _request_row(store.db, request_id)
    assert row["status"] == "started" and row["seq"] is None
    assert _head(store.db) == (0, GENESIS_HASH)
    # The record can still be finalized properly afterwards.
    store.finish_request(request_id, "cancelled")
    assert _request_row(store.db, request_id)["seq"] == 1


def test_unknown_request_fields_are_refused(store: AuditStore) -> None:
    with pytest.raises(UsageError, match="owner"):
        store.start_request(user="alice", owner="someone-else")
    request_id = store.start_request(user="alice")
    with pytest.raises(UsageError, match="seq"):
        store.finish_request(request_id, "ok", seq=42)
    assert _request_row(store.db, request_id)["status"] == "started"


# ---------------------------------------------------------------------------------------------------------------
# Abandoned records: swept at the next start-up, for real, with a child process that dies
# ---------------------------------------------------------------------------------------------------------------

# Starts three requests, prints their ids, then dies (SIGKILL), exits without finishing, or waits for stdin.
CHILD_STARTS_REQUESTS = """
import os, signal, sys
from clawdbot.audit import AuditStore
from clawdbot.db import Database
store = AuditStore(Database(sys.argv[1]))
ids = [store.start_request(user="ghost", prompt=f"lost {i}", model_requested="qwen3:8b") for i in range(3)]
print(" ".join(str(i) for i in ids), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
elif sys.argv[2] == "wait":
    sys.stdin.read()
"""


def _child(db: Database, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_STARTS_REQUESTS, db.url, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    ids = [int(i) for i in line.split()]
    assert len(ids) == 3, f"child printed {line!r}"
    return child, ids


def test_requests_of_a_dead_process_are_swept_as_abandoned(store: AuditStore) -> None:
    db = store.db
    _finished(store, response="before the crash")
    store.record_event("alice", "sign_in")
    mine = store.start_request(user="alice", prompt="served by this very process")

    child, ghost_ids = _child(db, "kill")
    assert child.wait(timeout=60) < 0  # killed by a signal, so nothing in it could clean up
    for request_id in ghost_ids:
        assert _request_row(db, request_id)["status"] == "started"

    assert store.sweep_abandoned() == 3

    for request_id in ghost_ids:
        row = _request_row(db, request_id)
        assert row["status"] == "abandoned"
        assert row["error"].strip() != ""
        assert row["finished_at"] is not None
        assert row["seq"] is not None and row["hash"] is not None
    assert sorted(_request_row(db, i)["seq"] for i in ghost_ids) == [3, 4, 5]
    # The current process's own record is alive and stays started, out of the chain.
    own = _request_row(db, mine)
    assert own["status"] == "started" and own["seq"] is None
    result = verify_chain(db)
    assert result.ok, result.first_break
    assert (result.checked, result.head_seq) == (5, 5)

    # A second start-up finds nothing more to sweep; the live record is finalized normally later.
    assert store.sweep_abandoned() == 0
    store.finish_request(mine, "ok", response="done")
    assert _request_row(db, mine)["seq"] == 6
    assert verify_chain(db).ok


def test_requests_of_a_live_process_are_not_swept_until_it_exits(store: AuditStore) -> None:
    db = store.db
    child, ghost_ids = _child(db, "wait")
    try:
        assert store.sweep_abandoned() == 0
        for request_id in ghost_ids:
            assert _request_row(db, request_id)["status"] == "started"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        # It exits normally, still without finishing its requests.
        assert child.wait(timeout=60) == 0

    assert store.sweep_abandoned() == 3
    assert {_request_row(db, i)["status"] for i in ghost_ids} == {"abandoned"}
    result = verify_chain(db)
    assert result.ok and result.checked == 3, result.first_break


# ---------------------------------------------------------------------------------------------------------------
# The chain on an intact database: no false breaks
# ---------------------------------------------------------------------------------------------------------------


def test_intact_chain_with_awkward_values_verifies(store: AuditStore) -> None:
    db = store.db
    ist = timezone(timedelta(hours=5, minutes=30))
    started = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=ist)
    context = json.dumps([{"role": "user", "content": "你好 🌍"}], ensure_ascii=False)

    r1 = store.start_request(
        user="王小明",
        prompt="请总结这份文件 📄🤖",
        context=context,
        started_at=started,
        agent="助手",
        conversation_id=None,
    )
    store.finish_request(
        r1,
        "ok",
        finished_at=started + timedelta(seconds=1, microseconds=1),
        response="好的 ✅ — 👍🏽 family: 👨‍👩‍👧",
        thinking="",
        queue_ms=5,
        ttft_ms=0,
        latency_ms=0.1 + 0.2,
        tokens_per_s=1e-300,
        prompt_tokens=None,
        completion_tokens=0,
        context_tokens_before=None,
        fallback_used=True,
        truncated=True,
        dropped_messages=3,
        agent_version=None,
    )
    r2 = store.start_request(user="nul", prompt="before\x00after", client_ip="127.0.0.1")
    store.finish_request(
        r2, "error", error="bad \x00 byte", response="\x00", tool_calls='[{"name": "x\x00"}]'
    )
    store.record_event(
        "王小明", "export", target="审计 📦", details={"filter": "用户=王", "nul": "a\x00b", "n": 1.5}
    )
    unfinished = store.start_request(user="bob", prompt="still streaming 🚰")
    r3 = store.start_request(user="utc-offsets", started_at=datetime(2026, 1, 1, tzinfo=UTC))
    store.finish_request(
        r3, "timeout", finished_at=datetime(2026, 1, 1, 0, 0, 30, tzinfo=timezone(timedelta(hours=-7)))
    )
    store.record_event("system", "startup")

    row1 = _request_row(db, r1)
    assert row1["prompt"] == "请总结这份文件 📄🤖"
    assert row1["started_at"] == started and row1["started_at"].tzinfo is not None
    assert row1["queue_ms"] == 5.0 and row1["prompt_tokens"] is None
    row2 = _request_row(db, r2)
    # NUL characters cannot be stored by PostgreSQL; both databases keep the same replacement character.
    assert row2["prompt"] == "before\ufffdafter"
    assert row2["error"] == "bad \ufffd byte"
    assert _request_row(db, unfinished)["status"] == "started"

    result = verify_chain(db)
    assert result.ok, result.first_break
    assert result.first_break is None
    assert result.checked == 5
    assert (result.head_seq, result.head_hash) == _head(db)
    assert result.head_hash == _links(db)[-1].hash


def test_each_hash_covers_the_record_and_the_previous_hash(store: AuditStore) -> None:
    chain = _build_chain(store)

    prev = GENESIS_HASH
    for link in chain:
        assert link.prev_hash == prev
        prev = link.hash
    assert _head(store.db) == (8, chain[-1].hash)
    assert len({link.hash for link in chain}) == len(chain)
    # The hash depends on the position and on the previous hash, not only on the content.
    row = _request_row(store.db, chain[0].id)
    assert record_hash("request", 1, GENESIS_HASH, row) == chain[0].hash
    assert record_hash("request", 2, GENESIS_HASH, row) != chain[0].hash
    assert record_hash("request", 1, "f" * 64, row) != chain[0].hash


def test_event_text_with_nul_is_stored_on_both_backends(store: AuditStore) -> None:
    """A sign-in attempt whose user name holds a NUL must still be recorded (PostgreSQL refuses NUL in text)."""
    event_id = store.record_event(
        "in\x00truder", "sign_in_failed", target="ad\x00min", details={"why": "x\x00"}
    )

    with store.db.read() as session:
        row = session.execute(select(Event.actor, Event.target).where(Event.id == event_id)).one()
    # The same replacement character as in request records, on both databases.
    assert (row.actor, row.target) == ("in\ufffdtruder", "ad\ufffdmin")
    result = verify_chain(store.db)
    assert result.ok and result.checked == 1, result.first_break


def test_verify_reports_no_break_while_writers_append(store: AuditStore) -> None:
    """Verification runs while the product serves requests; an intact chain must never look broken."""
    db = store.db
    _build_chain(store)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                _finished(store, prompt=f"during verification {i}")
                if i % 3 == 0:
                    store.record_event("writer", "tick", details={"i": i})
                i += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    breaks = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            result = verify_chain(db)
            if not result.ok:
                assert result.first_break is not None
                breaks.append(result.first_break.describe())
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    final = verify_chain(db)
    assert final.ok, final.first_break
    assert breaks == [], f"{len(breaks)} false break(s), first: {breaks[0]}"


# ---------------------------------------------------------------------------------------------------------------
# Tampering with raw SQL: verification names the first record affected
# ---------------------------------------------------------------------------------------------------------------


def test_edited_request_response_is_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    victim = chain[2]  # R2 at position 3
    _sql(store.db, "UPDATE requests SET response = :r WHERE id = :id", r="a nicer answer", id=victim.id)

    _assert_break(verify_chain(store.db), "request", victim.id, 3)


def test_edited_event_details_are_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    victim = chain[4]  # E2 at position 5
    _sql(
        store.db,
        "UPDATE events SET details = :d WHERE id = :id",
        d='{"model": "other", "version": 2}',
        id=victim.id,
    )

    result = verify_chain(store.db)
    _assert_break(result, "event", victim.id, 5)
    assert result.first_break is not None and "changed" in result.first_break.reason


def test_changed_request_status_is_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    victim = chain[3]  # R3 at position 4, status error
    assert _request_row(store.db, victim.id)["status"] == "error"
    _sql(store.db, "UPDATE requests SET status = 'ok', error = '' WHERE id = :id", id=victim.id)

    _assert_break(verify_chain(store.db), "request", victim.id, 4)


def test_deleted_middle_request_is_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    deleted = chain[3]  # R3 at position 4
    _sql(store.db, "DELETE FROM requests WHERE id = :id", id=deleted.id)

    result = verify_chain(store.db)
    following = chain[4]  # E2 at position 5 is now the first record out of place
    _assert_break(result, following.kind, following.id, 5)
    assert result.first_break is not None and "missing" in result.first_break.reason


def test_deleted_middle_event_is_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    deleted = chain[1]  # E1 at position 2
    _sql(store.db, "DELETE FROM events WHERE id = :id", id=deleted.id)

    following = chain[2]  # R2 at position 3
    _assert_break(verify_chain(store.db), following.kind, following.id, 3)


def test_deleted_last_record_disagrees_with_the_head(store: AuditStore) -> None:
    chain = _build_chain(store)
    _sql(store.db, "DELETE FROM requests WHERE id = :id", id=chain[-1].id)

    result = verify_chain(store.db)
    _assert_break(result, "chain head", None, 8)
    assert result.checked == 7


def test_deleted_last_event_disagrees_with_the_head(store: AuditStore) -> None:
    _build_chain(store)
    store.record_event("alice", "sign_out")  # the event at position 9 is now the last record
    _sql(store.db, "DELETE FROM events WHERE seq = 9")

    result = verify_chain(store.db)
    _assert_break(result, "chain head", None, 9)
    assert result.checked == 8


def test_inserted_finalized_request_without_position_is_found(store: AuditStore) -> None:
    chain = _build_chain(store)
    fake = _sql_returning_id(
        store.db,
        _copy_request_sql(
            {"response": "'an answer nobody gave'", "seq": "NULL", "prev_hash": "NULL", "hash": "NULL"}
        ),
        src=chain[2].id,
    )

    _assert_break(verify_chain(store.db), "request", fake, None)


def test_inserted_started_request_is_not_a_chain_member(store: AuditStore) -> None:
    """A `started` record without a position is a request in flight, not a break."""
    chain = _build_chain(store)
    _sql_returning_id(
        store.db,
        _copy_request_sql({"status": "'started'", "seq": "NULL", "prev_hash": "NULL", "hash": "NULL"}),
        src=chain[0].id,
    )
    result = verify_chain(store.db)
    assert result.ok and result.checked == 8, result.first_break


@pytest.mark.parametrize("forge_hash", [False, True], ids=["copied-hash", "recomputed-hash"])
def test_inserted_record_with_plausible_position_is_found(store: AuditStore, forge_hash: bool) -> None:
    """A fake event slipped in at position 4, later records shifted up by one, the head moved to match."""
    db = store.db
    chain = _build_chain(store)
    # Shift positions 4… up by one (via negative values: unique constraints are checked row by row).
    for table in ("requests", "events"):
        _sql(db, f"UPDATE {table} SET seq = -(seq + 1) WHERE seq >= 4")
        _sql(db, f"UPDATE {table} SET seq = -seq WHERE seq < 0")
    _sql(db, "UPDATE chain_head SET seq = seq + 1")
    fake = _sql_returning_id(
        db,
        "INSERT INTO events (at, actor, action, target, details, seq, prev_hash, hash) "
        "SELECT at, 'admin', 'export', 'requests', '{}', 4, :prev, :copied FROM events WHERE id = :src RETURNING id",
        prev=chain[2].hash,
        copied=chain[3].hash,
        src=chain[1].id,
    )
    if forge_hash:
        _forge_event_hash(db, fake)

    result = verify_chain(db)
    if forge_hash:
        # The fake is perfect in itself; the first record it affects is R3, whose link now points past it.
        _assert_break(result, "request", chain[3].id, 5)
        assert result.first_break is not None and "previous-hash" in result.first_break.reason
    else:
        _assert_break(result, "event", fake, 4)


def test_inserted_request_at_a_taken_position_names_the_fake(store: AuditStore) -> None:
    """A forged request is given position 5, which the genuine event E2 holds; the fake must be named, not E2."""
    db = store.db
    chain = _build_chain(store)
    fake = _sql_returning_id(
        db,
        _copy_request_sql({"response": "'a forged answer'", "seq": "5", "prev_hash": ":prev", "hash": "''"}),
        src=chain[3].id,
        prev=chain[3].hash,
    )
    _forge_request_hash(db, fake)

    _assert_break(verify_chain(db), "request", fake, 5)


def test_duplicate_position_is_reported_with_that_position(store: AuditStore) -> None:
    """A fake event given position 4, which the genuine request R3 holds: the event is named, at position 4."""
    db = store.db
    chain = _build_chain(store)
    fake = _sql_returning_id(
        db,
        "INSERT INTO events (at, actor, action, target, details, seq, prev_hash, hash) "
        "SELECT at, 'admin', 'export', 'requests', '{}', 4, :prev, '' FROM events WHERE id = :src RETURNING id",
        prev=chain[2].hash,
        src=chain[1].id,
    )
    _forge_event_hash(db, fake)

    result = verify_chain(db)
    _assert_break(result, "event", fake, 4)
    assert result.first_break is not None
    assert "position 4 is taken twice" in result.first_break.reason, result.first_break.reason


@pytest.mark.parametrize("pair", [(2, 5), (3, 4)], ids=["requests-3-and-6", "request-4-and-event-5"])
def test_reordered_records_are_found(store: AuditStore, pair: tuple[int, int]) -> None:
    """Two records swap positions (and previous-hash links) so that the sequence still looks complete."""
    db = store.db
    chain = _build_chain(store)
    first, second = chain[pair[0]], chain[pair[1]]
    _set_seq(db, first, -1, first.prev_hash)
    _set_seq(db, second, first.seq, first.prev_hash)
    _set_seq(db, first, second.seq, second.prev_hash)

    # The earlier position now holds `second`, linked correctly but hashed for another position.
    _assert_break(verify_chain(db), second.kind, second.id, first.seq)


def test_swapped_content_between_two_requests_is_found(store: AuditStore) -> None:
    db = store.db
    chain = _build_chain(store)
    a, b = chain[2], chain[5]  # R2 at position 3, R4 at position 6
    row_a, row_b = _request_row(db, a.id), _request_row(db, b.id)
    assert (row_a["prompt"], row_a["response"]) != (row_b["prompt"], row_b["response"])
    update = "UPDATE requests SET prompt = :p, response = :r WHERE id = :id"
    _sql(db, update, p=row_b["prompt"], r=row_b["response"], id=a.id)
    _sql(db, update, p=row_a["prompt"], r=row_a["response"], id=b.id)

    _assert_break(verify_chain(db), "request", a.id, 3)


@pytest.mark.parametrize(
    ("statement", "head_seq"),
    [
        ("UPDATE chain_head SET hash = '" + "f" * 64 + "'", 8),
        ("UPDATE chain_head SET seq = 9", 9),
        ("UPDATE chain_head SET seq = 7", 7),
    ],
    ids=["hash", "seq-ahead", "seq-behind"],
)
def test_edited_chain_head_is_found(store: AuditStore, statement: str, head_seq: int) -> None:
    _build_chain(store)
    _sql(store.db, statement)

    result = verify_chain(store.db)
    _assert_break(result, "chain head", None, head_seq)
    assert result.checked == 8


# ---------------------------------------------------------------------------------------------------------------
# Concurrency: threads and processes never fork or gap the chain
# ---------------------------------------------------------------------------------------------------------------

THREADS = 8
PROCESSES = 2
RECORDS_PER_WRITER = 500
EVENT_EVERY = 5  # one event after every fifth request


def _write_records(store: AuditStore, writer: str, count: int) -> list[str]:
    """Start and finish `count` requests, with an event after every EVENT_EVERY-th; returns the errors met."""
    errors = []
    for i in range(count):
        try:
            request_id = store.start_request(user=writer, prompt=f"{writer} #{i}", model_requested="m")
            store.finish_request(
                request_id, "ok", response=f"answer {i} for {writer}", queue_ms=i, latency_ms=1.5
            )
            if i % EVENT_EVERY == EVENT_EVERY - 1:
                store.record_event(writer, "tick", target=str(i), details={"i": i})
        except Exception as exc:
            errors.append(f"{writer} #{i}: {type(exc).__name__}: {exc}")
    return errors


def _process_writer(url: str, writer: str, count: int) -> list[str]:
    """Entry point of a spawned writer process: its own Database on the same URL."""
    db = Database(url)
    try:
        return _write_records(AuditStore(db), writer, count)
    finally:
        db.dispose()


def _wait_for_writers(db: Database, writers: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db.read() as session:
            present = set(
                session.execute(select(Request.user).where(Request.user.in_(writers)).distinct()).scalars()
            )
        if present == set(writers):
            return
        time.sleep(0.05)
    raise AssertionError(f"writer processes did not start writing within {timeout_s} s")


@pytest.fixture
def timed() -> Iterator[dict[str, float]]:
    timings: dict[str, float] = {}
    yield timings
    for name, seconds in timings.items():
        print(f"\n{name}: {seconds:.1f} s")


@pytest.mark.slow
def test_concurrent_threads_and_processes_keep_one_unbroken_chain(
    store: AuditStore, timed: dict[str, float]
) -> None:
    db = store.db
    process_names = [f"process-{p}" for p in range(PROCESSES)]
    thread_names = [f"thread-{t}" for t in range(THREADS)]
    thread_errors: dict[str, list[str]] = {}
    began = time.monotonic()

    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_process_writer, db.url, name, RECORDS_PER_WRITER) for name in process_names]
        # Let the processes get going so that they really write at the same time as the threads.
        _wait_for_writers(db, process_names, timeout_s=60)

        def run(name: str) -> None:
            thread_errors[name] = _write_records(store, name, RECORDS_PER_WRITER)

        threads = [threading.Thread(target=run, args=(name,)) for name in thread_names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        process_errors = {
            name: future.result(timeout=240) for name, future in zip(process_names, futures, strict=True)
        }
    timed["concurrent writers" + (" (SQLite)" if db.is_sqlite else " (PostgreSQL)")] = (
        time.monotonic() - began
    )

    all_errors = [e for errors in [*thread_errors.values(), *process_errors.values()] for e in errors]
    assert all_errors == [], f"{len(all_errors)} error(s), first: {all_errors[0]}"
    assert sorted(thread_errors) == thread_names

    writers = THREADS + PROCESSES
    events_per_writer = RECORDS_PER_WRITER // EVENT_EVERY
    with db.read() as session:
        per_user = {
            user: n for user, n in session.execute(select(Request.user, func.count()).group_by(Request.user))
        }
        statuses = set(session.execute(select(Request.status).distinct()).scalars())
        events_per_actor = {
            actor: n for actor, n in session.execute(select(Event.actor, func.count()).group_by(Event.actor))
        }
    assert per_user == {name: RECORDS_PER_WRITER for name in process_names + thread_names}
    assert statuses == {"ok"}
    assert events_per_actor == {name: events_per_writer for name in process_names + thread_names}

    total = writers * (RECORDS_PER_WRITER + events_per_writer)
    chain = _links(db)
    assert [link.seq for link in chain] == list(range(1, total + 1))
    prev = GENESIS_HASH
    for link in chain:
        assert link.prev_hash == prev, f"{link.kind} {link.id} at {link.seq} does not link to its predecessor"
        prev = link.hash
    assert _head(db) == (total, chain[-1].hash)
    result = verify_chain(db)
    assert result.ok, result.first_break
    assert (result.checked, result.head_seq) == (total, total)


def test_values_of_another_type_are_stored_as_hashed(store: AuditStore, db: Database) -> None:
    """Regression: the hash was computed on the values as given (1, 2.0, nan), not as the database keeps them."""
    request_id = store.start_request(user="bob", prompt="p")
    store.finish_request(
        request_id,
        "ok",
        fallback_used=1,
        retries=2.0,
        prompt_tokens=True,
        latency_ms=float("nan"),
        queue_ms=5,
    )
    assert verify_chain(db).ok
