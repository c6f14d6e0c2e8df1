"""Admin-defined HTTP tools: a named web call an agent may make, with its arguments checked before it is made.

An admin gives the name, a description for the model, the JSON schema of the arguments, the URL, method,
headers, timeout and response size cap; the tools table keeps them and each change is an event in the audit
chain. Header values may be API keys, so they are never shown back (the page shows `MASK`, and saving `MASK`
keeps the stored value), never written to events, and never logged.

A call fills `{placeholders}` in the URL's path and query from the arguments (percent-encoded, so an argument
can never change the host), sends the other arguments as query parameters (GET, DELETE) or as a JSON body,
and goes out through `clawdbot.outbound`, which refuses private addresses and pins DNS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clawdbot.agents import BUILTIN_TOOLS, Problem, first_blocking
from clawdbot.audit import append_event
from clawdbot.backends import without_credentials
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Tool
from clawdbot.outbound import OutboundPolicy, fetch, literal_address, refusal_reason
from clawdbot.secret_box import SecretBox, SecretUnreadableError

MASK = "••••••"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
MAX_DESCRIPTION_CHARS = 2000
MAX_SCHEMA_CHARS = 20_000
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.5, 60.0
MAX_RESPONSE_CAP = 10_000_000
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpToolConfig:
    """What an admin sets on an HTTP tool."""

    name: str
    description: str
    url: str
    parameters: dict[str, Any] = field(default_factory=lambda: dict(EMPTY_SCHEMA))
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    max_response_bytes: int = 1_000_000
    disabled: bool = False

    def problems(self, allowlist: frozenset[str] = frozenset()) -> list[Problem]:
        """Everything wrong with the settings, each tied to its field; warnings do not stop a save."""
        found: list[Problem] = []
        if not TOOL_NAME.match(self.name):
            found.append(
                Problem(
                    "name", "the name must start with a letter and hold up to 64 letters, digits, '_' or '-'"
                )
            )
        elif self.name in BUILTIN_TOOLS:
            found.append(Problem("name", f"{self.name!r} is a built-in tool: choose another name"))
        if not self.description.strip():
            found.append(
                Problem("description", "describe what the tool does: the model reads this to choose it")
            )
        elif len(self.description) > MAX_DESCRIPTION_CHARS:
            found.append(
                Problem("description", f"the description is longer than {MAX_DESCRIPTION_CHARS} characters")
            )
        found += _schema_problems(self.parameters)
        found += _url_problems(self.url, self.parameters, allowlist)
        if self.method not in METHODS:
            found.append(Problem("method", f"the method must be one of {', '.join(METHODS)}"))
        for name, value in self.headers.items():
            if not HEADER_NAME.match(name):
                found.append(Problem("headers", f"{name!r} is not a valid header name"))
            elif name.lower() in FORBIDDEN_HEADERS:
                found.append(Problem("headers", f"the header {name!r} is set by clawdbot itself"))
            elif any(c in value for c in "\r\n\x00"):
                found.append(Problem("headers", f"the value of {name!r} holds a line break"))
        if not MIN_TIMEOUT_S <= self.timeout_s <= MAX_TIMEOUT_S:
            found.append(
                Problem(
                    "timeout_s", f"the timeout must be from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g} seconds"
                )
            )
        if not 1 <= self.max_response_bytes <= MAX_RESPONSE_CAP:
            found.append(
                Problem(
                    "max_response_bytes", f"the response cap must be from 1 to {MAX_RESPONSE_CAP:,} bytes"
                )
            )
        return found

    def function_schema(self) -> dict[str, Any]:
        """The tool as the model sees it (Ollama's function format); headers and URL are not shown."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def shown(self) -> dict[str, Any]:
        """The settings as events and pages show them: header values masked, URL without credentials."""
        return {
            "url": without_credentials(self.url),
            "method": self.method,
            "headers": sorted(self.headers),
            "timeout_s": self.timeout_s,
            "max_response_bytes": self.max_response_bytes,
            "disabled": self.disabled,
        }


def _schema_problems(schema: Any) -> list[Problem]:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return [
            Problem("parameters", 'the parameters must be a JSON schema of an object: {"type": "object", …}')
        ]
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        return [Problem("parameters", f"the parameter schema is longer than {MAX_SCHEMA_CHARS} characters")]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return [
            Problem("parameters", f"the parameter schema is not valid JSON schema at {where}: {exc.message}")
        ]
    return []


def _url_problems(url: str, schema: Any, allowlist: frozenset[str]) -> list[Problem]:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [Problem("url", "the URL must start with http:// or https:// and name a host")]
    if "{" in parts.netloc or "}" in parts.netloc:
        return [Problem("url", "placeholders may only be used in the path and query, never in the host")]
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    unknown = [p for p in PLACEHOLDER.findall(url) if p not in properties]
    if unknown:
        return [Problem("url", f"the placeholder {{{unknown[0]}}} is not a parameter in the schema")]
    literal = literal_address(parts.hostname)
    if literal is not None and parts.hostname.lower() not in allowlist and (why := refusal_reason(literal)):
        return [
            Problem(
                "url",
                f"calls will be refused: {parts.hostname} is {why} (an operator can allow the host with "
                "CLAWDBOT_TOOL_ALLOWLIST)",
                blocking=False,
            )
        ]
    return []


def parse_headers(text: str, stored: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers from `Name: value` lines; a value equal to MASK keeps the stored value of that header."""
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise UsageError(f"header line {number} is not of the form 'Name: value'")
        name, value = name.strip(), value.strip()
        if value == MASK:
            kept = (stored or {}).get(name)
            if kept is None:
                raise UsageError(f"header {name!r} has no stored value to keep: type its value")
            value = kept
        headers[name] = value
    return headers


def config_from_form(
    *,
    name: str,
    description: str,
    parameters: str,
    url: str,
    method: str,
    headers: str,
    timeout_s: float,
    max_response_bytes: int,
    disabled: bool = False,
    stored_headers: Mapping[str, str] | None = None,
) -> tuple[HttpToolConfig | None, list[Problem]]:
    """The settings typed on the agents page: a config, or the problems with the text fields (JSON, headers)."""
    problems: list[Problem] = []
    schema: dict[str, Any] = dict(EMPTY_SCHEMA)
    if parameters.strip():
        try:
            loaded = json.loads(parameters)
        except ValueError as exc:
            problems.append(Problem("parameters", f"the parameters are not valid JSON: {exc}"))
        else:
            schema = loaded if isinstance(loaded, dict) else {"type": None}
    try:
        parsed_headers = parse_headers(headers, stored_headers)
    except UsageError as exc:
        problems.append(Problem("headers", exc.message))
        parsed_headers = {}
    if problems:
        return None, problems
    config = HttpToolConfig(
        name=name.strip(),
        description=description.strip(),
        url=url.strip(),
        parameters=schema,
        method=method.upper(),
        headers=parsed_headers,
        timeout_s=float(timeout_s),
        max_response_bytes=int(max_response_bytes),
        disabled=disabled,
    )
    return config, []


def masked_headers_text(headers: Mapping[str, str]) -> str:
    """The headers as the form shows them: names with masked values."""
    return "\n".join(f"{name}: {MASK}" for name in headers)


def build_call(config: HttpToolConfig, arguments: Mapping[str, Any]) -> tuple[str, dict[str, Any], Any]:
    """(URL with placeholders filled, query parameters, JSON body) for validated `arguments`."""
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        used.add(match.group(1))
        value = arguments.get(match.group(1), "")
        return quote(value if isinstance(value, str) else json.dumps(value), safe="")

    url = PLACEHOLDER.sub(fill, config.url.strip())
    rest = {k: v for k, v in arguments.items() if k not in used}
    if config.method in ("GET", "DELETE"):
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in rest.items()}
        return url, params, None
    return url, {}, rest


def call(config: HttpToolConfig, arguments: Mapping[str, Any], policy: OutboundPolicy) -> str:
    """Make the call; the response text for the model. Raises OutboundRefused, OutboundFailed or UsageError."""
    url, params, body = build_call(config, arguments)
    response = fetch(
        policy,
        config.method,
        url,
        headers=config.headers,
        params=params or None,
        json_body=body,
        timeout_s=config.timeout_s,
        max_bytes=config.max_response_bytes,
    )
    text = response.body.decode("utf-8", errors="replace")
    if response.status_code >= 400:
        raise UsageError(
            f"{config.name} answered HTTP {response.status_code}: {' '.join(text.split())[:300]}"
        )
    if "json" in response.content_type:
        with contextlib.suppress(ValueError):
            text = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    return text


@dataclass(frozen=True)
class HttpToolInfo:
    """A stored HTTP tool: its settings and when it was added."""

    id: int
    config: HttpToolConfig
    created_at: datetime | None


def _open_headers(tool: Tool, box: SecretBox) -> dict[str, str]:
    """The header values in clear; one this server cannot open is left empty, with a warning naming the header."""
    headers: dict[str, str] = {}
    for name, value in json.loads(tool.headers or "{}").items():
        try:
            headers[name] = box.open(value)
        except SecretUnreadableError as exc:
            log.warning("HTTP tool %s, header %s: %s", tool.name, name, exc.message)
            headers[name] = ""
    return headers


def _config_of(tool: Tool, box: SecretBox) -> HttpToolConfig:
    headers = _open_headers(tool, box)
    return HttpToolConfig(
        name=tool.name,
        description=tool.description,
        url=tool.url,
        parameters=json.loads(tool.parameters or "{}") or dict(EMPTY_SCHEMA),
        method=tool.method,
        headers=headers,
        timeout_s=tool.timeout_s,
        max_response_bytes=tool.max_response_bytes,
        disabled=tool.disabled,
    )


class HttpTools:
    """The admin-defined HTTP tools in the tools table; every change is an event in the audit chain.

    Header values (API tokens) are stored sealed by `box`, so the database alone does not give them away.
    """

    def __init__(self, db: Database, box: SecretBox, allowlist: frozenset[str] = frozenset()) -> None:
        self.db = db
        self.box = box
        self.allowlist = allowlist

    def all(self) -> list[HttpToolInfo]:
        with self.db.read() as session:
            rows = session.scalars(select(Tool).where(Tool.kind == "http").order_by(Tool.name))
            return [HttpToolInfo(t.id, _config_of(t, self.box), t.created_at) for t in rows]

    def enabled(self, names: tuple[str, ...] | list[str]) -> dict[str, HttpToolConfig]:
        """The enabled HTTP tools among `names`, by name."""
        if not names:
            return {}
        with self.db.read() as session:
            rows = session.scalars(
                select(Tool).where(Tool.kind == "http", Tool.disabled.is_(False), Tool.name.in_(list(names)))
            )
            return {t.name: _config_of(t, self.box) for t in rows}

    def get(self, name: str) -> HttpToolConfig:
        with self.db.read() as session:
            return _config_of(self._find(session, name), self.box)

    def save(self, actor: str, config: HttpToolConfig, *, original: str | None = None) -> HttpToolConfig:
        """Add a tool (`original` None) or change the one called `original`; raises UsageError on a problem."""
        config = replace(
            config, name=config.name.strip(), url=config.url.strip(), method=config.method.upper()
        )
        problem = first_blocking(config.problems(self.allowlist))
        if problem is not None:
            raise UsageError(problem.message)
        try:
            with self.db.write() as session:
                if original is None:
                    tool = Tool(kind="http", name=config.name)
                    session.add(tool)
                    action = "tool.create"
                else:
                    tool = self._find(session, original)
                    action = "tool.update"
                tool.name = config.name
                tool.description = config.description
                tool.url = config.url
                tool.parameters = json.dumps(config.parameters, ensure_ascii=False)
                tool.method = config.method
                sealed = {name: self.box.seal(value) for name, value in config.headers.items()}
                tool.headers = json.dumps(sealed, ensure_ascii=False)
                tool.timeout_s = config.timeout_s
                tool.max_response_bytes = config.max_response_bytes
                tool.disabled = config.disabled
                session.flush()
                details = {
                    **config.shown(),
                    **({"renamed_from": original} if original not in (None, config.name) else {}),
                }
                append_event(session.connection(), actor, action, config.name, details)
        except IntegrityError:
            raise UsageError(f"a tool named {config.name!r} already exists") from None
        return config

    def set_disabled(self, actor: str, name: str, disabled: bool = True) -> None:
        """Disable (agents stop getting it; their settings keep its name) or enable a tool again."""
        with self.db.write() as session:
            tool = self._find(session, name)
            tool.disabled = disabled
            session.flush()
            append_event(session.connection(), actor, "tool.disable" if disabled else "tool.enable", name)

    @staticmethod
    def _find(session: Session, name: str) -> Tool:
        tool = session.scalar(select(Tool).where(Tool.name == name, Tool.kind == "http"))
        if tool is None:
            raise NotFoundError(f"there is no HTTP tool named {name!r}")
        return tool
