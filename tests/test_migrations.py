"""Migrations and the database layer: blank to head and back, models and migrations agree, SQLite set-up."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import column, insert, inspect, table, text
from sqlalchemy.exc import IntegrityError

from clawdbot import migrate
from clawdbot.audit import AuditStore
from clawdbot.chain import REQUEST_HASHED_FIELDS, record_hash, stored_values_hash, verify_chain
from clawdbot.db import SQLITE_BUSY_TIMEOUT_S, Database
from clawdbot.errors import DatabaseUnavailableError
from clawdbot.models import GENESIS_HASH, Base, Request
from clawdbot.records import SEARCH_OBJECTS

MODEL_TABLES = set(Base.metadata.tables)


def _tables(db: Database) -> set[str]:
    """The tables, less the full-text search ones of migration 0004 (checked by `_search_tables`)."""
    return set(inspect(db.engine).get_table_names()) - SEARCH_OBJECTS


def _search_tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names()) & SEARCH_OBJECTS


def _not_search_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Leave out of the comparison only what migration 0004 made beside the models, found in the database
    under its exact name: FTS5 tables are no SQLAlchemy models, and the trigram indexes live on PostgreSQL only."""
    return not (reflected and compare_to is None and name in SEARCH_OBJECTS)


def _chain_head_rows(db: Database) -> list[tuple[int, int, str]]:
    with db.engine.connect() as conn:
        return [
            (int(r.id), int(r.seq), str(r.hash))
            for r in conn.execute(text("SELECT id, seq, hash FROM chain_head"))
        ]


def test_blank_database_upgrades_to_head(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.check()
        assert _tables(db) == set()
        assert migrate.current_revision(db) is None

        migrate.upgrade(db)

        head = migrate.head_revision(db)
        assert head is not None
        assert migrate.current_revision(db) == head
        assert _tables(db) == MODEL_TABLES | {"alembic_version"}
        fts_tables = {name for name in SEARCH_OBJECTS if name.startswith("requests_fts")}
        assert len(fts_tables) == 5
        assert _search_tables(db) == (fts_tables if db.is_sqlite else set())
        assert _chain_head_rows(db) == [(1, 0, GENESIS_HASH)]
        migrate.ensure_current(db)  # does not raise
        # Upgrading a database already at head changes nothing.
        migrate.upgrade(db)
        assert migrate.current_revision(db) == head
        assert _chain_head_rows(db) == [(1, 0, GENESIS_HASH)]
    finally:
        db.dispose()


def test_ensure_current_refuses_a_blank_database(db_url: str) -> None:
    db = Database(db_url)
    try:
        with pytest.raises(DatabaseUnavailableError, match="clawdbot db upgrade") as excinfo:
            migrate.ensure_current(db)
        assert "none" in str(excinfo.value)
        assert "\n" not in str(excinfo.value)
    finally:
        db.dispose()


def test_models_and_migrations_agree(db: Database) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": _not_search_object}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_comparison_sees_a_drifted_schema(db: Database) -> None:
    """The empty diff above means something: an extra column, and on PostgreSQL a lost time zone, are seen."""
    statements = [
        "ALTER TABLE events ADD COLUMN extra TEXT",
        "CREATE INDEX ix_requests_prompt_extra ON requests (status)",
    ]
    if not db.is_sqlite:
        statements.append("ALTER TABLE requests ALTER COLUMN started_at TYPE timestamp without time zone")
    with db.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))

    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": _not_search_object}
        )
        diff = compare_metadata(context, Base.metadata)

    flat = [d for entry in diff for d in (entry if isinstance(entry, list) else [entry])]
    found = {
        (d[0], d[1].table.name, d[1].name)
        if d[0] == "remove_index"
        else (d[0], d[2], d[3] if d[0] == "modify_type" else d[3].name)
        for d in flat
    }
    expected = {
        ("remove_column", "events", "extra"),
        ("remove_index", "requests", "ix_requests_prompt_extra"),
    }
    if not db.is_sqlite:
        expected.add(("modify_type", "requests", "started_at"))
    assert found == expected


