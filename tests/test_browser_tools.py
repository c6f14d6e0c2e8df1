"""The Excel scenario end to end in a real browser against `clawdbot run`: a workbook attached in the chat input,
the model's scripted tool calls (query_table, then make_chart) run by clawdbot, and a bar chart of the right three
cities drawn by Plotly on the page, again after a reload."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openpyxl import Workbook
from playwright.sync_api import Page, expect
from sqlalchemy import select

from clawdbot.models import Message, Request
from tests.browser_helpers import LiveServer, sign_in
from tests.tools_helpers import SALES_ROWS, TOP_THREE

pytestmark = pytest.mark.browser

QUESTION = "Analyse the attached Excel, find the three cities with the highest sales and draw a bar chart."
ANSWER = "The three cities with the highest sales are Munich, Frankfurt and Hamburg."
TOP_QUERY = {"group_by": ["City"], "value_column": "Sales", "sort_by": "sum of Sales", "limit": 3}


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("stella", "staff")
    done = live_server.cli(
        "agent", "add", "analyst", "--model", "qwen3:32b", "--system-prompt", "Use tools for numbers.",
        "--tool", "read_document", "--tool", "query_table", "--tool", "make_chart",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield live_server


def workbook(directory: Path) -> Path:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Sales"
    sheet.append(["City", "Month", "Sales"])
    for row in SALES_ROWS:
        sheet.append(row)
    path = directory / "sales.xlsx"
    book.save(path)
    return path


def wait_for_ok(server: LiveServer, timeout: float = 20.0) -> Request:
    db = server.database()
    try:
        deadline = time.monotonic() + timeout
        while True:
            with db.read() as session:
                row = session.scalars(select(Request).order_by(Request.id.desc()).limit(1)).first()
                if row is not None and (row.status == "ok" or time.monotonic() > deadline):
                    session.expunge(row)
                    return row
            time.sleep(0.1)
    finally:
        db.dispose()


def test_the_excel_scenario_draws_a_bar_chart_of_the_top_three_cities(
    server: LiveServer, page: Page, tmp_path: Path
) -> None:
    server.sim.script(tool_calls=[{"name": "query_table", "arguments": TOP_QUERY}])
    server.sim.script(
        tool_calls=[
            {"name": "make_chart", "arguments": {"kind": "bar", "source": "result 1", "title": "Top cities"}}
        ]
    )
    server.sim.script(ANSWER)
    sign_in(page, server, "stella", path="/chat")
    page.get_by_test_id("stSelectbox").click()
    page.get_by_role("option", name="analyst").click()
    chat_input = page.get_by_test_id("stChatInput")
    chat_input.locator("input[type=file]").set_input_files(str(workbook(tmp_path)))
    expect(chat_input).to_contain_text("sales.xlsx")
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(QUESTION)
    box.press("Enter")

    chart = page.locator(".js-plotly-plot").first
    expect(chart).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("stChatMessage").last).to_contain_text(ANSWER)
    row = wait_for_ok(server)
    assert row.status == "ok", (row.status, row.error)
    calls = json.loads(row.tool_calls)
    assert [c["name"] for c in calls] == ["query_table", "make_chart"] and not any(c["error"] for c in calls)
    assert "| Munich | 6300 |\n| Frankfurt | 4900 |\n| Hamburg | 4600 |" in calls[0]["result"]

    # The chart as drawn: three bars, labelled with the three cities, after the rerun that reads the database.
    for _ in range(2):
        chart = page.locator(".js-plotly-plot").first
        expect(chart).to_be_visible(timeout=30_000)
        expect(chart.locator(".bars .point")).to_have_count(3)
        expect(chart.locator(".xtick text")).to_have_text(TOP_THREE)
        expect(chart.locator(".gtitle")).to_have_text("Top cities")
        page.reload()
    expect(page.get_by_test_id("stChatMessage").last).to_contain_text("Tools used: query_table, make_chart")

    db = server.database()
    try:
        with db.read() as session:
            answer = session.scalars(
                select(Message).where(Message.request_id == row.id, Message.role == "assistant")
            ).one()
            [stored] = json.loads(answer.charts)
    finally:
        db.dispose()
    assert stored["title"] == "Top cities" and stored["figure"]["data"][0]["x"] == TOP_THREE
