"""One turn of a conversation with an agent, shared by the chat page, `clawdbot ask` and the HTTP API.

It turns (user, agent, prompt, conversation) into the messages to send, runs them through the gateway, and
stores the turn in the conversation, including a partial answer when the person pressed stop.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from clawdbot.agents import NAME_PATTERN, UNSAVED_AGENT, AgentConfig, AgentInfo, Agents, first_blocking
from clawdbot.attachments import AttachmentBatch, AttachmentStore, Upload
from clawdbot.backends import ContentDelta, ThinkingDelta, ToolCall
from clawdbot.conversations import Conversations, StoredMessage
from clawdbot.document_context import fit_documents
from clawdbot.errors import UsageError
from clawdbot.gateway import ChatRequest, ContextPlanned, Finished, Gateway, GatewayEvent, Queued, Started
from clawdbot.http_tools import HttpTools
from clawdbot.outbound import OutboundPolicy
from clawdbot.secret_box import SecretBox
from clawdbot.tools import Toolbox, ToolResult

MAX_PROMPT_CHARS = 200_000
# The question when files are sent without one.
ATTACHMENT_PROMPT = "Summarise the attached file."


@dataclass(frozen=True)
class TurnStarted:
    """Sent first: which conversation the turn belongs to (a new one is created when none was given)."""

    conversation_id: int
    agent: AgentInfo
    notes: tuple[str, ...] = ()
    """About the attached files, for the person: macros ignored, a document sent as an outline and passages."""


class ChatService:
    def __init__(
        self,
        agents: Agents,
        conversations: Conversations,
        gateway: Gateway,
        http_tools: HttpTools | None = None,
    ) -> None:
        self.agents = agents
        self.conversations = conversations
        self.gateway = gateway
        self.attachments = AttachmentStore(conversations.db, gateway.settings)
        allowlist = gateway.settings.allowlisted_hosts
        self.http_tools = http_tools or HttpTools(
            agents.db, SecretBox(gateway.settings.session_secret()), allowlist
        )
        self.outbound = OutboundPolicy(allowlist)

    def _with_tools(self, request: ChatRequest, names: Sequence[str]) -> ChatRequest:
        """The request with the agent's tools the gateway runs (those that fit its attachments), if any."""
        if not names:
            return request
        toolbox = Toolbox.for_agent(
            names,
            documents=request.documents,
            http=self.http_tools.enabled(list(names)),
            policy=self.outbound,
        )
        if not toolbox:
            return request
        return replace(request, tools=toolbox.schemas(), toolbox=toolbox)

    def turn(
        self,
        user: str,
        prompt: str,
        *,
        agent: str | None = None,
        conversation_id: int | None = None,
        think: bool | None = None,
        client_ip: str = "",
        attachments: Sequence[Upload] = (),
    ) -> Generator[TurnStarted | GatewayEvent, None, None]:
        """Run one turn; yields `TurnStarted`, then the gateway's events, ending with `Finished`.

        Attached files are read first (a refused one ends the turn as `rejected_input`); they and the files of
        earlier turns go into `ChatRequest.documents`, and into the message as far as the budget allows.
        """
        if attachments and not prompt.strip():
            prompt = ATTACHMENT_PROMPT
        if conversation_id is not None:
            owner_agent = self.conversations.agent_of(conversation_id, user)
            if agent is not None and agent != owner_agent:
                raise UsageError(
                    f"conversation {conversation_id} is with agent {owner_agent!r}, not {agent!r}"
                )
            agent = owner_agent
        if agent is None:
            raise UsageError("name an agent (see `clawdbot agent list`) or a conversation to continue")
        info = self.agents.get(agent)
        if info.archived:
            raise UsageError(f"the agent {agent!r} is archived; an admin can restore it")
        config = info.config
        history = self.conversations.history(conversation_id, user) if conversation_id is not None else []
        messages: list[dict[str, Any]] = []
        if config.system_prompt:
            messages.append({"role": "system", "content": config.system_prompt})
        messages.extend(m.for_model() for m in history)
        messages.append({"role": "user", "content": prompt})
        request = agent_request(
            config,
            messages,
            user=user,
            prompt=prompt,
            client_ip=client_ip,
            version=info,
            conversation_id=conversation_id,
            think=think,
        )
        problem = prompt_problem(prompt)
        batch = self.attachments.read_all(attachments) if attachments and not problem else AttachmentBatch()
        problem = problem or batch.refusal
        request = replace(
            request,
            attachments=batch.records(),
            documents=() if problem else self.attachments.for_turn(conversation_id, batch),
        )
        request = self._with_tools(request, config.tools)
        if problem:
            refused = self.gateway.reject(request, problem)
            self.attachments.record(batch, refused.request_id, conversation_id)
            yield refused
            return
        if conversation_id is None:
            # Titled from the first message at once, so a first turn refused busy still leaves a findable one.
            conversation_id = self.conversations.create(user, info.name, title=" ".join(prompt.split())[:80])
            request = ChatRequest(**{**request.__dict__, "conversation_id": conversation_id})
        request, notices = fit_documents(request, self.gateway)
        yield TurnStarted(conversation_id, info, (*batch.notes, *notices))

        content: list[str] = []
        thinking: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        tool_results: list[ToolResult] = []
        request_id: int | None = None
        events = self.gateway.stream(request)
        try:
            for event in events:
                if isinstance(event, ContentDelta):
                    content.append(event.text)
                elif isinstance(event, ThinkingDelta):
                    thinking.append(event.text)
                elif isinstance(event, ToolCall):
                    tool_calls.append({"name": event.name, "arguments": event.arguments})
                elif isinstance(event, ToolResult):
                    tool_results.append(event)
                elif isinstance(event, Started | Queued | Finished):
                    request_id = event.request_id
                if isinstance(event, Finished) and event.tool_calls:
                    tool_calls = event.tool_calls  # as recorded: with results, durations and errors
                yield event
        finally:
            # Closed first, so the record is finalized (`cancelled` when the caller stopped) before the turn is
            # stored, whatever the interpreter's order of finalizing generators.
            events.close()
            if request_id is not None:
                self.attachments.record(batch, request_id, conversation_id)
            # Kept also when the caller stopped half-way: the partial answer belongs to the conversation.
            if content or thinking or tool_calls:
                if tool_results and len(tool_results) == len(tool_calls):  # stopped before `Finished`
                    tool_calls = [r.record() for r in tool_results]
                charts = [r.chart.to_json() for r in tool_results if r.chart is not None]
                self.conversations.append(
                    conversation_id,
                    user,
                    [
                        StoredMessage("user", prompt, "", [], request_id),
                        StoredMessage(
                            "assistant", "".join(content), "".join(thinking), tool_calls, request_id, charts
                        ),
                    ],
                )

    def try_config(
        self, user: str, name: str, config: AgentConfig, prompt: str, *, client_ip: str = ""
    ) -> Generator[GatewayEvent, None, None]:
        """One turn with a configuration that is not saved yet, for the admin page's try box.

        It takes the same road as every request (rate limit, queue, audit record), with no conversation and no
        agent version: the record names the agent (or `UNSAVED_AGENT`) with an empty version, and an
        `agent.try` event by the admin points at it. Raises UsageError when the draft cannot be sent at all.
        """
        config = config.normalized()
        problem = first_blocking(self.agents.problems(config))
        if problem is not None:
            raise UsageError(problem.message)
        name = name.strip()
        label = name if NAME_PATTERN.match(name) else UNSAVED_AGENT
        messages: list[dict[str, Any]] = []
        if config.system_prompt:
            messages.append({"role": "system", "content": config.system_prompt})
        messages.append({"role": "user", "content": prompt})
        request = agent_request(config, messages, user=user, prompt=prompt, client_ip=client_ip, agent=label)
        request = self._with_tools(request, config.tools)
        rejected = prompt_problem(prompt)
        if rejected:
            finished = self.gateway.reject(request, rejected)
            self.agents.record_trial(user, label, finished.request_id, finished.status.value, config.model)
            yield finished
            return
        request_id: int | None = None
        status = "cancelled"
        events = self.gateway.stream(request)
        try:
            for event in events:
                if isinstance(event, ContextPlanned | Queued | Started | Finished):
                    request_id = event.request_id
                if isinstance(event, Finished):
                    status = event.status.value
                yield event
        finally:
            events.close()  # a try-out stopped half-way is finalized (cancelled) before its event is written
            if request_id is not None:
                self.agents.record_trial(user, label, request_id, status, config.model)


