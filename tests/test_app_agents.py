"""The Agents page in AppTest, signed in as an admin over a real database and the Ollama simulator: create,
validation under each field, edit into versions with their history, restore, archive, clone and the try box.
Every action is checked to be exactly one audit event by the admin who clicked."""

from __future__ import annotations

from typing import Any

from streamlit.testing.v1 import AppTest

from clawdbot.agents import AgentConfig
from clawdbot.models import Request, Tool
from tests.app_helpers import AppHarness, messages, plain
from tests.helpers import events_after, last_event_id

ADMIN = "boss"


def open_agents(harness: AppHarness) -> AppTest:
    harness.user(ADMIN, "admin")
    at = harness.open(ADMIN, "agents")
    assert not at.exception, at.exception
    assert at.title[0].value == "Agents"
    return at


def field_box(at: AppTest, prefix: str, name: str) -> Any:
    return at.get_by_key(f"{prefix}_field_{name}")


def test_create_an_agent_with_its_settings(app_harness: AppHarness) -> None:
    at = open_agents(app_harness)
    assert at.selectbox(key="agent_pick").value == "+ New agent"
    assert at.text_input(key="new_model").value == "qwen3:32b"  # CLAWDBOT_DEFAULT_MODEL
    assert at.multiselect(key="new_tools").options == ["read_document", "query_table", "make_chart"]
    caption = " ".join(messages(field_box(at, "new", "model").caption))
    assert "qwen3:32b (40960 tokens)" in caption and "llama3.2:1b (131072 tokens)" in caption

    before = last_event_id(app_harness.runtime.db)
    at.text_input(key="new_name").input("Contract Reviewer")
    at.text_area(key="new_system_prompt").input("Review contracts.")
    at.multiselect(key="new_tools").select("read_document")
    at.number_input(key="new_context_budget").set_value(8192)
    at.number_input(key="new_max_output_tokens").set_value(1024)
    at.number_input(key="new_temperature").set_value(0.3)
    at.toggle(key="new_think").set_value(False)
    at.button(key="new_save").click().run()
    assert not at.exception, at.exception

    assert messages(at.success) == ["Created agent Contract Reviewer (version 1)."]
    assert at.selectbox(key="agent_pick").value == "Contract Reviewer"
    saved = app_harness.runtime.agents.get("Contract Reviewer")
    assert (saved.version, saved.created_by) == (1, ADMIN)
    assert saved.config == AgentConfig(
        model="qwen3:32b",
        system_prompt="Review contracts.",
        tools=("read_document",),
        context_budget=8192,
        max_output_tokens=1024,
        temperature=0.3,
        think=False,
    )
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "agent.create", "Contract Reviewer", {"version": 1, "model": "qwen3:32b"})
    ]
    assert at.dataframe[0].value["Name"].tolist() == ["Contract Reviewer"]
    at.run()
    assert not at.success  # the notice is shown once


