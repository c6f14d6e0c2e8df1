"""The objects one process shares: settings, database, audit store, users and agents.

The CLI builds one per command; the web app keeps one per process (`st.cache_resource`), so every page and route
reaches the same database engine and, later, the same gateway.
"""

from __future__ import annotations

from functools import cached_property

from clawdbot import migrate
from clawdbot.agents import Agents
from clawdbot.audit import AuditStore
from clawdbot.db import Database
from clawdbot.settings import Settings, load_settings
from clawdbot.users import Users


class Runtime:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.db = Database(self.settings.database_url)

    @classmethod
    def open(cls, settings: Settings | None = None, *, upgrade: bool = False) -> Runtime:
        """Connect, and either bring the schema up to date or refuse an outdated one with what to run."""
        runtime = cls(settings)
        runtime.db.check()
        if upgrade:
            migrate.upgrade(runtime.db)
        else:
            migrate.ensure_current(runtime.db)
        return runtime

    @cached_property
    def store(self) -> AuditStore:
        return AuditStore(self.db)

    @cached_property
    def users(self) -> Users:
        return Users(self.db)

    @cached_property
    def agents(self) -> Agents:
        return Agents(self.db)

    def close(self) -> None:
        self.db.dispose()
