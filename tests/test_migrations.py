"""Migrations and the database layer: blank to head and back, models and migrations agree, SQLite set-up."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from clawdbot import migrate
from clawdbot.audit import AuditStore
from clawdbot.chain import verify_chain
from clawdbot.db import SQLITE_BUSY_TIMEOUT_S, Database
from clawdbot.errors import DatabaseUnavailableError
from clawdbot.models import GENESIS_HASH, Base

MODEL_TABLES = set(Base.metadata.tables)


def _tables(db: Database) -> set[str]:
    return set(inspect(db.engine).get_table_names())


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
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_comparison_sees_a_drifted_schema(db: Database) -> None:
    """The empty diff above means something: an extra column, and on PostgreSQL a lost time zone, are seen."""
    statements = ["ALTER TABLE events ADD COLUMN extra TEXT"]
    if not db.is_sqlite:
        statements.append("ALTER TABLE requests ALTER COLUMN started_at TYPE timestamp without time zone")
    with db.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)

    flat = [d for entry in diff for d in (entry if isinstance(entry, list) else [entry])]
    found = {(d[0], d[2], d[3] if d[0] == "modify_type" else d[3].name) for d in flat}
    expected = {("remove_column", "events", "extra")}
    if not db.is_sqlite:
        expected.add(("modify_type", "requests", "started_at"))
    assert found == expected


def test_downgrade_to_base_then_upgrade_again(db: Database) -> None:
    store = AuditStore(db)
    store.record_event("alice", "sign_in")

    migrate.downgrade(db)

    assert _tables(db) <= {"alembic_version"}
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
