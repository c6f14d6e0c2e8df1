"""The tools an agent may call during a request: the built-in ones and the admin-defined HTTP tools.

A `Toolbox` is made per request from the agent's tool names and the request's attachments. The gateway offers
its `schemas()` to the model and runs each call the model asks for with `call()`, which validates the arguments
against the tool's JSON schema before anything runs, times the call, and turns every failure into an error
result that the model reads (so it can fix its arguments or answer without the tool) instead of breaking the
request. A tool that needs attachments is offered only when the request has some.

Built-in tools:
- `read_document`: pages of an attached document, or the passages that best match a search;
- `query_table`: filter, group, aggregate, sort and top-N over an attached sheet (`clawdbot.table_query`);
  each result is kept as "result N" for `make_chart`;
- `make_chart`: a bar, line or pie chart (`clawdbot.charts`) of a sheet or of a `query_table` result, shown
  to the person under the answer and kept with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from clawdbot import http_tools
from clawdbot.charts import CHART_KINDS, Chart, build_chart
from clawdbot.documents import Document, Table, read_pages, search_passages
from clawdbot.errors import ClawdbotError
from clawdbot.http_tools import HttpToolConfig
from clawdbot.outbound import OutboundPolicy
from clawdbot.table_query import QUERY_SCHEMA, TableQuery, render_table, run_query

log = logging.getLogger(__name__)

MAX_RESULT_CHARS = 8000
"""The most of one tool result sent to the model (the gateway may cut it further to fit the budget)."""
RECORD_EXCERPT_CHARS = 1000
"""The most of one tool result kept in the audit record's `tool_calls`."""
MAX_PAGES_PER_READ = 10
SEARCH_PASSAGES = 5


class ToolError(ClawdbotError):
    """A tool cannot do what was asked; the message tells the model what would work."""


@dataclass(frozen=True)
class ToolOutput:
    """What a tool produced: text for the model, and a chart or a table to keep."""

    text: str
    chart: Chart | None = None
    table: Table | None = None


@dataclass(frozen=True)
class ToolResult:
    """One executed tool call, as the gateway yields it and the audit record keeps it."""

    name: str
    arguments: dict[str, Any]
    content: str
    """What the model reads: the result, or `error: …`."""
    error: str
    duration_ms: float
    chart: Chart | None = None

    def record(self) -> dict[str, Any]:
        """The entry in the request's `tool_calls`: name, arguments, result excerpt, duration, error."""
        excerpt = self.content if not self.error else ""
        if len(excerpt) > RECORD_EXCERPT_CHARS:
            excerpt = excerpt[: RECORD_EXCERPT_CHARS - 1] + "…"
        entry: dict[str, Any] = {
            "name": self.name,
            "arguments": self.arguments,
            "result": excerpt,
            "duration_ms": round(self.duration_ms, 1),
            "error": self.error,
        }
        if self.chart is not None:
            entry["chart"] = self.chart.title
        return entry


@dataclass
class ToolContext:
    """What tools of one request share: its attachments and the tables `query_table` produced."""

    documents: tuple[Document, ...] = ()
    results: dict[str, Table] = field(default_factory=dict)
    policy: OutboundPolicy = field(default_factory=OutboundPolicy)

    def document(self, name: str | None) -> Document:
        if not self.documents:
            raise ToolError("no document is attached to this request")
        if not name:
            return self.documents[0]
        wanted = name.strip().casefold()
        for document in self.documents:
            if document.name.casefold() == wanted:
                return document
        listed = ", ".join(repr(d.name) for d in self.documents)
        raise ToolError(f"no attached document is called {name!r}; attached: {listed}")

    def sheet(self, document_name: str | None, table_name: str | None) -> Table:
        """A sheet by name (any attached document, or the one named); the first sheet when no name is given."""
        if not self.documents:
            raise ToolError("no document is attached to this request")
        documents = (
            [self.document(document_name)] if document_name else [d for d in self.documents if d.tables]
        )
        tables = [t for d in documents for t in d.tables]
        if not tables:
            raise ToolError(
                f"{self.document(document_name).name} has no table: only spreadsheets and CSV files do"
            )
        if table_name is None:
            return tables[0]
        for document in documents:
            table = document.table(table_name.strip())
            if table is not None:
                return table
        names = ", ".join(repr(t.name) for t in tables)
        raise ToolError(f"there is no sheet {table_name!r}; the sheets are: {names}")

    def result(self, source: str) -> Table | None:
        """A `query_table` result by name ("result 2", "Result2")."""
        wanted = "".join(source.split()).casefold()
        return next((t for n, t in self.results.items() if "".join(n.split()).casefold() == wanted), None)