def test_problems_show_under_their_field_and_nothing_is_saved(app_harness: AppHarness) -> None:
    app_harness.runtime.agents.add("setup", "Helper", AgentConfig(model="qwen3:32b"))
    app_harness.sim.add_model("tiny:1b", context_length=2048)
    at = open_agents(app_harness)
    before = last_event_id(app_harness.runtime.db)

    at.text_input(key="new_name").input("helper")
    at.number_input(key="new_context_budget").set_value(50_000)
    at.number_input(key="new_temperature").set_value(3.0)
    at.button(key="new_save").click().run()
    assert messages(field_box(at, "new", "name").error) == ["an agent named 'helper' already exists"]
    assert messages(field_box(at, "new", "context_budget").error) == [
        "the context budget (50000 tokens) is above the context length of qwen3:32b (40960 tokens)"
    ]
    assert messages(field_box(at, "new", "temperature").error) == ["the temperature must be from 0 to 2"]
    assert not field_box(at, "new", "model").error and not field_box(at, "new", "max_output_tokens").error
    assert "Not saved: fix the fields marked above." in messages(at.error)

    at.text_input(key="new_name").input("Tiny helper")
    at.text_input(key="new_model").input("tiny:1b")
    at.number_input(key="new_context_budget").set_value(1800)
    at.number_input(key="new_max_output_tokens").set_value(512)
    at.number_input(key="new_temperature").set_value(None)
    at.button(key="new_save").click().run()
    assert not field_box(at, "new", "name").error and not field_box(at, "new", "context_budget").error
    (limit,) = messages(field_box(at, "new", "max_output_tokens").error)
    assert "(1800 + 512 tokens) is above the context length of tiny:1b (2048 tokens)" in limit

    at.text_input(key="new_name").input("bad/name")
    at.number_input(key="new_max_output_tokens").set_value(40_000)
    at.button(key="new_save").click().run()
    assert messages(field_box(at, "new", "name").error)[0].startswith("invalid agent name 'bad/name'")
    assert messages(field_box(at, "new", "max_output_tokens").error)[0] == (
        "the output limit must be from 1 to 32768 tokens"
    )

    assert [a.name for a in app_harness.runtime.agents.all(include_archived=True)] == ["Helper"]
    assert events_after(app_harness.runtime.db, before) == []


def test_a_model_the_server_lacks_is_a_warning_that_does_not_stop_the_save(app_harness: AppHarness) -> None:
    at = open_agents(app_harness)
    at.text_input(key="new_name").input("Future")
    at.text_input(key="new_model").input("qwen4:9t")
    at.button(key="new_try").click().run()
    (warning,) = messages(field_box(at, "new", "model").warning)
    assert "the model server has no model 'qwen4:9t'" in warning and "ollama pull qwen4:9t" in warning
    at.button(key="new_save").click().run()
    assert messages(at.success) == ["Created agent Future (version 1)."]
    assert any("the model server has no model 'qwen4:9t'" in w for w in messages(at.warning))
    assert app_harness.runtime.agents.get("Future").config.model == "qwen4:9t"


def test_a_model_server_that_does_not_answer_is_said_at_the_model_field(app_harness: AppHarness) -> None:
    app_harness.sim.stop()
    at = open_agents(app_harness)
    assert "The model server did not answer" in " ".join(messages(field_box(at, "new", "model").caption))
    at.text_input(key="new_name").input("Offline")
    at.button(key="new_save").click().run()
    assert messages(at.success) == ["Created agent Offline (version 1)."]
    assert any(
        "the model server did not answer, so 'qwen3:32b' could not be checked" in w
        for w in messages(at.warning)
    )


def test_tools_from_the_tools_table_can_be_chosen(app_harness: AppHarness) -> None:
    with app_harness.runtime.db.write() as session:
        session.add(Tool(name="weather", kind="http", url="https://example.org/weather"))
    at = open_agents(app_harness)
    assert at.multiselect(key="new_tools").options == [
        "read_document",
        "query_table",
        "make_chart",
        "weather",
    ]
    at.text_input(key="new_name").input("Forecaster")
    at.multiselect(key="new_tools").select("weather").select("make_chart")
    at.button(key="new_save").click().run()
    assert app_harness.runtime.agents.get("Forecaster").config.tools == ("weather", "make_chart")


