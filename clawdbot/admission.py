"""Admission control: the one gate every caller in the process passes before it may generate on the GPU.

Why it exists: clawdbot fronts ONE scarce GPU. Ollama would accept any number of requests and either queue
them out of sight or run them side by side until the card runs out of memory, so the process itself decides
who generates: at most `max_concurrent` at once, at most `queue_size` waiting in FIFO order (each can see its
place), the next one refused busy at once with a retry-after estimate, a waiter refused busy after
`queue_timeout` seconds, and, while GPU memory is above the VRAM guard, nobody new admitted even when a slot
is free. Streamlit script threads, the CLI and the API's thread pool share one `Admission`, so its state
lives behind one lock and one condition variable; no thread polls except for the VRAM re-check.

How the gateway uses it (synchronous, one thread per request)::

    ticket = admission.enter()          # BusyError at once when the queue is full
    try:
        while not ticket.wait(0.2):     # True once admitted; BusyError after queue_timeout in the queue
            if ticket.position == -1:   # released by another thread: the caller went away
                return
            report(ticket.position)     # 1 = next in line
        ...generate...
    finally:
        ticket.release()                # idempotent; hands the slot to the head of the queue at once

Cancellation: `release()` may be called from any thread. A thread blocked in `wait()` on that ticket then
returns False promptly, and `position` is -1 from then on; `wait()` never raises for a released ticket.

Clocks: the injected `clock` times the bookkeeping (time in the queue, queue deadlines, the one-minute
refusal window); blocking (the `timeout` of `wait()`) and the rate limit of the VRAM check use real time.

Faults: every state change happens under the lock, `release()` is idempotent, and a ticket that is garbage
collected while it still holds a slot gives it back, so the counters return to zero whatever the callers do.
A `release()` that runs inside one of this class's own critical sections (a generator's `finally` run by the
garbage collector on the same thread) is queued and applied before the lock is let go, instead of deadlocking.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from clawdbot.errors import BusyError, SettingsError
from clawdbot.settings import ACCEPTED, env_name

log = logging.getLogger(__name__)

REFUSAL_WINDOW_S = 60.0
"""`refused_last_minute` counts busy refusals this many seconds back."""
DEFAULT_SERVICE_TIME_S = 10.0
"""The service-time estimate before the gateway has reported any generation."""
SERVICE_TIME_ALPHA = 0.2
"""Weight of the newest report in the moving average of service time."""
PRESSURE_INTERVAL_S = 0.5
"""Least time between two calls of the `pressure` callable."""


class _State(enum.Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    RELEASED = "released"
    REFUSED = "refused"


@dataclass(frozen=True)
class AdmissionStats:
    """What the gate looks like now, for the operations page and the API."""

    generating: int
    queued: int
    max_concurrent: int
    queue_size: int
    refused_last_minute: int
    """Busy refusals in the last 60 s, both at the door (queue full) and after waiting `queue_timeout`."""
    admitted_total: int
    refused_total: int
    vram_hold: bool
    """GPU memory is above the guard, so queued requests wait even for a free slot."""
    queue_timeout: float
    service_time_s: float
    """The moving average of how long a generation holds its slot (the default before any report)."""


class Ticket:
    """One request's place at the gate: queued, admitted (holding a slot), released, or refused.

    Tickets come from `Admission.enter()`. Every method may be called from any thread.
    """

    def __init__(self, admission: Admission, entered: float, state: _State) -> None:
        self._admission = admission
        self._entered = entered
        self._state = state
        self._admitted_at: float | None = entered if state is _State.ADMITTED else None
        self._ended_at: float | None = None
        self._error: BusyError | None = None

    @property
    def position(self) -> int:
        """0 while admitted, the 1-based place in the queue while waiting (1 = next), -1 once released or refused."""
        return self._admission._position(self)

    @property
    def admitted(self) -> bool:
        """Whether this ticket holds a slot now (False again after `release()`)."""
        return self._state is _State.ADMITTED

    @property
    def queued_s(self) -> float:
        """Seconds spent waiting in the queue: so far while queued, in total once admitted, released or refused."""
        end = self._admitted_at if self._admitted_at is not None else self._ended_at
        if end is None:
            end = self._admission._clock()
        return max(0.0, end - self._entered)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until admitted (True), until `timeout` seconds pass (False), or until released (False).

        Raises `BusyError` once the ticket has waited `queue_timeout` seconds in the queue (and on every later
        call). After a `release()` from any thread it returns False and `position` is -1. `timeout=None` waits
        as long as the queue timeout allows; `timeout=0` only looks.
        """
        return self._admission._wait(self, timeout)

    def release(self) -> None:
        """Give the slot back or leave the queue; the slot goes to the head of the queue at once. Idempotent."""
        self._admission._release(self)

    def __enter__(self) -> Self:
        """`with admission.enter() as ticket:` releases the ticket however the block ends; it does not wait."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A ticket nobody can release any more must not keep its slot. Queued tickets are referenced by the
        # queue, so only an admitted one (or any at interpreter shutdown) gets here.
        try:
            if self._state is _State.ADMITTED:
                self._admission._release(self)
        except Exception:  # noqa: S110 - nothing useful can be done from a finalizer
            pass

    def __repr__(self) -> str:
        return f"<Ticket {self._state.value} queued_s={self.queued_s:.3f}>"


def _seconds(value: float) -> str:
    """60.0 → '60', 0.3 → '0.3', 12.7 → '13'."""
    return f"{round(value)}" if value >= 10 else f"{round(value, 1):g}"


def _busy_state(generating: int, waiting: int, hold: bool) -> str:
    """'4 requests are generating and 3 are waiting', in plain words."""
    are = "is" if waiting == 1 else "are"
    if hold:
        return f"GPU memory is above the guard and {waiting} {'request' if waiting == 1 else 'requests'} {are} waiting"
    return f"{generating} {'request is' if generating == 1 else 'requests are'} generating and {waiting} {are} waiting"


def _setting_error(field: str, value: object) -> SettingsError:
    return SettingsError(f"invalid setting {env_name(field)}={value}: expected {ACCEPTED[field]}")


def _validate(max_concurrent: int, queue_size: int, queue_timeout: float) -> None:
    if not 1 <= max_concurrent <= 256:
        raise _setting_error("max_concurrent", max_concurrent)
    if not 0 <= queue_size <= 10_000:
        raise _setting_error("queue_size", queue_size)
    if not (math.isfinite(queue_timeout) and queue_timeout > 0):
        raise _setting_error("queue_timeout", queue_timeout)


class Admission:
    """The concurrency cap, the bounded FIFO queue and the VRAM hold, shared by every caller in the process.

    `pressure`, when given, answers True while GPU memory use is above the guard; it is called outside the
    lock, at most every `pressure_interval` seconds, only when someone is entering, waiting or looking at
    `snapshot()` (never per token). While it says True nobody new is admitted, already admitted requests go
    on, and when it clears the queue is admitted in FIFO order. If it raises, the guard counts as clear.
    """

    def __init__(
        self,
        max_concurrent: int,
        queue_size: int,
        queue_timeout: float,
        *,
        pressure: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        pressure_interval: float = PRESSURE_INTERVAL_S,
    ) -> None:
        _validate(max_concurrent, queue_size, queue_timeout)
        if not (math.isfinite(pressure_interval) and pressure_interval > 0):
            raise ValueError("pressure_interval must be a positive number of seconds")
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._owner: int | None = None  # thread holding _lock inside _locked(), to spot re-entry
        self._deferred: list[Ticket] = []  # releases asked for from inside our own critical section
        self._max_concurrent = max_concurrent
        self._queue_size = queue_size
        self._queue_timeout = float(queue_timeout)
        self._queue: deque[Ticket] = deque()
        self._generating = 0
        self._admitted_total = 0
        self._refused_total = 0
        self._refused_at: deque[float] = deque()
        self._service_time: float | None = None
        self._pressure = pressure
        self._pressure_interval = pressure_interval
        self._pressure_checked_at: float | None = None  # time.monotonic() of the last reading
        self._checking = False
        self._hold = False

    # ----------------------------------------------------------------------------------------- public API

    def enter(self) -> Ticket:
        """Take a slot now, or a place at the tail of the queue; raise `BusyError` at once if the queue is full.

        A free slot goes to a newcomer only when nobody is queued and the VRAM guard is clear, so queued
        requests are never overtaken. With `queue_size=0` this either admits at once or raises.
        """
        with self._locked():
            now = self._clock()
            self._dispatch_locked(now)
            if not self._queue and self._generating < self._max_concurrent and self._pressure_due_locked():
                self._check_pressure_locked()
                now = self._clock()
            if not self._hold and not self._queue and self._generating < self._max_concurrent:
                ticket = Ticket(self, now, _State.ADMITTED)
                self._generating += 1
                self._admitted_total += 1
                return ticket
            if len(self._queue) < self._queue_size:
                ticket = Ticket(self, now, _State.QUEUED)
                self._queue.append(ticket)
                return ticket
            retry = self._retry_after_locked()
            held_back = self._hold and self._generating < self._max_concurrent
            state = _busy_state(self._generating, len(self._queue), held_back)
            self._count_refusal_locked(now)
        raise BusyError(f"the model is busy: {state}; try again in {retry:.0f} s", retry)

    def snapshot(self) -> AdmissionStats:
        """The counters now (re-reading the VRAM guard if its last reading is older than the interval)."""
        with self._locked():
            if self._pressure_due_locked():
                self._check_pressure_locked()
            now = self._clock()
            self._dispatch_locked(now)
            self._prune_refusals_locked(now)
            return AdmissionStats(
                generating=self._generating,
                queued=len(self._queue),
                max_concurrent=self._max_concurrent,
                queue_size=self._queue_size,
                refused_last_minute=len(self._refused_at),
                admitted_total=self._admitted_total,
                refused_total=self._refused_total,
                vram_hold=self._hold,
                queue_timeout=self._queue_timeout,
                service_time_s=self._service_time_locked(),
            )

    def record_service_time(self, seconds: float) -> None:
        """Fold how long one generation held its slot into the moving average (negative or NaN is ignored)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        with self._locked():
            if self._service_time is None:
                self._service_time = seconds
            else:
                self._service_time += SERVICE_TIME_ALPHA * (seconds - self._service_time)

    def retry_after(self) -> float:
        """Seconds after which a refused request may expect to get in: whole seconds, at least 1.

        Everyone queued plus the newcomer needs a slot, and `max_concurrent` slots each free up about once
        per average service time: ceil(service_time × (queued + 1) / max_concurrent).
        """
        with self._locked():
            return self._retry_after_locked()

    def reconfigure(self, max_concurrent: int, queue_size: int, queue_timeout: float) -> None:
        """Change the limits live. A higher cap admits waiters at once; a lower one lets running requests
        finish; a smaller queue keeps those already waiting; the new timeout applies to them too.

        Raises `SettingsError` (and changes nothing) for a value the settings would not accept.
        """
        _validate(max_concurrent, queue_size, queue_timeout)
        with self._locked():
            self._max_concurrent = max_concurrent
            self._queue_size = queue_size
            self._queue_timeout = float(queue_timeout)
            self._dispatch_locked(self._clock())
            self._cond.notify_all()

    # ------------------------------------------------------------------------------- used by Ticket

    def _position(self, ticket: Ticket) -> int:
        with self._locked():
            self._dispatch_locked(self._clock())
            if ticket._state is _State.QUEUED:
                return self._queue.index(ticket) + 1
            return 0 if ticket._state is _State.ADMITTED else -1

    def _wait(self, ticket: Ticket, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        with self._locked():
            while True:
                now = self._clock()
                self._dispatch_locked(now)
                if ticket._state is _State.QUEUED and self._pressure_due_locked():
                    self._check_pressure_locked()
                    continue
                if ticket._state is _State.ADMITTED:
                    return True
                if ticket._state is _State.RELEASED:
                    return False
                if ticket._state is _State.REFUSED:
                    assert ticket._error is not None
                    raise BusyError(ticket._error.message, ticket._error.retry_after)
                delay = self._queue_timeout - (now - ticket._entered)
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    delay = min(delay, left)
                if self._hold and not self._checking and self._pressure_checked_at is not None:
                    delay = min(delay, self._pressure_checked_at + self._pressure_interval - time.monotonic())
                self._wait_locked(max(delay, 0.0))

    def _release(self, ticket: Ticket) -> None:
        if self._owner == threading.get_ident():
            # Called from inside one of our own critical sections (a finalizer run by the garbage collector
            # on this thread): applying it now could corrupt the operation in progress, blocking would
            # deadlock, so it is applied when that critical section ends.
            self._deferred.append(ticket)
            return
        with self._locked():
            self._release_locked(ticket)

    # ---------------------------------------------------------------------------------- internals

    @contextmanager
    def _locked(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("Admission was called from inside its own critical section")
        self._lock.acquire()
        self._owner = me
        try:
            yield
        finally:
            try:
                self._drain_locked()
            finally:
                self._owner = None
                self._lock.release()

    def _drain_locked(self) -> None:
        while self._deferred:
            self._release_locked(self._deferred.pop(0))

    def _wait_locked(self, timeout: float) -> None:
        self._drain_locked()
        self._owner = None
        try:
            self._cond.wait(timeout)
        finally:
            self._owner = threading.get_ident()

    def _release_locked(self, ticket: Ticket) -> None:
        if ticket._state is _State.QUEUED:
            self._queue.remove(ticket)
        elif ticket._state is _State.ADMITTED:
            self._generating -= 1
        else:
            return  # released twice, or refused: nothing to give back
        now = self._clock()
        ticket._state = _State.RELEASED
        ticket._ended_at = now
        self._dispatch_locked(now)
        self._cond.notify_all()

    def _dispatch_locked(self, now: float) -> None:
        """Refuse waiters past their deadline, then hand free slots to the head of the queue."""
        changed = False
        while self._queue and now - self._queue[0]._entered >= self._queue_timeout:
            self._expire_locked(self._queue.popleft(), now)
            changed = True
        while self._queue and not self._hold and self._generating < self._max_concurrent:
            ticket = self._queue.popleft()
            ticket._state = _State.ADMITTED
            ticket._admitted_at = now
            self._generating += 1
            self._admitted_total += 1
            changed = True
        if changed:
            self._cond.notify_all()

    def _expire_locked(self, ticket: Ticket, now: float) -> None:
        retry = self._retry_after_locked()
        if self._hold and self._generating < self._max_concurrent:
            reason = "while GPU memory was above the guard"
        else:
            reason = "without a free slot"
        ticket._error = BusyError(
            f"waited {_seconds(self._queue_timeout)} s in the queue {reason}; try again in {retry:.0f} s",
            retry,
        )
        ticket._state = _State.REFUSED
        ticket._ended_at = now
        self._count_refusal_locked(now)

    def _count_refusal_locked(self, now: float) -> None:
        self._refused_total += 1
        self._refused_at.append(now)
        self._prune_refusals_locked(now)

    def _prune_refusals_locked(self, now: float) -> None:
        while self._refused_at and now - self._refused_at[0] >= REFUSAL_WINDOW_S:
            self._refused_at.popleft()

    def _service_time_locked(self) -> float:
        return DEFAULT_SERVICE_TIME_S if self._service_time is None else self._service_time

    def _retry_after_locked(self) -> float:
        needed = len(self._queue) + 1
        return float(max(1, math.ceil(self._service_time_locked() * needed / self._max_concurrent)))

    def _pressure_due_locked(self) -> bool:
        if self._pressure is None or self._checking:
            return False
        last = self._pressure_checked_at
        return last is None or time.monotonic() - last >= self._pressure_interval

    def _check_pressure_locked(self) -> None:
        """Read the VRAM guard with the lock let go (it may take milliseconds), then apply the reading."""
        pressure = self._pressure
        assert pressure is not None
        self._checking = True
        self._drain_locked()
        self._owner = None
        self._lock.release()
        try:
            try:
                held = bool(pressure())
            except Exception:
                log.warning(
                    "the VRAM guard could not be read; admitting as if memory were below it", exc_info=True
                )
                held = False
        finally:
            self._lock.acquire()
            self._owner = threading.get_ident()
            self._checking = False
            self._pressure_checked_at = time.monotonic()
            self._cond.notify_all()  # waiters that skipped the check while it ran look again
        self._hold = held
        self._dispatch_locked(self._clock())
