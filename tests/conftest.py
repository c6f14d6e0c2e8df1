"""Fixtures shared by the suite: a fresh, migrated database per test on SQLite and, when configured, PostgreSQL.

PostgreSQL tests each get a schema of their own (through `search_path`), so they run in parallel without
seeing each other. With CI=true the PostgreSQL leg is mandatory: a missing server fails the run.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from clawdbot import migrate
from clawdbot.audit import AuditStore
from clawdbot.db import Database
from clawdbot.runtime import Runtime, install_shared_runtime
from clawdbot.settings import load_settings
from tests.helpers import IN_CI
from tests.ollama_sim import OllamaSimulator

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from tests.app_helpers import AppHarness
    from tests.browser_helpers import LiveServer

PG_URL = os.environ.get("CLAWDBOT_TEST_DATABASE_URL", "")
# Screenshots of failed browser tests land here (CI keeps the directory).
ARTIFACTS = Path(os.environ.get("CLAWDBOT_TEST_ARTIFACTS", "test-artifacts")).resolve()
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
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


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    """The Ollama simulator serving real HTTP on 127.0.0.1, stopped after the test."""
    with OllamaSimulator() as simulator:
        yield simulator


@pytest.fixture
def app_settings() -> dict[str, Any]:
    """Settings the `app_harness` runtime overrides; a test changes them with
    `@pytest.mark.parametrize("app_settings", [{"max_concurrent": 1}])`."""
    return {}


@pytest.fixture
def app_harness(workdir: Path, db: Database, app_settings: dict[str, Any]) -> Iterator[AppHarness]:
    """The Streamlit app in-process over this test's database; the model server is the Ollama simulator."""
    from tests.app_helpers import AppHarness, write_entry
    from tests.ollama_sim import OllamaSimulator

    with OllamaSimulator() as sim:
        settings = load_settings(
            database_url=db.url,
            data_dir=workdir / "data",
            ollama_host=sim.url,
            backend="ollama",
            **{"rate_limit": "", "retries": 0, **app_settings},
        )
        runtime = Runtime(settings)
        previous = install_shared_runtime(runtime)
        try:
            yield AppHarness(runtime, sim, write_entry(workdir))
        finally:
            install_shared_runtime(previous)
            runtime.close()


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Put the real `__main__` back after each test.

    AppTest runs its script as `__main__` and leaves it there; child processes that a later test in the same
    worker starts with the spawn method would run that script again (and fail) unless the real one is back.
    """
    main_module = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main_module


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`clawdbot run` on a free port over a SQLite file and the Ollama simulator, one per test module."""
    from tests.browser_helpers import serve

    yield from serve(tmp_path_factory)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium through Playwright; a missing browser fails the test rather than skipping it."""
    from tests.browser_helpers import launch_browser

    yield from launch_browser()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item, so fixtures can tell in teardown whether the test failed."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (no cookies) and tab; a failed test leaves a screenshot in ARTIFACTS."""
    from tests.browser_helpers import new_page

    for tab in new_page(browser):
        yield tab
        reports = request.node.stash.get(PHASE_REPORTS, {})
        if any(r.failed for r in reports.values()):
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.nodeid)
            tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
