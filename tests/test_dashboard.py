"""The Dashboard page in-process (AppTest) over real gateway traffic to the Ollama simulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from clawdbot.gateway import ChatRequest, Finished
from clawdbot.models import Event, Status
from tests.app_helpers import AppHarness
from tests.ollama_sim import VERSION


def ask(harness: AppHarness, user: str, agent: str, text: str) -> Finished:
    """One request through the runtime's gateway to the simulator; returns how it finished."""
    request = ChatRequest(
        user=user, messages=[{"role": "user", "content": text}], model="qwen3:32b", agent=agent
    )
    events = list(harness.runtime.gateway.stream(request))
    finished = events[-1]
    assert isinstance(finished, Finished)
    return finished


def chart(at: AppTest, key_part: str) -> dict[str, Any]:
    """The Plotly figure whose chart title contains `key_part`, as the JSON the browser gets."""
    for element in at.get("plotly_chart"):
        figure: dict[str, Any] = json.loads(element.proto.spec)
        if key_part in figure["layout"]["title"]["text"]:
            return figure
    raise AssertionError(f"no chart titled {key_part!r}")


def table(at: AppTest, column: str) -> Any:
    """The first table (as a pandas DataFrame) with a column named `column`."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def metric(at: AppTest, label: str) -> str:
    return str(next(m.value for m in at.metric if m.label == label))


def test_an_admin_sees_gpu_ollama_gateway_charts_and_the_last_requests(app_harness: AppHarness) -> None:
    app_harness.user("ops", "admin")
    app_harness.sim.tokens_per_s = None
    results = [
        ask(app_harness, "alice", "contract" if i % 3 else "helpdesk", f"question {i}") for i in range(6)
    ]
    assert all(r.status is Status.OK for r in results)
    app_harness.runtime.sampler.tick()  # what the background thread does every few seconds

    at = app_harness.open("ops", "dashboard")
    assert not at.exception, at.exception
    assert at.title[0].value == "Dashboard"
    # no NVIDIA driver on this machine: one sentence, and the rest of the page is there
    assert any("NVIDIA" in str(i.value) for i in at.info)
    assert any(f"Reachable at {app_harness.sim.url} · version {VERSION}" in str(c.value) for c in at.caption)
    loaded = table(at, "in VRAM")
    assert list(loaded["model"]) == ["qwen3:32b"]  # the simulator loaded it for the chat requests
    assert metric(at, "Generating") == "0 / 4" and metric(at, "Queued") == "0 / 3"
    assert metric(at, "Requests") == "6"
    rate = chart(at, "Requests per second")
    assert sum(rate["data"][0]["y"]) > 0
    by_agent = chart(at, "Requests by agent")["data"][0]
    assert dict(zip(by_agent["x"], by_agent["y"], strict=True)) == {"contract": 4, "helpdesk": 2}
    status = chart(at, "Outcomes by status")["data"]
    assert [(s["name"], sum(s["y"])) for s in status] == [("ok", 6)]
    latest = table(at, "latency_ms")
    assert list(latest["id"]) == sorted((r.request_id for r in results), reverse=True)
    assert set(latest["status"]) == {"ok"}


def test_a_full_gateway_shows_in_the_live_figures(app_harness: AppHarness) -> None:
    app_harness.user("ops", "admin")
    admission = app_harness.runtime.gateway.admission
    held = [admission.enter() for _ in range(5)]  # 4 generating, 1 queued
    try:
        app_harness.runtime.sampler.sample()
        at = app_harness.open("ops", "dashboard")
        assert not at.exception, at.exception
        assert metric(at, "Generating") == "4 / 4" and metric(at, "Queued") == "1 / 3"
    finally:
        for ticket in held:
            ticket.release()


def test_the_page_says_when_ollama_is_down_and_still_works(app_harness: AppHarness) -> None:
    app_harness.user("ops", "admin")
    app_harness.sim.stop()
    app_harness.runtime.sampler.sample()
    at = app_harness.open("ops", "dashboard")
    assert not at.exception, at.exception
    assert any("Ollama does not answer" in str(e.value) and "ollama serve" in str(e.value) for e in at.error)
    assert metric(at, "Generating") == "0 / 4"
    assert any("No request has been recorded yet" in str(c.value) for c in at.caption)


def test_an_admin_loads_and_unloads_a_model(app_harness: AppHarness) -> None:
    app_harness.user("ops", "admin")
    sim = app_harness.sim
    assert sim.loaded == []
    at = app_harness.open("ops", "dashboard")
    at.selectbox(key="load_choice").select("qwen3:32b")
    next(b for b in at.button if b.label == "Load").click()
    at.run()
    assert not at.exception, at.exception
    assert sim.loaded == ["qwen3:32b"]
    assert any("qwen3:32b is loaded" in str(s.value) for s in at.success)
    assert list(table(at, "in VRAM")["model"]) == ["qwen3:32b"]

    at.selectbox(key="unload_choice").select("qwen3:32b")
    next(b for b in at.button if b.label == "Unload").click()
    at.run()
    assert not at.exception, at.exception
    assert sim.loaded == []
    assert any("qwen3:32b is unloaded" in str(s.value) for s in at.success)
    generate = [r["body"] for r in sim.requests if r["path"] == "/api/generate"]
    assert [g.get("keep_alive") for g in generate][-1] == 0
    with app_harness.runtime.db.read() as session:
        rows = session.execute(select(Event.actor, Event.action, Event.target).order_by(Event.id)).all()
    assert [tuple(r) for r in rows if r[1].startswith("model.")] == [
        ("ops", "model.load", "qwen3:32b"),
        ("ops", "model.unload", "qwen3:32b"),
    ]


@pytest.mark.parametrize("roles", [("staff",), ("auditor",)])
def test_only_admins_reach_the_dashboard(app_harness: AppHarness, roles: tuple[str, ...]) -> None:
    app_harness.user("someone", *roles)
    at = app_harness.open("someone", "dashboard")
    assert any("Not permitted" in str(e.value) for e in at.error)
    assert not at.title and not at.get("plotly_chart")
