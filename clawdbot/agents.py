"""Agents and their immutable versions: an edit adds a version, and a request names the version it used.

Besides saving, this module answers what the admin page asks before a save: every problem with a draft at once,
each tied to the field it concerns (so the page can show it there), checked against the models the model server
says it has; and what changed from one version to the next.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clawdbot.audit import append_event
from clawdbot.backends import BackendError, BackendSelector, ModelInfo
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Agent, AgentVersion, Tool

NAME_PATTERN = re.compile(r"^[\w][\w .-]{0,62}[\w]$|^\w$")
# Tools implemented inside clawdbot; admin-defined HTTP tools live in the tools table.
BUILTIN_TOOLS = ("read_document", "query_table", "make_chart")
MAX_OUTPUT_TOKENS = 32_768
MAX_SYSTEM_PROMPT_CHARS = 100_000
MIN_CONTEXT_BUDGET = 256
MAX_CONTEXT_BUDGET = 1_000_000
# What a request is recorded under when an admin tries a draft that has no valid name yet.
UNSAVED_AGENT = "(unsaved agent)"

# How each setting is named for people (the page's labels, the history's field names).
FIELD_LABELS = {
    "name": "Name",
    "model": "Model",
    "system_prompt": "System prompt",
    "tools": "Tools",
    "fallback_model": "Fallback model",
    "context_budget": "Context budget",
    "max_output_tokens": "Output limit",
    "temperature": "Temperature",
    "top_p": "Top p",
    "think": "Thinking",
}


@dataclass(frozen=True)
class Problem:
    """Something wrong with a draft, for the field named; a warning (`blocking` False) does not stop a save."""

    field: str
    message: str
    blocking: bool = True


def first_blocking(problems: Sequence[Problem]) -> Problem | None:
    return next((p for p in problems if p.blocking), None)


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

    def problems(self) -> list[Problem]:
        """Every value out of range, in the order of the fields (no database or server needed)."""
        found: list[Problem] = []
        if not self.model.strip():
            found.append(Problem("model", "the model is empty: give a model name such as qwen3:32b"))
        if len(self.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
            found.append(
                Problem(
                    "system_prompt", f"the system prompt is longer than {MAX_SYSTEM_PROMPT_CHARS} characters"
                )
            )
        if len(set(self.tools)) != len(self.tools):
            found.append(Problem("tools", "a tool is listed twice"))
        if not MIN_CONTEXT_BUDGET <= self.context_budget <= MAX_CONTEXT_BUDGET:
            found.append(
                Problem(
                    "context_budget",
                    f"the context budget must be from {MIN_CONTEXT_BUDGET} to {MAX_CONTEXT_BUDGET} tokens",
                )
            )
        if not 1 <= self.max_output_tokens <= MAX_OUTPUT_TOKENS:
            found.append(
                Problem("max_output_tokens", f"the output limit must be from 1 to {MAX_OUTPUT_TOKENS} tokens")
            )
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            found.append(Problem("temperature", "the temperature must be from 0 to 2"))
        if self.top_p is not None and not 0 < self.top_p <= 1:
            found.append(Problem("top_p", "top_p must be greater than 0 and at most 1"))
        return found

    def normalized(self) -> AgentConfig:
        """The same configuration with the model names trimmed, as it is stored."""
        return replace(self, model=self.model.strip(), fallback_model=self.fallback_model.strip())

    def check(self) -> None:
        """Raise UsageError naming the first value out of range."""
        problem = first_blocking(self.problems())
        if problem is not None:
            raise UsageError(problem.message)


@dataclass(frozen=True)
class AgentInfo:
    """An agent with its current version (or, from `versions()`, with one of its versions)."""

    id: int
    name: str
    archived: bool
    version: int
    version_id: int
    config: AgentConfig
    created_by: str
    created_at: datetime | None = None
    """When this version was saved."""


@dataclass(frozen=True)
class FieldChange:
    """One setting that differs between two versions, as text for people."""

    field: str
    label: str
    before: str
    after: str


@dataclass(frozen=True)
class VersionChanges:
    """A version and what it changed from the one before it (nothing for version 1)."""

    version: AgentInfo
    fields: tuple[FieldChange, ...]
    """Changed settings other than the system prompt."""
    prompt_diff: str
    """Unified diff of the system prompt; empty when it did not change."""

    @property
    def changed(self) -> bool:
        return bool(self.fields or self.prompt_diff)


@dataclass(frozen=True)
class ModelCatalog:
    """The models the model server says it has, or why that is not known.

    `checked` is False when names are not checked at all (the embedded model answers every agent).
    """

    models: tuple[ModelInfo, ...] = ()
    error: str = ""
    checked: bool = True

    def find(self, name: str) -> ModelInfo | None:
        """The model Ollama would run for `name` ("qwen3" means "qwen3:latest")."""
        wanted = _normal_model_name(name)
        return next((m for m in self.models if _normal_model_name(m.name) == wanted), None)

    @property
    def names(self) -> list[str]:
        return sorted(m.name for m in self.models)


def _normal_model_name(name: str) -> str:
    name = name.strip().lower()
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def model_catalog(backends: BackendSelector) -> ModelCatalog:
    """Ask the model server which models it has (with their context lengths); never raises."""
    if backends.mode == "embedded":
        return ModelCatalog(checked=False)
    try:
        return ModelCatalog(tuple(backends.ollama_backend.models()))
    except BackendError as exc:
        return ModelCatalog(error=exc.message)


def _model_problems(config: AgentConfig, catalog: ModelCatalog) -> list[Problem]:
    """Warnings for models the server does not have, errors for limits the model cannot hold."""
    if not catalog.checked or not config.model.strip():
        return []
    if catalog.error:
        message = f"the model server did not answer, so {config.model.strip()!r} could not be checked: "
        return [Problem("model", message + catalog.error, blocking=False)]
    found: list[Problem] = []
    known = ", ".join(catalog.names) or "none"
    model = catalog.find(config.model)
    if model is None:
        found.append(
            Problem(
                "model",
                f"the model server has no model {config.model.strip()!r} (it has: {known}); "
                f"requests will fail until someone runs `ollama pull {config.model.strip()}`",
                blocking=False,
            )
        )
    if config.fallback_model.strip() and catalog.find(config.fallback_model) is None:
        found.append(
            Problem(
                "fallback_model",
                f"the model server has no model {config.fallback_model.strip()!r} (it has: {known})",
                blocking=False,
            )
        )
    length = model.context_length if model is not None else None
    if model is None or length is None:
        return found
    if config.context_budget > length:
        found.append(
            Problem(
                "context_budget",
                f"the context budget ({config.context_budget} tokens) is above the context length of "
                f"{model.name} ({length} tokens)",
            )
        )
    elif config.context_budget + config.max_output_tokens > length:
        # num_ctx is the budget plus the output limit: the prompt and the answer share the model's window.
        found.append(
            Problem(
                "max_output_tokens",
                f"the context budget plus the output limit ({config.context_budget} + "
                f"{config.max_output_tokens} tokens) is above the context length of {model.name} "
                f"({length} tokens): lower one of them",
            )
        )
    return found


def _show(field: str, value: Any) -> str:
    """A setting's value as the history shows it."""
    if value is None:
        return "server default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    if value == "":
        return "none"
    return str(value)


