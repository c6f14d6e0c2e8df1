"""The Audit page in-process (AppTest): filters, paging, the detail view, export and verify as events."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from clawdbot.models import Event, Request
from tests.app_helpers import AppHarness

USERS = ("alice", "bob")


def seed(harness: AppHarness, n: int = 6) -> list[int]:
    """`n` finalized requests alternating between alice and bob; bob's ones are in Chinese."""
    store = harness.runtime.store
    for name in USERS:
        harness.user(name, "staff")
    ids = []
    for i in range(n):
        user = USERS[i % 2]
        prompt = f"合同第{i}条的付款条款是什么" if user == "bob" else f"what does clause {i} say?"
        request_id = store.start_request(
            user=user,
            agent="contract",
            prompt=prompt,
            context=json.dumps([{"role": "user", "content": prompt}], ensure_ascii=False),
            conversation_id=100 + i % 2,
        )
        store.finish_request(
            request_id, "ok", response=f"<script>alert({i})</script> answer {i}", latency_ms=10.0 * i
        )
        ids.append(request_id)
    return ids


def shown_ids(at: AppTest) -> list[int]:
    frame = at.dataframe[0].value
    return [int(v) for v in frame["id"]] if len(frame) else []


def submit(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click()
    return at.run()


def events(harness: AppHarness, action: str) -> list[dict[str, Any]]:
    with harness.runtime.db.read() as session:
        rows = session.execute(select(Event.actor, Event.details).where(Event.action == action)).all()
    return [{"actor": actor, **json.loads(details)} for actor, details in rows]


def test_an_auditor_filters_by_user_and_text(app_harness: AppHarness) -> None:
    ids = seed(app_harness)
    app_harness.user("aud", "auditor")
    at = app_harness.open("aud", "audit")
    assert not at.exception, at.exception
    assert at.title[0].value == "Audit"
    assert shown_ids(at) == ids[::-1]  # newest first
    assert at.metric[0].value == "6"

    at.multiselect(key="f_users").select("bob")
    submit(at, "Apply filters")
    assert shown_ids(at) == [ids[5], ids[3], ids[1]]
    assert at.metric[0].value == "3"

    at.text_input(key="f_search").input("第3条的付款")
    submit(at, "Apply filters")
    assert shown_ids(at) == [ids[3]]

    at.multiselect(key="f_users").unselect("bob")
    at.text_input(key="f_search").input("clause 4")
    submit(at, "Apply filters")
    assert shown_ids(at) == [ids[4]]


def test_pages_move_by_keyset_and_sort_changes_the_order(app_harness: AppHarness) -> None:
    ids = seed(app_harness, 55)
    app_harness.user("aud", "auditor")
    at = app_harness.open("aud", "audit")
    assert shown_ids(at) == ids[::-1][:50]
    previous = next(b for b in at.button if b.label == "Previous page")
    assert previous.disabled
    submit(at, "Next page")
    assert shown_ids(at) == ids[::-1][50:]
    assert next(b for b in at.button if b.label == "Next page").disabled
    submit(at, "Previous page")
    assert shown_ids(at) == ids[::-1][:50]

    at.selectbox(key="sort_column").select("latency_ms")
    at.toggle(key="sort_desc").set_value(False)
    at.run()
    assert shown_ids(at) == ids[:50]


def test_the_detail_view_shows_the_record_as_text(app_harness: AppHarness) -> None:
    ids = seed(app_harness)
    app_harness.user("aud", "auditor")
    at = app_harness.open("aud", "audit")
    at.number_input(key="open_id").set_value(ids[1])
    submit(at, "Open record")
    assert not at.exception, at.exception
    assert any(h.value == f"Request {ids[1]}" for h in at.subheader)
    codes = [c.value for c in at.code]
    assert "合同第1条的付款条款是什么" in codes
    assert "<script>alert(1)</script> answer 1" in codes  # shown as text, never as HTML
    assert any(
        json.loads(j.value) == [{"role": "user", "content": "合同第1条的付款条款是什么"}] for j in at.json
    )
    with app_harness.runtime.db.read() as session:
        digest = session.scalar(select(Request.hash).where(Request.id == ids[1]))
    assert any(digest is not None and digest in c for c in codes)
    # The conversation view holds bob's other turns.
    texts = [t.value for t in at.text]
    assert "合同第3条的付款条款是什么" in texts and "合同第5条的付款条款是什么" in texts

    at.number_input(key="open_id").set_value(ids[-1] + 100)
    submit(at, "Open record")
    assert any("no request" in str(e.value) for e in at.error)


def test_export_and_verify_are_events(app_harness: AppHarness) -> None:
    seed(app_harness)
    app_harness.user("aud", "auditor")
    at = app_harness.open("aud", "audit")
    at.multiselect(key="f_users").select("alice")
    submit(at, "Apply filters")
    at.selectbox(key="export_format").select("jsonl")
    at.button(key="export").click().run()
    assert not at.exception, at.exception
    [exported] = events(app_harness, "audit.export")
    assert exported["actor"] == "aud" and exported["rows"] == 3 and exported["filter"] == {"users": ["alice"]}
    assert any("3 records exported" in c.value for c in at.caption)

    at.button(key="verify").click().run()
    assert any("The chain is intact" in str(s.value) for s in at.success)
    [verified] = events(app_harness, "audit.verify")
    # Every record written before it: 6 requests, users added, the sign-in and the export.
    assert verified["actor"] == "aud" and verified["ok"] is True
    assert verified["checked"] == verified["head_seq"] >= 8


def test_the_events_tab_lists_events(app_harness: AppHarness) -> None:
    app_harness.user("aud", "auditor")
    app_harness.runtime.store.record_event("root", "agent.edit", "助手", {"model": "qwen3:32b"})
    at = app_harness.open("aud", "audit")
    actions = list(at.dataframe[1].value["action"])
    assert actions[:2] == ["auth.sign_in", "agent.edit"] and "user.create" in actions  # newest first
    at.text_input(key="e_actor").input("root")
    submit(at, "Show events")
    assert list(at.dataframe[1].value["action"]) == ["agent.edit"]
