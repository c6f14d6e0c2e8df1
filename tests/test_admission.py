"""Admission control with real threads: the cap, the FIFO queue, busy refusals, cancellation and the VRAM hold.

Timing is asserted loosely (generous upper bounds) except the refusal latency, which is a median of many.
"""

from __future__ import annotations

import functools
import gc
import random
import statistics
import threading
import time
from collections.abc import Callable

import pytest

from clawdbot.admission import Admission, AdmissionStats, Ticket
from clawdbot.errors import BusyError, SettingsError

PROMPT = 2.0  # "promptly": a generous bound for anything that should take milliseconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switch:
    """A pressure callable the test flips, counting how often the gate asks."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.on


def until(condition: Callable[[], bool], timeout: float = PROMPT) -> bool:
    """Poll a test condition (the gate itself never polls)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def assert_idle(adm: Admission) -> AdmissionStats:
    stats = adm.snapshot()
    assert (stats.generating, stats.queued) == (0, 0), stats
    return stats


def test_twenty_callers_cap_fifo_and_no_leak() -> None:
    adm = Admission(4, 3, queue_timeout=5.0)
    barrier = threading.Barrier(20)
    lock = threading.Lock()
    entered = threading.Semaphore(0)
    finish = threading.Event()
    outcomes: list[str] = []
    refusal_s: list[float] = []
    holders: list[threading.Event] = []
    queued_positions: list[int] = []
    admission_order: list[int] = []
    inside = [0, 0]  # now, most ever

    def generate(then: threading.Event) -> None:
        with lock:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        then.wait(10)
        with lock:
            inside[0] -= 1

    def caller() -> None:
        barrier.wait()
        began = time.perf_counter()
        try:
            ticket = adm.enter()
        except BusyError as exc:
            with lock:
                outcomes.append("refused")
                refusal_s.append(time.perf_counter() - began)
            assert exc.retry_after >= 1
            entered.release()
            return
        try:
            if ticket.admitted:
                mine = threading.Event()
                with lock:
                    outcomes.append("admitted")
                    holders.append(mine)
                entered.release()
                generate(mine)
                return
            place = ticket.position  # stable: nobody leaves before every caller has entered
            with lock:
                outcomes.append("queued")
                queued_positions.append(place)
            entered.release()
            while not ticket.wait(0.05):
                assert ticket.position >= 1
            with lock:
                admission_order.append(place)
            generate(finish)
        finally:
            ticket.release()

    threads = [start(caller) for _ in range(20)]
    for _ in range(20):
        assert entered.acquire(timeout=5)
    assert sorted(outcomes) == ["admitted"] * 4 + ["queued"] * 3 + ["refused"] * 13
    assert sorted(queued_positions) == [1, 2, 3]
    assert max(refusal_s) < 1.0
    stats = adm.snapshot()
    assert (stats.generating, stats.queued, stats.refused_total, stats.refused_last_minute) == (4, 3, 13, 13)

    # Free the first four slots one by one: each goes to the head of the queue, in the order they entered.
    for freed in range(3):
        holders[freed].set()
        assert until(functools.partial(lambda n: len(admission_order) == n, freed + 1))
        stats = adm.snapshot()
        assert (stats.generating, stats.queued) == (4, 2 - freed)
    assert admission_order == [1, 2, 3]
    finish.set()
    holders[3].set()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert inside == [0, 4]
    stats = assert_idle(adm)
    assert (stats.admitted_total, stats.refused_total) == (7, 13)


def test_random_load_never_exceeds_the_cap_and_leaves_nothing_behind() -> None:
    adm = Admission(3, 4, queue_timeout=0.5)
    lock = threading.Lock()
    inside = [0, 0]
    admitted = [0]
    timers: list[threading.Timer] = []
    rng = random.Random(7)
    plans = [[rng.random() for _ in range(15)] for _ in range(20)]

    def caller(plan: list[float]) -> None:
        for roll in plan:
            try:
                ticket = adm.enter()
            except BusyError:
                time.sleep(0.002)
                continue
            cancel = roll < 0.15  # the caller goes away: another thread cancels its ticket
            if cancel:
                timer = threading.Timer(0.003, ticket.release)
                timer.start()
                with lock:
                    timers.append(timer)
            try:
                with ticket:
                    while not ticket.wait(0.01):
                        if ticket.position == -1:
                            break
                    if cancel or not ticket.admitted:
                        continue
                    with lock:
                        admitted[0] += 1
                        inside[0] += 1
                        inside[1] = max(inside[1], inside[0])
                    time.sleep(roll * 0.004)
                    with lock:
                        inside[0] -= 1
                    if roll > 0.9:
                        raise RuntimeError("the generation failed")
            except (BusyError, RuntimeError):
                pass

    threads = [start(functools.partial(caller, plan)) for plan in plans]
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive()
    for timer in timers:
        timer.join(5)
    assert 1 <= inside[1] <= 3
    stats = assert_idle(adm)
    assert stats.admitted_total >= admitted[0] > 0


