"""Fixtures shared by the suite: a fresh, migrated database per test on SQLite and, when configured, PostgreSQL.

PostgreSQL tests each get a schema of their own (through `search_path`), so they run in parallel without
seeing each other. With CI=true the PostgreSQL leg is mandatory: a missing server fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clawdbot import migrate
from clawdbot.audit import AuditStore
from clawdbot.db import Database

PG_URL = os.environ.get("CLAWDBOT_TEST_DATABASE_URL", "")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


def pytest_sessionstart(session: pytest.Session) -> None:
    if IN_CI and not PG_URL:
        raise pytest.UsageError("CI=true needs CLAWDBOT_TEST_DATABASE_URL: the PostgreSQL leg is mandatory")
    if PG_URL:
        engine = create_engine(PG_URL)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise pytest.UsageError(f"PostgreSQL at {PG_URL} does not answer: {exc}") from None
        finally:
            engine.dispose()


def _pg_schema_url(schema: str) -> str:
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'clawdbot.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield _pg_schema_url(schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database at head."""
    database = Database(db_url)
    migrate.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def store(db: Database) -> AuditStore:
    return AuditStore(db)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory with no clawdbot settings in the environment."""
    for name in list(os.environ):
        if name.startswith("CLAWDBOT_") or name == "OLLAMA_HOST":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
