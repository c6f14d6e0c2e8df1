"""The one road every request takes (web page, CLI, HTTP API) between a person and the GPU.

`Gateway.stream()` records the request, applies the user's rate limit, waits for a slot (reporting its place in
the queue), streams from the backend with retries before the first token and then the fallback model, and
finalizes the audit record in `finally`, also when the caller stops reading half-way (closing the generator is
the cancel signal; it frees the slot at once). It yields the backend's own event objects, so the token path
adds no allocation, and ends with one `Finished` that says what happened in plain words.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from clawdbot.admission import Admission, Ticket
from clawdbot.audit import AuditStore, to_json
from clawdbot.backends import (
    EMBEDDED_DEFAULT_N_CTX,
    EMBEDDED_MAX_OUTPUT_TOKENS,
    Backend,
    BackendBusy,
    BackendError,
    BackendSelector,
    BackendTimeout,
    ContentDelta,
    Done,
    ModelCall,
    ModelNotFound,
    ThinkingDelta,
    ToolCall,
)
from clawdbot.context import ContextPlan, cut_text, plan_context
from clawdbot.documents import Document
from clawdbot.errors import BusyError, ClawdbotError, RateLimitedError
from clawdbot.models import Status
from clawdbot.ratelimit import RateLimiter
from clawdbot.settings import Settings
from clawdbot.tokens import TokenCounter, counter_for
from clawdbot.tools import Toolbox, ToolResult

log = logging.getLogger(__name__)

RETRY_DELAY_S = 0.5
MAX_TOOL_ROUNDS = 5
"""Rounds of tool calls one request may run; after them the model is asked once more, without tools, to answer."""
TOOL_RESULT_CUT = "\n[… the rest of this result was cut to fit the context budget: ask for less …]"
# A tool result given less room than this is replaced by a short note rather than cut to nothing useful.
MIN_TOOL_RESULT_TOKENS = 48
QUEUE_REPORT_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ChatRequest:
    """What a caller asks: the messages to send (already within the budget) and who asks, for the record."""

    user: str
    messages: list[dict[str, Any]]
    model: str
    prompt: str = ""
    fallback_model: str = ""
    client_ip: str = ""
    conversation_id: int | None = None
    agent: str = ""
    agent_version: int | None = None
    agent_version_id: int | None = None
    tools: list[dict[str, Any]] | None = None
    think: bool | None = None
    context_budget: int = 7500
    max_output_tokens: int = 2048
    temperature: float | None = None
    top_p: float | None = None
    attachments: list[dict[str, Any]] = field(default_factory=list)
    documents: tuple[Document, ...] = ()
    """The attachments' extracted content, for tools such as `read_document` and `query_table`."""
    audit: dict[str, Any] = field(default_factory=dict)
    """Further record fields the caller computed (token counts and truncation from context planning)."""
    toolbox: Toolbox | None = None
    """Tools the gateway runs itself when the model asks (`tools` are then their schemas); without it, tool
    calls are only passed on to the caller (the HTTP API's clients run their own tools)."""


@dataclass(frozen=True)
class Queued:
    """The request waits for a slot; `position` 1 is next."""

    request_id: int
    position: int


@dataclass(frozen=True)
class ContextPlanned:
    """Sent when the context had to be shortened: `plan.dropped` lists the earlier messages left out and
    `plan.notice()` says it in plain words."""

    request_id: int
    plan: ContextPlan


@dataclass(frozen=True)
class Started:
    """A backend accepted the request (sent again after a retry or on the fallback model)."""

    request_id: int
    backend: str
    model: str


EXIT_CODES = {
    Status.OK: 0,
    Status.REJECTED_INPUT: 2,
    Status.BUSY: 3,
    Status.RATE_LIMITED: 4,
    Status.TIMEOUT: 6,
}


@dataclass(frozen=True)
class Finished:
    """The outcome: status, a sentence for people, and the figures shown under an answer."""

    request_id: int
    status: Status
    message: str = ""
    retry_after: float | None = None
    model_unavailable: bool = False
    backend: str = ""
    model_used: str = ""
    fallback_used: bool = False
    retries: int = 0
    response: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    queue_ms: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    tokens_per_s: float | None = None
    prompt_eval_count: int | None = None
    completion_tokens: int | None = None
    server_truncated: bool = False
    """The server counted more prompt tokens than we sent: it may have cut the front of the prompt."""

    @property
    def exit_code(self) -> int:
        """The `clawdbot ask` exit code of the contract."""
        if self.model_unavailable:
            return 5
        return EXIT_CODES.get(self.status, 1)