def test_refusal_is_immediate_even_with_a_slow_vram_guard() -> None:
    def slow_guard() -> bool:
        time.sleep(0.2)
        return False

    adm = Admission(1, 1, queue_timeout=30, pressure=slow_guard)
    holder = adm.enter()
    waiter = adm.enter()
    durations: list[float] = []
    for _ in range(200):
        began = time.perf_counter()
        with pytest.raises(BusyError) as refused:
            adm.enter()
        durations.append(time.perf_counter() - began)
    assert statistics.median(durations) < 0.05
    assert (
        str(refused.value) == "the model is busy: 1 request is generating and 1 is waiting; try again in 20 s"
    )
    assert refused.value.retry_after == 20
    assert refused.value.exit_code == 3
    holder.release()
    waiter.release()
    stats = assert_idle(adm)
    assert stats.refused_last_minute == stats.refused_total == 200

    closed = Admission(2, 0, queue_timeout=30)
    first, second = closed.enter(), closed.enter()
    assert first.admitted and second.admitted
    with pytest.raises(BusyError, match=r"^the model is busy: 2 requests are generating and 0 are waiting; "):
        closed.enter()
    first.release()
    third = closed.enter()
    assert third.admitted
    second.release()
    third.release()
    assert_idle(closed)


def test_position_is_observable_and_decreases_as_slots_free() -> None:
    adm = Admission(1, 3, queue_timeout=10)
    running = adm.enter()
    first, second, third = adm.enter(), adm.enter(), adm.enter()
    assert [running.position, first.position, second.position, third.position] == [0, 1, 2, 3]
    seen: list[int] = []

    def gateway() -> None:
        while not third.wait(0.02):
            if not seen or seen[-1] != third.position:
                seen.append(third.position)
        seen.append(third.position)

    watcher = start(gateway)
    assert until(lambda: seen == [3])
    running.release()
    assert [running.position, first.position, second.position, third.position] == [-1, 0, 1, 2]
    assert until(lambda: seen[-1] == 2)
    second.release()  # leaves the queue: the ones behind move up
    assert until(lambda: seen[-1] == 1)
    first.release()
    watcher.join(PROMPT)
    assert seen == [3, 2, 1, 0]
    assert third.admitted and third.queued_s > 0
    third.release()
    assert_idle(adm)


def test_queue_timeout_refuses_busy_and_counters_return_to_zero() -> None:
    adm = Admission(1, 1, queue_timeout=0.3)
    holder = adm.enter()
    waiter = adm.enter()
    began = time.monotonic()
    with pytest.raises(BusyError) as refused:
        while not waiter.wait(0.05):
            pass
    waited = time.monotonic() - began
    assert 0.25 <= waited < PROMPT
    assert str(refused.value).startswith("waited 0.3 s in the queue without a free slot; try again in ")
    assert refused.value.retry_after >= 1
    assert waiter.position == -1 and not waiter.admitted
    assert 0.25 <= waiter.queued_s < PROMPT
    with pytest.raises(BusyError):  # asking again says the same
        waiter.wait(0)
    waiter.release()
    waiter.release()
    stats = adm.snapshot()
    assert (stats.generating, stats.queued, stats.refused_total) == (1, 0, 1)
    holder.release()
    assert_idle(adm)


def test_a_queued_ticket_nobody_waits_on_still_expires() -> None:
    adm = Admission(1, 1, queue_timeout=0.2)
    holder = adm.enter()
    abandoned = adm.enter()
    time.sleep(0.3)
    late = adm.enter()  # the abandoned one's place is free again
    assert abandoned.position == -1 and late.position == 1
    holder.release()
    assert late.admitted
    late.release()
    assert assert_idle(adm).refused_total == 1


