"""Agents and their immutable versions: an edit adds a version, and a request names the version it used."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clawdbot.audit import append_event
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Agent, AgentVersion, Tool

NAME_PATTERN = re.compile(r"^[\w][\w .-]{0,62}[\w]$|^\w$")
# Tools implemented inside clawdbot; admin-defined HTTP tools live in the tools table.
BUILTIN_TOOLS = ("read_document", "query_table", "make_chart")
MAX_OUTPUT_TOKENS = 32_768
MAX_SYSTEM_PROMPT_CHARS = 100_000


@dataclass(frozen=True)
class AgentConfig:
    """What an admin sets on an agent; each saved change becomes a new version."""

    model: str
    system_prompt: str = ""
    tools: tuple[str, ...] = ()
    fallback_model: str = ""
    context_budget: int = 7500
    max_output_tokens: int = 2048
    temperature: float | None = None
    top_p: float | None = None
    think: bool = True

    def check(self) -> None:
        """Raise UsageError naming the first value out of range."""
        if not self.model.strip():
            raise UsageError("the model is empty: give a model name such as qwen3:32b")
        if len(self.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
            raise UsageError(f"the system prompt is longer than {MAX_SYSTEM_PROMPT_CHARS} characters")
        if not 256 <= self.context_budget <= 1_000_000:
            raise UsageError("the context budget must be from 256 to 1000000 tokens")
        if not 1 <= self.max_output_tokens <= MAX_OUTPUT_TOKENS:
            raise UsageError(f"the output limit must be from 1 to {MAX_OUTPUT_TOKENS} tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise UsageError("the temperature must be from 0 to 2")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError("top_p must be greater than 0 and at most 1")
        if len(set(self.tools)) != len(self.tools):
            raise UsageError("a tool is listed twice")


@dataclass(frozen=True)
class AgentInfo:
    """An agent with its current version."""

    id: int
    name: str
    archived: bool
    version: int
    version_id: int
    config: AgentConfig
    created_by: str


def _config_of(version: AgentVersion) -> AgentConfig:
    return AgentConfig(
        model=version.model,
        system_prompt=version.system_prompt,
        tools=tuple(json.loads(version.tools)),
        fallback_model=version.fallback_model,
        context_budget=version.context_budget,
        max_output_tokens=version.max_output_tokens,
        temperature=version.temperature,
        top_p=version.top_p,
        think=version.think,
    )


def _info(agent: Agent, version: AgentVersion) -> AgentInfo:
    return AgentInfo(
        agent.id,
        agent.name,
        agent.archived,
        version.version,
        version.id,
        _config_of(version),
        version.created_by,
    )


def _latest(session: Session, agent_id: int) -> AgentVersion:
    return session.scalars(
        select(AgentVersion).where(AgentVersion.agent_id == agent_id).order_by(AgentVersion.version.desc())
    ).first()  # type: ignore[return-value]


def _check_tools(session: Session, tools: Sequence[str]) -> None:
    defined = set(session.scalars(select(Tool.name).where(Tool.disabled.is_(False))))
    for tool in tools:
        if tool not in BUILTIN_TOOLS and tool not in defined:
            known = ", ".join(sorted({*BUILTIN_TOOLS, *defined}))
            raise UsageError(f"unknown tool {tool!r}: use one of {known}")


def _changes(old: AgentConfig, new: AgentConfig) -> dict[str, Any]:
    return {
        f.name: getattr(new, f.name)
        for f in fields(AgentConfig)
        if getattr(old, f.name) != getattr(new, f.name)
    }


class Agents:
    """Agent administration; every change is an event in the audit chain."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, actor: str, name: str, config: AgentConfig) -> AgentInfo:
        name = name.strip()
        if not NAME_PATTERN.match(name):
            raise UsageError(
                f"invalid agent name {name!r}: use 1 to 64 letters, digits, spaces, '_', '.' or '-', "
                "starting and ending with a letter or digit"
            )
        config.check()
        try:
            with self.db.write() as session:
                if session.scalar(select(Agent.id).where(func.lower(Agent.name) == name.lower())) is not None:
                    raise UsageError(f"an agent named {name!r} already exists")
                _check_tools(session, config.tools)
                agent = Agent(name=name)
                session.add(agent)
                session.flush()
                version = self._add_version(session, agent, 1, config, actor)
                append_event(
                    session.connection(), actor, "agent.create", name, {"version": 1, "model": config.model}
                )
                return _info(agent, version)
        except IntegrityError:
            raise UsageError(f"an agent named {name!r} already exists") from None

    def update(self, actor: str, name: str, config: AgentConfig) -> AgentInfo:
        """Save a changed configuration as the next version; an unchanged one adds nothing."""
        config.check()
        with self.db.write() as session:
            agent = self._find(session, name)
            current = _latest(session, agent.id)
            changes = _changes(_config_of(current), config)
            if not changes:
                return _info(agent, current)
            _check_tools(session, config.tools)
            version = self._add_version(session, agent, current.version + 1, config, actor)
            append_event(
                session.connection(),
                actor,
                "agent.update",
                agent.name,
                {"version": version.version, "changed": sorted(changes)},
            )
            return _info(agent, version)

    def set_archived(self, actor: str, name: str, archived: bool = True) -> None:
        with self.db.write() as session:
            agent = self._find(session, name)
            agent.archived = archived
            session.flush()
            append_event(
                session.connection(), actor, "agent.archive" if archived else "agent.restore", agent.name
            )

    def get(self, name: str) -> AgentInfo:
        with self.db.read() as session:
            agent = self._find(session, name)
            return _info(agent, _latest(session, agent.id))

    def all(self, include_archived: bool = False) -> list[AgentInfo]:
        with self.db.read() as session:
            query = select(Agent).order_by(Agent.name)
            if not include_archived:
                query = query.where(Agent.archived.is_(False))
            return [_info(a, _latest(session, a.id)) for a in session.scalars(query)]

    def versions(self, name: str) -> list[AgentInfo]:
        with self.db.read() as session:
            agent = self._find(session, name)
            rows = session.scalars(
                select(AgentVersion).where(AgentVersion.agent_id == agent.id).order_by(AgentVersion.version)
            )
            return [_info(agent, v) for v in rows]

    @staticmethod
    def _find(session: Session, name: str) -> Agent:
        agent = session.scalar(select(Agent).where(Agent.name == name))
        if agent is None:
            raise NotFoundError(f"there is no agent named {name!r}: see `clawdbot agent list`")
        return agent

    @staticmethod
    def _add_version(
        session: Session, agent: Agent, number: int, config: AgentConfig, actor: str
    ) -> AgentVersion:
        version = AgentVersion(
            agent_id=agent.id,
            version=number,
            model=config.model.strip(),
            fallback_model=config.fallback_model.strip(),
            system_prompt=config.system_prompt,
            tools=json.dumps(list(config.tools)),
            context_budget=config.context_budget,
            max_output_tokens=config.max_output_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            think=config.think,
            created_by=actor,
        )
        session.add(version)
        session.flush()
        return version
