"""The Chat page in a real browser against `clawdbot run`: what only a browser shows — the answer growing on
screen, the stop button ending generation, the URL keeping the conversation over a reload, and how many screen
updates a fast stream costs on the websocket.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import Locator, Page, WebSocket, expect
from sqlalchemy import select

from clawdbot.models import Message, Request
from tests.browser_helpers import LiveServer, sign_in

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("stella", "staff")
    for name in ("helper", "writer"):
        done = live_server.cli("agent", "add", name, "--model", "qwen3:32b", "--system-prompt", "Be brief.")
        assert done.returncode == 0, done.stderr
    yield live_server
    live_server.sim.tokens_per_s, live_server.sim.default_tokens = None, 20


def answer(page: Page) -> Locator:
    """The Markdown of the last chat message (the answer; its thinking sits in an expander before it)."""
    return page.get_by_test_id("stChatMessage").last.get_by_test_id("stMarkdownContainer").last


def send(page: Page, text: str) -> None:
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def latest_request(server: LiveServer) -> Request:
    db = server.database()
    try:
        with db.read() as session:
            row = session.scalars(select(Request).order_by(Request.id.desc()).limit(1)).one()
            session.expunge(row)
            return row
    finally:
        db.dispose()


def wait_for_status(server: LiveServer, status: str, timeout: float = 10.0) -> Request:
    deadline = time.monotonic() + timeout
    while True:
        row = latest_request(server)
        if row.status == status or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def test_the_answer_streams_stop_keeps_the_partial_answer_and_a_reload_keeps_the_conversation(
    server: LiveServer, page: Page
) -> None:
    server.sim.tokens_per_s, server.sim.default_tokens = 20.0, 400  # twenty seconds of answer
    sign_in(page, server, "stella", path="/chat")
    expect(page.get_by_role("heading", name="Chat")).to_be_visible()
    page.get_by_test_id("stSelectbox").click()
    page.get_by_role("option", name="writer").click()
    expect(page.get_by_test_id("stChatInputTextArea")).to_have_attribute("placeholder", "Message writer")
    send(page, "hello there")

    expect(answer(page)).to_contain_text("Echo: hello there")
    first = answer(page).inner_text()
    time.sleep(0.8)
    later = answer(page).inner_text()
    assert later.startswith(first.rstrip()) and len(later) > len(first), (first, later)
    assert "?c=" in page.url  # the conversation is in the URL while it streams

    page.get_by_test_id("stChatInputStopButton").click()
    row = wait_for_status(server, "cancelled")
    assert row.status == "cancelled", row.status
    assert row.agent == "writer" and row.response.startswith("Echo: hello there")
    assert len(row.response.split()) < 400
    time.sleep(0.3)  # frames already on their way
    shown = answer(page).inner_text()
    time.sleep(0.6)
    assert answer(page).inner_text() == shown  # it stopped growing at once
    assert server.sim.wait_idle(5.0)  # and the model stopped generating

    db = server.database()
    try:
        with db.read() as session:
            stored = session.scalars(select(Message).where(Message.request_id == row.id).order_by(Message.id))
            assert [(m.role, m.content) for m in stored] == [
                ("user", "hello there"),
                ("assistant", row.response),
            ]
    finally:
        db.dispose()

    page.reload()
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2)
    expect(messages.first).to_contain_text("hello there")
    expect(messages.last).to_contain_text(row.response.strip()[:60])
    expect(messages.last).to_contain_text("stopped")
    expect(page.get_by_test_id("stSidebar")).to_contain_text("hello there")


def test_a_fast_answer_costs_at_most_about_15_screen_updates_a_second(server: LiveServer, page: Page) -> None:
    server.sim.tokens_per_s, server.sim.default_tokens = 400.0, 800  # two seconds at 400 tokens a second
    frames: list[float] = []

    def watch(ws: WebSocket) -> None:
        ws.on("framereceived", lambda payload: frames.append(time.monotonic()))

    page.on("websocket", watch)
    sign_in(page, server, "stella", path="/chat")
    page.get_by_test_id("stSidebar").get_by_role("button", name="New conversation").click()
    expect(page.get_by_test_id("stChatMessage")).to_have_count(0)
    send(page, "go fast")
    expect(answer(page)).to_contain_text("Echo: go fast")
    began = time.monotonic()
    expect(page.get_by_test_id("stChatMessage").last).to_contain_text("tokens/s", timeout=20_000)
    ended = time.monotonic()
    row = latest_request(server)
    assert row.status == "ok" and row.completion_tokens == 800 + 5  # the answer and its thinking
    assert ended - began > 1.8  # the stream ran about two seconds after its first words were on screen
    # The first 1.5 s of it, before the rerun that redraws the page from the database at the end.
    window = 1.5
    during = [t for t in frames if began <= t <= began + window]
    rate = len(during) / window
    print(f"{len(during)} websocket frames in the first {window} s of a 400 tokens/s answer ({rate:.1f}/s)")
    assert rate <= 15 + 2, f"{rate:.1f} updates a second"
    assert rate >= 5, f"{rate:.1f} updates a second: the answer did not stream"
    expect(page.get_by_test_id("stChatMessage").last).to_contain_text("laboris")
