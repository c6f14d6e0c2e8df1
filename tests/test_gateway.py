"""The gateway with real parts: HTTP to the Ollama simulator, real databases, real threads, the real SmolLM2.

Nothing here fakes the ollama client: every gateway is built by `Runtime` from settings (or from the same
real parts, where a test needs the embedded model shared), and each fault is one the simulator produces on the
wire. Timing bounds are loose on purpose; the counts (requests at the simulator, rows, statuses) are exact.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from clawdbot.admission import Admission
from clawdbot.agents import AgentConfig
from clawdbot.audit import AuditStore
from clawdbot.backends import BackendSelector, ContentDelta, EmbeddedBackend, ThinkingDelta
from clawdbot.chain import verify_chain
from clawdbot.chat import TurnStarted
from clawdbot.db import Database
from clawdbot.gateway import ChatRequest, ContextPlanned, Finished, Gateway, GatewayEvent, Queued, Started
from clawdbot.models import Request, Status
from clawdbot.ratelimit import RateLimiter
from clawdbot.runtime import Runtime
from clawdbot.settings import Settings, load_settings
from tests.helpers import MODEL, all_requests
from tests.ollama_sim import BUSY_MESSAGE, DEFAULT_THINKING, RUNNER_CRASH_MESSAGE, OllamaSimulator

SMALL = "qwen3:0.6b"
OTHER = "llama3.2:1b"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1"
FRANCE = "What is the capital of France? Answer in one word."
PROMPTLY = 2.0  # a generous bound for what should take milliseconds

MakeRuntime = Callable[..., Runtime]


# -- helpers -------------------------------------------------------------------------------------------


def ask(
    prompt: str = "hello there", *, user: str = "alice", model: str = MODEL, **fields: Any
) -> ChatRequest:
    return ChatRequest(
        user=user, messages=[{"role": "user", "content": prompt}], model=model, prompt=prompt, **fields
    )


class Caller(threading.Thread):
    """One caller reading a gateway stream in its own thread; its events are visible while it runs."""

    def __init__(
        self, gateway: Gateway, request: ChatRequest, barrier: threading.Barrier | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.request = request
        self.barrier = barrier
        self.events: list[tuple[float, GatewayEvent]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            for event in self.gateway.stream(self.request):
                self.events.append((time.monotonic(), event))
        except BaseException as exc:  # reported by the test through `finished`
            self.error = exc

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for _, e in list(self.events) if isinstance(e, kind)]

    @property
    def finished(self) -> Finished:
        assert self.error is None, repr(self.error)
        last = self.events[-1][1]
        assert isinstance(last, Finished)
        assert sum(isinstance(e, Finished) for _, e in self.events) == 1
        return last

    @property
    def finished_at(self) -> float:
        return self.events[-1][0]

    def is_queued(self) -> bool:
        return bool(self.of(Queued))

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.of(Queued)]


def run_together(gateway: Gateway, requests: list[ChatRequest], timeout: float) -> list[Caller]:
    """A caller per request, all released at once through a barrier; returns them once they have finished."""
    barrier = threading.Barrier(len(requests))
    callers = [Caller(gateway, request, barrier) for request in requests]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout)
    return callers


def drain(gateway: Gateway, request: ChatRequest) -> tuple[list[GatewayEvent], Finished]:
    events = list(gateway.stream(request))
    # A context plan is announced only when something had to be left out or cut.
    events = [e for e in events if not isinstance(e, ContextPlanned) or e.plan.truncated]
    last = events[-1]
    assert isinstance(last, Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    return events, last


def text_of(events: list[Any]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def row(db: Database, request_id: int) -> Request:
    with db.read() as session:
        found = session.get(Request, request_id)
        assert found is not None
        return found


def until(condition: Callable[[], bool], timeout: float = PROMPTLY) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def chain_ok(db: Database, records: int) -> None:
    result = verify_chain(db)
    assert result.ok, result.first_break
    assert result.checked == records


def assert_idle(gateway: Gateway) -> None:
    stats = gateway.admission.snapshot()
    assert (stats.generating, stats.queued) == (0, 0)


def bodies(sim: OllamaSimulator) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.requests if r["path"] == "/api/chat"]


def last_user_text(body: dict[str, Any]) -> str:
    return str([m for m in body["messages"] if m["role"] == "user"][-1]["content"])


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def make_runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[MakeRuntime]:
    """Runtimes over the test's database and simulator; keyword arguments override the settings."""
    made: list[Runtime] = []

    def make(**overrides: Any) -> Runtime:
        settings: dict[str, Any] = {
            "database_url": db.url,
            "ollama_host": sim.url,
            "backend": "ollama",
            "rate_limit": "",
            "retries": 0,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
            "queue_timeout": 5.0,
            "fallback_model": "",
            **overrides,
        }
        runtime = Runtime(load_settings(**settings))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()