def prompt_diff(before: str, after: str, old_label: str = "before", new_label: str = "after") -> str:
    """A unified diff of two system prompts; empty when they are the same."""
    if before == after:
        return ""
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), fromfile=old_label, tofile=new_label, lineterm=""
    )
    return "\n".join(lines)


def compare(old: AgentInfo | None, new: AgentInfo) -> VersionChanges:
    """What `new` changed from `old` (None: `new` is the first version)."""
    if old is None:
        return VersionChanges(new, (), "")
    changed = tuple(
        FieldChange(f.name, FIELD_LABELS[f.name], _show(f.name, before), _show(f.name, after))
        for f in fields(AgentConfig)
        if f.name != "system_prompt"
        and (before := getattr(old.config, f.name)) != (after := getattr(new.config, f.name))
    )
    diff = prompt_diff(
        old.config.system_prompt, new.config.system_prompt, f"version {old.version}", f"version {new.version}"
    )
    return VersionChanges(new, changed, diff)


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
        version.created_at,
    )


def _latest(session: Session, agent_id: int) -> AgentVersion:
    return session.scalars(
        select(AgentVersion).where(AgentVersion.agent_id == agent_id).order_by(AgentVersion.version.desc())
    ).first()  # type: ignore[return-value]


def _tool_names(session: Session) -> list[str]:
    defined = session.scalars(select(Tool.name).where(Tool.disabled.is_(False)).order_by(Tool.name))
    return [*BUILTIN_TOOLS, *(name for name in defined if name not in BUILTIN_TOOLS)]


def _tool_problems(session: Session, tools: Sequence[str]) -> list[Problem]:
    available = _tool_names(session)
    unknown = [tool for tool in tools if tool not in available]
    if not unknown:
        return []
    known = ", ".join(sorted(available))
    return [Problem("tools", f"unknown tool {unknown[0]!r}: use one of {known}")]


def _name_problems(session: Session, name: str) -> list[Problem]:
    """Whether `name` is a valid name that no agent has yet (letter case does not count)."""
    if not NAME_PATTERN.match(name):
        return [
            Problem(
                "name",
                f"invalid agent name {name!r}: use 1 to 64 letters, digits, spaces, '_', '.' or '-', "
                "starting and ending with a letter or digit",
            )
        ]
    if session.scalar(select(Agent.id).where(func.lower(Agent.name) == name.lower())) is not None:
        return [Problem("name", f"an agent named {name!r} already exists")]
    return []


