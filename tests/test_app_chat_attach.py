"""Attaching files in the Chat page's input (AppTest, real database, Ollama simulator, real reader process)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from clawdbot.agents import AgentConfig
from tests import hostile_files as hostile
from tests.app_helpers import AppHarness
from tests.helpers import MODEL, all_requests

PDF = "application/pdf"


@pytest.fixture
def harness(app_harness: AppHarness) -> AppHarness:
    app_harness.user("alice", "staff")
    app_harness.runtime.agents.add("admin", "helper", AgentConfig(model=MODEL, think=False))
    return app_harness


def send_files(at: AppTest, text: str, *files: tuple[str, bytes, str]) -> AppTest:
    widget = at.chat_input(key="chat_prompt")
    for name, data, mime in files:
        widget.upload(name, data, mime)
    widget.set_value(text).run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> list[str]:
    return [str(c.value) for c in at.caption]


def test_a_pdf_attached_in_the_chat_is_read_sent_and_shown_with_the_question(harness: AppHarness) -> None:
    harness.sim.script("The warehouse flooded.")
    at = send_files(
        harness.open("alice", "chat"),
        "What happened in Rotterdam?",
        ("report.pdf", hostile.report_pdf(), PDF),
    )
    assert "The warehouse in Rotterdam flooded" in harness.sim.requests[-1]["body"]["messages"][-1]["content"]
    question, answer = at.chat_message
    assert [m.value for m in question.markdown] == ["What happened in Rotterdam?"]
    assert [c.value for c in question.caption] == ["Attached: report.pdf"]
    assert [m.value for m in answer.markdown] == ["The warehouse flooded."]
    # Said once after the turn: the document went in as an outline and passages, not whole.
    assert any(c.startswith("report.pdf is longer than the context budget") for c in captions(at))
    # Shown again, from the database, when the conversation is opened later.
    [conversation] = harness.runtime.conversations.list_for("alice")
    again = harness.open("alice", "chat")
    again.query_params["c"] = str(conversation.id)
    again.run()
    assert [c.value for c in again.chat_message[0].caption] == ["Attached: report.pdf"]
    assert not any("longer than the context budget" in c for c in captions(again))


def test_a_hostile_file_is_refused_in_plain_words_and_the_next_message_is_answered(
    harness: AppHarness,
) -> None:
    at = send_files(
        harness.open("alice", "chat"), "Open this", ("bomb.xlsx", hostile.zip_bomb_workbook(), "x")
    )
    [error] = [str(e.value) for e in at.error]
    assert "bomb.xlsx: this workbook expands" in error and "looks like a zip bomb" in error
    assert "Traceback" not in error
    assert [r.status for r in all_requests(harness.runtime.db)] == ["rejected_input"]
    assert harness.sim.requests == []

    harness.sim.script("Hello again.")
    at.chat_input(key="chat_prompt").set_value("Hello?").run()
    assert [m.value for m in at.chat_message[-1].markdown] == ["Hello again."]


def test_files_alone_ask_for_a_summary(harness: AppHarness) -> None:
    harness.sim.script("It is about sales.")
    at = send_files(harness.open("alice", "chat"), "", ("sales.csv", b"city,sales\nOslo,3\n", "text/csv"))
    assert [m.value for m in at.chat_message[0].markdown] == ["Summarise the attached file."]
    assert "Oslo | 3" in harness.sim.requests[-1]["body"]["messages"][-1]["content"]
