"""In a real browser: an auditor filters, opens a record, exports and verifies; staff cannot reach /audit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from clawdbot.audit import AuditStore
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
