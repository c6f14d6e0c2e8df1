"""Per-user rate limits against real storage: this process's memory (the limiter's own moving windows) and a
real Redis (`limits`' moving-window storage).

Redis is expected at CLAWDBOT_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Outside CI its absence skips
the Redis legs with the reason; with CI=true it fails them, so a missing service cannot pass unnoticed.
Each test uses a namespace of its own and deletes its keys afterwards.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
import redis

from clawdbot.errors import ClawdbotError, RateLimitedError, SettingsError
from clawdbot.ratelimit import RateLimiter, RateLimiterUnavailableError
from tests.helpers import REDIS_URL, require_redis, run_threads

MakeLimiter = Callable[[str], RateLimiter]


def _delete_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def namespace() -> str:
    return f"clawdbot-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url(namespace: str) -> Iterator[str]:
    url = require_redis()
    yield url
    _delete_namespace(namespace)


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest, namespace: str) -> Iterator[MakeLimiter]:
    """Builds limiters over one store: in memory, or Redis in this test's namespace (deleted afterwards)."""
    url = require_redis() if request.param == "redis" else ""
    created: list[RateLimiter] = []

    def make(spec: str) -> RateLimiter:
        limiter = RateLimiter(spec, url, namespace=namespace)
        created.append(limiter)
        return limiter

    yield make
    for limiter in created:
        limiter.reset()
        limiter.close()
    if url:
        _delete_namespace(namespace)


# Both orders: checking the limits one by one would charge refusals to whichever comes first.
@pytest.mark.parametrize("spec", ["3/10seconds;5/minute", "5/minute;3/10seconds"])
def test_fourth_request_in_ten_seconds_is_refused_with_the_wait(make_limiter: MakeLimiter, spec: str) -> None:
    limiter = make_limiter(spec)
    assert limiter.enabled
    for _ in range(3):
        limiter.check("alice")

    with pytest.raises(RateLimitedError) as caught:
        limiter.check("alice")

    error = caught.value
    assert 1 <= error.retry_after <= 10
    assert error.exit_code == 4
    assert str(error) == (
        "you have sent 3 requests in the last 10 seconds, the most allowed; "
        f"try again in {error.retry_after:.0f} s"
    )
    assert 1 <= limiter.retry_after("alice") <= 10
    # refusals, however many, use no quota of either limit
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            limiter.check("alice")
    assert limiter.remaining("alice") == {"3/10seconds": 0, "5/minute": 2}