@pytest.fixture
def gateway(make_runtime: MakeRuntime) -> Gateway:
    return make_runtime().gateway


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedBackend]:
    model = EmbeddedBackend()
    yield model
    model.close()


# -- 1. timings ----------------------------------------------------------------------------------------


def test_timings_are_measured_inside_the_stream_and_recorded(
    sim: OllamaSimulator, gateway: Gateway, db: Database
) -> None:
    sim.ttft, sim.tokens_per_s, sim.default_tokens = 0.4, 40.0, 20
    began = time.monotonic()
    events, finished = drain(gateway, ask(think=True))
    waited_ms = (time.monotonic() - began) * 1000

    assert isinstance(events[0], Started) and events[0].backend == "ollama" and events[0].model == MODEL
    assert [type(e) for e in events[1:-1]] == [ThinkingDelta] * 5 + [ContentDelta] * 20
    assert finished.status is Status.OK and finished.exit_code == 0 and finished.message == ""
    record = row(db, finished.request_id)
    assert record.status == "ok"
    assert record.thinking == DEFAULT_THINKING
    assert record.response == text_of(events) and record.response.startswith("Echo: hello there")
    # The first thinking token counts: the simulator holds it back 0.4 s.
    assert record.ttft_ms is not None and 350 <= record.ttft_ms <= 1500
    # The server's eval_count / eval_duration: 25 chunks paced at 40 per second.
    assert record.tokens_per_s is not None and 25 <= record.tokens_per_s <= 60
    assert record.latency_ms is not None and record.ttft_ms + 450 <= record.latency_ms <= waited_ms + 50
    # Nothing else was running: the wait for a slot is bookkeeping only, far shorter than the held-back first token.
    assert record.queue_ms is not None and 0 <= record.queue_ms < record.ttft_ms
    assert record.completion_tokens == 25
    assert record.prompt_eval_count == sim.requests[0]["prompt_eval_count"] > 0
    assert (record.backend, record.model_used, record.retries, record.fallback_used) == (
        "ollama",
        MODEL,
        0,
        False,
    )
    for name in ("ttft_ms", "tokens_per_s", "latency_ms", "queue_ms", "completion_tokens"):
        assert getattr(finished, name) == pytest.approx(getattr(record, name)), name
    chain_ok(db, 1)