def test_cancel_from_another_thread_wakes_the_waiter_and_hands_the_slot_on() -> None:
    adm = Admission(1, 2, queue_timeout=30)
    running = adm.enter()
    cancelled = adm.enter()
    result: list[bool] = []
    waiter = start(lambda: result.append(cancelled.wait()))  # blocks: no timeout of its own
    time.sleep(0.05)
    began = time.monotonic()
    cancelled.release()
    waiter.join(PROMPT)
    assert time.monotonic() - began < PROMPT and result == [False]
    assert cancelled.position == -1
    assert adm.snapshot().queued == 0

    nxt = adm.enter()
    admitted: list[bool] = []
    second = start(lambda: admitted.append(nxt.wait()))
    running.release()
    assert nxt.admitted  # at once, inside release()
    newcomer = adm.enter()  # no barging: the freed slot is taken, the newcomer queues
    assert newcomer.position == 1 and not newcomer.admitted
    second.join(PROMPT)
    assert admitted == [True]
    nxt.release()
    assert newcomer.admitted
    newcomer.release()
    assert_idle(adm)


def test_cancelling_an_admitted_ticket_while_another_thread_generates() -> None:
    adm = Admission(1, 0, queue_timeout=30)
    ticket = adm.enter()
    threading.Timer(0.05, ticket.release).start()
    assert until(lambda: ticket.position == -1)
    assert ticket.wait(1) is False
    assert_idle(adm)


def test_an_exception_inside_the_with_block_frees_the_slot() -> None:
    adm = Admission(1, 1, queue_timeout=30)
    with pytest.raises(ValueError, match="boom"), adm.enter() as ticket:
        assert ticket.wait(1)
        assert adm.snapshot().generating == 1
        raise ValueError("boom")
    assert ticket.position == -1
    assert_idle(adm)


def test_a_forgotten_ticket_gives_its_slot_back_when_collected() -> None:
    adm = Admission(1, 1, queue_timeout=30)
    ticket: Ticket | None = adm.enter()
    assert ticket is not None and ticket.admitted
    del ticket
    gc.collect()
    assert_idle(adm)
    assert adm.enter().admitted  # and frees it again right away


def test_vram_pressure_holds_the_queue_and_releases_it_in_order() -> None:
    guard = Switch(on=False)
    adm = Admission(2, 3, queue_timeout=10, pressure=guard, pressure_interval=0.1)
    running = adm.enter()
    assert running.admitted
    guard.on = True
    time.sleep(0.15)  # the last reading is stale: the next one sees the pressure
    first = adm.enter()
    second = adm.enter()
    assert (first.position, second.position) == (1, 2)  # a slot is free, yet they wait
    assert first.wait(0.3) is False
    stats = adm.snapshot()
    assert stats.vram_hold and (stats.generating, stats.queued) == (1, 2)
    assert running.admitted  # already admitted requests go on
    running.release()
    assert first.wait(0.2) is False and first.position == 1

    adm.reconfigure(1, 3, 10)  # one slot, so the order of admission shows
    guard.on = False
    assert first.wait(PROMPT) is True
    assert second.position == 1 and not adm.snapshot().vram_hold
    first.release()
    assert second.admitted
    second.release()
    assert_idle(adm)


def test_vram_pressure_with_no_queue_refuses_with_a_plain_reason() -> None:
    adm = Admission(2, 0, queue_timeout=10, pressure=lambda: True)
    with pytest.raises(
        BusyError, match=r"^the model is busy: GPU memory is above the guard and 0 requests are"
    ):
        adm.enter()
    waiting = Admission(2, 1, queue_timeout=0.2, pressure=lambda: True)
    ticket = waiting.enter()
    with pytest.raises(BusyError, match=r"^waited 0.2 s in the queue while GPU memory was above the guard"):
        ticket.wait()
    assert_idle(waiting)


def test_the_vram_guard_is_read_at_most_every_half_second() -> None:
    guard = Switch(on=True)
    adm = Admission(2, 3, queue_timeout=10, pressure=guard)
    tickets = [adm.enter() for _ in range(3)]

    def wait_a_while(ticket: Ticket) -> None:
        assert ticket.wait(1.2) is False

    waiters = [start(functools.partial(wait_a_while, t)) for t in tickets]
    for waiter in waiters:
        waiter.join(PROMPT)
    assert 2 <= guard.calls <= 5
    guard.on = False
    assert until(lambda: tickets[0].wait(0.1) and tickets[1].wait(0.1))
    assert tickets[2].position == 1
    for ticket in tickets:
        ticket.release()
    assert_idle(adm)


def test_a_failing_vram_guard_does_not_hold_anyone_back() -> None:
    def broken() -> bool:
        raise OSError("NVML went away")

    adm = Admission(1, 1, queue_timeout=10, pressure=broken)
    ticket = adm.enter()
    assert ticket.admitted and not adm.snapshot().vram_hold
    ticket.release()
    assert_idle(adm)


