"""The chat core behind the Chat page: stopping a turn, ownership of conversations, the figures and words
shown about an answer, and the coalescing of streamed text into screen updates.

Turns run through a real runtime (gateway, admission, audit store) against the Ollama simulator and a real
database; the pure helpers are tested as plain functions with a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import select

from clawdbot.agents import AgentConfig
from clawdbot.answers import (
    Coalescer,
    Notice,
    caption,
    context_notice,
    display_markdown,
    figures_of,
    outcome_notice,
)
from clawdbot.backends import ContentDelta, ThinkingDelta
from clawdbot.chat import TurnStarted
from clawdbot.conversations import AnswerFigures
from clawdbot.db import Database
from clawdbot.errors import NotFoundError
from clawdbot.gateway import Finished, Started
from clawdbot.models import Conversation, Request, Status
from clawdbot.runtime import Runtime
from clawdbot.settings import load_settings
from tests.ollama_sim import DEFAULT_THINKING, OllamaSimulator

MODEL = "qwen3:32b"


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator() as simulator:
        yield simulator


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    settings = load_settings(
        database_url=db.url, ollama_host=sim.url, backend="ollama", rate_limit="", retries=0, read_timeout=5.0
    )
    rt = Runtime(settings)
    rt.users.add("test", "alice", ["staff"], "correct horse battery")
    rt.users.add("test", "bob", ["staff"], "correct horse battery")
    rt.agents.add("test", "helper", AgentConfig(model=MODEL, system_prompt="Be brief.", think=True))
    yield rt
    rt.close()


def record(db: Database, request_id: int) -> Request:
    with db.read() as session:
        row = session.get(Request, request_id)
        assert row is not None
        return row


def converse(rt: Runtime, prompt: str, conversation_id: int | None = None) -> tuple[int, Finished]:
    events = list(rt.chat.turn("alice", prompt, agent="helper", conversation_id=conversation_id))
    started, finished = events[0], events[-1]
    assert isinstance(started, TurnStarted) and isinstance(finished, Finished)
    return started.conversation_id, finished


# -- stopping ----------------------------------------------------------------------------------------------


def test_closing_the_turn_mid_stream_keeps_the_partial_answer_and_records_cancelled(
    sim: OllamaSimulator, runtime: Runtime, db: Database
) -> None:
    # What the page's `finally` does when Streamlit raises inside the stream (stop button, another click).
    sim.tokens_per_s, sim.default_tokens = 20.0, 60
    turn = runtime.chat.turn("alice", "hello there", agent="helper")
    started = next(turn)
    assert isinstance(started, TurnStarted)
    request_id, thinking, content = -1, "", ""
    for event in turn:
        if isinstance(event, Started):
            request_id = event.request_id
        elif isinstance(event, ThinkingDelta):
            thinking += event.text
        elif isinstance(event, ContentDelta):
            content += event.text
            if content.count(" ") == 4:
                break
    turn.close()

    row = record(db, request_id)
    assert (row.status, row.response, row.thinking) == ("cancelled", content, DEFAULT_THINKING)
    assert row.finished_at is not None and row.conversation_id == started.conversation_id
    entries = runtime.conversations.transcript(started.conversation_id, "alice")
    assert [(e.message.role, e.message.content) for e in entries] == [
        ("user", "hello there"),
        ("assistant", content),
    ]
    assert entries[1].message.thinking == thinking == DEFAULT_THINKING
    figures = entries[1].figures
    assert figures is not None and figures.status == "cancelled"
    assert caption(figures).endswith("stopped")
    assert runtime.gateway.admission.snapshot().generating == 0
    assert sim.wait_idle(2.0)


def test_a_turn_closed_before_any_token_stores_nothing_but_is_recorded_cancelled(
    sim: OllamaSimulator, runtime: Runtime, db: Database
) -> None:
    sim.ttft = 5.0
    turn = runtime.chat.turn("alice", "hello there", agent="helper")
    started = next(turn)
    assert isinstance(started, TurnStarted)
    assert isinstance(next(turn), Started)
    turn.close()
    with db.read() as session:
        statuses = list(session.scalars(select(Request.status)))
    assert statuses == ["cancelled"]
    assert runtime.conversations.transcript(started.conversation_id, "alice") == []
    # Titled from the message at once, so it can be found in the list and continued.
    assert runtime.conversations.get(started.conversation_id, "alice").title == "hello there"


# -- ownership ---------------------------------------------------------------------------------------------


def test_another_users_conversation_is_refused_everywhere(
    sim: OllamaSimulator, runtime: Runtime, db: Database
) -> None:
    conversation_id, _ = converse(runtime, "my secret plans")
    conversations = runtime.conversations
    for attempt in (
        lambda: conversations.get(conversation_id, "bob"),
        lambda: conversations.transcript(conversation_id, "bob"),
        lambda: conversations.history(conversation_id, "bob"),
        lambda: conversations.rename(conversation_id, "bob", "mine now"),
        lambda: conversations.delete(conversation_id, "bob"),
        lambda: list(runtime.chat.turn("bob", "and then?", conversation_id=conversation_id)),
    ):
        with pytest.raises(NotFoundError, match=f"bob has no conversation {conversation_id}"):
            attempt()
    # The same answer as for a conversation that does not exist: nothing tells bob it exists.
    with pytest.raises(NotFoundError, match="bob has no conversation 999"):
        conversations.get(999, "bob")
    assert conversations.list_for("bob") == []
    info = conversations.get(conversation_id, "alice")
    assert info.title == "my secret plans" and info.agent == "helper"
    assert len(conversations.transcript(conversation_id, "alice")) == 2
    assert len(sim.requests) == 1  # bob's turn never reached the model


def test_rename_and_delete_by_the_owner(runtime: Runtime, db: Database) -> None:
    conversation_id, _ = converse(runtime, "first question")
    other_id, _ = converse(runtime, "second question")
    conversations = runtime.conversations
    conversations.rename(conversation_id, "alice", "  Trip   to Paris ")
    assert conversations.get(conversation_id, "alice").title == "Trip to Paris"
    conversations.delete(conversation_id, "alice")
    assert [c.id for c in conversations.list_for("alice")] == [other_id]
    with pytest.raises(NotFoundError):
        conversations.transcript(conversation_id, "alice")
    with db.read() as session:
        hidden = session.get(Conversation, conversation_id)
        assert hidden is not None and hidden.deleted_at is not None
        # The audit records of its requests stay.
        assert session.scalar(select(Request.id).where(Request.conversation_id == conversation_id))


# -- the figures under an answer ------------------------------------------------------------------------------


def test_the_transcript_gives_each_answer_the_figures_of_its_request(
    sim: OllamaSimulator, runtime: Runtime, db: Database
) -> None:
    sim.tokens_per_s = 200.0
    conversation_id, first = converse(runtime, "hello there")
    _, second = converse(runtime, "and again", conversation_id)
    entries = runtime.conversations.transcript(conversation_id, "alice")
    assert [e.message.role for e in entries] == ["user", "assistant"] * 2
    assert [e.figures for e in entries if e.message.role == "user"] == [None, None]
    for entry, finished in ((entries[1], first), (entries[3], second)):
        row = record(db, finished.request_id)
        assert entry.figures == AnswerFigures(
            "ok", MODEL, row.ttft_ms, row.tokens_per_s, row.completion_tokens, 0, False
        )
        assert entry.figures == figures_of(finished)  # the live caption equals the one read back
        assert row.completion_tokens == 25 and row.tokens_per_s is not None and row.ttft_ms is not None


def test_caption_says_model_speed_length_and_how_it_ended() -> None:
    figures = AnswerFigures("ok", MODEL, 412.4, 38.06, 25)
    assert caption(figures) == "qwen3:32b · first token after 412 ms · 38.1 tokens/s · 25 tokens"
    slow = AnswerFigures("cancelled", MODEL, 2345.0, None, 1)
    assert caption(slow) == "qwen3:32b · first token after 2.3 s · 1 token · stopped"
    assert caption(AnswerFigures("timeout", "", None, None, None)) == "timed out"
    assert context_notice(figures) == ""
    assert context_notice(AnswerFigures("ok", MODEL, 1, 1, 1, dropped_messages=1)).startswith(
        "1 earlier message not sent"
    )
    assert context_notice(AnswerFigures("ok", MODEL, 1, 1, 1, dropped_messages=4)).startswith(
        "4 earlier messages not sent: the conversation is longer than the agent's context budget"
    )
    assert "cut" in context_notice(AnswerFigures("ok", MODEL, 1, 1, 1, truncated=True))


# -- outcomes in plain words ----------------------------------------------------------------------------------


def finished(status: Status, message: str = "", **fields: object) -> Finished:
    return Finished(request_id=1, status=status, message=message, **fields)  # type: ignore[arg-type]


def test_outcomes_say_what_happened_and_when_to_retry() -> None:
    assert outcome_notice(finished(Status.OK)) is None
    busy = outcome_notice(finished(Status.BUSY, "the model is busy: 4 generating", retry_after=11.2))
    assert busy == Notice(
        "warning",
        "The model is busy with other people's requests. Try again in 12 seconds.",
        "the model is busy: 4 generating",
    )
    limited = outcome_notice(finished(Status.RATE_LIMITED, "you have sent 3 in 10 seconds", retry_after=1))
    assert limited == Notice(
        "warning",
        "You have sent more messages than your limit allows. Try again in 1 second.",
        "you have sent 3 in 10 seconds",
    )
    long_wait = outcome_notice(finished(Status.RATE_LIMITED, "…", retry_after=600))
    assert long_wait is not None and long_wait.text.endswith("Try again in about 10 minutes.")
    server_busy = outcome_notice(finished(Status.BUSY, "Ollama answered 503"))  # no estimate from Ollama
    assert server_busy is not None and server_busy.text.endswith("Try again in a minute.")
    down = outcome_notice(finished(Status.ERROR, "cannot reach Ollama", model_unavailable=True))
    assert down is not None and (down.level, down.detail) == ("error", "cannot reach Ollama")
    assert down.text.startswith("The model is unavailable right now. Try again in a few minutes")
    timeout = outcome_notice(finished(Status.TIMEOUT, "no answer for 120 s"))
    assert timeout is not None and timeout.text.startswith(
        "The model stopped answering. Try again in a minute"
    )
    stopped = outcome_notice(finished(Status.CANCELLED))
    assert stopped is not None and stopped.level == "info" and "kept" in stopped.text
    broken = outcome_notice(finished(Status.ERROR, "the stream broke"))
    assert broken == Notice("error", "The answer ended with an error. Try again.", "the stream broke")
    rejected = outcome_notice(finished(Status.REJECTED_INPUT, "the message is empty"))
    assert rejected == Notice("error", "Not sent: the message is empty.")


# -- untrusted Markdown ---------------------------------------------------------------------------------------


def test_images_in_model_text_are_shown_as_text_and_code_is_left_alone() -> None:
    text = "see ![chart](https://evil.example/x.png?q=secret) and `![a](b)`\n```\n![c](d)\n```\n![e][ref]"
    assert display_markdown(text) == (
        "see !\\[chart](https://evil.example/x.png?q=secret) and `![a](b)`\n```\n![c](d)\n```\n!\\[e][ref]"
    )
    # An unclosed fence while streaming counts as code until it closes.
    assert display_markdown("```\n![c](d)") == "```\n![c](d)"
    plain = "no images <b>here</b>"
    assert display_markdown(plain) is plain


# -- coalescing streamed text ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_fast_stream_is_coalesced_to_at_most_15_updates_a_second() -> None:
    clock = FakeClock()
    shown: list[tuple[str, str]] = []
    coalescer = Coalescer(lambda part, text: shown.append((part, text)), clock=clock)
    tokens = [f"t{i} " for i in range(2000)]
    for token in tokens:  # 1000 tokens a second for two seconds
        coalescer.add("content", token)
        clock.now += 0.001
    coalescer.flush()
    assert shown[0] == ("content", "t0 ")  # the first token is shown at once
    assert shown[-1] == ("content", "".join(tokens))  # and the whole text at the end
    assert len(shown) == coalescer.renders
    # Two seconds at 15 a second, plus the first token and the end; and steadily, not only at the end.
    assert 2 * 15 - 1 <= len(shown) <= 2 * 15 + 2
    texts = [text for _, text in shown]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in pairwise(texts))


def test_updates_are_spaced_by_the_interval_and_slow_tokens_show_at_once() -> None:
    clock = FakeClock()
    times: list[float] = []
    coalescer = Coalescer(lambda part, text: times.append(clock.now), clock=clock)
    for _ in range(300):
        coalescer.add("content", "x")
        clock.now += 0.004
    assert all(later - earlier >= 1 / 15 - 1e-9 for earlier, later in pairwise(times))
    before = coalescer.renders
    for _ in range(5):  # ten tokens a second: slower than the limit, each shown as it comes
        clock.now += 0.1
        coalescer.add("content", "y")
    assert coalescer.renders == before + 5
    coalescer.flush()
    assert coalescer.renders == before + 5  # nothing was pending: no extra update
    assert coalescer.text("content") == "x" * 300 + "y" * 5


def test_thinking_and_content_are_rendered_as_separate_parts() -> None:
    clock = FakeClock()
    shown: list[tuple[str, str]] = []
    coalescer = Coalescer(lambda part, text: shown.append((part, text)), clock=clock)
    coalescer.add("thinking", "Let me ")
    coalescer.add("thinking", "think.")  # within the interval: waits
    clock.now += 0.01
    coalescer.add("content", "Paris")  # still within it
    coalescer.add("content", "")  # nothing new: ignored
    assert shown == [("thinking", "Let me ")]
    coalescer.flush()
    assert shown == [("thinking", "Let me "), ("thinking", "Let me think."), ("content", "Paris")]
    assert coalescer.text("thinking") == "Let me think." and coalescer.text("missing") == ""
