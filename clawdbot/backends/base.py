"""The backend interface: the call, the events a backend yields, its errors, and helpers the backends share."""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import httpx

from clawdbot.errors import ClawdbotError

if TYPE_CHECKING:
    pass

ERROR_TEXT_LIMIT = 300
DEFAULT_OLLAMA_PORT = 11434

# -- the call and its events -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCall:
    """One request to a model: Ollama chat messages plus the few options clawdbot sets."""

    model: str
    messages: list[dict[str, Any]]
    """Ollama chat messages: role, content, and optionally thinking, tool_calls, tool_name."""
    tools: list[dict[str, Any]] | None = None
    """Ollama/OpenAI function schemas."""
    think: bool | None = None
    num_ctx: int | None = None
    """Context budget plus output limit, so the server never cuts the prompt."""
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    keep_alive: str | None = None
    """How long Ollama keeps the model loaded afterwards; None means the backend's default."""


@dataclass(frozen=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Done:
    """The last event of every stream, with the server's metrics (None when it did not say)."""

    prompt_eval_count: int | None
    eval_count: int | None
    eval_duration_ns: int | None
    prompt_eval_duration_ns: int | None
    total_duration_ns: int | None
    done_reason: str | None


BackendEvent: TypeAlias = ThinkingDelta | ContentDelta | ToolCall | Done


@dataclass(frozen=True)
class ModelInfo:
    """A model a backend can run."""

    name: str
    context_length: int | None
    """The trained context (Ollama) or the loaded context (embedded); None if unknown."""
    capabilities: frozenset[str]
    """As Ollama reports them: "completion", "tools", "thinking", "vision", ..."""
    size: int | None
    """Bytes on disk."""
    parameter_size: str | None = None
    quantization_level: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model Ollama holds in memory now (/api/ps)."""

    name: str
    size: int | None
    size_vram: int | None
    context_length: int | None
    expires_at: datetime | None


@runtime_checkable
class Backend(Protocol):
    name: str
    """"ollama" or "embedded"."""

    def stream(self, call: ModelCall) -> Generator[BackendEvent, None, None]:
        """A generator of events that ends with exactly one `Done`; raises `BackendError`.

        Closing it (`.close()`) cancels the answer; that is why this is a Generator, not an Iterator.
        """
        ...

    def models(self) -> list[ModelInfo]: ...

    def reachable(self) -> bool:
        """A cheap check that the backend can answer now; never raises."""
        ...


# -- errors ------------------------------------------------------------------------------------------


class BackendError(ClawdbotError):
    """A model backend failed; `retryable` says whether the same call may succeed if tried again."""

    exit_code = 5
    retryable = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class BackendUnavailable(BackendError):
    """The backend cannot be reached or started (Ollama down, embedded model missing)."""


class ModelNotFound(BackendError):
    """The model is not installed on the Ollama server."""

    retryable = False

    def __init__(self, model: str) -> None:
        super().__init__(f"the model {model} is not on the Ollama server: run `ollama pull {model}`")
        self.model = model


class BackendServerError(BackendError):
    """The server reported an error; `status_code` is the HTTP status (None for an error in mid-stream)."""

    def __init__(
        self, message: str, *, retryable: bool | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.status_code = status_code


class BackendBusy(BackendError):
    """The backend refused for now because it has too much to do."""

    exit_code = 3


class StreamBroken(BackendError):
    """The connection dropped before the answer was complete (events may already have been yielded)."""


class BackendTimeout(BackendError):
    """The model went silent for longer than the read timeout."""

    exit_code = 6
    retryable = False


# -- helpers -----------------------------------------------------------------------------------------


def shorten(text: str, limit: int = ERROR_TEXT_LIMIT) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def seconds(value: float) -> str:
    return f"{value:g}"


def normalize_host(host: str) -> str:
    """A base URL for `host`, defaulting like Ollama does (scheme http, port 11434 when neither is given)."""
    host = host.strip().rstrip("/") or f"http://127.0.0.1:{DEFAULT_OLLAMA_PORT}"
    if "://" in host:
        return host
    parts = urlsplit(f"http://{host}")
    return f"http://{host}" if parts.port else f"http://{parts.netloc}:{DEFAULT_OLLAMA_PORT}{parts.path}"


def without_credentials(url: str) -> str:
    """`url` as safe to show in messages, logs and audit records: any user name and password removed."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect_reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (the client's ConnectionError hides it in __context__)."""
    if isinstance(exc.__context__, httpx.ConnectError):
        exc = exc.__context__
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if any(s in text for s in ("name or service not known", "nodename nor servname", "name resolution")):
        return "unknown host name"
    if "unreachable" in text:
        return "network unreachable"
    return shorten(str(exc), 120) or type(exc).__name__


def close_quietly(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        with contextlib.suppress(httpx.HTTPError, OSError):  # the response is being dropped anyway
            close()
