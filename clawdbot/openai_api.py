"""The OpenAI-compatible HTTP API: `GET /v1/models` and `POST /v1/chat/completions`, with API keys.

Scripts that speak the OpenAI API reach the agents on the same road as the chat page: a `ChatRequest` through
`Gateway.stream()`, so the same rate limit, admission (concurrency cap and queue), context planning and audit
record apply, with the client's address and the key's user. Each request runs in a thread of its own that
checks the key, reads the agent and drives the gateway's (blocking) generator, handing its events to the event
loop; nothing blocking runs on the loop. The response status is chosen when the first token arrives (or the
request ends before one), so a refusal while queued or a model that fails before answering still gets its own
status (503 busy and 429 rate limited with `Retry-After`) instead of a broken stream. A client that goes away
stops the thread at the next event: it closes the gateway's generator, which frees the slot and records the
request `cancelled`.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; what a request may ask and the
gateway request it becomes are in clawdbot.openai_requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from clawdbot.agents import model_catalog
from clawdbot.api_keys import ApiKeyRefusedError, api_keys_of
from clawdbot.backends import ContentDelta, ThinkingDelta
from clawdbot.chat import prompt_problem
from clawdbot.errors import ClawdbotError
from clawdbot.gateway import ChatRequest, ContextPlanned, Finished, GatewayEvent, Started
from clawdbot.models import Request as RequestRecord
from clawdbot.models import Status
from clawdbot.openai_requests import (
    AGENT_PREFIX,
    ApiError,
    CompletionParams,
    bad_request,
    chat_request,
    finished_error,
    may_chat,
    may_use_raw_models,
    parse_completion,
)
from clawdbot.runtime import Runtime
from clawdbot.users import UserInfo

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
MAX_BODY_BYTES = 4 * 1024 * 1024
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

RuntimeSource = Callable[[], Runtime]


# -- one completion, served from a thread ---------------------------------------------------------------------


_END = object()


@dataclass(frozen=True)
class _Failure:
    error: ApiError


class _Completion:
    """Checks the key, builds the request and drives `Gateway.stream()` in a thread; the loop reads its events.

    Closing the gateway's generator is its cancel signal, and a generator can only be closed between two of its
    events, from the thread that runs it: so `stop()` only sets a flag, and the thread closes the generator at
    its next event (the next token, or within 0.2 s while queued).
    """

    def __init__(
        self, runtime: RuntimeSource, authorization: str, body: bytes, client_ip: str, created: int
    ) -> None:
        self._runtime = runtime
        self._authorization = authorization
        self._body = body
        self.client_ip = client_ip
        self.created = created
        self.params: CompletionParams | None = None
        self.request: ChatRequest | None = None
        self.usage: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clawdbot-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    async def next_batch(self) -> list[object]:
        """The next event and every one already waiting behind it (written to the client in one go)."""
        batch = [await self._queue.get()]
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is reading any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self) -> None:
        try:
            events = self._open()
        except ApiError as exc:
            self._put(_Failure(exc))
            self._put(_END)
            return
        except SQLAlchemyError:
            log.exception("the HTTP API could not reach the database")
            unavailable = ApiError(503, "the database did not answer; try again shortly", type="server_error")
            self._put(_Failure(unavailable))
            self._put(_END)
            return
        except Exception:
            log.exception("the HTTP API could not start a completion")
            self._put(_Failure(ApiError(500, "internal error; it was logged", type="server_error")))
            self._put(_END)
            return
        try:
            for event in events:
                if self._stop.is_set():
                    break
                if isinstance(event, Finished) and event.status is Status.OK:
                    self.usage = self._usage(event)  # read by the loop after the event, which is put after it
                self._put(event)
        except Exception:
            log.exception("the gateway failed while serving an HTTP API completion")
            self._put(_Failure(ApiError(500, "internal error; it was logged", type="server_error")))
        finally:
            events.close()  # when stopped: the gateway records `cancelled` and frees the slot
            self._put(_END)

    def _open(self) -> Generator[GatewayEvent, None, None]:
        try:
            runtime = self._runtime()
        except ClawdbotError as exc:
            raise ApiError(503, f"clawdbot cannot serve now: {exc.message}", type="server_error") from None
        user = _authenticate(runtime, self._authorization, self.client_ip)
        try:
            try:
                body = json.loads(self._body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
            self.params = parse_completion(body)
            self.request = chat_request(runtime, user, self.params, self.client_ip)
        except ApiError as exc:
            _record_refusal(runtime, user, self._body, self.client_ip, exc)
            raise
        problem = prompt_problem(self.request.prompt, "the last user message", too_long_hint="")
        if problem:
            runtime.gateway.reject(self.request, problem)
            raise bad_request(problem, f"messages[{len(self.params.messages) - 1}].content", "rejected_input")
        return runtime.gateway.stream(self.request)

    def _usage(self, finished: Finished) -> dict[str, int]:
        prompt = finished.prompt_eval_count
        if prompt is None:
            prompt = _counted_prompt_tokens(self._runtime(), finished.request_id)
        completion = finished.completion_tokens or 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _authenticate(runtime: Runtime, authorization: str, client_ip: str) -> UserInfo:
    scheme, _, secret = authorization.partition(" ")
    if not authorization:
        raise ApiError(
            401,
            "no API key: send the header `Authorization: Bearer <key>`; create a key on the API keys page "
            "or with `clawdbot key create`",
            type="authentication_error",
            code="invalid_api_key",
        )
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "the Authorization header must be `Bearer <key>`",
            type="authentication_error",
            code="invalid_api_key",
        )
    try:
        return api_keys_of(runtime.db).authenticate(secret.strip(), client_ip)
    except ApiKeyRefusedError as exc:
        raise ApiError(401, exc.message, type="authentication_error", code="invalid_api_key") from None


def _record_refusal(runtime: Runtime, user: UserInfo, body: bytes, client_ip: str, error: ApiError) -> None:
    """A request refused before the gateway saw it is still recorded (`rejected_input`), with what was asked."""
    model = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        model = str(json.loads(body).get("model") or "")
    agent = model[len(AGENT_PREFIX) :] if model.startswith(AGENT_PREFIX) else ""
    request = ChatRequest(
        user=user.name, messages=[], model=model[:200], client_ip=client_ip, agent=agent[:64]
    )
    runtime.gateway.reject(request, f"HTTP API: {error.message}")


def _counted_prompt_tokens(runtime: Runtime, request_id: int) -> int:
    """Our own count of the prompt as sent, when the model server did not report one."""
    with runtime.db.read() as session:
        count = session.scalar(select(RequestRecord.prompt_tokens).where(RequestRecord.id == request_id))
    return int(count or 0)


# -- turning gateway events into OpenAI responses -------------------------------------------------------------


def _finish_reason(finished: Finished, request: ChatRequest | None) -> str:
    if request is not None and (finished.completion_tokens or 0) >= request.max_output_tokens:
        return "length"
    return "stop"


def _sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class CompletionResponse(Response):
    """Serves one chat completion as JSON or as server-sent events, watching for the client going away."""

    def __init__(self, completion: _Completion) -> None:
        self.completion = completion
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completion = self.completion
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            completion.stop()
            completion._put(_END)  # wakes the reader below

        watcher = asyncio.create_task(watch())
        completion.start()
        try:
            await self._serve(send, gone)
        except OSError:  # the client went away while we wrote (ASGI 2.4 servers raise on send)
            completion.stop()
        finally:
            completion.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _serve(self, send: Send, gone: asyncio.Event) -> None:
        completion = self.completion
        headers: dict[str, str] = {}
        started = False
        content: list[str] = []
        thinking: list[str] = []
        while True:
            batch = await completion.next_batch()
            if gone.is_set():
                return
            chunks: list[bytes] = []
            for item in batch:
                if item is _END:
                    if not started:  # ended without an outcome (internal error already sent, or nothing)
                        return
                    await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": False})
                    return
                if isinstance(item, _Failure):
                    if started:
                        chunks.append(_sse(item.error.body()))
                        continue
                    await _send_json(send, item.error.status, item.error.body(), item.error.headers())
                    started = True  # the response is complete; _END follows
                    return
                if isinstance(item, ContextPlanned):
                    headers["X-Clawdbot-Dropped-Messages"] = str(len(item.plan.dropped))
                    continue
                if isinstance(item, Started):
                    headers["X-Clawdbot-Request-Id"] = str(item.request_id)
                    continue
                if isinstance(item, Finished):
                    if item.status is not Status.OK:
                        error = finished_error(item)
                        if not started:
                            await _send_json(send, error.status, error.body(), {**error.headers(), **headers})
                            return
                        chunks.append(_sse(error.body()))
                        continue
                    if not completion.params or not completion.params.stream:
                        await _send_json(
                            send, 200, self._whole(item, "".join(content), "".join(thinking)), headers
                        )
                        return
                    if not started:
                        await self._start_stream(send, headers)
                        started = True
                        chunks.append(self._chunk(item.request_id, {"role": "assistant", "content": ""}))
                    chunks.append(self._chunk(item.request_id, {}, _finish_reason(item, completion.request)))
                    if completion.params.include_usage:
                        chunks.append(self._usage_chunk(item))
                    chunks.append(b"data: [DONE]\n\n")
                    continue
                if isinstance(item, ContentDelta | ThinkingDelta):
                    key = "content" if isinstance(item, ContentDelta) else "reasoning_content"
                    if not completion.params or not completion.params.stream:
                        (content if key == "content" else thinking).append(item.text)
                        continue
                    request_id = int(headers.get("X-Clawdbot-Request-Id", "0"))
                    if not started:
                        await self._start_stream(send, headers)
                        started = True
                        chunks.append(self._chunk(request_id, {"role": "assistant", "content": ""}))
                    chunks.append(self._chunk(request_id, {key: item.text}))
            if chunks:
                await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})

    async def _start_stream(self, send: Send, headers: Mapping[str, str]) -> None:
        raw = [(b"content-type", b"text/event-stream; charset=utf-8")]
        raw += [(k.lower().encode(), v.encode()) for k, v in {**_SSE_HEADERS, **headers}.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})

    def _base(self, request_id: int, kind: str) -> dict[str, Any]:
        params = self.completion.params
        return {
            "id": f"chatcmpl-{request_id}",
            "object": kind,
            "created": self.completion.created,
            "model": params.model if params else "",
            "system_fingerprint": None,
        }

    def _chunk(self, request_id: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**self._base(request_id, "chat.completion.chunk"), "choices": [choice]})

    def _usage_chunk(self, finished: Finished) -> bytes:
        return _sse(
            {
                **self._base(finished.request_id, "chat.completion.chunk"),
                "choices": [],
                "usage": self.completion.usage,
            }
        )

    def _whole(self, finished: Finished, content: str, thinking: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["reasoning_content"] = thinking
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _finish_reason(finished, self.completion.request),
        }
        return {
            **self._base(finished.request_id, "chat.completion"),
            "choices": [choice],
            "usage": self.completion.usage,
        }


async def _send_json(send: Send, status: int, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
    payload = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


# -- routes ---------------------------------------------------------------------------------------------------


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413, f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB", code="request_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def openai_routes(runtime: RuntimeSource) -> list[BaseRoute]:
    """`GET /v1/models` and `POST /v1/chat/completions`; every other `/v1/` path answers 404 in OpenAI's shape."""

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _read_body(request)
        except ApiError as exc:
            return exc.response()
        completion = _Completion(
            runtime, request.headers.get("authorization", ""), body, _client_ip(request), int(time.time())
        )
        return CompletionResponse(completion)

    async def models(request: Request) -> Response:
        try:
            listing = await run_in_threadpool(
                _list_models, runtime, request.headers.get("authorization", ""), _client_ip(request)
            )
        except ApiError as exc:
            return exc.response()
        return JSONResponse(listing, headers={"Cache-Control": "no-store"})

    async def not_found(request: Request) -> Response:
        return ApiError(
            404,
            f"there is no {request.method} {request.url.path}: this server offers GET /v1/models and "
            "POST /v1/chat/completions",
            code="unknown_url",
        ).response()

    return [
        Route(f"{API_PREFIX}/models", models, methods=["GET"]),
        Route(f"{API_PREFIX}/chat/completions", chat_completions, methods=["POST"]),
        Route(API_PREFIX, not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route(API_PREFIX + "/{rest:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]


def _list_models(source: RuntimeSource, authorization: str, client_ip: str) -> dict[str, Any]:
    """The agents the key's user may chat with, as `agent:<name>`; for admins also the server's models."""
    try:
        runtime = source()
    except ClawdbotError as exc:
        raise ApiError(503, f"clawdbot cannot serve now: {exc.message}", type="server_error") from None
    user = _authenticate(runtime, authorization, client_ip)
    data: list[dict[str, Any]] = []
    if may_chat(user):
        for agent in runtime.agents.all():
            created = int(agent.created_at.timestamp()) if agent.created_at else 0
            data.append(
                {
                    "id": AGENT_PREFIX + agent.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "clawdbot",
                }
            )
    if may_use_raw_models(user):
        catalog = model_catalog(runtime.gateway.backends)
        data += [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "ollama"} for m in catalog.models
        ]
    return {"object": "list", "data": data}
