"""The objects one process shares: settings, database, audit store, users and agents.

The CLI builds one per command; the web app keeps one per process (`st.cache_resource`), so every page and route
reaches the same database engine and, later, the same gateway.
"""

from __future__ import annotations

import threading
from functools import cached_property

from clawdbot import migrate
from clawdbot.admission import Admission
from clawdbot.agents import Agents
from clawdbot.audit import AuditStore
from clawdbot.auth import Auth
from clawdbot.backends import BackendSelector
from clawdbot.chat import ChatService
from clawdbot.conversations import Conversations
from clawdbot.db import Database
from clawdbot.gateway import Gateway
from clawdbot.gpu import VramGuard
from clawdbot.ratelimit import RateLimiter
from clawdbot.sampler import Sampler
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

    @cached_property
    def conversations(self) -> Conversations:
        return Conversations(self.db)

    @cached_property
    def gateway(self) -> Gateway:
        s = self.settings
        return Gateway(
            s,
            self.store,
            BackendSelector(s),
            Admission(s.max_concurrent, s.queue_size, s.queue_timeout, pressure=VramGuard(s.vram_guard)),
            RateLimiter(s.rate_limit, s.redis_url),
        )

    @cached_property
    def auth(self) -> Auth:
        return Auth(self.db, self.users, self.settings.session_secret(), self.settings.redis_url)

    @cached_property
    def chat(self) -> ChatService:
        return ChatService(self.agents, self.conversations, self.gateway)

    @cached_property
    def sampler(self) -> Sampler:
        """The dashboard's background sampler; created here, started only by the server's shared runtime."""
        return Sampler(self.db, self.gateway)

    def close(self) -> None:
        if "sampler" in self.__dict__:
            self.sampler.stop()
        if "gateway" in self.__dict__:
            self.gateway.backends.close()
            self.gateway.limiter.close()
        if "auth" in self.__dict__:
            self.auth.close()
        self.db.dispose()


_shared: Runtime | None = None
_shared_lock = threading.Lock()


def shared_runtime() -> Runtime:
    """The one runtime of this server process, shared by every page, session and HTTP route.

    One gateway per process is what makes the concurrency cap and the queue hold for the UI and the API
    together. A failed open (database down) is not kept, so the next call tries again.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Runtime.open()
            # One sampler per server process, from its start, so the dashboard has history nobody watched.
            _shared.sampler.start()
        return _shared


def install_shared_runtime(runtime: Runtime | None) -> Runtime | None:
    """Make `runtime` the process's shared one (tests run the app in-process); returns the previous one."""
    global _shared
    with _shared_lock:
        previous, _shared = _shared, runtime
        return previous