Run = Callable[[ToolContext, dict[str, Any]], ToolOutput]


@dataclass(frozen=True)
class ToolSpec:
    """A tool: the name, description and JSON-schema parameters the model sees, and how to run it."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Run
    needs: str = ""
    """"documents" or "tables": offered only when the request has some."""

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


# -- built-in tools ----------------------------------------------------------------------------------


def _read_document(context: ToolContext, arguments: dict[str, Any]) -> ToolOutput:
    document = context.document(arguments.get("document"))
    query = str(arguments.get("search") or "").strip()
    if query:
        passages = search_passages(document, query, SEARCH_PASSAGES)
        if not passages:
            return ToolOutput(f"nothing in {document.name} matches {query!r}; try other words")
        return ToolOutput("\n\n".join(f"[page {p.page}] {p.text}" for p in passages))
    pages = len(document.pages)
    first = int(arguments.get("first_page") or 1)
    last = int(arguments.get("last_page") or first)
    if first > pages:
        raise ToolError(
            f"{document.name} has {pages} page{'s' if pages != 1 else ''}; ask for pages 1 to {pages}"
        )
    last = min(last, first + MAX_PAGES_PER_READ - 1)
    return ToolOutput(read_pages(document, first, last, max_chars=MAX_RESULT_CHARS - 200))


def _query_table(context: ToolContext, arguments: dict[str, Any]) -> ToolOutput:
    table = context.sheet(arguments.get("document"), arguments.get("table"))
    name = f"result {len(context.results) + 1}"
    result = run_query(table, TableQuery.from_arguments(arguments), name)
    context.results[name] = result
    text = (
        f"{name}: {len(result.rows)} row{'s' if len(result.rows) != 1 else ''} from sheet {table.name!r} "
        f"(draw it with make_chart and source {name!r})\n{render_table(result)}"
    )
    return ToolOutput(text, table=result)


def _make_chart(context: ToolContext, arguments: dict[str, Any]) -> ToolOutput:
    source = str(arguments.get("source") or "").strip()
    table = context.result(source) if source else None
    if table is None and source.casefold().startswith("result"):
        known = ", ".join(context.results) or "none yet"
        raise ToolError(f"there is no {source!r}; query_table results so far: {known}")
    if table is None:
        table = context.sheet(arguments.get("document"), source or None)
    y = arguments.get("y")
    chart = build_chart(
        table,
        str(arguments.get("kind", "bar")),
        arguments.get("x"),
        [y] if isinstance(y, str) else y,
        str(arguments.get("title") or ""),
    )
    return ToolOutput(
        f"drew a {chart.kind} chart {chart.title!r} with {chart.points} points; it is shown to the user under "
        "your answer, so do not describe it as an image or link",
        chart=chart,
    )


READ_DOCUMENT = ToolSpec(
    "read_document",
    "Read pages of an attached document, or search it for the passages about something.",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "document": {"type": "string", "description": "Name of the attached file; default: the first"},
            "first_page": {"type": "integer", "minimum": 1, "description": "First page to read (1-based)"},
            "last_page": {
                "type": "integer",
                "minimum": 1,
                "description": f"Last page (at most {MAX_PAGES_PER_READ})",
            },
            "search": {"type": "string", "maxLength": 500, "description": "Words to search for instead"},
        },
    },
    _read_document,
    needs="documents",
)
QUERY_TABLE = ToolSpec(
    "query_table",
    "Filter, group, aggregate (sum, count, mean, min, max), sort and take the top N rows of an attached "
    "spreadsheet or CSV. Computed exactly; use it for any number taken from a sheet.",
    QUERY_SCHEMA,
    _query_table,
    needs="tables",
)
MAKE_CHART = ToolSpec(
    "make_chart",
    "Draw a bar, line or pie chart of a query_table result or of a sheet; the user sees it under the answer.",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["kind"],
        "properties": {
            "kind": {"enum": list(CHART_KINDS)},
            "source": {"type": "string", "description": "'result N' from query_table, or a sheet name"},
            "document": {
                "type": "string",
                "description": "The attached file of the sheet; default: the first",
            },
            "x": {"type": "string", "description": "Column of the categories (labels)"},
            "y": {
                "description": "Column(s) of the values",
                "type": ["string", "array"],
                "items": {"type": "string"},
                "maxItems": 6,
            },
            "title": {"type": "string", "maxLength": 200},
        },
    },
    _make_chart,
    needs="tables",
)
BUILTIN: dict[str, ToolSpec] = {spec.name: spec for spec in (READ_DOCUMENT, QUERY_TABLE, MAKE_CHART)}


def http_spec(config: HttpToolConfig) -> ToolSpec:
    """An admin-defined HTTP tool as a ToolSpec (arguments validated against its schema like any tool's)."""

    def run(context: ToolContext, arguments: dict[str, Any]) -> ToolOutput:
        return ToolOutput(http_tools.call(config, arguments, context.policy))

    return ToolSpec(config.name, config.description, config.parameters, run)


# -- the per-request toolbox -------------------------------------------------------------------------


class Toolbox:
    """The tools of one request and the state they share; not thread-safe (one request, one thread)."""

    def __init__(self, specs: Sequence[ToolSpec], context: ToolContext | None = None) -> None:
        self.context = context or ToolContext()
        has_tables = any(d.tables for d in self.context.documents)
        offered = {"": True, "documents": bool(self.context.documents), "tables": has_tables}
        self.specs = {spec.name: spec for spec in specs if offered.get(spec.needs, False)}

    @classmethod
    def for_agent(
        cls,
        names: Sequence[str],
        *,
        documents: Sequence[Document] = (),
        http: Mapping[str, HttpToolConfig] | None = None,
        policy: OutboundPolicy | None = None,
    ) -> Toolbox:
        """The agent's tools, in the agent's order; names of tools removed or disabled since are left out."""
        specs: list[ToolSpec] = []
        for name in names:
            if name in BUILTIN:
                specs.append(BUILTIN[name])
            elif http and name in http:
                specs.append(http_spec(http[name]))
        context = ToolContext(tuple(documents), policy=policy or OutboundPolicy())
        return cls(specs, context)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools in Ollama's `tools=` format."""
        return [spec.schema() for spec in self.specs.values()]

    def call(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        """Run one tool call; never raises: a failure is an error result for the model to read."""
        started = time.perf_counter()
        args = dict(arguments) if isinstance(arguments, Mapping) else {}
        output: ToolOutput | None = None
        error = ""
        spec = self.specs.get(name)
        try:
            if spec is None:
                offered = ", ".join(self.specs) or "none"
                raise ToolError(f"there is no tool {name!r} in this request; the tools are: {offered}")
            _validate(spec.parameters, args)
            output = spec.run(self.context, args)
        except ClawdbotError as exc:
            error = exc.message
        except Exception as exc:
            log.exception("tool %s failed", name)
            error = f"the tool failed unexpectedly ({type(exc).__name__}); try other arguments or answer without it"
        duration_ms = (time.perf_counter() - started) * 1000
        if output is None:
            return ToolResult(name, args, f"error: {error}", error, duration_ms)
        text = output.text
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f"\n[… cut at {MAX_RESULT_CHARS} characters: ask for less …]"
        return ToolResult(name, args, text, "", duration_ms, output.chart)


def _validate(schema: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Raise ToolError naming the first argument that does not match the tool's schema."""
    try:
        Draft202012Validator(schema).validate(arguments)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        place = f" at {where!r}" if where else ""
        raise ToolError(f"the arguments do not match the tool's parameters{place}: {exc.message}") from None