def test_refused_request_uses_no_quota_of_the_longer_limit(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter("3/minute;2/2seconds")  # the long limit first: the one a refusal could charge
    limiter.check("alice")
    limiter.check("alice")
    for _ in range(3):
        with pytest.raises(RateLimitedError):
            limiter.check("alice")
    assert limiter.remaining("alice") == {"2/2seconds": 0, "3/minute": 1}

    wait = limiter.retry_after("alice")
    assert 1 <= wait <= 2
    time.sleep(wait + 0.05)
    assert limiter.retry_after("alice") == 0
    assert limiter.remaining("alice") == {"2/2seconds": 2, "3/minute": 1}

    limiter.check("alice")  # the third of the minute: passes only because the refusals cost nothing
    assert limiter.remaining("alice") == {"2/2seconds": 1, "3/minute": 0}
    with pytest.raises(RateLimitedError, match=r"^you have sent 3 requests in the last minute, ") as caught:
        limiter.check("alice")
    assert 50 <= caught.value.retry_after <= 60
    assert limiter.remaining("alice") == {"2/2seconds": 1, "3/minute": 0}


def test_users_have_their_own_quota_whatever_their_names(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter("2/minute")
    limiter.check("alice")
    limiter.check("alice")
    with pytest.raises(RateLimitedError):
        limiter.check("alice")

    # names built to look like alice's keys, or like each other's once escaped
    lookalikes = ["bob", "alice/2/1/minute", "alice/", "/alice", "alice:", "user=alice", "alice%2F", "ALICE"]
    for name in lookalikes:
        limiter.check(name)
        assert limiter.remaining(name) == {"2/minute": 1}, name
    assert limiter.remaining("alice") == {"2/minute": 0}

    # and the other way round: an exhausted lookalike does not take from alice
    limiter.reset("alice")
    limiter.check("alice/")
    with pytest.raises(RateLimitedError):
        limiter.check("alice/")
    assert limiter.remaining("alice") == {"2/minute": 2}


def test_reset_one_user_or_all(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter("1/minute")
    limiter.check("alice")
    limiter.check("bob")
    limiter.reset("alice")
    assert limiter.remaining("alice") == {"1/minute": 1}
    assert limiter.remaining("bob") == {"1/minute": 0}
    limiter.reset()
    assert limiter.remaining("bob") == {"1/minute": 1}


def _race(limiter: RateLimiter, user: str, threads: int) -> tuple[int, int]:
    """Calls check() from `threads` threads released at once; returns (passed, refused)."""
    start = threading.Barrier(threads)
    outcomes: list[str] = []
    guard = threading.Lock()

    def one(_: int) -> None:
        start.wait(timeout=10)
        try:
            limiter.check(user)
            outcome = "passed"
        except RateLimitedError:
            outcome = "refused"
        with guard:
            outcomes.append(outcome)

    run_threads(one, threads)
    return outcomes.count("passed"), outcomes.count("refused")


# A second, roomier limit, listed first, makes the race stricter: without one lock around test-and-hit,
# the refused requests would still be charged to the hour.
RACE_SPEC = "50/hour;5/minute"


def test_concurrent_checks_let_exactly_the_limit_through(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(RACE_SPEC)
    assert _race(limiter, "alice", 20) == (5, 15)
    assert limiter.remaining("alice") == {"50/hour": 45, "5/minute": 0}


# -- the in-memory windows -------------------------------------------------------------------------------

T0 = 1000.0


class Clock:
    """A clock the test moves by hand, so that window arithmetic is checked to the exact second."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def test_memory_windows_slide_hit_by_hit() -> None:
    clock = Clock()
    limiter = RateLimiter("3/10seconds;5/minute", clock=clock)
    for second in (0, 1, 2):
        clock.now = T0 + second
        limiter.check("alice")

    clock.now = T0 + 5
    with pytest.raises(RateLimitedError, match=r"3 requests in the last 10 seconds, .*; try again in 5 s$"):
        limiter.check("alice")
    clock.now = T0 + 9.999
    assert limiter.retry_after("alice") == 1  # a thousandth of a second, rounded up
    with pytest.raises(RateLimitedError):
        limiter.check("alice")
    assert limiter.remaining("alice") == {"3/10seconds": 0, "5/minute": 2}  # the refusals cost nothing

    clock.now = T0 + 10  # the first hit leaves the 10-second window: exactly one request may pass
    assert limiter.retry_after("alice") == 0
    assert limiter.remaining("alice") == {"3/10seconds": 1, "5/minute": 2}
    limiter.check("alice")
    with pytest.raises(RateLimitedError):
        limiter.check("alice")

    clock.now = T0 + 11  # the hit at 1 left: the fifth of the minute passes
    limiter.check("alice")
    clock.now = T0 + 12  # the 10-second window has room again, the minute none until T0 + 60
    with pytest.raises(
        RateLimitedError, match=r"5 requests in the last minute, .*; try again in 48 s$"
    ) as caught:
        limiter.check("alice")
    assert caught.value.retry_after == 48
    assert limiter.remaining("alice") == {"3/10seconds": 1, "5/minute": 0}

    clock.now = T0 + 60
    assert limiter.remaining("alice") == {"3/10seconds": 3, "5/minute": 1}
    limiter.check("alice")


def test_memory_keeps_only_the_users_seen_within_the_longest_window() -> None:
    clock = Clock()
    limiter = RateLimiter("1/10seconds;3/minute", clock=clock)
    for i in range(1000):
        limiter.check(f"user{i}")
    clock.now = T0 + 30
    limiter.check("late")
    limiter.check("user0")  # seen again: kept for another minute
    assert limiter.tracked_users() == 1001

    clock.now = T0 + 59.999
    assert limiter.tracked_users() == 1001
    clock.now = T0 + 60  # the first 999 users' windows have all expired
    assert limiter.tracked_users() == 2
    assert limiter.remaining("user1") == {"1/10seconds": 1, "3/minute": 3}
    assert limiter.remaining("user0") == {"1/10seconds": 1, "3/minute": 2}

    clock.now = T0 + 90
    limiter.check("user1")  # the check itself drops the expired ones
    assert limiter.tracked_users() == 1


def test_memory_checks_start_no_thread() -> None:
    # limits' MemoryStorage started a timer thread per check once the last one had run out (10 ms), about
    # half a millisecond on the path to every request's first token.
    limiter = RateLimiter("100/minute;10/second")
    time.sleep(0.02)
    threads = set(threading.enumerate())
    for _ in range(3):
        limiter.check("alice")
        assert set(threading.enumerate()) <= threads
        time.sleep(0.02)


def test_memory_race_of_many_threads_over_several_users_counts_exactly() -> None:
    limiter = RateLimiter("40/hour;25/minute")
    users = ["alice", "bob", "carol"]
    passed: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    guard = threading.Lock()
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        start.wait(timeout=10)
        for n in range(60):
            user = users[(worker + n) % len(users)]
            try:
                limiter.check(user)
                outcome = passed
            except RateLimitedError:
                outcome = refused
            with guard:
                outcome[user] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to give a race every chance
    try:
        run_threads(work, 8)
    finally:
        sys.setswitchinterval(interval)
    assert passed == dict.fromkeys(users, 25)
    assert refused == dict.fromkeys(users, 160 - 25)
    for user in users:
        assert limiter.remaining(user) == {"40/hour": 15, "25/minute": 0}


def _race_in_process(
    url: str, namespace: str, threads: int, ready: Barrier, results: Queue[tuple[int, int]]
) -> None:
    limiter = RateLimiter(RACE_SPEC, url, namespace=namespace)
    ready.wait(timeout=30)  # both processes connected: start together
    results.put(_race(limiter, "alice", threads))
    limiter.close()


def test_processes_sharing_redis_let_exactly_the_limit_through(redis_url: str, namespace: str) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(2)
    results: Queue[tuple[int, int]] = context.Queue()
    processes = [
        context.Process(target=_race_in_process, args=(redis_url, namespace, 10, ready, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    try:
        counts = [results.get(timeout=30) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert sum(passed for passed, _ in counts) == 5
    assert sum(refused for _, refused in counts) == 15
    limiter = RateLimiter(RACE_SPEC, redis_url, namespace=namespace)
    assert limiter.remaining("alice") == {"50/hour": 45, "5/minute": 0}
    limiter.close()


def test_empty_spec_never_refuses() -> None:
    for spec in ("", "  "):
        limiter = RateLimiter(spec)
        assert not limiter.enabled
        for _ in range(100):
            limiter.check("alice")
        assert limiter.retry_after("alice") == 0
        assert limiter.remaining("alice") == {}


def test_bad_spec_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="CLAWDBOT_RATE_LIMIT=3/fortnight"):
        RateLimiter("3/fortnight")


def test_keys_stay_in_the_namespace(redis_url: str, namespace: str) -> None:
    limiter = RateLimiter("2/minute;10/hour", redis_url, namespace=namespace)
    limiter.check("a:b/c")
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sorted(key.decode() for key in client.scan_iter(match=f"{namespace}:*"))
    finally:
        client.close()
    assert len(keys) == 2
    assert all(key.startswith(f"{namespace}:ratelimit:") for key in keys)
    assert all("a%3Ab%2Fc" in key for key in keys)
    assert limiter.tracked_users() is None  # nothing is kept in this process's memory
    limiter.reset()
    assert limiter.remaining("a:b/c") == {"2/minute": 2, "10/hour": 10}
    limiter.close()


def test_unreachable_redis_is_one_clear_line_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(RateLimiterUnavailableError) as caught:
        RateLimiter("3/minute", "redis://:hunter2@127.0.0.1:1/0")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert isinstance(caught.value, ClawdbotError)
    assert "\n" not in message
    assert message.startswith(
        "the rate limiter cannot use Redis at CLAWDBOT_REDIS_URL=redis://:***@127.0.0.1:1/0: "
    )
    assert "refused" in message.lower()
    assert "hunter2" not in message


def test_silent_redis_times_out_instead_of_hanging() -> None:
    # accepts connections (the kernel's backlog does) but never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(RateLimiterUnavailableError, match=r"CLAWDBOT_REDIS_URL=.*: Timeout"):
            RateLimiter("3/minute", f"redis://127.0.0.1:{port}/0", timeout=0.5)
        assert time.monotonic() - started < 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_redis(url: str, server: subprocess.Popen[bytes]) -> None:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                time.sleep(0.05)
        pytest.fail(f"redis-server at {url} did not start")
    finally:
        client.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server program")
def test_redis_stopping_after_start_fails_checks_quickly() -> None:
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_redis(url, server)
        limiter = RateLimiter("3/minute", url, timeout=0.5)
        limiter.check("alice")
        server.send_signal(signal.SIGSTOP)  # alive, connected, silent: the case that hangs without timeouts
        started = time.monotonic()
        with pytest.raises(
            RateLimiterUnavailableError, match=re.escape(f"CLAWDBOT_REDIS_URL={url}: Timeout")
        ):
            limiter.check("alice")
        assert time.monotonic() - started < 3
        server.send_signal(signal.SIGCONT)
        limiter.close()
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=10)
