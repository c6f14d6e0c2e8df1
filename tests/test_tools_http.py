"""Admin-defined HTTP tools: settings checked field by field, secrets masked in the page, events and logs,
arguments validated before any call, and a whole turn where the model calls one (the Ollama simulator's scripted
call, a real HTTP server on 127.0.0.1 allowed through CLAWDBOT_TOOL_ALLOWLIST)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clawdbot.agents import AgentConfig
from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.http_tools import MASK, HttpToolConfig, HttpTools, build_call, config_from_form, parse_headers
from clawdbot.models import Event, Message, Tool
from clawdbot.runtime import Runtime
from clawdbot.secret_box import PREFIX, SecretBox
from clawdbot.settings import load_settings
from clawdbot.tools import ToolResult
from tests.app_helpers import AppHarness, messages
from tests.helpers import MODEL, all_requests
from tests.ollama_sim import OllamaSimulator
from tests.tools_helpers import ToolServer, tool_server

SECRET = "sk-live-0123456789abcdef"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["city"],
    "additionalProperties": False,
    "properties": {"city": {"type": "string", "minLength": 1}, "days": {"type": "integer", "maximum": 7}},
}


def weather(url: str, **changes: Any) -> HttpToolConfig:
    fields: dict[str, Any] = {
        "name": "weather",
        "description": "Current weather of a city",
        "url": url,
        "parameters": WEATHER_SCHEMA,
        "headers": {"Authorization": f"Bearer {SECRET}"},
        "timeout_s": 5.0,
        **changes,
    }
    return HttpToolConfig(**fields)


@pytest.fixture
def server() -> Iterator[ToolServer]:
    with tool_server() as running:
        yield running


# -- settings ----------------------------------------------------------------------------------------


def test_every_problem_with_the_settings_is_tied_to_its_field() -> None:
    config = HttpToolConfig(
        name="read_document",
        description="",
        url="ftp://example.org/{nope}",
        parameters={"type": "array"},
        method="TRACE",
        headers={"Bad Header": "x", "Host": "evil", "X-Ok": "a\r\nInjected: 1"},
        timeout_s=0,
        max_response_bytes=0,
    )
    found = {(p.field, p.message) for p in config.problems()}
    assert found == {
        ("name", "'read_document' is a built-in tool: choose another name"),
        ("description", "describe what the tool does: the model reads this to choose it"),
        ("parameters", 'the parameters must be a JSON schema of an object: {"type": "object", …}'),
        ("url", "the URL must start with http:// or https:// and name a host"),
        ("method", "the method must be one of GET, POST, PUT, PATCH, DELETE"),
        ("headers", "'Bad Header' is not a valid header name"),
        ("headers", "the header 'Host' is set by clawdbot itself"),
        ("headers", "the value of 'X-Ok' holds a line break"),
        ("timeout_s", "the timeout must be from 0.5 to 60 seconds"),
        ("max_response_bytes", "the response cap must be from 1 to 10,000,000 bytes"),
    }
    bad_schema = weather(
        "https://api.example.org/w", parameters={"type": "object", "properties": {"a": {"type": 5}}}
    )
    assert [p.message for p in bad_schema.problems()] == [
        "the parameter schema is not valid JSON schema at properties/a/type: "
        "5 is not valid under any of the given schemas"
    ]
    host_placeholder = weather("https://{city}.example.org/")
    assert host_placeholder.problems()[0].message.startswith(
        "placeholders may only be used in the path and query"
    )
    private = weather("http://10.0.0.7/w")
    [warning] = private.problems()
    assert not warning.blocking and "10.0.0.7 is a private address" in warning.message
    assert weather("http://10.0.0.7/w").problems(frozenset({"10.0.0.7"})) == []


def test_the_form_text_becomes_settings_and_masked_headers_keep_their_value() -> None:
    assert parse_headers(f"Authorization: {MASK}\nX-Team: blue", {"Authorization": "Bearer old"}) == {
        "Authorization": "Bearer old",
        "X-Team": "blue",
    }
    with pytest.raises(UsageError, match="header line 1 is not of the form 'Name: value'"):
        parse_headers("no colon here")
    with pytest.raises(UsageError, match="has no stored value to keep"):
        parse_headers(f"X-New: {MASK}")
    _, problems = config_from_form(
        name="w", description="d", parameters="{not json", url="https://x.org", method="GET", headers="",
        timeout_s=5, max_response_bytes=100,
    )  # fmt: skip
    assert problems[0].field == "parameters" and problems[0].message.startswith(
        "the parameters are not valid JSON"
    )


def test_arguments_fill_placeholders_encoded_and_the_rest_go_as_query_or_json() -> None:
    config = weather("https://api.example.org/cities/{city}/now")
    url, params, body = build_call(config, {"city": "São Paulo/../admin?x=1#", "days": 3})
    assert url == "https://api.example.org/cities/S%C3%A3o%20Paulo%2F..%2Fadmin%3Fx%3D1%23/now"
    assert (params, body) == ({"days": "3"}, None)
    post = weather("https://api.example.org/forecast", method="POST")
    assert build_call(post, {"city": "Berlin", "days": 2}) == (
        "https://api.example.org/forecast",
        {},
        {"city": "Berlin", "days": 2},
    )


def test_tools_are_saved_changed_and_disabled_with_events_that_hold_no_secret(db: Database) -> None:
    tools = HttpTools(db, SecretBox("s" * 48))
    tools.save("boss", weather("https://api.example.org/w/{city}"))
    changed = parse_headers(f"Authorization: {MASK}\nX-Team: blue", tools.get("weather").headers)
    tools.save("boss", weather("https://api.example.org/v2/{city}", headers=changed), original="weather")
    assert tools.get("weather").headers == {"Authorization": f"Bearer {SECRET}", "X-Team": "blue"}
    tools.set_disabled("boss", "weather")
    assert tools.enabled(["weather"]) == {} and tools.get("weather").disabled
    with pytest.raises(UsageError, match="a tool named 'weather' already exists"):
        tools.save("boss", weather("https://api.example.org/w"))
    with db.read() as session:
        events = [(e.action, e.target, e.details) for e in session.scalars(select(Event).order_by(Event.id))]
    assert [e[:2] for e in events] == [
        ("tool.create", "weather"),
        ("tool.update", "weather"),
        ("tool.disable", "weather"),
    ]
    assert json.loads(events[1][2])["headers"] == ["Authorization", "X-Team"]
    assert all(SECRET not in e[2] for e in events)


# -- a turn that calls an HTTP tool --------------------------------------------------------------------


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    settings = load_settings(
        database_url=db.url, ollama_host=sim.url, backend="ollama", rate_limit="", retries=0,
        read_timeout=5.0, tool_allowlist="127.0.0.1",
    )  # fmt: skip
    rt = Runtime(settings)
    rt.users.add("test", "alice", ["staff"], "correct horse battery")
    yield rt
    rt.close()


def test_the_model_calls_an_http_tool_and_the_secret_stays_out_of_every_record(
    runtime: Runtime, sim: OllamaSimulator, server: ToolServer, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runtime.chat.http_tools.save("boss", weather(f"{server.url}/weather/{{city}}"))
    runtime.agents.add("boss", "forecaster", AgentConfig(model=MODEL, tools=("weather",), think=False))
    sim.script(tool_calls=[{"name": "weather", "arguments": {"city": 5}}])  # refused before any call
    sim.script(tool_calls=[{"name": "weather", "arguments": {"city": "Berlin", "days": 2}}])
    sim.script("It is 21.5 degrees in Berlin.")
    events = list(runtime.chat.turn("alice", "Weather in Berlin?", agent="forecaster"))
    finished = events[-1]
    assert finished.status.value == "ok" and finished.response == "It is 21.5 degrees in Berlin."  # type: ignore[union-attr]

    # The wrong argument type never left the machine; the right call arrived once, with the admin's header.
    [call] = server.received
    assert (call.method, call.path, call.query) == ("GET", "/weather/Berlin", {"days": ["2"]})
    assert call.headers["authorization"] == f"Bearer {SECRET}"
    results = [e for e in events if isinstance(e, ToolResult)]
    assert (
        results[0].error
        == "the arguments do not match the tool's parameters at 'city': 5 is not of type 'string'"
    )
    assert '"temperature":21.5' in results[1].content

    # The model saw the tool by its schema only: no URL, no headers.
    offered = json.dumps(sim.requests[0]["body"]["tools"])
    assert "weather" in offered and SECRET not in offered and server.url not in offered
    [record] = all_requests(db)
    calls = json.loads(record.tool_calls)
    assert [c["error"] != "" for c in calls] == [True, False] and '"temperature":21.5' in calls[1]["result"]
    with db.read() as session:
        stored = [m.tool_calls for m in session.scalars(select(Message))]
        details = [e.details for e in session.scalars(select(Event))]
    everything = " ".join(
        [record.context, record.tool_calls, record.response, *stored, *details, caplog.text]
    )
    assert SECRET not in everything


def test_a_tool_url_at_a_private_address_is_refused_without_the_allowlist(
    workdir: Path, db: Database, sim: OllamaSimulator, server: ToolServer
) -> None:
    settings = load_settings(
        database_url=db.url, ollama_host=sim.url, backend="ollama", rate_limit="", retries=0
    )
    rt = Runtime(settings)
    try:
        rt.users.add("test", "alice", ["staff"], "correct horse battery")
        rt.chat.http_tools.save("boss", weather(f"{server.url}/weather/{{city}}"))
        rt.agents.add("boss", "forecaster", AgentConfig(model=MODEL, tools=("weather",), think=False))
        sim.script(tool_calls=[{"name": "weather", "arguments": {"city": "Berlin"}}])
        sim.script("I could not reach the weather service.")
        events = list(rt.chat.turn("alice", "Weather?", agent="forecaster"))
        [result] = [e for e in events if isinstance(e, ToolResult)]
        assert result.error.startswith("refused to call 127.0.0.1 a loopback address")
        assert server.received == []
    finally:
        rt.close()


# -- the agents page -----------------------------------------------------------------------------------


def test_an_admin_adds_an_http_tool_on_the_agents_page_and_its_secret_is_never_shown(
    app_harness: AppHarness,
) -> None:
    app_harness.user("boss", "admin")
    at = app_harness.open("boss", "agents")
    assert not at.exception, at.exception
    at.text_input(key="http_tool_new_name").input("weather")
    at.text_area(key="http_tool_new_description").input("Current weather of a city")
    at.text_area(key="http_tool_new_parameters").input("{broken")
    at.text_input(key="http_tool_new_url").input("https://api.example.org/w/{city}")
    at.text_area(key="http_tool_new_headers").input(f"Authorization: Bearer {SECRET}")
    at.button(key="http_tool_new_save").click().run()
    assert not at.exception, at.exception
    assert any(m.startswith("the parameters are not valid JSON") for m in messages(at.error))
    assert app_harness.runtime.chat.http_tools.all() == []

    at.text_area(key="http_tool_new_parameters").input(json.dumps(WEATHER_SCHEMA))
    at.button(key="http_tool_new_save").click().run()
    assert not at.exception, at.exception
    assert messages(at.success) == ["Saved the HTTP tool weather."]
    assert at.selectbox(key="http_tool_pick").value == "weather"
    assert at.text_area(key="http_tool_weather_headers").value == f"Authorization: {MASK}"
    listed = at.dataframe[-1].value
    assert listed["Name"].tolist() == ["weather"] and listed["Headers"].tolist() == [f"Authorization: {MASK}"]
    page_text = str(at.main)
    assert SECRET not in page_text

    # Saved again with the masked value: the secret is kept, not replaced by the mask.
    at.number_input(key="http_tool_weather_timeout_s").set_value(3.0)
    at.button(key="http_tool_weather_save").click().run()
    assert not at.exception, at.exception
    saved = app_harness.runtime.chat.http_tools.get("weather")
    assert saved.headers == {"Authorization": f"Bearer {SECRET}"} and saved.timeout_s == 3.0
    assert "weather" in app_harness.runtime.agents.tool_names()


def test_header_values_are_stored_sealed_and_a_changed_key_leaves_them_empty_with_a_warning(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    HttpTools(db, SecretBox("k" * 48)).save("boss", weather("https://api.example.org/w/{city}"))
    with db.read() as session:
        stored = json.loads(session.scalars(select(Tool.headers).where(Tool.name == "weather")).one())
    assert stored["Authorization"].startswith(PREFIX) and SECRET not in stored["Authorization"]
    assert HttpTools(db, SecretBox("k" * 48)).get("weather").headers["Authorization"] == f"Bearer {SECRET}"

    with caplog.at_level(logging.WARNING, logger="clawdbot.http_tools"):
        reopened = HttpTools(db, SecretBox("another key" * 5)).get("weather")
    assert reopened.headers["Authorization"] == ""
    assert (
        "CLAWDBOT_SECRET_KEY" in caplog.text and "Authorization" in caplog.text and SECRET not in caplog.text
    )