GatewayEvent: TypeAlias = (
    ContextPlanned | Queued | Started | ThinkingDelta | ContentDelta | ToolCall | ToolResult | Finished
)


class _Attempt:
    """What one request has produced so far, across retries and the fallback."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.first_token_at: float | None = None
        self.started_at: float | None = None
        self.done: Done | None = None
        self.deltas = 0
        self.backend = ""
        self.model_used = ""
        self.retries = 0
        self.fallback_used = False
        self.plan: ContextPlan | None = None
        self.plan_backend = ""
        self.replanned = False
        self.tool_rounds = 0
        self.sent: list[dict[str, Any]] | None = None
        """The messages of the last model call, when tool rounds made them grow beyond the plan."""
        self.sent_tokens: int | None = None


class Gateway:
    """Admission, limits, retries, fallback and audit for every model request in the process."""

    def __init__(
        self,
        settings: Settings,
        store: AuditStore,
        backends: BackendSelector,
        admission: Admission,
        limiter: RateLimiter,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backends = backends
        self.admission = admission
        self.limiter = limiter

    def stream(self, request: ChatRequest) -> Generator[GatewayEvent, None, None]:
        """Serve one request; the last event is always `Finished` unless the caller closes the stream first."""
        entered = time.perf_counter()
        state = _Attempt()
        backend = self.backends.current()
        state.plan, state.plan_backend = self._plan(request, backend), backend.name
        request_id = self._start(request, context=to_json(state.plan.messages), **state.plan.audit_fields())
        if state.plan.truncated:
            yield ContextPlanned(request_id, state.plan)
        outcome: dict[str, Any] = {
            "status": Status.CANCELLED,
            "message": "the caller stopped reading the answer",
        }
        ticket: Ticket | None = None
        admitted_at: float | None = None
        queued_at: float | None = None
        try:
            try:
                self.limiter.check(request.user)
                # The queue is the wait for a slot only: planning and the `started` record come before it.
                queued_at = time.perf_counter()
                ticket = self.admission.enter()
            except (RateLimitedError, BusyError) as exc:
                status = Status.RATE_LIMITED if isinstance(exc, RateLimitedError) else Status.BUSY
                outcome = {"status": status, "message": exc.message, "retry_after": exc.retry_after}
            else:
                try:
                    while not ticket.wait(QUEUE_REPORT_INTERVAL_S):
                        if ticket.position == -1:  # released by another thread: cancelled while queued
                            return
                        yield Queued(request_id, ticket.position)
                except BusyError as exc:
                    outcome = {"status": Status.BUSY, "message": exc.message, "retry_after": exc.retry_after}
                else:
                    admitted_at = time.perf_counter()
                    outcome = yield from self._generate(request_id, request, state)
        except ClawdbotError as exc:  # e.g. the shared rate limiter's Redis is unreachable
            outcome = {"status": Status.ERROR, "message": exc.message}
        except Exception as exc:
            outcome = {"status": Status.ERROR, "message": f"internal error: {type(exc).__name__}: {exc}"}
            raise
        finally:
            if ticket is not None:
                ticket.release()
                if admitted_at is not None:
                    self.admission.record_service_time(time.perf_counter() - admitted_at)
            finished = self._finish(request_id, request, state, outcome, entered, queued_at, admitted_at)
        yield finished

    def reject(self, request: ChatRequest, message: str) -> Finished:
        """Record input refused before any model call (`rejected_input`), so the refusal is audited too."""
        request_id = self._start(request)
        outcome = {"status": Status.REJECTED_INPUT, "message": message}
        return self._finish(request_id, request, _Attempt(), outcome, time.perf_counter(), None, None)

    def _start(self, request: ChatRequest, **fields: Any) -> int:
        """Write the `started` record; nothing reaches a model without it."""
        return self.store.start_request(
            user=request.user,
            client_ip=request.client_ip,
            conversation_id=request.conversation_id,
            agent=request.agent,
            agent_version=request.agent_version,
            agent_version_id=request.agent_version_id,
            model_requested=request.model,
            prompt=request.prompt,
            attachments=to_json(request.attachments),
            **request.audit,
            **fields,
        )

    def _counter(self, request: ChatRequest, backend: Backend) -> TokenCounter:
        """The tokenizer of the model that will read the messages (cached per model by `counter_for`)."""
        return counter_for(request.model, backend.name, model_path=self.settings.embedded_model or None)

    def _budget(self, request: ChatRequest, backend: Backend) -> int:
        budget = request.context_budget
        if backend.name == "embedded":
            output = min(request.max_output_tokens, EMBEDDED_MAX_OUTPUT_TOKENS)
            budget = min(budget, EMBEDDED_DEFAULT_N_CTX - output)
        return budget

    def _plan(self, request: ChatRequest, backend: Backend) -> ContextPlan:
        """Fit the messages into the budget, counted with the tokenizer of the model that will read them."""
        counter = self._counter(request, backend)
        budget = self._budget(request, backend)
        messages = request.messages
        system = messages[0] if messages and messages[0].get("role") == "system" else None
        rest = messages[1:] if system is not None else messages
        if not rest:
            return ContextPlan(list(messages), 0, 0)
        return plan_context(counter, system, rest[:-1], rest[-1], budget, request.tools)

    def _generate(
        self, request_id: int, request: ChatRequest, state: _Attempt
    ) -> Generator[GatewayEvent, None, dict[str, Any]]:
        models = [request.model]
        fallback = request.fallback_model or self.settings.fallback_model
        if fallback and fallback != request.model:
            models.append(fallback)
        last_error: BackendError | None = None
        errors: dict[str, BackendError] = {}  # the last failure of each model
        for index, model in enumerate(models):
            for attempt in range(self.settings.retries + 1):
                if attempt:
                    time.sleep(RETRY_DELAY_S)
                    state.retries += 1
                backend = self.backends.current()
                state.backend, state.model_used = backend.name, model
                state.fallback_used = index > 0
                if backend.name != state.plan_backend:
                    # Another tokenizer and window (Ollama went away and the embedded model serves): plan again.
                    state.plan, state.plan_backend, state.replanned = (
                        self._plan(request, backend),
                        backend.name,
                        True,
                    )
                    if state.plan.truncated:
                        yield ContextPlanned(request_id, state.plan)
                try:
                    # Inside the try: naming the embedded model loads it, and a model that cannot load is a
                    # backend failure like any other (retries, fallback, exit 5), not an internal error.
                    state.model_used = self._model_name(backend, model)
                    yield Started(request_id, state.backend, state.model_used)
                    yield from self._converse(backend, model, request, state)
                    return {"status": Status.OK}
                except BackendTimeout as exc:
                    return {"status": Status.TIMEOUT, "message": self._partial(exc.message, state)}
                except BackendError as exc:
                    if state.first_token_at is not None:
                        # After the first token there is no retry: the partial answer stands as it is.
                        return {"status": Status.ERROR, "message": self._partial(exc.message, state)}
                    last_error = errors[model] = exc
                    self.backends.invalidate()
                    log.warning(
                        "request %d: %s (model %s, attempt %d)", request_id, exc.message, model, attempt + 1
                    )
                    if isinstance(exc, ModelNotFound) or not exc.retryable:
                        break
        tried = " and the fallback model " + models[1] if len(models) > 1 else ""
        detail = last_error.message if last_error is not None else "no backend answered"
        first = errors.get(models[0])
        if last_error is not None and first is not None and first.message != last_error.message:
            # Both failures matter: e.g. the model asked for is not installed *and* neither is the fallback.
            detail = f"{first.message}; the fallback model {models[1]} failed too: {last_error.message}"
            tried = ""
        if isinstance(last_error, BackendBusy):
            # The server itself is at capacity (Ollama's 503): busy, like a full queue here (exit 3).
            return {"status": Status.BUSY, "message": f"{detail} (after {state.retries} retries{tried})"}
        return {
            "status": Status.ERROR,
            "model_unavailable": True,
            "message": f"{detail} (after {state.retries} retries{tried})",
        }

    def _converse(
        self, backend: Backend, model: str, request: ChatRequest, state: _Attempt
    ) -> Generator[GatewayEvent, None, None]:
        """Stream the answer; while the model asks for tools the request's toolbox has, run them and ask again.

        All rounds belong to this one request: one audit record, and the admission slot is held throughout.
        At most MAX_TOOL_ROUNDS rounds run tools; then the model is asked without tools, so it must answer.
        """
        messages = list(state.plan.messages if state.plan is not None else request.messages)
        toolbox = request.toolbox
        state.started_at = time.perf_counter()
        for round_number in range(MAX_TOOL_ROUNDS + 1):
            last = round_number == MAX_TOOL_ROUNDS
            tools = None if toolbox is not None and last else request.tools
            content_from = len(state.content)
            asked = yield from self._stream_once(backend, model, request, state, messages, tools)
            if toolbox is None or not asked:
                return
            if last:
                for index, _call in asked:
                    state.tool_calls[index]["error"] = (
                        f"not run: a request may run tools in at most {MAX_TOOL_ROUNDS} rounds"
                    )
                return
            state.tool_rounds += 1
            results: list[ToolResult] = []
            for index, call in asked:
                result = toolbox.call(call.name, call.arguments)
                state.tool_calls[index] = result.record()
                results.append(result)
                yield result
            messages = self._with_results(
                backend, request, messages, "".join(state.content[content_from:]), results, tools
            )
            state.sent = messages

    def _with_results(
        self,
        backend: Backend,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        content: str,
        results: list[ToolResult],
        tools: list[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        """The messages for the next round: the assistant's calls, then each result, cut to fit the budget."""
        counter = self._counter(request, backend)
        calls = [{"function": {"name": r.name, "arguments": r.arguments}} for r in results]
        said: dict[str, Any] = (
            {"content": content} if content else {}
        )  # as the client sends it: no empty text
        grown = [*messages, {"role": "assistant", **said, "tool_calls": calls}]
        room = self._budget(request, backend) - counter.count_messages(grown, tools)
        for position, result in enumerate(results):
            message = {"role": "tool", "content": result.content, "tool_name": result.name}
            share = room // (len(results) - position)
            size = counter.count_message(message)
            if size > share:
                overhead = counter.count_message({**message, "content": ""}) + counter.count_text(
                    TOOL_RESULT_CUT
                )
                if share - overhead < MIN_TOOL_RESULT_TOKENS:
                    message["content"] = (
                        "error: the result does not fit in the context budget left; ask for less"
                    )
                else:
                    message["content"] = cut_text(counter, result.content, share - overhead) + TOOL_RESULT_CUT
                size = counter.count_message(message)
            room -= size
            grown.append(message)
        return grown

    def _stream_once(
        self,
        backend: Backend,
        model: str,
        request: ChatRequest,
        state: _Attempt,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
    ) -> Generator[GatewayEvent, None, list[tuple[int, ToolCall]]]:
        """One model call; returns the tool calls it asked for, with their places in `state.tool_calls`."""
        call = ModelCall(
            model=model,
            messages=messages,
            tools=tools,
            think=request.think,
            num_ctx=request.context_budget + request.max_output_tokens,
            num_predict=request.max_output_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            keep_alive=self.settings.keep_alive,
        )
        if state.sent is not None:
            state.sent_tokens = self._counter(request, backend).count_messages(messages, tools)
        asked: list[tuple[int, ToolCall]] = []
        events = backend.stream(call)
        try:
            for event in events:
                if isinstance(event, ContentDelta):
                    state.content.append(event.text)
                elif isinstance(event, ThinkingDelta):
                    state.thinking.append(event.text)
                elif isinstance(event, ToolCall):
                    asked.append((len(state.tool_calls), event))
                    state.tool_calls.append({"name": event.name, "arguments": event.arguments})
                else:
                    state.done = _add_rounds(state.done, event) if state.tool_rounds else event
                    continue
                state.deltas += 1
                if state.first_token_at is None:
                    state.first_token_at = time.perf_counter()
                yield event
        finally:
            events.close()
        return asked

    @staticmethod
    def _model_name(backend: Backend, model: str) -> str:
        if backend.name == "ollama":
            return model
        return next((m.name for m in backend.models()), backend.name)

    @staticmethod
    def _partial(message: str, state: _Attempt) -> str:
        if state.first_token_at is None:
            return message
        return f"{message}; the answer stopped part-way and what arrived is kept"

    def _check_server_count(
        self, request_id: int, request: ChatRequest, state: _Attempt, server_count: int | None
    ) -> bool:
        """Whether the server saw a longer prompt than we counted, so it may have cut the front of it (warned
        in the log, and flagged in the record as `server_truncated`)."""
        if server_count is None or state.plan is None or state.backend != "ollama":
            return False
        ours = state.sent_tokens if state.sent_tokens is not None else state.plan.tokens_after
        num_ctx = request.context_budget + request.max_output_tokens
        if server_count > ours * 1.05 + 16 or server_count >= num_ctx - 16:
            log.warning(
                "request %d: the server counted %d prompt tokens where clawdbot counted %d (num_ctx %d); "
                "it may have cut the front of the prompt",
                request_id, server_count, ours, num_ctx,
            )  # fmt: skip
            return True
        return False

    def _finish(
        self,
        request_id: int,
        request: ChatRequest,
        state: _Attempt,
        outcome: dict[str, Any],
        entered: float,
        queued_at: float | None,
        admitted_at: float | None,
    ) -> Finished:
        ended = time.perf_counter()
        done = state.done
        ttft_ms = None
        if state.first_token_at is not None and state.started_at is not None:
            ttft_ms = (state.first_token_at - state.started_at) * 1000
        completion = done.eval_count if done is not None and done.eval_count else (state.deltas or None)
        tokens_per_s = None
        if done is not None and done.eval_count and done.eval_duration_ns:
            tokens_per_s = done.eval_count / (done.eval_duration_ns / 1e9)
        elif state.first_token_at is not None and state.deltas > 1 and ended > state.first_token_at:
            tokens_per_s = (state.deltas - 1) / (ended - state.first_token_at)
        prompt_eval_count = done.prompt_eval_count if done is not None else None
        finished = Finished(
            request_id=request_id,
            status=outcome["status"],
            message=outcome.get("message", ""),
            retry_after=outcome.get("retry_after"),
            model_unavailable=outcome.get("model_unavailable", False),
            backend=state.backend,
            model_used=state.model_used,
            fallback_used=state.fallback_used,
            retries=state.retries,
            response="".join(state.content),
            thinking="".join(state.thinking),
            tool_calls=state.tool_calls,
            queue_ms=(admitted_at - queued_at) * 1000
            if admitted_at is not None and queued_at is not None
            else None,
            ttft_ms=ttft_ms,
            latency_ms=(ended - entered) * 1000,
            tokens_per_s=tokens_per_s,
            prompt_eval_count=prompt_eval_count,
            completion_tokens=completion,
            server_truncated=self._check_server_count(request_id, request, state, prompt_eval_count),
        )
        replanned: dict[str, Any] = {}
        if state.replanned and state.plan is not None:
            replanned = {"context": to_json(state.plan.messages), **state.plan.audit_fields()}
        if state.sent is not None:
            # Tool rounds sent more than the plan: the record keeps the last (longest) list, as sent.
            replanned.update(context=to_json(state.sent), prompt_tokens=state.sent_tokens)
        try:
            self.store.finish_request(
                request_id,
                finished.status,
                **replanned,
                error=finished.message if finished.status is not Status.OK else "",
                backend=finished.backend,
                model_used=finished.model_used,
                fallback_used=finished.fallback_used,
                retries=finished.retries,
                response=finished.response,
                thinking=finished.thinking,
                tool_calls=json.dumps(finished.tool_calls, ensure_ascii=False),
                prompt_eval_count=finished.prompt_eval_count,
                completion_tokens=finished.completion_tokens,
                server_truncated=finished.server_truncated,
                queue_ms=finished.queue_ms,
                ttft_ms=finished.ttft_ms,
                latency_ms=finished.latency_ms,
                tokens_per_s=finished.tokens_per_s,
            )
        except Exception:
            # The record stays `started`; the next start-up marks it abandoned, so it is never lost.
            log.exception("request %d could not be finalized in the audit log", request_id)
        return finished


def _add_rounds(before: Done | None, now: Done) -> Done:
    """The figures of a request with tool rounds: tokens and time generated added up, the last prompt count."""
    if before is None:
        return now

    def total(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    return Done(
        prompt_eval_count=now.prompt_eval_count,
        eval_count=total(before.eval_count, now.eval_count),
        eval_duration_ns=total(before.eval_duration_ns, now.eval_duration_ns),
        prompt_eval_duration_ns=total(before.prompt_eval_duration_ns, now.prompt_eval_duration_ns),
        total_duration_ns=total(before.total_duration_ns, now.total_duration_ns),
        done_reason=now.done_reason,
    )