def test_edits_become_versions_with_a_history_of_what_changed(app_harness: AppHarness) -> None:
    agents = app_harness.runtime.agents
    info = agents.add(
        "setup", "Reviewer", AgentConfig(model="qwen3:32b", system_prompt="Read it.\nBe brief.")
    )
    at = open_agents(app_harness)
    at.selectbox(key="agent_pick").select("Reviewer").run()
    prefix = f"a{info.id}v1"
    assert at.text_area(key=f"{prefix}_system_prompt").value == "Read it.\nBe brief."

    before = last_event_id(app_harness.runtime.db)
    at.button(key=f"{prefix}_save").click().run()
    assert "Nothing changed, so no new version was saved." in messages(at.info)
    assert events_after(app_harness.runtime.db, before) == []

    at.text_area(key=f"{prefix}_system_prompt").input("Read it.\nBe thorough.")
    at.text_input(key=f"{prefix}_model").input("qwen3:0.6b")
    at.button(key=f"{prefix}_save").click().run()
    assert not at.exception, at.exception
    assert messages(at.success) == ["Saved Reviewer as version 2."]
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "agent.update", "Reviewer", {"version": 2, "changed": ["model", "system_prompt"]})
    ]
    assert [v.config.model for v in agents.versions("Reviewer")] == ["qwen3:32b", "qwen3:0.6b"]
    # The form now starts from version 2.
    assert at.text_input(key=f"a{info.id}v2_model").value == "qwen3:0.6b"

    labels = [plain(e.label) for e in at.expander]
    assert labels[0].startswith("Version 2 · ") and labels[0].endswith(f"by {ADMIN} · current")
    assert labels[1].startswith("Version 1 · ") and labels[1].endswith("by setup")
    newest = at.expander[0]
    assert newest.dataframe[0].value.to_dict("records") == [
        {"Setting": "Model", "Before": "qwen3:32b", "After": "qwen3:0.6b"}
    ]
    assert newest.code[0].value.splitlines() == [
        "--- version 1",
        "+++ version 2",
        "@@ -1,2 +1,2 @@",
        " Read it.",
        "-Be brief.",
        "+Be thorough.",
    ]
    assert messages(at.expander[1].caption) == ["The first version."]

    before = last_event_id(app_harness.runtime.db)
    at.button(key="restore_version_1").click().run()
    assert messages(at.success) == ["Saved version 1's settings as version 3."]
    current = agents.get("Reviewer")
    assert (current.version, current.config.system_prompt, current.config.model) == (
        3,
        "Read it.\nBe brief.",
        "qwen3:32b",
    )
    assert events_after(app_harness.runtime.db, before) == [
        (
            ADMIN,
            "agent.update",
            "Reviewer",
            {"version": 3, "changed": ["model", "system_prompt"], "restored_from": 1},
        )
    ]
    assert at.text_area(key=f"a{info.id}v3_system_prompt").value == "Read it.\nBe brief."


def test_archive_restore_and_the_archived_list(app_harness: AppHarness) -> None:
    app_harness.runtime.agents.add("setup", "Old", AgentConfig(model="qwen3:32b"))
    app_harness.runtime.agents.add("setup", "New", AgentConfig(model="qwen3:32b"))
    at = open_agents(app_harness)
    at.selectbox(key="agent_pick").select("Old").run()
    before = last_event_id(app_harness.runtime.db)
    at.button(key="agent_archive").click().run()
    assert messages(at.success) == ["Old is archived."]
    assert app_harness.runtime.agents.get("Old").archived
    assert at.dataframe[0].value["Name"].tolist() == ["New"]  # archived ones are hidden by default
    assert "archived" in plain(at.caption[0].value)

    at.toggle(key="show_archived").set_value(True).run()
    table = at.dataframe[0].value
    assert table["Name"].tolist() == ["New", "Old"] and table["Status"].tolist() == ["active", "archived"]

    at.button(key="agent_restore").click().run()
    assert messages(at.success) == ["Old is restored."]
    assert not app_harness.runtime.agents.get("Old").archived
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "agent.archive", "Old", {}),
        (ADMIN, "agent.restore", "Old", {}),
    ]