def test_downgrade_to_base_then_upgrade_again(db: Database) -> None:
    store = AuditStore(db)
    store.record_event("alice", "sign_in")

    migrate.downgrade(db)

    assert _tables(db) <= {"alembic_version"}
    assert _search_tables(db) == set()
    assert migrate.current_revision(db) is None
    with pytest.raises(DatabaseUnavailableError, match="clawdbot db upgrade"):
        migrate.ensure_current(db)

    migrate.upgrade(db)

    assert migrate.current_revision(db) == migrate.head_revision(db)
    assert _tables(db) == MODEL_TABLES | {"alembic_version"}
    assert _chain_head_rows(db) == [(1, 0, GENESIS_HASH)]
    # The fresh chain starts again at position 1.
    store.record_event("alice", "sign_in")
    result = verify_chain(db)
    assert result.ok and (result.checked, result.head_seq) == (1, 1), result.first_break


# ---------------------------------------------------------------------------------------------------------------
# 0002 adds requests.server_truncated: chains written before it still verify, and the flag is hashed when set
# ---------------------------------------------------------------------------------------------------------------

# A finalized request as the audit store kept it at revision 0001, at chain position 1, and the hash that the code
# of that revision gave it (computed with clawdbot/chain.py of commit 753c32d, before server_truncated existed).
RECORD_0001: dict[str, Any] = {
    "id": 1,
    "started_at": datetime(2026, 11, 22, 9, 30, 0, 123456, tzinfo=UTC),
    "finished_at": datetime(2026, 11, 22, 9, 30, 2, 500000, tzinfo=UTC),
    "status": "ok", "error": "", "user": "张伟", "client_ip": "10.0.0.7", "conversation_id": 42,
    "agent": "助手", "agent_version": 3, "backend": "ollama", "model_requested": "qwen3:32b",
    "model_used": "qwen3:32b", "fallback_used": False, "retries": 1, "prompt": "请总结 the report 🚀",
    "context": '[{"role": "user", "content": "请总结 the report 🚀"}]', "response": "好的 — done",
    "thinking": "", "tool_calls": "[]", "attachments": "[]", "prompt_tokens": 812, "prompt_eval_count": 2400,
    "completion_tokens": 120, "context_tokens_before": 900, "context_tokens_after": 812, "truncated": True,
    "dropped_messages": 3, "queue_ms": 0.25, "ttft_ms": 153.5, "latency_ms": 2345.678901, "tokens_per_s": None,
    "agent_version_id": None,
}  # fmt: skip
HASH_0001 = "a24aaf67fb41109e0a7601c7cd32a0d200ea9ce4a5012ff08ae9840a71fe139c"


def test_a_record_not_server_truncated_hashes_as_before_the_column_existed() -> None:
    assert REQUEST_HASHED_FIELDS[-1] == "server_truncated"
    assert set(RECORD_0001) == set(REQUEST_HASHED_FIELDS) - {"server_truncated"}
    # As SQLAlchemy reads it (false, or absent as in a row of 0001), and as the drivers return it (SQLite's 0).
    assert record_hash("request", 1, GENESIS_HASH, RECORD_0001) == HASH_0001
    assert record_hash("request", 1, GENESIS_HASH, {**RECORD_0001, "server_truncated": False}) == HASH_0001
    for stored_false in (False, 0):
        values = [{**RECORD_0001, "server_truncated": stored_false}[name] for name in REQUEST_HASHED_FIELDS]
        assert stored_values_hash("request", 1, GENESIS_HASH, values) == HASH_0001
    # Set, it is covered: true (PostgreSQL) and 1 (SQLite) give one hash, another than false's.
    flagged = {**RECORD_0001, "server_truncated": True}
    digest = record_hash("request", 1, GENESIS_HASH, flagged)
    assert digest != HASH_0001
    values = [{**flagged, "server_truncated": 1}[name] for name in REQUEST_HASHED_FIELDS]
    assert stored_values_hash("request", 1, GENESIS_HASH, values) == digest
    # A value of another kind hand-written into the column (SQLite keeps anything) is not taken for false.
    for odd in (2, "0", b"0", None):
        values = [{**RECORD_0001, "server_truncated": odd}[name] for name in REQUEST_HASHED_FIELDS]
        assert stored_values_hash("request", 1, GENESIS_HASH, values) not in (HASH_0001, digest), odd


