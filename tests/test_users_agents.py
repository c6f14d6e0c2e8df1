"""Users and agents: validation, argon2 sign-in, immutable agent versions, and an event for every change."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from clawdbot.agents import AgentConfig, Agents
from clawdbot.chain import verify_chain
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import AgentVersion, Event, Role, User
from clawdbot.users import Users


def _events(db: Database) -> list[tuple[str, str, str, dict[str, object]]]:
    with db.read() as session:
        rows = session.execute(
            select(Event.actor, Event.action, Event.target, Event.details).order_by(Event.seq)
        )
        return [(a, b, c, json.loads(d)) for a, b, c, d in rows]


def test_user_lifecycle_with_events(db: Database) -> None:
    users = Users(db)
    users.add("root", "root", ["admin"])  # so that alice is not the last admin when she is disabled
    info, password = users.add("root", "alice", ["staff", "auditor"])
    assert info.roles == frozenset({Role.STAFF, Role.AUDITOR})
    assert info.must_change_password
    assert users.authenticate("alice", password) == info
    assert users.authenticate("alice", password + "x") is None
    assert users.authenticate("nobody", password) is None
    with db.read() as session:
        stored = session.scalar(select(User.password_hash).where(User.name == "alice"))
    assert stored is not None and stored.startswith("$argon2id$") and password not in stored

    users.set_roles("root", "alice", ["admin"])
    assert users.get("alice").roles == frozenset({Role.ADMIN})
    new_password = users.reset_password("root", "alice", "a much longer password")
    assert users.authenticate("alice", password) is None
    assert users.authenticate("alice", new_password) is not None
    users.set_disabled("root", "alice")
    assert users.authenticate("alice", new_password) is None
    assert users.get("alice").disabled

    assert [(a, b, c) for a, b, c, _ in _events(db)] == [
        ("root", "user.create", "root"),
        ("root", "user.create", "alice"),
        ("root", "user.roles", "alice"),
        ("root", "user.password", "alice"),
        ("root", "user.disable", "alice"),
    ]
    assert all("password" not in json.dumps(d) or d == {"one_time": False} for *_, d in _events(db))
    assert verify_chain(db).ok


@pytest.mark.parametrize(
    ("name", "roles", "password", "message"),
    [
        ("bad name", ["staff"], None, "invalid user name"),
        ("", ["staff"], None, "invalid user name"),
        ("bob", [], None, "give at least one role"),
        ("bob", ["root"], None, "unknown role 'root'"),
        ("bob", ["staff"], "short", "too short"),
    ],
)
def test_bad_user_input_is_refused_and_nothing_is_written(
    db: Database, name: str, roles: list[str], password: str | None, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        Users(db).add("root", name, roles, password)
    assert Users(db).all() == []
    assert _events(db) == []


def test_duplicate_user_and_unknown_user(db: Database) -> None:
    users = Users(db)
    users.add("root", "bob", ["staff"])
    with pytest.raises(UsageError, match="already exists"):
        users.add("root", "bob", ["admin"])
    with pytest.raises(NotFoundError, match="no user named 'carol'"):
        users.set_disabled("root", "carol")
    assert len(_events(db)) == 1


def test_first_admin_is_created_only_once(db: Database) -> None:
    users = Users(db)
    password = users.ensure_first_admin()
    assert password is not None
    admin = users.authenticate("admin", password)
    assert admin is not None and admin.has(Role.ADMIN) and admin.must_change_password
    assert users.ensure_first_admin() is None


def test_agent_edits_create_versions_and_requests_can_name_them(db: Database) -> None:
    agents = Agents(db)
    first = agents.add("root", "Contract Reviewer", AgentConfig(model="qwen3:32b", system_prompt="Review."))
    assert (first.version, first.config.context_budget) == (1, 7500)
    same = agents.update("root", "Contract Reviewer", first.config)
    assert same.version == 1  # nothing changed, no new version
    second = agents.update(
        "root",
        "Contract Reviewer",
        AgentConfig(model="qwen3:32b", system_prompt="Review carefully.", tools=("read_document",)),
    )
    assert second.version == 2 and second.version_id != first.version_id
    history = agents.versions("Contract Reviewer")
    assert [v.config.system_prompt for v in history] == ["Review.", "Review carefully."]
    with db.read() as session:
        assert session.scalar(
            select(AgentVersion.system_prompt).where(AgentVersion.id == first.version_id)
        ) == ("Review.")
    agents.set_archived("root", "Contract Reviewer")
    assert agents.all() == []
    assert [a.name for a in agents.all(include_archived=True)] == ["Contract Reviewer"]
    agents.set_archived("root", "Contract Reviewer", archived=False)
    assert [(a, c, d.get("changed")) for _, a, c, d in _events(db)] == [
        ("agent.create", "Contract Reviewer", None),
        ("agent.update", "Contract Reviewer", ["system_prompt", "tools"]),
        ("agent.archive", "Contract Reviewer", None),
        ("agent.restore", "Contract Reviewer", None),
    ]
    assert verify_chain(db).ok


@pytest.mark.parametrize(
    ("name", "config", "message"),
    [
        ("x" * 65, AgentConfig(model="m"), "invalid agent name"),
        (" lead", AgentConfig(model="m"), None),
        ("<script>", AgentConfig(model="m"), "invalid agent name"),
        ("ok", AgentConfig(model=" "), "the model is empty"),
        ("ok", AgentConfig(model="m", context_budget=100), "context budget"),
        ("ok", AgentConfig(model="m", max_output_tokens=0), "output limit"),
        ("ok", AgentConfig(model="m", temperature=3), "temperature"),
        ("ok", AgentConfig(model="m", tools=("shell",)), "unknown tool 'shell'"),
        ("ok", AgentConfig(model="m", tools=("make_chart", "make_chart")), "listed twice"),
    ],
)
def test_bad_agent_input_is_refused(
    db: Database, name: str, config: AgentConfig, message: str | None
) -> None:
    agents = Agents(db)
    if message is None:  # surrounding spaces are trimmed, not refused
        assert agents.add("root", name, config).name == name.strip()
        return
    with pytest.raises(UsageError, match=message):
        agents.add("root", name, config)
    assert agents.all(include_archived=True) == []


def test_agent_names_are_unique_regardless_of_case(db: Database) -> None:
    agents = Agents(db)
    agents.add("root", "Helper", AgentConfig(model="m"))
    with pytest.raises(UsageError, match="already exists"):
        agents.add("root", "helper", AgentConfig(model="m"))
    with pytest.raises(NotFoundError, match="clawdbot agent list"):
        agents.get("nope")
