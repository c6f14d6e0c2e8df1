"""Browser tests: the real server (`clawdbot run`) on a free port, driven by Debian's Chromium via Playwright.

The server runs as a subprocess over a SQLite file of the test module and the Ollama simulator, exactly as an
operator starts it; tests reach its database through the CLI or a `Database` of their own.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from clawdbot.db import Database
from tests.cli_helpers import clawdbot_run, clean_env, run_cli
from tests.ollama_sim import OllamaSimulator

CHROMIUM = Path("/usr/bin/chromium")
PASSWORD = "correct horse battery"
# Streamlit reruns and the app's first page load are slow on a busy two-core CI machine.
expect.set_options(timeout=20_000)


@dataclass
class LiveServer:
    """A running `clawdbot run` and what it was started with."""

    url: str
    db_url: str
    workdir: Path
    sim: OllamaSimulator
    env: dict[str, str] = field(repr=False)

    def add_user(self, name: str, *roles: str, password: str = PASSWORD) -> str:
        args = ["user", "add", name, *[f"--role={role}" for role in roles], "--password-stdin"]
        done = run_cli(args, self.db_url, self.workdir, stdin=password + "\n", **self._settings())
        assert done.returncode == 0, done.stderr
        return name

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), self.db_url, self.workdir, stdin=stdin, **self._settings())

    def database(self) -> Database:
        return Database(self.db_url)

    def _settings(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if k.startswith(("CLAWDBOT_", "OLLAMA_"))
                and k not in ("CLAWDBOT_DATABASE_URL", "CLAWDBOT_DATA_DIR")}  # fmt: skip


def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`clawdbot run` serving the UI and HTTP routes, its model server the simulator (one per test module)."""
    workdir = tmp_path_factory.mktemp("live")
    with OllamaSimulator() as sim:
        db_url = f"sqlite:///{workdir / 'clawdbot.db'}"
        env = clean_env(
            db_url, workdir / "data", OLLAMA_HOST=sim.url, CLAWDBOT_BACKEND="ollama", CLAWDBOT_RATE_LIMIT=""
        )
        with clawdbot_run(workdir, env) as url:
            yield LiveServer(url, db_url, workdir, sim, env)


def launch_browser() -> Iterator[Browser]:
    """Debian's Chromium (the test command installs it); a missing browser fails rather than skips."""
    if not CHROMIUM.is_file():
        pytest.fail(f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


def new_page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    tab = context.new_page()
    yield tab
    context.close()


def sign_in(page: Page, server: LiveServer, name: str, password: str = PASSWORD, path: str = "/") -> None:
    """Open `path`, get sent to the sign-in form, sign in and wait for the app to show the user at `path`."""
    page.goto(server.url + path)
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text(f"Signed in as {name}")).to_be_visible()
    if path != "/":
        expect(page).to_have_url(server.url + path)
