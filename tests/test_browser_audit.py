"""In a real browser: an auditor filters, opens a record, exports and verifies; staff cannot reach /audit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import func, select

from clawdbot.audit import AuditStore
from clawdbot.models import Request
from tests.browser_helpers import LiveServer, sign_in


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("sam", "staff")
    live_server.add_user("bob", "staff")
    live_server.add_user("aud", "auditor")
    db = live_server.database()
    store = AuditStore(db)
    for n, (user, prompt) in enumerate(
        [("sam", "What is the notice period?"), ("bob", "请总结合同的付款条款"), ("bob", "第二个问题")]
    ):
        request_id = store.start_request(user=user, agent="contract", prompt=prompt)
        store.finish_request(request_id, "ok", response=f"answer {n}", latency_ms=100.0 + n)
    db.dispose()
    yield live_server


def test_an_auditor_filters_opens_exports_and_verifies(server: LiveServer, page: Page) -> None:
    # The Audit page is an auditor's first page, which Streamlit serves at the root URL.
    sign_in(page, server, "aud", path="/audit")
    expect(page.get_by_role("heading", name="Audit")).to_be_visible()
    metric = page.get_by_test_id("stMetric").filter(has_text="Matching records")
    expect(metric).to_contain_text("3")

    page.get_by_test_id("stMultiSelect").filter(has_text="Users").click()
    page.get_by_role("option", name="bob").click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Apply filters").click()
    expect(metric).to_contain_text("2")

    page.get_by_label("Open record by id").fill("2")
    page.get_by_role("button", name="Open record").click()
    expect(page.get_by_role("heading", name="Request 2")).to_be_visible()
    expect(page.get_by_text("请总结合同的付款条款").first).to_be_visible()

    page.get_by_role("button", name="Export").click()
    expect(page.get_by_text("2 records exported")).to_be_visible()
    with page.expect_download() as download_info:
        page.get_by_test_id("stDownloadButton").get_by_role("button").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".csv")
    content = open(download.path(), encoding="utf-8-sig").read()  # noqa: SIM115
    assert "请总结合同的付款条款" in content and "第二个问题" in content and "notice period" not in content

    page.get_by_role("tab", name="Verify").click()
    page.get_by_role("button", name="Verify the chain").click()
    expect(page.get_by_text("The chain is intact")).to_be_visible()
    result = server.cli("audit", "export", "--kind", "events", "--format", "jsonl", "-o", "events.jsonl")
    assert result.returncode == 0, result.stderr
    events = (server.workdir / "events.jsonl").read_text(encoding="utf-8")
    assert '"action": "audit.export"' in events and '"action": "audit.verify"' in events


def test_staff_typing_the_url_are_not_permitted(server: LiveServer, page: Page) -> None:
    sign_in(page, server, "sam", path="/audit")
    expect(page.get_by_text("Not permitted")).to_be_visible()
    expect(page.get_by_role("heading", name="Audit")).to_have_count(0)
    expect(page.get_by_test_id("stSidebarNav")).not_to_contain_text("Audit")


def test_an_auditor_downloads_an_attached_file_and_the_download_is_an_event(
    server: LiveServer, page: Page
) -> None:
    agent = server.cli("agent", "add", "reader", "--model", "qwen3:32b", "--system-prompt", "Read files.")
    assert agent.returncode == 0, agent.stderr
    sheet = server.workdir / "prices.csv"
    sheet.write_bytes(b"city,price\nOslo,7\n=cmd|' /C calc'!A0,1\n")
    asked = server.cli("ask", "What is in it?", "--agent", "reader", "--user", "sam", "--attach", str(sheet))
    assert asked.returncode == 0, asked.stderr
    db = server.database()
    try:
        with db.read() as session:
            request_id = session.scalar(select(func.max(Request.id)))
    finally:
        db.dispose()

    sign_in(page, server, "aud", path="/audit")
    page.get_by_label("Open record by id").fill(str(request_id))
    page.get_by_role("button", name="Open record").click()
    expect(page.get_by_role("heading", name=f"Request {request_id}")).to_be_visible()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download prices.csv").click()
    download = download_info.value
    assert download.suggested_filename == "prices.csv"
    assert Path(download.path()).read_bytes() == sheet.read_bytes()  # the file as attached, byte for byte

    result = server.cli("audit", "export", "--kind", "events", "--format", "jsonl", "-o", "downloads.jsonl")
    assert result.returncode == 0, result.stderr
    downloads = [
        json.loads(line)
        for line in (server.workdir / "downloads.jsonl").read_text(encoding="utf-8").splitlines()
        if '"audit.download"' in line
    ]
    assert len(downloads) == 1
    assert downloads[0]["actor"] == "aud" and downloads[0]["target"] == f"request {request_id}"
    assert downloads[0]["details"]["name"] == "prices.csv"
