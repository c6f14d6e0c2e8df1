"""Ollama through the official `ollama` client: streaming chat, model lists, load and unload.

How the client's failures map to `BackendError`s is in the package's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

import httpx
import ollama

if TYPE_CHECKING:
    pass

from clawdbot.backends.base import (
    BackendBusy,
    BackendError,
    BackendEvent,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ContentDelta,
    Done,
    LoadedModel,
    ModelCall,
    ModelInfo,
    ModelNotFound,
    StreamBroken,
    ThinkingDelta,
    ToolCall,
    close_quietly,
    connect_reason,
    normalize_host,
    seconds,
    shorten,
    without_credentials,
)

_PROBE_TIMEOUT_S = 2.0


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
        self.host = normalize_host(host)
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
                f"the request for {call.model} is malformed: {shorten(str(exc), 200)}", retryable=False
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
            close_quietly(chunks)
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
                f"cannot reach Ollama at {self.shown_host}: no answer within {seconds(self.connect_timeout)} s "
                f"(CLAWDBOT_CONNECT_TIMEOUT); {start_hint}"
            )
        if isinstance(exc, httpx.ConnectError | ConnectionError):
            return BackendUnavailable(
                f"cannot reach Ollama at {self.shown_host}: {connect_reason(exc)}; {start_hint}"
            )
        if isinstance(exc, httpx.ReadTimeout):
            return BackendTimeout(
                f"the model sent nothing for {seconds(self.read_timeout)} s (CLAWDBOT_READ_TIMEOUT); "
                f"Ollama at {self.shown_host} may be overloaded or stuck"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return BackendBusy(
                f"every connection to Ollama at {self.shown_host} is in use; try again shortly"
            )
        if isinstance(exc, httpx.TransportError):
            detail = shorten(f"{type(exc).__name__}: {exc}", 160)
            return StreamBroken(
                f"the connection to Ollama at {self.shown_host} broke before the answer was complete ({detail})"
            )
        if isinstance(exc, ollama.RequestError):
            return BackendServerError(f"invalid request to Ollama: {shorten(exc.error)}", retryable=False)
        if isinstance(exc, ValueError):  # unreadable JSON or a shape the client does not accept
            return BackendServerError(
                f"Ollama at {self.shown_host} sent a reply clawdbot cannot read: {shorten(str(exc), 200)}",
                retryable=False,
            )
        raise exc

    def _response_error(self, exc: ollama.ResponseError, model: str | None) -> BackendError:
        status = exc.status_code
        text = shorten(str(exc.error))
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
