"""The tool-calling loop in the gateway, over real HTTP to the Ollama simulator's scripted tool calls and a real
database: one request and one audit record for every round, tool results as `role: tool` messages, failures
given back to the model, the bound on rounds, and results cut to fit the context budget."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clawdbot.backends import ToolCall
from clawdbot.db import Database
from clawdbot.documents import Document
from clawdbot.gateway import MAX_TOOL_ROUNDS, TOOL_RESULT_CUT, ChatRequest, Finished, GatewayEvent
from clawdbot.models import Status
from clawdbot.runtime import Runtime
from clawdbot.settings import load_settings
from clawdbot.tokens import counter_for
from clawdbot.tools import BUILTIN, Toolbox, ToolResult
from tests.helpers import MODEL, all_requests
from tests.ollama_sim import OllamaSimulator
from tests.tools_helpers import TOP_THREE, sales_document

QUESTION = "Analyse the attached Excel, find the three cities with the highest sales and draw a bar chart."
TOP_QUERY = {"group_by": ["City"], "value_column": "Sales", "sort_by": "sum of Sales", "limit": 3}


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    settings = load_settings(
        database_url=db.url, ollama_host=sim.url, backend="ollama", rate_limit="", retries=0, read_timeout=5.0
    )
    rt = Runtime(settings)
    yield rt
    rt.close()


def request_with(*documents: Document, prompt: str = QUESTION, **fields: Any) -> ChatRequest:
    toolbox = Toolbox.for_agent(list(BUILTIN), documents=documents)
    return ChatRequest(
        user="alice",
        messages=[
            {"role": "system", "content": "Use tools for numbers."},
            {"role": "user", "content": prompt},
        ],
        model=MODEL,
        prompt=prompt,
        documents=documents,
        tools=toolbox.schemas(),
        toolbox=toolbox,
        think=False,
        **fields,
    )


def run(rt: Runtime, request: ChatRequest) -> tuple[list[GatewayEvent], Finished]:
    events = list(rt.gateway.stream(request))
    finished = events[-1]
    assert isinstance(finished, Finished)
    return events, finished


def chat_requests(sim: OllamaSimulator) -> list[dict[str, Any]]:
    return [r["body"] for r in sim.requests if r["path"] == "/api/chat"]


def test_the_excel_scenario_runs_query_table_then_make_chart_inside_one_request(
    runtime: Runtime, sim: OllamaSimulator, db: Database
) -> None:
    qwen = counter_for(MODEL, "ollama")
    # Count as real Ollama would (Qwen's tokenizer), so `server_truncated` compares like with like.
    sim.count_tokens = lambda messages, tools: qwen.count_messages(messages, tools or None)
    sim.script(tool_calls=[{"name": "query_table", "arguments": TOP_QUERY}])
    sim.script(tool_calls=[{"name": "make_chart", "arguments": {"kind": "bar", "source": "result 1"}}])
    sim.script("The three cities with the highest sales are Munich, Frankfurt and Hamburg.")
    generating: list[int] = []
    events: list[GatewayEvent] = []
    for event in runtime.gateway.stream(request_with(sales_document())):
        if isinstance(event, ToolResult):
            generating.append(runtime.gateway.admission.snapshot().generating)
        events.append(event)
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status is Status.OK

    # The slot was held while the tools ran: the request never left the GPU's admission.
    assert generating == [1, 1]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [e.name for e in events if isinstance(e, ToolCall)] == ["query_table", "make_chart"]
    assert [r.name for r in results] == ["query_table", "make_chart"] and not any(r.error for r in results)
    chart = results[1].chart
    assert chart is not None and chart.figure["data"][0]["x"] == TOP_THREE
    assert chart.figure["data"][0]["y"] == [6300, 4900, 4600]

    # Three model calls, each carrying everything before it: the calls, then the results as `tool` messages.
    bodies = chat_requests(sim)
    assert len(bodies) == 3
    assert all(b["tools"] and [t["function"]["name"] for t in b["tools"]] == list(BUILTIN) for b in bodies)
    second = bodies[1]["messages"]
    assert second[-2]["role"] == "assistant"
    assert second[-2]["tool_calls"][0]["function"] == {"name": "query_table", "arguments": TOP_QUERY}
    assert second[-1]["role"] == "tool" and second[-1]["tool_name"] == "query_table"
    assert "| Munich | 6300 |\n| Frankfurt | 4900 |\n| Hamburg | 4600 |" in second[-1]["content"]
    third = bodies[2]["messages"]
    assert third[: len(second)] == second and third[-1]["tool_name"] == "make_chart"

    # One audit record: every call with name, arguments, result excerpt, duration and error; the context as sent.
    [record] = all_requests(db)
    assert record.status == "ok" and record.id == finished.request_id
    assert record.response == "The three cities with the highest sales are Munich, Frankfurt and Hamburg."
    calls = json.loads(record.tool_calls)
    assert [(c["name"], c["arguments"], c["error"]) for c in calls] == [
        ("query_table", TOP_QUERY, ""),
        ("make_chart", {"kind": "bar", "source": "result 1"}, ""),
    ]
    assert "| Munich | 6300 |" in calls[0]["result"] and calls[1]["chart"] == "sum of Sales by City"
    assert all(isinstance(c["duration_ms"], float) and c["duration_ms"] >= 0 for c in calls)
    assert json.loads(record.context) == third
    counter = counter_for(MODEL, "ollama")
    # Counted with the schemas as clawdbot has them (the client leaves some keys out: an overestimate, never less).
    schemas = Toolbox.for_agent(list(BUILTIN), documents=[sales_document()]).schemas()
    assert record.prompt_tokens == counter.count_messages(third, schemas)
    assert record.prompt_eval_count == sim.requests[2]["prompt_eval_count"]
    assert not record.server_truncated  # the last round's prompt is compared with the last round's count
    assert finished.tool_calls == calls


def test_a_failing_tool_gives_the_model_an_error_and_the_request_goes_on(
    runtime: Runtime, sim: OllamaSimulator, db: Database
) -> None:
    sim.script(
        tool_calls=[{"name": "query_table", "arguments": {"group_by": ["Town"], "value_column": "Sales"}}]
    )
    sim.script(tool_calls=[{"name": "query_table", "arguments": {**TOP_QUERY, "limit": 1}}])
    sim.script("Munich sold the most.")
    _, finished = run(runtime, request_with(sales_document()))
    assert finished.status is Status.OK and finished.response == "Munich sold the most."
    tool_message = chat_requests(sim)[1]["messages"][-1]
    assert tool_message["role"] == "tool"
    assert tool_message["content"].startswith(
        "error: there is no column to group by 'Town'; the columns are:"
    )
    first, second = json.loads(all_requests(db)[0].tool_calls)
    assert first["error"].startswith("there is no column to group by 'Town'") and first["result"] == ""
    assert second["error"] == "" and "| Munich | 6300 |" in second["result"]


def test_rounds_are_bounded_and_the_last_call_goes_without_tools(
    runtime: Runtime, sim: OllamaSimulator, db: Database
) -> None:
    for _ in range(MAX_TOOL_ROUNDS + 1):
        sim.script(tool_calls=[{"name": "query_table", "arguments": {"aggregate": "count"}}])
    _, finished = run(runtime, request_with(sales_document()))
    assert finished.status is Status.OK
    bodies = chat_requests(sim)
    assert len(bodies) == MAX_TOOL_ROUNDS + 1
    assert all(b.get("tools") for b in bodies[:-1]) and not bodies[-1].get("tools")
    calls = json.loads(all_requests(db)[0].tool_calls)
    assert len(calls) == MAX_TOOL_ROUNDS + 1 and len(all_requests(db)) == 1
    assert all(c["error"] == "" for c in calls[:-1])
    assert calls[-1]["error"] == f"not run: a request may run tools in at most {MAX_TOOL_ROUNDS} rounds"


def test_tool_results_are_cut_to_fit_the_context_budget(
    runtime: Runtime, sim: OllamaSimulator, db: Database
) -> None:
    pages = [" ".join(f"word{p}x{i}" for i in range(400)) for p in range(10)]
    document = Document("long.pdf", "3" * 64, "pdf", pages=pages)
    sim.script(tool_calls=[{"name": "read_document", "arguments": {"first_page": 1, "last_page": 10}}])
    sim.script("Done.")
    budget = 1500
    _, finished = run(runtime, request_with(document, context_budget=budget))
    assert finished.status is Status.OK
    sent = chat_requests(sim)[1]
    assert sent["messages"][-1]["content"].endswith(TOOL_RESULT_CUT)
    counter = counter_for(MODEL, "ollama")
    assert counter.count_messages(sent["messages"], sent["tools"]) <= budget
    # The record keeps the whole result's excerpt, not the cut one.
    assert json.loads(all_requests(db)[0].tool_calls)[0]["result"].startswith("[page 1]")


def test_without_a_toolbox_tool_calls_are_passed_on_not_run(
    runtime: Runtime, sim: OllamaSimulator, db: Database
) -> None:
    # The HTTP API's clients run their own tools: the gateway only reports the calls.
    schemas = Toolbox.for_agent(list(BUILTIN), documents=[sales_document()]).schemas()
    sim.script(tool_calls=[{"name": "query_table", "arguments": {"aggregate": "count"}}])
    request = ChatRequest(
        user="alice",
        messages=[{"role": "user", "content": "count"}],
        model=MODEL,
        prompt="count",
        tools=schemas,
    )
    events, finished = run(runtime, request)
    assert finished.status is Status.OK and len(chat_requests(sim)) == 1
    assert not any(isinstance(e, ToolResult) for e in events)
    assert json.loads(all_requests(db)[0].tool_calls) == [
        {"name": "query_table", "arguments": {"aggregate": "count"}}
    ]
