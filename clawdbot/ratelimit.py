"""Per-user rate limits, so one person cannot monopolise the single GPU everyone shares.

The limits come from the `rate_limit` setting (CLAWDBOT_RATE_LIMIT), e.g. "12/minute;3/10seconds", and are
enforced with the `limits` library's moving-window strategy. Counters live in this process's memory by default;
when CLAWDBOT_REDIS_URL is set they live in Redis, so every app process behind the same Redis shares them.

Why this is more than a loop over `limits`' `hit()`:

* With several limits, hitting them one by one could consume the first and then be refused by the second,
  charging the user for a request they never got. `check()` therefore reads every limit first and hits all of
  them only when all of them have room: a refused request uses no quota.
* Test-then-hit is a race between threads and between processes. The whole read-and-hit runs under a lock:
  a `threading.Lock` in memory mode, a per-user Redis lock (shared by every process) in Redis mode.
* A Redis that is down or stuck must not hang requests: every socket operation has a timeout and any Redis
  failure becomes `RateLimiterUnavailableError`, one line naming CLAWDBOT_REDIS_URL and the reason.
* Keys are namespaced ("<namespace>:ratelimit:...") and the user name is percent-encoded, so no user name
  (containing '/', ':' or anything else) can address another user's counters.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter
from limits.util import SEPARATORS
from redis.backoff import NoBackoff
from redis.retry import Retry

from clawdbot.errors import ClawdbotError, RateLimitedError, SettingsError

__all__ = ["RateLimiter", "RateLimiterUnavailableError"]

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]+$")
# How long a crashed process's Redis lock survives before it expires on its own.
_LOCK_TTL = 10.0


class RateLimiterUnavailableError(ClawdbotError):
    """The rate-limit counters (in Redis) cannot be read or written, so no request can be let through."""


@dataclass(frozen=True)
class _Limit:
    text: str  # as the operator wrote it, e.g. "3/10seconds": the key of `remaining()`
    item: RateLimitItem

    def period(self) -> str:
        """The window in plain words: "minute", "10 seconds"."""
        name = self.item.GRANULARITY.name
        return name if self.item.multiples == 1 else f"{self.item.multiples} {name}s"

    def describe(self) -> str:
        amount = self.item.amount
        return f"{amount} request{'' if amount == 1 else 's'} in the last {self.period()}"


def _parse_spec(spec: str) -> list[_Limit]:
    result: list[_Limit] = []
    for part in SEPARATORS.split(spec):
        text = part.strip()
        if not text:
            continue
        try:
            item = parse(text)
        except ValueError:
            raise SettingsError(
                f"invalid setting CLAWDBOT_RATE_LIMIT={spec}: expected rate strings such as "
                "12/minute;3/10seconds separated by ';', or empty for no limit"
            ) from None
        if item.amount < 1:
            raise SettingsError(
                f"invalid setting CLAWDBOT_RATE_LIMIT={spec}: {text} allows no request at all"
            )
        result.append(_Limit(text, item))
    return result


def _redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + host))
    except ValueError:
        return "(unparsable URL)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.rstrip(".")


class RateLimiter:
    """Per-user moving-window limits; see the module docstring for why `check()` is built as it is."""

    def __init__(
        self, spec: str, redis_url: str = "", *, namespace: str = "clawdbot", timeout: float = 2.0
    ) -> None:
        """Parse `spec` and connect to `redis_url` when given (raising at once if it does not answer).

        `timeout` bounds each Redis socket operation (connect, read, write), in seconds.
        """
        if not _NAMESPACE.match(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        self._limits = _parse_spec(spec)
        self._namespace = namespace
        self._redis_url = redis_url
        self._timeout = timeout
        self._local_lock = threading.Lock()
        self._redis: redis.Redis | None = None
        self._storage: MemoryStorage | RedisStorage
        if redis_url:
            try:
                # retry once on a broken connection (e.g. the server restarted); never on a timeout, since
                # running a hit again could count it twice
                self._redis = redis.Redis.from_url(
                    redis_url,
                    socket_timeout=timeout,
                    socket_connect_timeout=timeout,
                    retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                )
                self._storage = RedisStorage(
                    redis_url,
                    connection_pool=self._redis.connection_pool,
                    key_prefix=f"{namespace}:ratelimit",
                )
            except (ValueError, redis.RedisError) as exc:
                raise self._unavailable(exc) from None
            with self._redis_errors():
                self._redis.ping()
        else:
            self._storage = MemoryStorage()
        self._strategy = MovingWindowRateLimiter(self._storage)

    @property
    def enabled(self) -> bool:
        """False when the spec is empty: `check()` then always passes."""
        return bool(self._limits)

    @property
    def limits(self) -> list[str]:
        """The limits as written in the spec, e.g. ["12/minute", "3/10seconds"]."""
        return [limit.text for limit in self._limits]

    def check(self, user: str) -> None:
        """Count one request of `user` against every limit, or raise `RateLimitedError` counting nothing."""
        if not self._limits:
            return
        ident = self._ident(user)
        with self._locked(ident), self._redis_errors():
            # get_window_stats is `test()` plus the reset time the message needs, in one round trip
            now = time.time()
            refused = [
                (limit, stats.reset_time)
                for limit in self._limits
                if (stats := self._strategy.get_window_stats(limit.item, ident)).remaining < 1
            ]
            if not refused:
                # Under the lock no other check() of this user runs, and entries only ever leave a moving
                # window, so every hit succeeds; its result is checked only in case something bypassed the lock.
                if all(self._strategy.hit(limit.item, ident) for limit in self._limits):
                    return
                now = time.time()
                stats_now = [
                    (limit, self._strategy.get_window_stats(limit.item, ident)) for limit in self._limits
                ]
                refused = [(limit, s.reset_time) for limit, s in stats_now if s.remaining < 1] or [
                    (limit, s.reset_time) for limit, s in stats_now
                ]
        limit, reset_time = max(refused, key=lambda pair: pair[1])
        wait = max(1, math.ceil(reset_time - now))
        raise RateLimitedError(
            f"you have sent {limit.describe()}, the most allowed; try again in {wait} s", float(wait)
        )

    def retry_after(self, user: str) -> float:
        """Seconds until `check(user)` would pass: 0 if it would now, else rounded up and at least 1."""
        if not self._limits:
            return 0.0
        ident = self._ident(user)
        with self._redis_errors():
            now = time.time()
            waits = [
                max(1, math.ceil(stats.reset_time - now))
                for limit in self._limits
                if (stats := self._strategy.get_window_stats(limit.item, ident)).remaining < 1
            ]
        return float(max(waits, default=0))

    def remaining(self, user: str) -> dict[str, int]:
        """Requests `user` may still send under each limit, keyed by the limit as written ("3/10seconds")."""
        ident = self._ident(user)
        with self._redis_errors():
            return {
                limit.text: max(0, self._strategy.get_window_stats(limit.item, ident).remaining)
                for limit in self._limits
            }

    def reset(self, user: str | None = None) -> None:
        """Forget the counters of `user`, or of every user in this namespace when None."""
        with self._local_lock, self._redis_errors():
            if user is None:
                self._storage.reset()
                return
            ident = self._ident(user)
            for limit in self._limits:
                self._strategy.clear(limit.item, ident)

    def close(self) -> None:
        """Release the Redis connections (a no-op in memory mode)."""
        if self._redis is not None:
            self._redis.close()

    @staticmethod
    def _ident(user: str) -> str:
        # Percent-encoding is injective and leaves no '/' (limits' key separator) nor ':' in the result,
        # so "alice/1/minute" or "bob:x" cannot reach the keys of another user.
        return "user=" + quote(user, safe="")

    @contextmanager
    def _locked(self, ident: str) -> Iterator[None]:
        if self._redis is None:
            with self._local_lock:
                yield
            return
        lock = self._redis.lock(
            f"{self._namespace}:ratelimit-lock:{ident}",
            timeout=_LOCK_TTL,
            sleep=0.005,
            blocking_timeout=2 * self._timeout,
            raise_on_release_error=False,  # held past its TTL: the counts are already written, nothing to undo
        )
        with self._redis_errors():
            acquired = lock.acquire()
        if not acquired:
            raise RateLimiterUnavailableError(
                f"the rate limiter could not lock the counters in Redis at CLAWDBOT_REDIS_URL="
                f"{_redact(self._redis_url)} within {2 * self._timeout:g} s: Redis is overloaded or "
                "another process is stuck"
            )
        try:
            yield
        finally:
            with self._redis_errors():
                lock.release()

    @contextmanager
    def _redis_errors(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> RateLimiterUnavailableError:
        return RateLimiterUnavailableError(
            f"the rate limiter cannot use Redis at CLAWDBOT_REDIS_URL={_redact(self._redis_url)}: "
            f"{_one_line(exc)}"
        )
