"""Constants and helpers that several test modules share, so that each exists once.

Fixtures shared the same way (the Ollama simulator `sim`) live in conftest.py.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from clawdbot.db import Database
from clawdbot.models import Event, Request

MODEL = "qwen3:32b"
HELLO = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "City name"}},
        },
    },
}

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("CLAWDBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@functools.cache
def _redis_problem() -> str:
    """Why Redis at REDIS_URL cannot be used, or "" when it answers (asked once per test run)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_URL} does not answer: {exc}"
    finally:
        client.close()
    return ""


def require_redis() -> str:
    """The Redis URL to test against (CLAWDBOT_TEST_REDIS_URL); skips the test without Redis, or fails it when
    CI=true, so that a missing service cannot pass unnoticed there."""
    problem = _redis_problem()
    if problem and IN_CI:
        pytest.fail(f"CI=true needs Redis: {problem}")
    if problem:
        pytest.skip(problem)
    return REDIS_URL


def all_requests(db: Database) -> list[Request]:
    """Every request record, oldest first."""
    with db.read() as session:
        return list(session.scalars(select(Request).order_by(Request.id)))


def run_threads(target: Callable[[int], None], count: int, timeout: float = 30) -> None:
    """Run `target(i)` for i in range(count), each in a thread of its own, and wait for all of them."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"


EventRow = tuple[str, str, str, dict[str, Any]]


def last_event_id(db: Database) -> int:
    """The newest event's id (0 when there is none), to look at only what an action adds after it."""
    with db.read() as session:
        return int(session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0)


def events_after(db: Database, event_id: int) -> list[EventRow]:
    """(actor, action, target, details) of every event after `event_id`, oldest first."""
    with db.read() as session:
        rows = session.execute(
            select(Event.actor, Event.action, Event.target, Event.details)
            .where(Event.id > event_id)
            .order_by(Event.id)
        )
        return [(a, b, c, json.loads(d)) for a, b, c, d in rows]
