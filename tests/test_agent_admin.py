"""What the agents page relies on in the core: every problem of a draft by field, the model server's say on
models and limits, clone, restoring a version, what changed between versions, and trying an unsaved draft
through the gateway. Each admin action is exactly one event, by the admin who did it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from clawdbot.agents import (
    UNSAVED_AGENT,
    AgentConfig,
    Agents,
    ModelCatalog,
    Problem,
    compare,
    model_catalog,
    prompt_diff,
)
from clawdbot.backends import BackendSelector, ContentDelta, ModelInfo
from clawdbot.chain import verify_chain
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.gateway import Finished
from clawdbot.models import AgentVersion, Conversation, Request, Status, Tool
from clawdbot.runtime import Runtime
from clawdbot.settings import load_settings
from tests.helpers import events_after, last_event_id
from tests.ollama_sim import OllamaSimulator


def by_field(problems: list[Problem]) -> dict[str, list[tuple[str, bool]]]:
    found: dict[str, list[tuple[str, bool]]] = {}
    for problem in problems:
        found.setdefault(problem.field, []).append((problem.message, problem.blocking))
    return found


def catalog_of(*models: tuple[str, int | None]) -> ModelCatalog:
    return ModelCatalog(tuple(ModelInfo(name, length, frozenset(), None) for name, length in models))


# -- problems ---------------------------------------------------------------------------------------------


def test_problems_lists_every_bad_field_at_once(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Helper", AgentConfig(model="m"))
    config = AgentConfig(
        model=" ",
        system_prompt="x" * 100_001,
        tools=("make_chart", "make_chart", "shell"),
        context_budget=100,
        max_output_tokens=0,
        temperature=2.5,
        top_p=0,
    )
    found = by_field(agents.problems(config, name="helper"))
    assert set(found) == {
        "name",
        "model",
        "system_prompt",
        "tools",
        "context_budget",
        "max_output_tokens",
        "temperature",
        "top_p",
    }
    assert found["name"] == [("an agent named 'helper' already exists", True)]
    assert [m for m, _ in found["tools"]] == ["a tool is listed twice", found["tools"][1][0]]
    assert found["tools"][1][0].startswith("unknown tool 'shell': use one of ")
    assert all(blocking for problems in found.values() for _, blocking in problems)


def test_a_good_draft_has_no_problem(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Helper", AgentConfig(model="m"))
    assert agents.problems(AgentConfig(model="m"), name="Fresh one") == []
    assert agents.problems(AgentConfig(model="m")) == []  # an edit: the name is not checked
    assert by_field(agents.problems(AgentConfig(model="m"), name="<b>"))["name"][0][0].startswith(
        "invalid agent name '<b>'"
    )


def test_tools_come_from_the_builtins_and_the_enabled_tools_table(db: Database) -> None:
    with db.write() as session:
        session.add(Tool(name="weather", kind="http", url="https://example.org"))
        session.add(Tool(name="retired", kind="http", url="https://example.org", disabled=True))
    agents = Agents(db)
    assert agents.tool_names() == ["read_document", "query_table", "make_chart", "weather"]
    assert agents.problems(AgentConfig(model="m", tools=("weather", "read_document"))) == []
    assert by_field(agents.problems(AgentConfig(model="m", tools=("retired",))))["tools"]
    saved = agents.add("boss", "Forecaster", AgentConfig(model="m", tools=("weather",)))
    assert saved.config.tools == ("weather",)
    with pytest.raises(UsageError, match="unknown tool 'retired'"):
        agents.add("boss", "Other", AgentConfig(model="m", tools=("retired",)))


def test_the_model_server_decides_on_model_names_and_limits(db: Database) -> None:
    agents = Agents(db)
    catalog = catalog_of(("qwen3:32b", 40960), ("tiny:latest", 2048), ("mystery:1b", None))

    assert agents.problems(AgentConfig(model="qwen3:32b", context_budget=7500), catalog=catalog) == []
    assert (
        agents.problems(
            AgentConfig(model="tiny", context_budget=1024, max_output_tokens=512), catalog=catalog
        )
        == []
    )

    unknown = by_field(agents.problems(AgentConfig(model="qwen4:1t", fallback_model="nope"), catalog=catalog))
    assert unknown["model"][0][1] is False  # a warning: the model may be pulled later
    assert (
        "no model 'qwen4:1t'" in unknown["model"][0][0] and "ollama pull qwen4:1t" in unknown["model"][0][0]
    )
    assert "qwen3:32b" in unknown["model"][0][0]
    assert unknown["fallback_model"][0][1] is False

    over = by_field(agents.problems(AgentConfig(model="qwen3:32b", context_budget=50_000), catalog=catalog))
    assert over == {
        "context_budget": [
            (
                "the context budget (50000 tokens) is above the context length of qwen3:32b (40960 tokens)",
                True,
            )
        ]
    }
    shared = by_field(
        agents.problems(
            AgentConfig(model="tiny", context_budget=1800, max_output_tokens=512), catalog=catalog
        )
    )
    assert list(shared) == ["max_output_tokens"]
    assert shared["max_output_tokens"][0][1] is True
    assert (
        "(1800 + 512 tokens) is above the context length of tiny:latest (2048 tokens)"
        in (shared["max_output_tokens"][0][0])
    )
    # A model whose context length the server does not report is not limited here.
    assert agents.problems(AgentConfig(model="mystery:1b", context_budget=900_000), catalog=catalog) == []


def test_no_answer_from_the_server_is_a_warning_and_the_embedded_backend_checks_nothing(db: Database) -> None:
    agents = Agents(db)
    down = by_field(agents.problems(AgentConfig(model="qwen3:32b"), catalog=ModelCatalog(error="refused")))
    assert down == {
        "model": [("the model server did not answer, so 'qwen3:32b' could not be checked: refused", False)]
    }
    assert agents.problems(AgentConfig(model="anything"), catalog=ModelCatalog(checked=False)) == []


@pytest.fixture
def sim() -> Iterator[OllamaSimulator]:
    with OllamaSimulator() as server:
        yield server


def test_model_catalog_asks_ollama_for_models_and_context_lengths(
    workdir: Path, sim: OllamaSimulator
) -> None:
    sim.add_model("tiny:1b", context_length=2048)
    selector = BackendSelector(load_settings(ollama_host=sim.url, backend="ollama", connect_timeout=2))
    try:
        catalog = model_catalog(selector)
        assert catalog.checked and not catalog.error
        assert {m.name: m.context_length for m in catalog.models} == {
            "qwen3:32b": 40960,
            "qwen3:0.6b": 40960,
            "llama3.2:1b": 131072,
            "tiny:1b": 2048,
        }
        assert catalog.find("tiny:1b") is not None and catalog.find("tiny") is None
        sim.stop()
        stopped = model_catalog(selector)
        assert stopped.models == () and "cannot reach Ollama" in stopped.error
    finally:
        selector.close()
    embedded = BackendSelector(load_settings(backend="embedded"))
    assert model_catalog(embedded) == ModelCatalog(checked=False)


# -- clone, restore, archive, history ----------------------------------------------------------------------


def test_clone_copies_the_current_version_under_a_new_name_with_one_event(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Reviewer", AgentConfig(model="m", system_prompt="One."))
    agents.update("boss", "Reviewer", AgentConfig(model="m", system_prompt="Two.", tools=("make_chart",)))
    before = last_event_id(db)
    copy = agents.clone("carol", "Reviewer", " Reviewer EU ")
    assert (copy.name, copy.version, copy.created_by) == ("Reviewer EU", 1, "carol")
    assert copy.config == agents.get("Reviewer").config
    assert events_after(db, before) == [
        ("carol", "agent.clone", "Reviewer EU", {"version": 1, "source": "Reviewer", "source_version": 2})
    ]
    before = last_event_id(db)
    with pytest.raises(UsageError, match="an agent named 'reviewer eu' already exists"):
        agents.clone("carol", "Reviewer", "reviewer eu")
    with pytest.raises(UsageError, match="invalid agent name"):
        agents.clone("carol", "Reviewer", "")
    with pytest.raises(NotFoundError):
        agents.clone("carol", "Nobody", "Copy")
    assert events_after(db, before) == []
    assert [a.name for a in agents.all()] == ["Reviewer", "Reviewer EU"]


def test_restoring_a_version_saves_its_settings_as_the_next_version(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Reviewer", AgentConfig(model="m", system_prompt="One."))
    agents.update("boss", "Reviewer", AgentConfig(model="m2", system_prompt="Two."))
    before = last_event_id(db)
    restored = agents.restore_version("carol", "Reviewer", 1)
    assert restored.version == 3
    assert restored.config == AgentConfig(model="m", system_prompt="One.")
    assert [v.config.system_prompt for v in agents.versions("Reviewer")] == ["One.", "Two.", "One."]
    assert events_after(db, before) == [
        (
            "carol",
            "agent.update",
            "Reviewer",
            {"version": 3, "changed": ["model", "system_prompt"], "restored_from": 1},
        )
    ]
    before = last_event_id(db)
    assert agents.restore_version("carol", "Reviewer", 1).version == 3  # already current: nothing to save
    with pytest.raises(NotFoundError, match="has no version 9"):
        agents.restore_version("carol", "Reviewer", 9)
    assert events_after(db, before) == []
    with db.read() as session:
        assert session.scalar(select(func.count(AgentVersion.id))) == 3


def test_archive_and_restore_are_one_event_each_and_a_repeat_is_refused(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Helper", AgentConfig(model="m"))
    before = last_event_id(db)
    agents.set_archived("carol", "Helper")
    with pytest.raises(UsageError, match="already archived"):
        agents.set_archived("carol", "Helper")
    assert agents.get("Helper").archived
    agents.set_archived("dave", "Helper", archived=False)
    with pytest.raises(UsageError, match="is already active"):
        agents.set_archived("dave", "Helper", archived=False)
    assert [(a, b, c) for a, b, c, _ in events_after(db, before)] == [
        ("carol", "agent.archive", "Helper"),
        ("dave", "agent.restore", "Helper"),
    ]
    assert verify_chain(db).ok


def test_history_says_what_each_version_changed(db: Database) -> None:
    agents = Agents(db)
    agents.add("boss", "Reviewer", AgentConfig(model="m", system_prompt="Read the contract.\nBe brief."))
    agents.update(
        "carol",
        "Reviewer",
        AgentConfig(
            model="m",
            system_prompt="Read the contract.\nBe thorough.",
            tools=("read_document",),
            temperature=0.2,
            think=False,
        ),
    )
    agents.update(
        "carol",
        "Reviewer",
        AgentConfig(
            model="m2",
            system_prompt="Read the contract.\nBe thorough.",
            tools=("read_document",),
            temperature=0.2,
            think=False,
        ),
    )
    newest, middle, first = agents.history("Reviewer")
    assert [c.version.version for c in (newest, middle, first)] == [3, 2, 1]
    assert (first.fields, first.prompt_diff, first.changed) == ((), "", False)
    assert [(f.label, f.before, f.after) for f in middle.fields] == [
        ("Tools", "none", "read_document"),
        ("Temperature", "server default", "0.2"),
        ("Thinking", "on", "off"),
    ]
    assert middle.prompt_diff.splitlines() == [
        "--- version 1",
        "+++ version 2",
        "@@ -1,2 +1,2 @@",
        " Read the contract.",
        "-Be brief.",
        "+Be thorough.",
    ]
    assert middle.version.created_by == "carol" and middle.version.created_at is not None
    assert [(f.field, f.before, f.after) for f in newest.fields] == [("model", "m", "m2")]
    assert newest.prompt_diff == ""
    assert compare(None, first.version) == first
    assert prompt_diff("same", "same") == ""


# -- trying a draft ----------------------------------------------------------------------------------------


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    settings = load_settings(
        database_url=db.url,
        data_dir=workdir / "data",
        ollama_host=sim.url,
        backend="ollama",
        rate_limit="",
        retries=0,
    )
    rt = Runtime(settings)
    yield rt
    rt.close()


def test_trying_a_draft_is_one_recorded_request_and_one_event_and_saves_nothing(
    runtime: Runtime, sim: OllamaSimulator
) -> None:
    runtime.agents.add("boss", "Helper", AgentConfig(model="qwen3:32b", system_prompt="Saved prompt."))
    before = last_event_id(runtime.db)
    sim.script("Draft answer.")
    draft = AgentConfig(
        model="qwen3:0.6b", system_prompt="Unsaved prompt.", max_output_tokens=64, think=False
    )
    events = list(runtime.chat.try_config("carol", "Helper", draft, "Hello?"))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.status == Status.OK
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Draft answer."

    body = sim.requests[-1]["body"]
    assert body["model"] == "qwen3:0.6b"
    assert body["messages"] == [
        {"role": "system", "content": "Unsaved prompt."},
        {"role": "user", "content": "Hello?"},
    ]
    assert body["options"]["num_predict"] == 64
    with runtime.db.read() as session:
        record = session.get(Request, finished.request_id)
        assert record is not None
        assert (record.user, record.agent, record.agent_version, record.agent_version_id) == (
            "carol",
            "Helper",
            None,
            None,
        )
        assert (record.status, record.conversation_id, record.response) == ("ok", None, "Draft answer.")
        assert "Unsaved prompt." in record.context
        assert session.scalar(select(func.count(Conversation.id))) == 0
    assert runtime.agents.get("Helper").version == 1  # nothing saved
    assert events_after(runtime.db, before) == [
        (
            "carol",
            "agent.try",
            "Helper",
            {"request_id": finished.request_id, "status": "ok", "model": "qwen3:0.6b"},
        )
    ]
    assert verify_chain(runtime.db).ok


def test_a_draft_without_a_valid_name_is_recorded_as_unsaved(runtime: Runtime) -> None:
    events = list(runtime.chat.try_config("carol", "  ", AgentConfig(model="qwen3:32b"), "Hi"))
    finished = events[-1]
    assert isinstance(finished, Finished)
    with runtime.db.read() as session:
        record = session.get(Request, finished.request_id)
        assert record is not None and (record.agent, record.agent_version) == (UNSAVED_AGENT, None)
    assert [(a, b, c) for a, b, c, _ in events_after(runtime.db, 0)] == [
        ("carol", "agent.try", UNSAVED_AGENT)
    ]


def test_a_draft_that_cannot_be_sent_is_refused_and_an_empty_message_is_recorded(runtime: Runtime) -> None:
    with pytest.raises(UsageError, match="context budget"):
        list(
            runtime.chat.try_config("carol", "Helper", AgentConfig(model="qwen3:32b", context_budget=5), "Hi")
        )
    with runtime.db.read() as session:
        assert session.scalar(select(func.count(Request.id))) == 0
    assert events_after(runtime.db, 0) == []

    (finished,) = list(runtime.chat.try_config("carol", "Helper", AgentConfig(model="qwen3:32b"), "   "))
    assert isinstance(finished, Finished) and finished.status == Status.REJECTED_INPUT
    assert events_after(runtime.db, 0) == [
        (
            "carol",
            "agent.try",
            "Helper",
            {"request_id": finished.request_id, "status": "rejected_input", "model": "qwen3:32b"},
        )
    ]


def test_a_try_out_stopped_half_way_is_finalized_before_its_event(
    runtime: Runtime, sim: OllamaSimulator
) -> None:
    sim.script("one two three four five six")
    stream = runtime.chat.try_config("carol", "Helper", AgentConfig(model="qwen3:32b", think=False), "Hi")
    for event in stream:
        if isinstance(event, ContentDelta):
            break
    stream.close()
    (row,) = events_after(runtime.db, 0)
    assert row[:3] == ("carol", "agent.try", "Helper") and row[3]["status"] == "cancelled"
    with runtime.db.read() as session:
        record = session.get(Request, row[3]["request_id"])
        assert record is not None and record.status == "cancelled"
    assert verify_chain(runtime.db).ok