def agent_request(
    config: AgentConfig,
    messages: list[dict[str, Any]],
    *,
    user: str,
    prompt: str,
    client_ip: str = "",
    version: AgentInfo | None = None,
    agent: str = "",
    conversation_id: int | None = None,
    think: bool | None = None,
) -> ChatRequest:
    """The gateway request for one turn under an agent's settings: a saved `version`, or a draft named `agent`.

    One place maps the settings to the request, so the chat, the try box and the HTTP API send alike.
    """
    return ChatRequest(
        user=user,
        messages=messages,
        model=config.model,
        prompt=prompt,
        fallback_model=config.fallback_model,
        client_ip=client_ip,
        conversation_id=conversation_id,
        agent=version.name if version is not None else agent,
        agent_version=version.version if version is not None else None,
        agent_version_id=version.version_id if version is not None else None,
        think=config.think if think is None else think,
        context_budget=config.context_budget,
        max_output_tokens=config.max_output_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )


def prompt_problem(
    prompt: str,
    subject: str = "the message",
    too_long_hint: str = ": attach long text as a file instead",
) -> str:
    """Why `prompt` cannot be sent (empty, or too long), in words for whoever wrote it; "" when it can."""
    if not prompt.strip():
        return f"{subject} is empty: type a question or instruction"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"{subject} is longer than {MAX_PROMPT_CHARS} characters{too_long_hint}"
    return ""