def _server_truncated(db: Database) -> dict[int, bool]:
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, server_truncated FROM requests ORDER BY id")).all()
    return {int(row[0]): bool(row[1]) for row in rows}


def test_a_chain_written_at_0001_verifies_after_the_upgrade_and_the_flag_is_hashed(db_url: str) -> None:
    db = Database(db_url)
    try:
        migrate.upgrade(db, "0001")
        columns = [*(n for n in RECORD_0001 if n != "id"), "owner", "seq", "prev_hash", "hash"]
        requests_0001 = table("requests", *(column(n, Request.__table__.c[n].type) for n in columns))
        values = {**RECORD_0001, "owner": "", "seq": 1, "prev_hash": GENESIS_HASH, "hash": HASH_0001}
        with db.engine.begin() as conn:
            assert "server_truncated" not in {c["name"] for c in inspect(conn).get_columns("requests")}
            values.pop("id")
            new_id = int(
                conn.execute(insert(requests_0001).values(values).returning(column("id"))).scalar_one()
            )
            assert new_id == RECORD_0001["id"]
            conn.execute(text("UPDATE chain_head SET seq = 1, hash = :h WHERE id = 1"), {"h": HASH_0001})

        migrate.upgrade(db)

        assert _server_truncated(db) == {1: False}  # the server default
        result = verify_chain(db)
        assert result.ok and (result.checked, result.head_hash) == (1, HASH_0001), result.first_break

        # New records go on the same chain, with the flag set or not.
        store = AuditStore(db)
        flagged = store.start_request(user="bob", prompt="long")
        store.finish_request(flagged, "ok", server_truncated=True, prompt_eval_count=8000)
        plain = store.start_request(user="bob", prompt="short")
        store.finish_request(plain, "ok", prompt_eval_count=10)
        assert _server_truncated(db) == {1: False, flagged: True, plain: False}
        result = verify_chain(db)
        assert result.ok and result.checked == 3, result.first_break

        # Setting the flag on a record after the fact, or clearing it, is tampering like any other edit.
        for request_id, seq, edited in ((1, 1, True), (flagged, 2, False), (plain, 3, True)):
            with db.engine.begin() as conn:
                conn.execute(
                    text("UPDATE requests SET server_truncated = :v WHERE id = :id"),
                    {"v": edited, "id": request_id},
                )
            result = verify_chain(db)
            assert not result.ok and result.first_break is not None
            assert (result.first_break.kind, result.first_break.id, result.first_break.seq) == (
                "request",
                request_id,
                seq,
            )
            assert "content was changed" in result.first_break.reason
            with db.engine.begin() as conn:
                conn.execute(
                    text("UPDATE requests SET server_truncated = :v WHERE id = :id"),
                    {"v": not edited, "id": request_id},
                )
            assert verify_chain(db).ok
    finally:
        db.dispose()


