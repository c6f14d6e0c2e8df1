"""Per-user rate limits, so one person cannot monopolise the single GPU everyone shares.

The limits come from the `rate_limit` setting (CLAWDBOT_RATE_LIMIT), e.g. "12/minute;3/10seconds", parsed by
the `limits` library, and are moving windows: a request counts against a limit for exactly that long after it
was let through. Counters live in this process's memory by default; when CLAWDBOT_REDIS_URL is set they live in
Redis (`limits`' moving-window strategy and storage), so every app process behind the same Redis shares them.

Why this is more than a loop over `limits`' `hit()`:

* With several limits, hitting them one by one could consume the first and then be refused by the second,
  charging the user for a request they never got. `check()` therefore reads every limit first and hits all of
  them only when all of them have room: a refused request uses no quota.
* Test-then-hit is a race between threads and between processes. The whole read-and-hit runs under a lock:
  one `threading.Lock` in memory mode, a per-user Redis lock (shared by every process) in Redis mode.
* In memory mode the windows are a deque of hit times per user and limit (`_LocalWindows`), not `limits`'
  `MemoryStorage`: that storage starts a new timer thread on a hit whenever its last one has run out (after
  10 ms), i.e. on nearly every request, and `check()` took 0.37 ms (median) on the gateway's path to the first
  token; the deques take 0.03 ms. Users whose windows have all expired are dropped, so memory holds only the
  users let through within the longest window.
* A Redis that is down or stuck must not hang requests: every socket operation has a timeout and any Redis
  failure becomes `RateLimiterUnavailableError`, one line naming CLAWDBOT_REDIS_URL and the reason.
* Redis keys are namespaced ("<namespace>:ratelimit:...") and the user name is percent-encoded, so no user
  name (containing '/', ':' or anything else) can address another user's counters.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from limits import RateLimitItem, parse
from limits.storage import RedisStorage
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
    seconds: float = field(init=False)  # the window's length

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", float(self.item.get_expiry()))

    def period(self) -> str:
        """The window in plain words: "minute", "10 seconds"."""
        name = self.item.GRANULARITY.name
        return name if self.item.multiples == 1 else f"{self.item.multiples} {name}s"

    def describe(self) -> str:
        amount = self.item.amount
        return f"{amount} request{'' if amount == 1 else 's'} in the last {self.period()}"


# A full limit and the seconds until it has room again.
_Refusal = tuple[_Limit, float]


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


class _UserWindows:
    """One user's hit times, oldest first, one deque per limit, and the time of their last hit."""

    __slots__ = ("last_hit", "windows")

    def __init__(self, limits: list[_Limit]) -> None:
        self.last_hit = -math.inf
        # A limit's deque never holds more than its amount: a hit is added only when there is room.
        self.windows = [deque[float](maxlen=limit.item.amount) for limit in limits]