def _raise_first(problems: Sequence[Problem]) -> None:
    problem = first_blocking(problems)
    if problem is not None:
        raise UsageError(problem.message)


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

    def problems(
        self,
        config: AgentConfig,
        *,
        name: str | None = None,
        catalog: ModelCatalog | None = None,
    ) -> list[Problem]:
        """Everything wrong with a draft, before it is saved or tried.

        `name`, when given, is checked as the name of a new agent; `catalog`, when given, adds what the model
        server says about the model and the limits.
        """
        with self.db.read() as session:
            found: list[Problem] = []
            if name is not None:
                found += _name_problems(session, name.strip())
            found += config.problems()
            found += _tool_problems(session, config.tools)
        if catalog is not None:
            found += _model_problems(config, catalog)
        return found

    def tool_names(self) -> list[str]:
        """Tools an agent may be given: the built-in ones, then the enabled admin-defined ones."""
        with self.db.read() as session:
            return _tool_names(session)

    def add(self, actor: str, name: str, config: AgentConfig) -> AgentInfo:
        name, config = name.strip(), config.normalized()
        try:
            with self.db.write() as session:
                _raise_first(_name_problems(session, name))
                config.check()
                _raise_first(_tool_problems(session, config.tools))
                agent, version = self._create(session, name, config, actor)
                append_event(
                    session.connection(), actor, "agent.create", name, {"version": 1, "model": config.model}
                )
                return _info(agent, version)
        except IntegrityError:
            raise UsageError(f"an agent named {name!r} already exists") from None

    def clone(self, actor: str, source: str, name: str) -> AgentInfo:
        """A new agent whose version 1 is the current configuration of `source` (archived or not)."""
        name = name.strip()
        try:
            with self.db.write() as session:
                original = self._find(session, source)
                current = _latest(session, original.id)
                _raise_first(_name_problems(session, name))
                agent, version = self._create(session, name, _config_of(current), actor)
                append_event(
                    session.connection(),
                    actor,
                    "agent.clone",
                    name,
                    {"version": 1, "source": original.name, "source_version": current.version},
                )
                return _info(agent, version)
        except IntegrityError:
            raise UsageError(f"an agent named {name!r} already exists") from None

    def update(self, actor: str, name: str, config: AgentConfig) -> AgentInfo:
        """Save a changed configuration as the next version; an unchanged one adds nothing."""
        config = config.normalized()
        config.check()
        with self.db.write() as session:
            return self._save(session, actor, self._find(session, name), config, {})

    def restore_version(self, actor: str, name: str, version: int) -> AgentInfo:
        """Save an earlier version's configuration as the next version (history is never rewritten)."""
        with self.db.write() as session:
            agent = self._find(session, name)
            old = session.scalar(
                select(AgentVersion).where(AgentVersion.agent_id == agent.id, AgentVersion.version == version)
            )
            if old is None:
                raise NotFoundError(f"the agent {agent.name!r} has no version {version}")
            return self._save(session, actor, agent, _config_of(old), {"restored_from": version})

    def set_archived(self, actor: str, name: str, archived: bool = True) -> None:
        """Archive (hidden from chat, kept for the audit log) or restore an agent."""
        with self.db.write() as session:
            agent = self._find(session, name)
            if agent.archived == archived:
                state = "archived" if archived else "active"
                raise UsageError(f"the agent {agent.name!r} is already {state}")
            agent.archived = archived
            session.flush()
            append_event(
                session.connection(), actor, "agent.archive" if archived else "agent.restore", agent.name
            )

    def record_trial(self, actor: str, name: str, request_id: int | None, status: str, model: str) -> None:
        """The event of an admin trying a draft: links the try-out to its request record."""
        with self.db.write() as session:
            append_event(
                session.connection(),
                actor,
                "agent.try",
                name,
                {"request_id": request_id, "status": status, "model": model},
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

    def history(self, name: str) -> list[VersionChanges]:
        """Every version, newest first, each with what it changed from the one before."""
        versions = self.versions(name)
        return [compare(old, new) for old, new in zip([None, *versions], versions, strict=False)][::-1]

    @staticmethod
    def _find(session: Session, name: str) -> Agent:
        agent = session.scalar(select(Agent).where(Agent.name == name))
        if agent is None:
            raise NotFoundError(f"there is no agent named {name!r}: see `clawdbot agent list`")
        return agent

    def _create(
        self, session: Session, name: str, config: AgentConfig, actor: str
    ) -> tuple[Agent, AgentVersion]:
        agent = Agent(name=name)
        session.add(agent)
        session.flush()
        return agent, self._add_version(session, agent, 1, config, actor)

    def _save(
        self, session: Session, actor: str, agent: Agent, config: AgentConfig, details: dict[str, Any]
    ) -> AgentInfo:
        current = _latest(session, agent.id)
        changes = _changes(_config_of(current), config)
        if not changes:
            return _info(agent, current)
        _raise_first(_tool_problems(session, config.tools))
        version = self._add_version(session, agent, current.version + 1, config, actor)
        append_event(
            session.connection(),
            actor,
            "agent.update",
            agent.name,
            {"version": version.version, "changed": sorted(changes), **details},
        )
        return _info(agent, version)

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
