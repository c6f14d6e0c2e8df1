"""Attaching files in a real browser against `clawdbot run`: a CSV answered from, a hostile workbook refused in
plain words, and the server still serving afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests import hostile_files as hostile
from tests.browser_helpers import LiveServer, sign_in

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("stella", "staff")
    done = live_server.cli("agent", "add", "analyst", "--model", "qwen3:32b", "--system-prompt", "Be brief.")
    assert done.returncode == 0, done.stderr
    yield live_server


def attach_and_send(page: Page, path: Path, text: str) -> None:
    with page.expect_file_chooser() as chooser:
        page.get_by_test_id("stChatInputFileUploadButton").click()
    chooser.value.set_files(str(path))
    expect(page.get_by_text(path.name).first).to_be_visible()  # the staged file, before sending
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(text)
    box.press("Enter")


def test_a_file_attached_in_the_browser_is_answered_from_and_a_bomb_is_refused(
    server: LiveServer, page: Page, tmp_path: Path
) -> None:
    sales = tmp_path / "sales.csv"
    sales.write_text("city,sales\nOslo,120\nLima,95\nPune,80\n", encoding="utf-8")
    server.sim.script("Oslo sold the most: 120.")
    sign_in(page, server, "stella", path="/chat")
    attach_and_send(page, sales, "Which city sold the most?")

    question = page.get_by_test_id("stChatMessage").first
    expect(question).to_contain_text("Which city sold the most?")
    expect(question).to_contain_text("Attached: sales.csv")
    expect(page.get_by_test_id("stChatMessage").last).to_contain_text("Oslo sold the most: 120.")
    assert "Oslo | 120" in server.sim.requests[-1]["body"]["messages"][-1]["content"]

    bomb = tmp_path / "bomb.xlsx"
    bomb.write_bytes(hostile.zip_bomb_workbook())
    attach_and_send(page, bomb, "And this one?")
    expect(page.get_by_test_id("stAlert")).to_contain_text("bomb.xlsx: this workbook expands")
    expect(page.get_by_test_id("stAlert")).to_contain_text("looks like a zip bomb")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
