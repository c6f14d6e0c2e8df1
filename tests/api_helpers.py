"""The HTTP API under test: `clawdbot run` on a free port over a SQLite file and the Ollama simulator.

Like the browser tests' live server (tests/browser_helpers.py), but started with the settings a test module
needs (concurrency cap, queue, rate limit). Users, keys and agents are written straight into the server's
database by the test process, which is much faster than one CLI process each.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from clawdbot.agents import AgentConfig, Agents
from clawdbot.api_keys import ApiKeys
from clawdbot.db import Database
from clawdbot.users import Users
from tests.cli_helpers import clawdbot_run, clean_env
from tests.ollama_sim import OllamaSimulator

PASSWORD = "correct horse battery"
AGENT = "helper"
AGENT_PROMPT = "You are a helpful assistant."


@dataclass
class ApiServer:
    """A running `clawdbot run`, its database and its simulated model server."""

    url: str
    db: Database
    sim: OllamaSimulator
    workdir: Path
    env: dict[str, str] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str, **options: object) -> openai.OpenAI:
        """The official client, without its own retries so that every refusal reaches the test."""
        settings: dict[str, object] = {"max_retries": 0, "timeout": 60.0, **options}
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **settings)  # type: ignore[arg-type]

    def user_with_key(self, name: str, *roles: str) -> str:
        """Create a user with the given roles (staff by default) and an API key; returns the key."""
        Users(self.db).add("admin", name, roles or ("staff",), PASSWORD)
        return ApiKeys(self.db).create("admin", name, "tests").secret

    def users_with_keys(self, names: list[str], *roles: str) -> list[str]:
        """`user_with_key` for many users at once (argon2 hashing, the slow part, runs on every core)."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda name: self.user_with_key(name, *roles), names))

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(encoding="utf-8", errors="replace")


def serve_api(tmp_path_factory: pytest.TempPathFactory, **settings: str) -> Iterator[ApiServer]:
    """Serve the app with `settings` (environment names) and the agent `helper` on the simulator."""
    workdir = tmp_path_factory.mktemp("api")
    with OllamaSimulator() as sim:
        db_url = f"sqlite:///{workdir / 'clawdbot.db'}"
        env = clean_env(db_url, workdir / "data", OLLAMA_HOST=sim.url, CLAWDBOT_BACKEND="ollama", **settings)
        with clawdbot_run(workdir, env) as url:
            db = Database(db_url)
            try:
                Agents(db).add("admin", AGENT, AgentConfig(model="qwen3:32b", system_prompt=AGENT_PROMPT))
                yield ApiServer(url, db, sim, workdir, env)
            finally:
                db.dispose()