def test_retry_after_grows_with_service_time_and_queue_length() -> None:
    adm = Admission(2, 4, queue_timeout=30)
    adm.record_service_time(0.1)
    assert adm.retry_after() == 1  # at least a second
    adm.record_service_time(10)
    short = adm.retry_after()
    for _ in range(10):
        adm.record_service_time(40)
    longer = adm.retry_after()
    assert 1 <= short < longer
    assert longer == int(longer)
    assert adm.snapshot().service_time_s > 30

    tickets = [adm.enter() for _ in range(2)]
    empty_queue = adm.retry_after()
    tickets += [adm.enter() for _ in range(4)]
    assert adm.retry_after() > empty_queue == longer
    with pytest.raises(BusyError) as refused:
        adm.enter()
    assert refused.value.retry_after == adm.retry_after()
    assert f"try again in {int(adm.retry_after())} s" in str(refused.value)
    adm.record_service_time(float("nan"))
    adm.record_service_time(-1)
    assert adm.retry_after() == refused.value.retry_after
    for ticket in tickets:
        ticket.release()
    assert_idle(adm)


def test_refused_last_minute_counts_both_kinds_and_expires_on_the_clock() -> None:
    clock = FakeClock()
    adm = Admission(1, 1, queue_timeout=10, clock=clock)
    holder = adm.enter()
    queued = adm.enter()
    with pytest.raises(BusyError, match=r"^the model is busy"):
        adm.enter()  # at the door, t=0
    clock.now += 11
    with pytest.raises(BusyError, match=r"^waited 10 s in the queue"):
        queued.wait(0)  # the queue timeout, t=11
    assert queued.queued_s == pytest.approx(11)
    assert adm.snapshot().refused_last_minute == 2
    clock.now += 50  # t=61: the first refusal is older than a minute
    assert adm.snapshot().refused_last_minute == 1
    clock.now += 10  # t=71
    stats = adm.snapshot()
    assert (stats.refused_last_minute, stats.refused_total, stats.admitted_total) == (0, 2, 1)
    holder.release()
    assert_idle(adm)


def test_reconfigure_raises_the_cap_and_admits_waiting_tickets() -> None:
    adm = Admission(1, 3, queue_timeout=30)
    running = adm.enter()
    waiting = [adm.enter(), adm.enter(), adm.enter()]
    adm.reconfigure(3, 3, 30)
    assert [t.position for t in waiting] == [0, 0, 1]
    stats = adm.snapshot()
    assert (stats.max_concurrent, stats.generating, stats.queued) == (3, 3, 1)

    adm.reconfigure(
        1, 0, 30
    )  # lower: running requests finish, the waiter keeps its place, newcomers are refused
    with pytest.raises(BusyError):
        adm.enter()
    running.release()
    waiting[0].release()
    assert waiting[2].position == 1
    waiting[1].release()
    assert waiting[2].admitted
    waiting[2].release()
    assert_idle(adm)

    with pytest.raises(SettingsError, match="CLAWDBOT_MAX_CONCURRENT=0"):
        adm.reconfigure(0, 3, 30)
    with pytest.raises(SettingsError, match="CLAWDBOT_QUEUE_TIMEOUT"):
        Admission(1, 1, queue_timeout=0)
    assert adm.snapshot().max_concurrent == 1


def test_release_is_idempotent_and_wait_after_release_is_false() -> None:
    adm = Admission(1, 1, queue_timeout=30)
    ticket = adm.enter()
    assert ticket.wait(0) is True and ticket.position == 0
    ticket.release()
    ticket.release()
    assert ticket.wait(0) is False and ticket.wait() is False
    assert (ticket.position, ticket.admitted) == (-1, False)
    stats = assert_idle(adm)
    assert stats.admitted_total == 1


def test_a_release_run_by_the_garbage_collector_inside_the_gate_is_applied_not_deadlocked() -> None:
    # A generator's `finally: ticket.release()` can be run by the garbage collector on a thread that is
    # inside the gate's critical section (any allocation may start a collection). That must neither
    # deadlock nor corrupt the state: the release is applied when the critical section ends.
    adm = Admission(2, 2, queue_timeout=30)
    victim = adm.enter()
    fired: list[bool] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and not fired and adm._lock.locked():
            fired.append(True)
            victim.release()

    threshold = gc.get_threshold()
    gc.callbacks.append(on_gc)
    gc.set_threshold(1)  # every allocation of a tracked object starts a collection
    try:
        for _ in range(20):
            adm.enter().release()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(on_gc)
    assert fired
    assert victim.position == -1
    stats = assert_idle(adm)
    assert stats.admitted_total == 21