def test_clone_an_agent(app_harness: AppHarness) -> None:
    agents = app_harness.runtime.agents
    info = agents.add("setup", "Reviewer", AgentConfig(model="qwen3:32b", system_prompt="Review."))
    agents.add("setup", "Taken", AgentConfig(model="qwen3:32b"))
    at = open_agents(app_harness)
    at.selectbox(key="agent_pick").select("Reviewer").run()
    before = last_event_id(app_harness.runtime.db)

    at.text_input(key=f"a{info.id}_clone_name").input("taken")
    at.button(key="agent_clone").click().run()
    assert "an agent named 'taken' already exists" in messages(at.error)
    assert events_after(app_harness.runtime.db, before) == []

    at.text_input(key=f"a{info.id}_clone_name").input("Reviewer EU")
    at.button(key="agent_clone").click().run()
    assert messages(at.success) == ["Created Reviewer EU as a copy of Reviewer version 1."]
    assert at.selectbox(key="agent_pick").value == "Reviewer EU"
    copy = agents.get("Reviewer EU")
    assert (copy.version, copy.config, copy.created_by) == (1, info.config, ADMIN)
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "agent.clone", "Reviewer EU", {"version": 1, "source": "Reviewer", "source_version": 1})
    ]


def test_the_try_box_runs_the_unsaved_settings_through_the_gateway(app_harness: AppHarness) -> None:
    agents = app_harness.runtime.agents
    info = agents.add("setup", "Helper", AgentConfig(model="qwen3:32b", system_prompt="Saved."))
    at = open_agents(app_harness)
    at.selectbox(key="agent_pick").select("Helper").run()
    prefix = f"a{info.id}v1"
    before = last_event_id(app_harness.runtime.db)

    at.button(key=f"{prefix}_try").click().run()
    assert "Type a message to try the agent with." in messages(at.error)
    assert events_after(app_harness.runtime.db, before) == []

    app_harness.sim.script("Unsaved answer.")
    at.text_area(key=f"{prefix}_system_prompt").input("Not saved yet.")
    at.text_input(key=f"{prefix}_model").input("qwen3:0.6b")
    at.text_area(key=f"{prefix}_try_prompt").input("Hello?")
    at.button(key=f"{prefix}_try").click().run()
    assert not at.exception, at.exception
    result = at.get_by_key("try_result")
    assert "Unsaved answer." in [m.value for m in result.markdown]
    assert not result.error

    body = app_harness.sim.requests[-1]["body"]
    assert body["model"] == "qwen3:0.6b"
    assert body["messages"][0] == {"role": "system", "content": "Not saved yet."}
    (event,) = events_after(app_harness.runtime.db, before)
    assert event[:3] == (ADMIN, "agent.try", "Helper")
    assert event[3]["status"] == "ok"
    with app_harness.runtime.db.read() as session:
        record = session.get(Request, event[3]["request_id"])
        assert record is not None
        assert (record.user, record.agent, record.agent_version, record.status) == (
            ADMIN,
            "Helper",
            None,
            "ok",
        )
        assert record.response == "Unsaved answer."
    assert agents.get("Helper").version == 1 and agents.get("Helper").config.system_prompt == "Saved."
    assert any(f"request {record.id}" in plain(c.value) for c in result.caption)


def test_a_new_draft_can_be_tried_before_it_has_a_name(app_harness: AppHarness) -> None:
    at = open_agents(app_harness)
    before = last_event_id(app_harness.runtime.db)
    at.text_area(key="new_try_prompt").input("Hi")
    at.number_input(key="new_context_budget").set_value(100)
    at.button(key="new_try").click().run()
    assert messages(field_box(at, "new", "context_budget").error) == [
        "the context budget must be from 256 to 1000000 tokens"
    ]
    assert "Not tried: fix the fields marked above." in messages(at.error)
    assert events_after(app_harness.runtime.db, before) == []

    at.number_input(key="new_context_budget").set_value(4096)
    at.button(key="new_try").click().run()
    assert not field_box(at, "new", "name").error
    (event,) = events_after(app_harness.runtime.db, before)
    assert event[:3] == (ADMIN, "agent.try", "(unsaved agent)")
    assert app_harness.runtime.agents.all(include_archived=True) == []
