"""OpenAI's chat completion request in clawdbot's terms: checking it, the gateway request it becomes, and
OpenAI's error shape for every refusal.

Kept apart from the HTTP handling (clawdbot.openai_api) so that what a request may ask, and whom an agent answers,
reads in one place and is tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import JSONResponse

from clawdbot.chat import agent_request
from clawdbot.errors import NotFoundError
from clawdbot.gateway import ChatRequest, Finished
from clawdbot.models import Role, Status
from clawdbot.runtime import Runtime
from clawdbot.users import UserInfo

AGENT_PREFIX = "agent:"
# Output limit of a raw-model request that sets none (an agent has its own).
DEFAULT_MAX_OUTPUT_TOKENS = 2048
# Parameters clients send often that change nothing we promise; anything not listed here or handled is refused.
_IGNORED_PARAMS = frozenset(
    {
        "user",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "metadata",
        "store",
        "service_tier",
    }
)
_HANDLED_PARAMS = frozenset(
    {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens"}
    | {"max_completion_tokens", "n", "tools", "tool_choice", "logprobs", "parallel_tool_calls"}
)


class ApiError(Exception):
    """A refusal in OpenAI's error shape; `retry_after` (seconds) becomes the `Retry-After` header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"Cache-Control": "no-store"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="clawdbot"'
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def may_chat(user: UserInfo) -> bool:
    """Agents answer the roles that may chat in the browser (the Chat page's roles)."""
    return Role.STAFF in user.roles


def may_use_raw_models(user: UserInfo) -> bool:
    """Admins may also call the model server's models by name, without an agent, as the Agents page's try box."""
    return Role.ADMIN in user.roles


# -- parsing a chat completion request ------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionParams:
    """A chat completion request as checked here: what the gateway needs, in OpenAI's terms."""

    model: str
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


def bad_request(message: str, param: str | None = None, code: str = "invalid_parameter") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"{name} must be a number from {low:g} to {high:g}", name)
    return float(value)


def _text_content(content: Any, index: int) -> str:
    """A message's text: a string, or a list of text parts (other parts, such as images, are refused)."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad_request(
                    "only text content is supported: give each part as {type: text, text: ...}", param
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request("content must be a string or a list of text parts", param)


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object with role and content", f"messages[{index}]")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(
                "role must be system, developer, user or assistant (tool messages are not supported)",
                f"messages[{index}].role",
            )
        if message.get("tool_calls"):
            raise bad_request("tool calls are not supported", f"messages[{index}].tool_calls")
        messages.append({"role": role, "content": _text_content(message.get("content"), index)})
    if messages[-1]["role"] != "user":
        raise bad_request(
            "the last message must be the user's (role user)", f"messages[{len(messages) - 1}].role"
        )
    return messages


def parse_completion(body: Any) -> CompletionParams:
    """Check a decoded request body; raises ApiError (400) naming the first parameter that is wrong."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - _HANDLED_PARAMS - _IGNORED_PARAMS)
    if unknown:
        raise bad_request(
            f"unsupported parameter {unknown[0]!r}: clawdbot serves agents with their own settings",
            unknown[0],
            "unsupported_parameter",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request(
            "model is required: name an agent as agent:<name> (see GET /v1/models)", "model", "missing"
        )
    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: one answer per request", "n")
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise bad_request("tools are not supported: the agent's own tools are set by an admin", "tools")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported", "logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object such as {include_usage: true}", "stream_options")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = body.get(limit_name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise bad_request(f"{limit_name} must be a whole number of at least 1", limit_name)
    return CompletionParams(
        model=model.strip(),
        messages=_messages(body.get("messages")),
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        max_tokens=limit,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
    )


def chat_request(runtime: Runtime, user: UserInfo, params: CompletionParams, client_ip: str) -> ChatRequest:
    """The gateway request for `params`: an agent's model, instructions and limits, or (admins) a raw model.

    The agent's system prompt comes first; system messages from the client follow it in one system message.
    """
    system = [m["content"] for m in params.messages if m["role"] == "system"]
    turns = [m for m in params.messages if m["role"] != "system"]
    if not params.model.startswith(AGENT_PREFIX):
        if not may_use_raw_models(user):
            raise ApiError(
                404,
                f"there is no model {params.model!r} for you: name an agent as agent:<name> "
                "(see GET /v1/models)",
                code="model_not_found",
                param="model",
            )
        return ChatRequest(
            user=user.name,
            messages=_with_system(system, turns),
            model=params.model,
            prompt=turns[-1]["content"],
            client_ip=client_ip,
            context_budget=runtime.settings.context_budget,
            max_output_tokens=params.max_tokens or DEFAULT_MAX_OUTPUT_TOKENS,
            temperature=params.temperature,
            top_p=params.top_p,
        )
    name = params.model[len(AGENT_PREFIX) :]
    if not may_chat(user):
        raise ApiError(
            403,
            f"{user.name} may not chat with agents: that needs the staff role",
            type="permission_error",
            code="permission_denied",
            param="model",
        )
    try:
        agent = runtime.agents.get(name)
    except NotFoundError:
        agent = None
    if agent is None or agent.archived:
        raise ApiError(
            404, f"there is no agent {name!r}: see GET /v1/models", code="model_not_found", param="model"
        )
    config = agent.config
    instructions = [config.system_prompt, *system] if config.system_prompt else system
    request = agent_request(
        config,
        _with_system(instructions, turns),
        user=user.name,
        prompt=turns[-1]["content"],
        client_ip=client_ip,
        version=agent,
    )
    return replace(
        request,
        # A client may ask for less than the agent's output limit, never for more.
        max_output_tokens=min(params.max_tokens or config.max_output_tokens, config.max_output_tokens),
        temperature=config.temperature if params.temperature is None else params.temperature,
        top_p=config.top_p if params.top_p is None else params.top_p,
    )


def _with_system(instructions: list[str], turns: list[dict[str, str]]) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": "\n\n".join(instructions)}] if instructions else []
    return [*head, *turns]


_STATUS_ERRORS: dict[Status, tuple[int, str, str]] = {
    Status.BUSY: (503, "server_error", "server_busy"),
    Status.RATE_LIMITED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Status.REJECTED_INPUT: (400, "invalid_request_error", "rejected_input"),
    Status.TIMEOUT: (504, "server_error", "timeout"),
}


def finished_error(finished: Finished) -> ApiError:
    """The HTTP refusal for a request that did not end `ok`."""
    if finished.model_unavailable:
        status, type_, code = 502, "server_error", "model_unavailable"
    else:
        status, type_, code = _STATUS_ERRORS.get(
            finished.status, (500, "server_error", finished.status.value)
        )
    retry_after = finished.retry_after
    if finished.status in (Status.BUSY, Status.RATE_LIMITED) and retry_after is None:
        retry_after = 1.0
    return ApiError(
        status, finished.message or finished.status.value, type=type_, code=code, retry_after=retry_after
    )