def test_downgrading_0002_keeps_the_requests_and_their_links(db: Database) -> None:
    """0002 alters `requests` in place: no copy, which on SQLite would null the messages' links to it."""
    store = AuditStore(db)
    request_id = store.start_request(user="alice", prompt="hi")
    store.finish_request(request_id, "ok", response="hello")
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (name, roles, password_hash, disabled, must_change_password, created_at, "
                "password_changed_at) VALUES ('alice', 'staff', 'x', false, false, :t, :t)"
            ),
            {"t": datetime(2026, 11, 22, tzinfo=UTC)},
        )
        conn.execute(
            text("INSERT INTO agents (name, archived, created_at) VALUES ('helper', false, :t)"),
            {"t": datetime(2026, 11, 22, tzinfo=UTC)},
        )
        conn.execute(
            text(
                "INSERT INTO conversations (user_id, agent_id, title, created_at, updated_at) "
                "SELECT u.id, a.id, '', :t, :t FROM users u, agents a"
            ),
            {"t": datetime(2026, 11, 22, tzinfo=UTC)},
        )
        conn.execute(
            text(
                "INSERT INTO messages (conversation_id, role, content, thinking, tool_calls, request_id, "
                "created_at) SELECT id, 'assistant', 'hello', '', '[]', :r, :t FROM conversations"
            ),
            {"r": request_id, "t": datetime(2026, 11, 22, tzinfo=UTC)},
        )

    migrate.downgrade(db, "0001")

    assert "server_truncated" not in {c["name"] for c in inspect(db.engine).get_columns("requests")}
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT request_id FROM messages")).scalar_one() == request_id
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == 1
    migrate.upgrade(db)
    assert _server_truncated(db) == {request_id: False}
    result = verify_chain(db)
    assert result.ok and result.checked == 1, result.first_break


def test_check_on_unreachable_postgresql_is_one_line_without_password() -> None:
    password = "S3cret-Pa55w0rd"
    db = Database(f"postgresql+psycopg://clawdbot:{password}@127.0.0.1:1/clawdbot")
    try:
        with pytest.raises(DatabaseUnavailableError) as excinfo:
            db.check()
        message = str(excinfo.value)
        assert "\n" not in message and "\r" not in message
        assert password not in message
        assert "clawdbot:***@127.0.0.1:1/clawdbot" in message
        assert message.startswith("cannot reach the database")
        # Migrating checks the connection first and fails the same way.
        with pytest.raises(DatabaseUnavailableError) as excinfo:
            migrate.upgrade(db)
        assert password not in str(excinfo.value) and "\n" not in str(excinfo.value)
    finally:
        db.dispose()


# ---------------------------------------------------------------------------------------------------------------
# SQLite: WAL, foreign keys, busy timeout, and write transactions that take the lock when they begin
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'data' / 'clawdbot.db'}")
    migrate.upgrade(db)
    yield db
    db.dispose()


def test_sqlite_pragmas_are_on_for_every_connection(sqlite_db: Database) -> None:
    # Two connections open at once, so both come from the pool's connect hook rather than one reused.
    with sqlite_db.engine.connect() as first, sqlite_db.engine.connect() as second:
        for conn in (first, second):
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_S * 1000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert SQLITE_BUSY_TIMEOUT_S >= 5


def test_sqlite_enforces_foreign_keys(sqlite_db: Database) -> None:
    with pytest.raises(IntegrityError, match="FOREIGN KEY"), sqlite_db.write_connection() as conn:
        conn.execute(
            text(
                "INSERT INTO messages (conversation_id, role, content, thinking, tool_calls, created_at) "
                "VALUES (424242, 'user', '', '', '[]', '2026-01-01 00:00:00.000000')"
            )
        )


def test_sqlite_write_transaction_takes_the_lock_when_it_begins(sqlite_db: Database) -> None:
    path = sqlite_db.engine.url.database
    assert path is not None
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with sqlite_db.write_connection():
            # Nothing written yet, and still another writer cannot begin: BEGIN IMMEDIATE holds the lock.
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                other.execute("BEGIN IMMEDIATE")
            # Readers are not blocked by the writer (WAL).
            with sqlite_db.read() as session:
                assert session.execute(text("SELECT seq FROM chain_head")).scalar_one() == 0
        # Once the write transaction ends, the lock is free.
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        # A read transaction takes no write lock.
        with sqlite_db.read() as session:
            session.execute(text("SELECT 1 FROM chain_head")).scalar_one()
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