def test_planning_and_the_started_record_are_not_counted_as_queue_time(
    sim: OllamaSimulator, gateway: Gateway, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With free slots the wait is nil, however long the context takes to plan (a tokenizer loading, say)."""
    plan = gateway._plan

    def slow_plan(request: ChatRequest, backend: Any) -> Any:
        time.sleep(0.5)
        return plan(request, backend)

    monkeypatch.setattr(gateway, "_plan", slow_plan)
    _, finished = drain(gateway, ask())
    record = row(db, finished.request_id)
    assert record.latency_ms is not None and record.latency_ms >= 500
    assert record.queue_ms is not None and record.queue_ms < 250


def test_queue_ms_is_the_time_spent_waiting_for_a_slot(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(max_concurrent=1, queue_size=1).gateway
    holder = gateway.stream(ask("first"))
    assert isinstance(next(holder), Started)
    waiter = Caller(gateway, ask("second"))
    waiter.start()
    assert until(waiter.is_queued)
    time.sleep(0.3)
    holder.close()
    waiter.join(10)
    finished = waiter.finished
    assert finished.status is Status.OK
    record = row(db, finished.request_id)
    assert record.queue_ms is not None and 450 <= record.queue_ms <= 5000
    # ttft counts from the call to the backend, not from arrival: the queue is not in it.
    assert record.ttft_ms is not None and record.ttft_ms < record.queue_ms
    assert record.latency_ms is not None and record.latency_ms > record.queue_ms


# -- 2. faults -----------------------------------------------------------------------------------------


def test_server_down_is_model_unavailable_after_the_retries(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=1).gateway
    sim.stop()
    began = time.monotonic()
    events, finished = drain(gateway, ask())
    assert time.monotonic() - began >= 0.45
    assert [type(e) for e in events] == [Started, Started, Finished]
    assert finished.status is Status.ERROR and finished.model_unavailable and finished.exit_code == 5
    assert f"cannot reach Ollama at {sim.url}: connection refused" in finished.message
    assert "start it with `ollama serve`" in finished.message and "after 1 retries" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.error, record.retries, record.backend) == (
        "error",
        finished.message,
        1,
        "ollama",
    )
    assert record.response == "" and record.ttft_ms is None


def test_missing_model_says_how_to_pull_it_and_is_not_retried(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2).gateway
    _, finished = drain(gateway, ask(model="nosuch:7b"))
    assert len(sim.requests) == 1
    assert finished.status is Status.ERROR and finished.exit_code == 5
    assert "the model nosuch:7b is not on the Ollama server: run `ollama pull nosuch:7b`" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.retries, record.model_requested) == ("error", 0, "nosuch:7b")


def test_missing_model_goes_straight_to_the_fallback(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2).gateway
    events, finished = drain(gateway, ask(model="nosuch:7b", fallback_model=SMALL))
    assert [r["model"] for r in sim.requests] == ["nosuch:7b", SMALL]
    assert [e.model for e in events if isinstance(e, Started)] == ["nosuch:7b", SMALL]
    assert finished.status is Status.OK
    record = row(db, finished.request_id)
    assert (record.model_requested, record.model_used, record.fallback_used, record.retries) == (
        "nosuch:7b",
        SMALL,
        True,
        0,
    )


def test_when_the_fallback_fails_too_the_message_names_both_models(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=1).gateway
    _, missing = drain(gateway, ask(model="nosuch:7b", fallback_model="gone:1b"))
    assert [r["model"] for r in sim.requests] == ["nosuch:7b", "gone:1b"]
    assert missing.status is Status.ERROR and missing.exit_code == 5
    assert missing.message == (
        "the model nosuch:7b is not on the Ollama server: run `ollama pull nosuch:7b`; "
        "the fallback model gone:1b failed too: "
        "the model gone:1b is not on the Ollama server: run `ollama pull gone:1b` (after 0 retries)"
    )
    assert row(db, missing.request_id).error == missing.message

    sim.stop()  # the same failure on both models is said once
    _, down = drain(gateway, ask(fallback_model=SMALL))
    assert down.message.count("cannot reach Ollama") == 1
    assert down.message.endswith(f"(after 2 retries and the fallback model {SMALL})")


def test_http_500_is_retried_half_a_second_apart_then_reported(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2).gateway
    sim.fail_next("http_500", count=3)
    _, finished = drain(gateway, ask())
    received = [r["received_at"] for r in sim.requests]
    assert len(received) == 3  # retries + 1
    assert all(later - earlier >= 0.45 for earlier, later in itertools.pairwise(received))
    assert finished.status is Status.ERROR and finished.model_unavailable and finished.exit_code == 5
    assert "answered HTTP 500" in finished.message and RUNNER_CRASH_MESSAGE in finished.message
    assert "after 2 retries" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.retries, record.fallback_used) == ("error", 2, False)


def test_a_failure_before_the_first_token_is_retried_and_the_answer_recorded(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2).gateway
    sim.ttft = 0.2
    sim.fail_next("drop", after_chunks=0)  # the connection closes before any byte of the answer
    events, finished = drain(gateway, ask())
    assert len(sim.requests) == 2
    assert [type(e) for e in events[:2]] == [Started, Started]
    assert finished.status is Status.OK
    record = row(db, finished.request_id)
    assert (record.status, record.retries, record.fallback_used) == ("ok", 1, False)
    assert record.response.startswith("Echo: hello there")
    # ttft counts only the attempt that answered; latency everything, the 0.5 s pause included.
    assert record.ttft_ms is not None and 150 <= record.ttft_ms < 600
    assert record.latency_ms is not None and record.latency_ms >= record.ttft_ms + 450


def test_ollama_503_is_busy_after_the_retries(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=1).gateway
    sim.fail_next("http_503", count=2)
    _, finished = drain(gateway, ask())
    assert len(sim.requests) == 2
    assert finished.status is Status.BUSY and finished.exit_code == 3
    assert f"Ollama at {sim.url} is busy ({BUSY_MESSAGE.split('  ')[0]}" in finished.message
    assert "try again shortly" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.retries, record.error) == ("busy", 1, finished.message)


@pytest.mark.parametrize(
    ("agent_fallback", "global_fallback", "expected"),
    [(SMALL, "", SMALL), ("", OTHER, OTHER), (SMALL, OTHER, SMALL)],
    ids=["agent", "global", "agent-wins"],
)
def test_after_the_retries_the_fallback_model_answers(
    sim: OllamaSimulator,
    make_runtime: MakeRuntime,
    db: Database,
    agent_fallback: str,
    global_fallback: str,
    expected: str,
) -> None:
    gateway = make_runtime(retries=1, fallback_model=global_fallback).gateway
    sim.fail_next("http_500", count=5, model=MODEL)
    events, finished = drain(gateway, ask(fallback_model=agent_fallback))
    assert [r["model"] for r in sim.requests] == [MODEL, MODEL, expected]
    assert [(e.model, e.backend) for e in events if isinstance(e, Started)] == [
        (MODEL, "ollama"),
        (MODEL, "ollama"),
        (expected, "ollama"),
    ]
    assert finished.status is Status.OK and finished.fallback_used
    record = row(db, finished.request_id)
    assert (record.model_requested, record.model_used, record.fallback_used, record.retries) == (
        MODEL,
        expected,
        True,
        1,
    )
    assert record.response.startswith("Echo: hello there")


def test_a_drop_after_the_first_token_keeps_the_partial_answer_without_retry(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2, fallback_model=SMALL).gateway
    sim.fail_next("drop", after_chunks=3)
    events, finished = drain(gateway, ask())
    assert len(sim.requests) == 1
    assert text_of(events) == "Echo: hello there "
    assert finished.status is Status.ERROR and not finished.model_unavailable and finished.exit_code == 1
    assert "broke before the answer was complete" in finished.message
    assert "the answer stopped part-way and what arrived is kept" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.response, record.retries, record.fallback_used) == (
        "error",
        "Echo: hello there ",
        0,
        False,
    )
    assert record.ttft_ms is not None and record.completion_tokens == 3
    chain_ok(db, 1)


def test_an_error_line_mid_stream_keeps_the_partial_answer(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(retries=2).gateway
    sim.fail_next("error_chunk", after_chunks=2)
    events, finished = drain(gateway, ask())
    assert len(sim.requests) == 1
    assert finished.status is Status.ERROR and finished.exit_code == 1
    assert f"Ollama failed in mid-answer: {RUNNER_CRASH_MESSAGE}" in finished.message
    assert row(db, finished.request_id).response == text_of(events) == "Echo: hello "


@pytest.mark.parametrize("after_chunks", [0, 2])
def test_silence_longer_than_the_read_timeout_is_a_timeout(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database, after_chunks: int
) -> None:
    gateway = make_runtime(read_timeout=0.5, retries=2).gateway
    sim.fail_next("stall", after_chunks=after_chunks, seconds=10)
    began = time.monotonic()
    events, finished = drain(gateway, ask())
    assert 0.45 <= time.monotonic() - began < 3
    assert len(sim.requests) == 1  # a timeout is not retried: it would make the person wait again
    assert finished.status is Status.TIMEOUT and finished.exit_code == 6
    assert "the model sent nothing for 0.5 s (CLAWDBOT_READ_TIMEOUT)" in finished.message
    partial = "Echo: hello " if after_chunks else ""
    assert text_of(events) == partial
    record = row(db, finished.request_id)
    assert (record.status, record.response) == ("timeout", partial)
    assert sim.wait_idle(PROMPTLY)


# -- 3. admission --------------------------------------------------------------------------------------


def test_twenty_callers_share_four_slots_and_a_queue_of_three(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(max_concurrent=4, queue_size=3, queue_timeout=10).gateway
    sim.ttft, sim.default_tokens = 1.0, 5
    callers = run_together(gateway, [ask(f"caller {i}", user=f"user{i}") for i in range(20)], timeout=30)
    outcomes = Counter(c.finished.status for c in callers)
    assert outcomes == {Status.OK: 7, Status.BUSY: 13}
    assert sim.max_active == 4
    assert len(sim.requests) == 7

    busy = [c for c in callers if c.finished.status is Status.BUSY]
    ok = [c for c in callers if c.finished.status is Status.OK]
    for caller in busy:  # answered at once, before any model call
        assert [type(e) for _, e in caller.events] == [Finished]
        assert "the model is busy: 4 requests are generating and 3 are waiting" in caller.finished.message
        assert caller.finished.retry_after is not None and caller.finished.retry_after >= 1
        assert caller.finished.exit_code == 3
    assert max(c.finished_at for c in busy) < min(c.finished_at for c in ok)

    queued = [c for c in ok if c.of(Queued)]
    assert len(queued) == 3
    assert sorted(c.positions[0] for c in queued) == [1, 2, 3]
    for caller in queued:
        assert caller.positions == sorted(caller.positions, reverse=True)
        assert caller.finished.queue_ms is not None and caller.finished.queue_ms >= 500

    records = all_requests(db)
    assert len(records) == 20
    assert Counter(r.status for r in records) == {"ok": 7, "busy": 13}
    assert all(r.error for r in records if r.status == "busy")
    stats = gateway.admission.snapshot()
    assert (stats.generating, stats.queued, stats.admitted_total, stats.refused_total) == (0, 0, 7, 13)
    chain_ok(db, 20)


def test_the_queue_is_fifo_and_each_caller_sees_its_place(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(max_concurrent=1, queue_size=3, queue_timeout=10).gateway
    sim.ttft, sim.default_tokens = 0.45, 3
    holder = gateway.stream(ask("holder"))
    assert isinstance(next(holder), Started)
    waiters: list[Caller] = []
    for place, name in enumerate(["B", "C", "D"], start=1):
        waiter = Caller(gateway, ask(name, user=name))
        waiter.start()
        assert until(waiter.is_queued), name
        assert waiter.positions[0] == place
        waiters.append(waiter)
    _, refused = drain(gateway, ask("E", user="E"))
    assert refused.status is Status.BUSY and "1 request is generating and 3 are waiting" in refused.message
    holder.close()
    for waiter in waiters:
        waiter.join(15)
        assert waiter.finished.status is Status.OK
    assert [last_user_text(b) for b in bodies(sim)] == ["B", "C", "D"]
    assert sorted(set(waiters[2].positions), reverse=True) == [3, 2, 1]
    assert waiters[2].positions == sorted(waiters[2].positions, reverse=True)
    queue_ms = [w.finished.queue_ms or 0.0 for w in waiters]
    assert queue_ms == sorted(queue_ms)
    assert Counter(r.status for r in all_requests(db)) == {"cancelled": 1, "busy": 1, "ok": 3}
    assert_idle(gateway)
    chain_ok(db, 5)


def test_a_request_queued_longer_than_the_queue_timeout_is_busy(
    make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(max_concurrent=1, queue_size=1, queue_timeout=0.6).gateway
    holder = gateway.stream(ask("holder"))
    assert isinstance(next(holder), Started)
    began = time.monotonic()
    events, finished = drain(gateway, ask("waiter", user="bob"))
    assert 0.55 <= time.monotonic() - began < 3
    assert [type(e) for e in events] == [Queued] * (len(events) - 1) + [Finished]
    assert {e.position for e in events if isinstance(e, Queued)} == {1}
    assert finished.status is Status.BUSY and finished.exit_code == 3
    assert "waited 0.6 s in the queue without a free slot; try again in" in finished.message
    assert finished.retry_after is not None and finished.retry_after >= 1
    record = row(db, finished.request_id)
    assert (record.status, record.queue_ms, record.backend) == ("busy", None, "")
    holder.close()
    assert_idle(gateway)


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_caller_that_stops_reading_frees_its_slot_and_the_connection(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database, how: str
) -> None:
    gateway = make_runtime(max_concurrent=1, queue_size=0).gateway
    sim.tokens_per_s, sim.default_tokens = 20.0, 60
    stream = gateway.stream(ask())
    seen: list[GatewayEvent] = []
    for event in stream:
        seen.append(event)
        if len([e for e in seen if isinstance(e, ContentDelta)]) == 3:
            break
    assert sim.active == 1 and gateway.admission.snapshot().generating == 1
    request_id = seen[0].request_id if isinstance(seen[0], Started) else -1
    if how == "close":
        stream.close()
    else:
        del stream  # dropped without close(): the generator's finalizer does the same
    assert_idle(gateway)  # at once, not when the simulator would have finished (3 s)
    record = row(db, request_id)
    assert record.status == "cancelled"
    assert record.response == text_of(seen) == "Echo: hello there "
    assert record.error == "the caller stopped reading the answer"
    assert record.latency_ms is not None and record.ttft_ms is not None
    assert sim.wait_idle(PROMPTLY) and sim.active == 0
    # The slot is really free: the next request is admitted at once instead of refused busy.
    sim.tokens_per_s = None
    _, finished = drain(gateway, ask("next"))
    assert finished.status is Status.OK
    chain_ok(db, 2)


def test_a_caller_that_leaves_the_queue_frees_its_place(make_runtime: MakeRuntime, db: Database) -> None:
    gateway = make_runtime(max_concurrent=1, queue_size=1, queue_timeout=10).gateway
    holder = gateway.stream(ask("holder"))
    assert isinstance(next(holder), Started)
    waiter = gateway.stream(ask("waiter", user="bob"))
    first = next(waiter)
    assert isinstance(first, Queued) and first.position == 1
    waiter.close()
    assert gateway.admission.snapshot().queued == 0
    record = row(db, first.request_id)
    assert (record.status, record.queue_ms) == ("cancelled", None)
    again = gateway.stream(ask("again", user="carol"))
    second = next(again)
    assert isinstance(second, Queued) and second.position == 1
    again.close()
    holder.close()
    assert_idle(gateway)
    chain_ok(db, 3)


# -- 4. rate limits ------------------------------------------------------------------------------------


def test_rate_limited_requests_are_refused_with_retry_after_and_recorded(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(rate_limit="2/minute").gateway
    results = [drain(gateway, ask(f"q{i}"))[1] for i in range(3)]
    assert [f.status for f in results] == [Status.OK, Status.OK, Status.RATE_LIMITED]
    refused = results[2]
    assert refused.exit_code == 4
    assert refused.retry_after is not None and 1 <= refused.retry_after <= 60
    assert "you have sent 2 requests in the last minute, the most allowed; try again in" in refused.message
    assert drain(gateway, ask("other user", user="bob"))[1].status is Status.OK  # per user
    assert len(sim.requests) == 3
    record = row(db, refused.request_id)
    assert (record.status, record.error, record.prompt) == ("rate_limited", refused.message, "q2")
    chain_ok(db, 4)


def test_concurrent_requests_cannot_slip_past_the_rate_limit(
    sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    gateway = make_runtime(rate_limit="3/minute", max_concurrent=10, queue_size=0).gateway
    sim.ttft = 0.2
    callers = run_together(gateway, [ask(f"race {i}") for i in range(10)], timeout=20)
    assert Counter(c.finished.status for c in callers) == {Status.OK: 3, Status.RATE_LIMITED: 7}
    assert len(sim.requests) == 3
    assert all(
        c.finished.retry_after is not None and c.finished.retry_after >= 1
        for c in callers
        if c.finished.status is Status.RATE_LIMITED
    )
    assert Counter(r.status for r in all_requests(db)) == {"ok": 3, "rate_limited": 7}
    chain_ok(db, 10)


# -- 5. the audit store --------------------------------------------------------------------------------


def test_the_request_is_recorded_started_before_the_model_is_called(
    sim: OllamaSimulator, gateway: Gateway, db: Database
) -> None:
    sim.ttft = 1.0
    caller = Caller(gateway, ask("is this recorded?"))
    caller.start()
    assert until(lambda: sim.active == 1)  # the simulator holds the first token back for a second
    during = all_requests(db)
    assert len(during) == 1
    record = during[0]
    assert (record.status, record.seq, record.prompt, record.user) == (
        "started",
        None,
        "is this recorded?",
        "alice",
    )
    assert '"is this recorded?"' in record.context and record.model_requested == MODEL
    received = datetime.fromtimestamp(sim.requests[0]["received_at"], UTC)
    assert record.started_at <= received
    caller.join(10)
    assert caller.finished.status is Status.OK
    assert row(db, record.id).status == "ok"
    chain_ok(db, 1)


def test_a_request_that_cannot_be_recorded_never_reaches_the_model(
    workdir: Path, sim: OllamaSimulator, gateway: Gateway
) -> None:
    unmigrated = Database(f"sqlite:///{workdir / 'empty.db'}")
    broken = Gateway(
        gateway.settings, AuditStore(unmigrated), gateway.backends, gateway.admission, gateway.limiter
    )
    try:
        with pytest.raises(OperationalError, match="no such table: requests"):
            next(broken.stream(ask()))
    finally:
        unmigrated.dispose()
    assert sim.requests == []
    assert_idle(gateway)


# -- 7. the embedded model -----------------------------------------------------------------------------


def _gateway_over(settings: Settings, db: Database, embedded: EmbeddedBackend) -> Gateway:
    return Gateway(
        settings,
        AuditStore(db),
        BackendSelector(settings, embedded=embedded),
        Admission(settings.max_concurrent, settings.queue_size, settings.queue_timeout),
        RateLimiter(settings.rate_limit),
    )


def _settings(db: Database, sim: OllamaSimulator, **overrides: Any) -> Settings:
    return load_settings(
        database_url=db.url, ollama_host=sim.url, rate_limit="", connect_timeout=2.0, **overrides
    )


def test_the_embedded_model_answers_a_real_prompt(
    workdir: Path, sim: OllamaSimulator, db: Database, embedded: EmbeddedBackend
) -> None:
    gateway = _gateway_over(_settings(db, sim, backend="embedded", retries=0), db, embedded)
    try:
        events, finished = drain(gateway, ask(FRANCE, max_output_tokens=24, temperature=0.0))
    finally:
        gateway.backends.close()
    assert isinstance(events[0], Started) and (events[0].backend, events[0].model) == ("embedded", SMOLLM2)
    assert finished.status is Status.OK, finished.message
    assert text_of(events).strip()
    record = row(db, finished.request_id)
    assert (record.backend, record.model_used, record.model_requested) == ("embedded", SMOLLM2, MODEL)
    assert record.response == text_of(events)
    assert record.completion_tokens is not None and 0 < record.completion_tokens <= 24
    assert record.tokens_per_s is not None and record.tokens_per_s > 0
    assert (
        record.ttft_ms is not None and record.prompt_eval_count is not None and record.prompt_eval_count > 10
    )
    assert sim.requests == []
    chain_ok(db, 1)


def test_auto_uses_the_embedded_model_while_ollama_is_stopped(
    workdir: Path, sim: OllamaSimulator, db: Database, embedded: EmbeddedBackend
) -> None:
    gateway = _gateway_over(_settings(db, sim, backend="auto", retries=1), db, embedded)
    try:
        _, on_ollama = drain(gateway, ask("while it runs"))
        assert (on_ollama.status, on_ollama.backend) == (Status.OK, "ollama")
        sim.stop()
        # The selector still believes Ollama is up: the first attempt is refused, the retry probes again.
        events, finished = drain(gateway, ask(FRANCE, max_output_tokens=16))
    finally:
        gateway.backends.close()
    assert [(e.backend, e.model) for e in events if isinstance(e, Started)] == [
        ("ollama", MODEL),
        ("embedded", SMOLLM2),
    ]
    assert finished.status is Status.OK, finished.message
    record = row(db, finished.request_id)
    assert (record.backend, record.model_used, record.retries) == ("embedded", SMOLLM2, 1)
    assert record.response.strip()
    chain_ok(db, 2)


def test_an_embedded_model_that_cannot_load_is_model_unavailable(
    workdir: Path, sim: OllamaSimulator, make_runtime: MakeRuntime, db: Database
) -> None:
    garbage = workdir / "garbage.gguf"
    garbage.write_bytes(b"this is not a model")
    gateway = make_runtime(backend="embedded", embedded_model=str(garbage), retries=1).gateway
    _, finished = drain(gateway, ask())
    assert finished.status is Status.ERROR and finished.model_unavailable and finished.exit_code == 5
    assert "not a GGUF file" in finished.message and "CLAWDBOT_EMBEDDED_MODEL" in finished.message
    record = row(db, finished.request_id)
    assert (record.status, record.backend) == ("error", "embedded")
    assert sim.requests == []


# -- the chat service ----------------------------------------------------------------------------------


@pytest.fixture
def chat_runtime(make_runtime: MakeRuntime) -> Runtime:
    runtime = make_runtime()
    runtime.users.add("test", "alice", ["staff"], "correct horse battery")
    runtime.users.add("test", "bob", ["staff"], "correct horse battery")
    runtime.agents.add("test", "helper", AgentConfig(model=MODEL, system_prompt="Be brief.", think=False))
    return runtime


def test_a_turn_continues_the_conversation(sim: OllamaSimulator, chat_runtime: Runtime) -> None:
    sim.script("Paris.")
    first = list(chat_runtime.chat.turn("alice", FRANCE, agent="helper"))
    started = first[0]
    assert isinstance(started, TurnStarted)
    final = first[-1]
    assert isinstance(final, Finished) and final.status is Status.OK
    second = list(chat_runtime.chat.turn("alice", "And of Italy?", conversation_id=started.conversation_id))
    assert isinstance(second[-1], Finished) and second[-1].status is Status.OK
    assert bodies(sim)[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": FRANCE},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    history = chat_runtime.conversations.history(started.conversation_id, "alice")
    assert [m.role for m in history] == ["user", "assistant"] * 2
    assert history[1].request_id == final.request_id


def test_the_partial_answer_is_stored_when_the_caller_stops_half_way(
    sim: OllamaSimulator, chat_runtime: Runtime, db: Database
) -> None:
    sim.tokens_per_s, sim.default_tokens = 20.0, 60
    turn = chat_runtime.chat.turn("alice", "hello there", agent="helper")
    started = next(turn)
    assert isinstance(started, TurnStarted)
    partial = ""
    request_id = -1
    for event in turn:
        if isinstance(event, Started):
            request_id = event.request_id
        if isinstance(event, ContentDelta):
            partial += event.text
            if partial.count(" ") == 3:
                break
    turn.close()
    assert_idle(chat_runtime.gateway)
    history = chat_runtime.conversations.history(started.conversation_id, "alice")
    assert [(m.role, m.content, m.request_id) for m in history] == [
        ("user", "hello there", request_id),
        ("assistant", partial, request_id),
    ]
    record = row(db, request_id)
    assert (record.status, record.response, record.conversation_id) == (
        "cancelled",
        partial,
        started.conversation_id,
    )
    assert (record.agent, record.agent_version) == ("helper", 1)
    assert sim.wait_idle(PROMPTLY)


def test_an_empty_prompt_is_rejected_recorded_and_not_added_to_the_conversation(
    sim: OllamaSimulator, chat_runtime: Runtime, db: Database
) -> None:
    first = list(chat_runtime.chat.turn("alice", "hello there", agent="helper"))
    assert isinstance(first[0], TurnStarted)
    conversation_id = first[0].conversation_id
    for prompt, conversation in (("   \n", conversation_id), ("", None)):
        events = list(chat_runtime.chat.turn("alice", prompt, agent="helper", conversation_id=conversation))
        assert len(events) == 1
        finished = events[0]
        assert isinstance(finished, Finished)
        assert finished.status is Status.REJECTED_INPUT and finished.exit_code == 2
        assert finished.message == "the message is empty: type a question or instruction"
        record = row(db, finished.request_id)
        assert (record.status, record.error, record.prompt) == ("rejected_input", finished.message, prompt)
    assert len(sim.requests) == 1
    assert len(chat_runtime.conversations.history(conversation_id, "alice")) == 2
    assert [c.id for c in chat_runtime.conversations.list_for("alice")] == [conversation_id]
    chain_ok(db, 6)  # three requests and the events of creating two users and the agent
