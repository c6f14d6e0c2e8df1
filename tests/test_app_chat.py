"""The Chat page in-process (AppTest) over a real database and the Ollama simulator.

Each test signs in real users; what the page shows is checked against what the database holds, and a second
AppTest session stands in for a reload or a second browser tab.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from clawdbot.agents import AgentConfig
from clawdbot.answers import caption
from clawdbot.gateway import ChatRequest, Started
from clawdbot.models import Request
from tests.app_helpers import AppHarness

MODEL = "qwen3:32b"
FRANCE = "What is the capital of France?"


@pytest.fixture
def harness(app_harness: AppHarness) -> AppHarness:
    app_harness.user("alice", "staff")
    app_harness.user("bob", "staff")
    app_harness.runtime.agents.add("admin", "helper", AgentConfig(model=MODEL, think=True))
    return app_harness


def open_chat(harness: AppHarness, user: str, conversation: int | None = None) -> AppTest:
    """The Chat page as `user`, at `?c=<conversation>` when given (a reload, a second tab, a pasted link)."""
    at = harness.open(user, "chat")
    if conversation is not None:
        at.query_params["c"] = str(conversation)
        at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Chat"
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="chat_prompt").set_value(text).run()
    assert not at.exception, at.exception
    return at


def shown(at: AppTest) -> list[tuple[str, list[str]]]:
    """Each chat message on the page: its role and the texts of its Markdown elements, in order."""
    return [(m.name, [str(md.value) for md in m.markdown]) for m in at.chat_message]


def records(harness: AppHarness) -> list[Request]:
    with harness.runtime.db.read() as session:
        return list(session.scalars(select(Request).order_by(Request.id)))


def texts(elements: Any) -> list[str]:
    return [str(e.value) for e in elements]


def test_an_answer_is_stored_and_shown_again_after_a_rerun_and_in_another_session(
    harness: AppHarness,
) -> None:
    harness.sim.script("Paris is the capital of **France**.", thinking="The user asks about France.")
    at = send(open_chat(harness, "alice"), FRANCE)

    [conversation] = harness.runtime.conversations.list_for("alice")
    assert at.query_params["c"] == str(conversation.id)  # the URL names it: a reload reopens it
    [row] = records(harness)
    assert (row.status, row.response, row.conversation_id) == (
        "ok",
        "Paris is the capital of **France**.",
        conversation.id,
    )
    stored = harness.runtime.conversations.transcript(conversation.id, "alice")
    assert [(e.message.role, e.message.content) for e in stored] == [
        ("user", FRANCE),
        ("assistant", "Paris is the capital of **France**."),
    ]
    figures = stored[1].figures
    assert figures is not None

    for view in (at.run(), open_chat(harness, "alice", conversation.id)):
        assert not view.exception
        assert shown(view) == [
            ("user", [FRANCE]),
            ("assistant", ["The user asks about France.", "Paris is the capital of **France**."]),
        ]
        answer = view.chat_message[1]
        # Thinking apart, collapsed, above the answer; the figures of the record under it.
        assert [child.type for child in answer.children.values()] == ["expander", "markdown", "caption"]
        assert answer.expander[0].label == "Thinking" and answer.expander[0].proto.expanded is False
        line = answer.caption[0].value
        assert line == caption(figures)
        assert line.startswith(f"{MODEL} · first token after ")
        assert f"{row.tokens_per_s:.1f} tokens/s" in line and line.endswith(
            f"· {row.completion_tokens} tokens"
        )
        assert view.sidebar.button(key=f"chat_open_{conversation.id}").label == FRANCE
        assert view.main.subheader[0].value == FRANCE

    # The next message continues the same conversation, with the history sent to the model.
    send(at, "And of Italy?")
    assert [c.id for c in harness.runtime.conversations.list_for("alice")] == [conversation.id]
    assert len(shown(at)) == 4
    last_body = harness.sim.requests[-1]["body"]
    assert [m["role"] for m in last_body["messages"]] == ["user", "assistant", "user"]
    assert records(harness)[-1].client_ip == ""  # AppTest has no connection: st.context.ip_address is None


def test_another_user_cannot_open_or_continue_someone_elses_conversation(harness: AppHarness) -> None:
    harness.sim.script("Here are your secret plans.")
    send(open_chat(harness, "alice"), "my secret plans")
    [conversation] = harness.runtime.conversations.list_for("alice")

    at = open_chat(harness, "bob", conversation.id)
    assert texts(at.error) == [
        f"You have no conversation '{conversation.id}': it was deleted, or it is not yours. Pick one of yours."
    ]
    assert shown(at) == []
    assert not [b for b in at.button if b.key in ("chat_delete",)]
    assert not at.main.subheader
    assert not [b for b in at.sidebar.button if b.key == f"chat_open_{conversation.id}"]

    # What bob sends from there starts a conversation of his own; alice's is untouched.
    send(at, "and then?")
    [own] = harness.runtime.conversations.list_for("bob")
    assert own.id != conversation.id and at.query_params["c"] == str(own.id)
    assert len(harness.runtime.conversations.transcript(conversation.id, "alice")) == 2
    assert [r.conversation_id for r in records(harness)] == [conversation.id, own.id]


def test_rename_and_delete_a_conversation(harness: AppHarness) -> None:
    at = send(open_chat(harness, "alice"), FRANCE)
    [conversation] = harness.runtime.conversations.list_for("alice")
    at.text_input(key=f"chat_title_{conversation.id}").input("Geography")
    at.form_submit_button[0].click().run()
    assert not at.exception and not at.error
    assert harness.runtime.conversations.get(conversation.id, "alice").title == "Geography"
    assert at.sidebar.button(key=f"chat_open_{conversation.id}").label == "Geography"

    at.text_input(key=f"chat_title_{conversation.id}").input("   ")
    at.form_submit_button[0].click().run()
    assert texts(at.error) == ["a conversation title cannot be empty"]

    at.button(key="chat_delete").click().run()
    assert not at.exception and not at.error
    assert "c" not in at.query_params
    assert harness.runtime.conversations.list_for("alice") == []
    assert shown(at) == []
    assert at.selectbox(key="chat_agent").value == "helper"  # back to starting a new one
    # A reload of the old URL finds nothing.
    again = open_chat(harness, "alice", conversation.id)
    assert again.error and shown(again) == []


def hold_the_only_slot(harness: AppHarness) -> Any:
    harness.sim.tokens_per_s, harness.sim.default_tokens = 5.0, 100
    holder = harness.runtime.gateway.stream(
        ChatRequest(user="someone", messages=[{"role": "user", "content": "hi"}], model=MODEL)
    )
    assert isinstance(next(holder), Started)
    return holder


@pytest.mark.parametrize("app_settings", [{"max_concurrent": 1, "queue_size": 0}], ids=["no-queue"])
def test_busy_says_when_to_retry_and_puts_the_message_back(harness: AppHarness) -> None:
    holder = hold_the_only_slot(harness)
    try:
        at = send(open_chat(harness, "alice"), FRANCE)
    finally:
        holder.close()
    [warning] = texts(at.warning)
    assert warning.startswith("The model is busy with other people's requests. Try again in ")
    assert "Details: the model is busy: 1 request is generating" in warning
    assert at.chat_input(key="chat_prompt").value == FRANCE  # ready to send again
    assert [r.status for r in records(harness)] == ["cancelled", "busy"]
    # The conversation exists, titled, with nothing in it: sending again continues it.
    [conversation] = harness.runtime.conversations.list_for("alice")
    assert conversation.title == FRANCE and at.query_params["c"] == str(conversation.id)
    harness.sim.tokens_per_s = None
    send(at, FRANCE)
    assert not at.warning
    assert [m[0] for m in shown(at)] == ["user", "assistant"]


@pytest.mark.parametrize("app_settings", [{"rate_limit": "1/minute"}], ids=["1-a-minute"])
def test_rate_limited_says_when_to_retry(harness: AppHarness) -> None:
    at = send(open_chat(harness, "alice"), FRANCE)
    assert not at.warning
    send(at, "And of Italy?")
    [warning] = texts(at.warning)
    assert warning.startswith("You have sent more messages than your limit allows. Try again in ")
    seconds = int(warning.split("Try again in ")[1].split(" second")[0])
    assert 1 <= seconds <= 60
    assert [r.status for r in records(harness)] == ["ok", "rate_limited"]
    assert len(shown(at)) == 2  # the refused message is not in the conversation


def test_model_down_says_so_in_plain_words(harness: AppHarness) -> None:
    harness.sim.fail_next("http_500")
    at = send(open_chat(harness, "alice"), FRANCE)
    [error] = texts(at.error)
    assert error.startswith("The model is unavailable right now. Try again in a few minutes")
    assert "llama runner process has terminated" in error
    assert not at.exception and "Traceback" not in error
    assert [r.status for r in records(harness)] == ["error"]


@pytest.mark.parametrize("app_settings", [{"read_timeout": 0.5}], ids=["read-timeout-0.5s"])
def test_timeout_says_so_in_plain_words(harness: AppHarness) -> None:
    harness.sim.fail_next("stall", after_chunks=8, seconds=3.0)  # 5 thinking tokens, then 3 of the answer
    at = send(open_chat(harness, "alice"), FRANCE)
    [error] = texts(at.error)
    assert error.startswith("The model stopped answering. Try again in a minute")
    [row] = records(harness)
    assert row.status == "timeout" and row.response
    # What arrived before the silence is kept, and its caption says it timed out.
    assert shown(at)[1][1][-1] == row.response.strip()
    assert at.chat_message[1].caption[0].value.endswith("timed out")


def test_a_notice_says_when_earlier_messages_were_left_out(harness: AppHarness) -> None:
    harness.runtime.agents.add(
        "admin", "brief", AgentConfig(model=MODEL, think=False, context_budget=256, max_output_tokens=64)
    )
    at = open_chat(harness, "alice")
    at.selectbox(key="chat_agent").select("brief").run()
    words = " ".join(f"word{i}" for i in range(60))
    for n in range(4):
        send(at, f"Question {n}: {words}")
    dropped = [r.dropped_messages for r in records(harness)]
    assert dropped[0] == 0 and dropped[-1] > 0
    notices = [c.value for m in at.chat_message for c in m.caption if "not sent" in str(c.value)]
    assert notices[-1] == (
        f"{dropped[-1]} earlier messages not sent: the conversation is longer than the agent's context budget"
    )
    assert len(notices) == sum(1 for d in dropped if d)


def test_model_and_user_text_never_render_as_html(harness: AppHarness) -> None:
    harness.sim.script(
        "<script>alert(1)</script> <img src=x onerror=alert(2)> ![t](https://evil.example/p.png)",
        thinking="<iframe src=https://evil.example></iframe>",
    )
    at = send(open_chat(harness, "alice"), "<b>bold?</b> ![me](https://evil.example/me.png)")
    # The title, taken from the message, is Markdown in the list and the heading too.
    [conversation] = harness.runtime.conversations.list_for("alice")
    title = "<b>bold?</b> !\\[me](https://evil.example/me.png)"
    assert at.sidebar.button(key=f"chat_open_{conversation.id}").label == title
    assert at.main.subheader[0].value == title
    messages = at.chat_message
    bodies = [md for m in messages for md in m.markdown]
    assert bodies and all(md.proto.allow_html is False for md in bodies)
    assert shown(at) == [
        ("user", ["<b>bold?</b> !\\[me](https://evil.example/me.png)"]),
        (
            "assistant",
            [
                "<iframe src=https://evil.example></iframe>",
                "<script>alert(1)</script> <img src=x onerror=alert(2)> !\\[t](https://evil.example/p.png)",
            ],
        ),
    ]
    assert not at.get("html")


def test_errors_reach_the_page_as_one_sentence(
    harness: AppHarness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    at = send(open_chat(harness, "alice"), FRANCE)
    [conversation] = harness.runtime.conversations.list_for("alice")
    harness.runtime.agents.set_archived("admin", "helper")
    send(at, "More?")
    assert texts(at.error) == ["the agent 'helper' is archived; an admin can restore it"]

    def broken(*args: object) -> None:
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(harness.runtime.conversations, "transcript", broken)
    with caplog.at_level(logging.ERROR, logger="clawdbot.pages.chat"):
        at = open_chat(harness, "alice", conversation.id)
    assert texts(at.error) == [
        "Something went wrong on our side, and it has been logged. Try again; if it keeps happening, "
        "tell an operator."
    ]
    assert not at.exception
    assert "the disk caught fire" in caplog.text  # in the log, not on the page


def test_without_agents_the_page_says_who_adds_them(app_harness: AppHarness) -> None:
    app_harness.user("carol", "staff")
    at = open_chat(app_harness, "carol")
    assert any("an admin adds agents" in str(i.value) for i in at.info)
    assert not at.chat_input


def stream_script() -> None:
    """A page that streams made-up events through `stream_turn`. In mode "interrupt" a rerun is raised
    mid-stream, as Streamlit does after a click on another widget; in mode "queued" the stream breaks while
    queued. Every turn stays referenced from session state, so only `stream_turn` can have closed it."""
    from collections.abc import Generator

    import streamlit as st

    from clawdbot.agents import AgentConfig, AgentInfo
    from clawdbot.backends import ContentDelta, ThinkingDelta
    from clawdbot.chat import TurnStarted
    from clawdbot.context import ContextPlan
    from clawdbot.gateway import ContextPlanned, GatewayEvent, Queued
    from ui.chat_view import stream_turn

    mode = st.session_state.get("mode", "whole")
    st.session_state["mode"] = "whole"
    st.session_state.setdefault("closed", 0)
    st.session_state.setdefault("closed_at_start", []).append(st.session_state["closed"])

    def events() -> Generator[TurnStarted | GatewayEvent, None, None]:
        try:
            yield TurnStarted(7, AgentInfo(1, "helper", False, 1, 1, AgentConfig(model="m"), "admin"))
            yield ContextPlanned(1, ContextPlan([], 900, 200, dropped=[{}, {}, {}]))
            yield Queued(1, 2)
            yield Queued(1, 1)
            if mode == "queued":
                raise RuntimeError("the connection broke")
            yield ThinkingDelta("Hmm, ")
            yield ThinkingDelta("let me see.")
            yield ContentDelta("Forty")
            yield ContentDelta("-two.")
            yield ContentDelta(" And more.")
        finally:
            st.session_state["closed"] += 1

    def opened(conversation_id: int) -> None:
        st.session_state["opened"] = conversation_id
        if mode == "interrupt":
            st.rerun()  # raised in stream_turn while the turn waits at a `yield`, as after a click

    turn = events()
    st.session_state.setdefault("turns", []).append(turn)
    try:
        stream_turn(turn, opened)
    except RuntimeError as exc:
        st.text(str(exc))


def test_the_live_view_shows_queue_context_thinking_and_answer_and_closes_the_turn() -> None:
    at = AppTest.from_function(stream_script).run()
    assert not at.exception
    [message] = at.chat_message
    assert [c.type for c in message.children.values()] == ["empty", "caption", "expander", "markdown"]
    assert message.caption[0].value.startswith("3 earlier messages not sent")
    assert (
        message.expander[0].label == "Thinking"
        and message.expander[0].markdown[0].value == "Hmm, let me see."
    )
    assert message.markdown[-1].value == "Forty-two. And more."
    assert (at.session_state["opened"], at.session_state["closed"]) == (7, 1)

    at.session_state["mode"] = "queued"
    at.run()
    assert [str(i.value) for i in at.chat_message[0].info] == [
        "Waiting for a free place on the GPU: number 1 in the queue…"
    ]
    assert at.text[0].value == "the connection broke" and at.session_state["closed"] == 2

    # Streamlit raising inside the stream closes the turn before the next run starts.
    at.session_state["mode"] = "interrupt"
    at.run()
    assert not at.exception
    assert at.session_state["closed_at_start"] == [0, 1, 2, 3]
    assert at.session_state["closed"] == 4