class _LocalWindows:
    """The moving windows of this process: every user's hit times, under one lock.

    Users are kept in the order of their last hit, so those whose windows have all expired are at the front
    and are dropped by the next call (amortised O(1) per call): memory holds only the users let through within
    the longest window.
    """

    def __init__(self, limits: list[_Limit], clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._longest = max(limit.seconds for limit in limits)
        self._lock = threading.Lock()
        self._users: OrderedDict[str, _UserWindows] = OrderedDict()

    def hit(self, user: str) -> list[_Refusal]:
        """Count one request against every limit and return []; or, when any limit is full, count nothing and
        return the full limits with the seconds until each has room."""
        with self._lock:
            now = self._clock()
            self._drop_expired(now)
            user_windows = self._users.get(user)
            if user_windows is None:
                user_windows = self._users[user] = _UserWindows(self._limits)
            refused = self._refusals(user_windows, now)
            if not refused:
                for window in user_windows.windows:
                    window.append(now)
                user_windows.last_hit = now
                self._users.move_to_end(user)
            return refused

    def refusals(self, user: str) -> list[_Refusal]:
        """What `hit()` would refuse now, without counting anything."""
        with self._lock:
            now = self._clock()
            user_windows = self._users.get(user)
            return [] if user_windows is None else self._refusals(user_windows, now)

    def remaining(self, user: str) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            user_windows = self._users.get(user)
            if user_windows is None:
                return {limit.text: limit.item.amount for limit in self._limits}
            result = {}
            for limit, window in zip(self._limits, user_windows.windows, strict=True):
                _prune(window, now - limit.seconds)
                result[limit.text] = limit.item.amount - len(window)
            return result

    def reset(self, user: str | None) -> None:
        with self._lock:
            if user is None:
                self._users.clear()
            else:
                self._users.pop(user, None)

    def tracked_users(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._users)

    def _refusals(self, user_windows: _UserWindows, now: float) -> list[_Refusal]:
        refused = []
        for limit, window in zip(self._limits, user_windows.windows, strict=True):
            _prune(window, now - limit.seconds)
            if len(window) >= limit.item.amount:
                refused.append((limit, window[0] + limit.seconds - now))
        return refused

    def _drop_expired(self, now: float) -> None:
        users = self._users
        while users:
            user_windows = next(iter(users.values()))
            if now - user_windows.last_hit < self._longest:
                return
            users.popitem(last=False)


def _prune(window: deque[float], horizon: float) -> None:
    """Forget the hits at or before `horizon`: they no longer count."""
    while window and window[0] <= horizon:
        window.popleft()


class RateLimiter:
    """Per-user moving-window limits; see the module docstring for why `check()` is built as it is."""

    def __init__(
        self,
        spec: str,
        redis_url: str = "",
        *,
        namespace: str = "clawdbot",
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Parse `spec` and connect to `redis_url` when given (raising at once if it does not answer).

        `timeout` bounds each Redis socket operation (connect, read, write), in seconds. `clock` times the
        in-memory windows (Redis keeps its own time).
        """
        if not _NAMESPACE.match(namespace):
            raise ValueError(f"namespace must match {_NAMESPACE.pattern}, got {namespace!r}")
        self._limits = _parse_spec(spec)
        self._namespace = namespace
        self._redis_url = redis_url
        self._timeout = timeout
        self._redis: redis.Redis | None = None
        self._local: _LocalWindows | None = None
        self._storage: RedisStorage | None = None
        self._strategy: MovingWindowRateLimiter | None = None
        if not redis_url:
            if self._limits:
                self._local = _LocalWindows(self._limits, clock)
            return
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
        self._strategy = MovingWindowRateLimiter(self._storage)
        with self._redis_errors():
            self._redis.ping()

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
        refused = self._local.hit(user) if self._local is not None else self._redis_hit(self._ident(user))
        if not refused:
            return
        limit, wait = max(refused, key=lambda pair: pair[1])
        seconds = _whole_seconds(wait)
        raise RateLimitedError(
            f"you have sent {limit.describe()}, the most allowed; try again in {seconds:.0f} s", seconds
        )

    def retry_after(self, user: str) -> float:
        """Seconds until `check(user)` would pass: 0 if it would now, else rounded up and at least 1."""
        if not self._limits:
            return 0.0
        if self._local is not None:
            refused = self._local.refusals(user)
        else:
            with self._redis_errors():
                refused = self._redis_refusals(self._ident(user))
        return max((_whole_seconds(wait) for _, wait in refused), default=0.0)

    def remaining(self, user: str) -> dict[str, int]:
        """Requests `user` may still send under each limit, keyed by the limit as written ("3/10seconds")."""
        if self._local is not None:
            return self._local.remaining(user)
        if self._strategy is None:
            return {}
        ident = self._ident(user)
        with self._redis_errors():
            return {
                limit.text: max(0, self._strategy.get_window_stats(limit.item, ident).remaining)
                for limit in self._limits
            }

    def reset(self, user: str | None = None) -> None:
        """Forget the counters of `user`, or of every user in this namespace when None."""
        if self._local is not None:
            self._local.reset(user)
            return
        if self._storage is None or self._strategy is None:
            return
        with self._redis_errors():
            if user is None:
                self._storage.reset()
                return
            ident = self._ident(user)
            for limit in self._limits:
                self._strategy.clear(limit.item, ident)

    def tracked_users(self) -> int | None:
        """How many users' counters this process keeps in memory; None with Redis, whose keys expire there."""
        if self._redis is not None:
            return None
        return self._local.tracked_users() if self._local is not None else 0

    def close(self) -> None:
        """Release the Redis connections (a no-op in memory mode)."""
        if self._redis is not None:
            self._redis.close()

    # ----------------------------------------------------------------------------------------------- Redis

    def _redis_hit(self, ident: str) -> list[_Refusal]:
        """`_LocalWindows.hit()` in Redis, for every process: read every limit, then hit them all, under the
        user's Redis lock."""
        assert self._strategy is not None
        with self._locked(ident), self._redis_errors():
            refused = self._redis_refusals(ident)
            if refused:
                return refused
            # Under the lock no other check() of this user runs, and entries only ever leave a moving window,
            # so every hit succeeds; its result is checked only in case something bypassed the lock.
            if all(self._strategy.hit(limit.item, ident) for limit in self._limits):
                return []
            now = time.time()
            stats = [(limit, self._strategy.get_window_stats(limit.item, ident)) for limit in self._limits]
            return [(limit, s.reset_time - now) for limit, s in stats if s.remaining < 1] or [
                (limit, s.reset_time - now) for limit, s in stats
            ]

    def _redis_refusals(self, ident: str) -> list[_Refusal]:
        # get_window_stats is `test()` plus the reset time the message needs, in one round trip
        assert self._strategy is not None
        now = time.time()
        return [
            (limit, stats.reset_time - now)
            for limit in self._limits
            if (stats := self._strategy.get_window_stats(limit.item, ident)).remaining < 1
        ]

    @staticmethod
    def _ident(user: str) -> str:
        # Percent-encoding is injective and leaves no '/' (limits' key separator) nor ':' in the result,
        # so "alice/1/minute" or "bob:x" cannot reach the keys of another user.
        return "user=" + quote(user, safe="")

    @contextmanager
    def _locked(self, ident: str) -> Iterator[None]:
        assert self._redis is not None
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


def _whole_seconds(wait: float) -> float:
    """A wait as people are told it: whole seconds, rounded up, at least 1."""
    return float(max(1, math.ceil(wait)))
