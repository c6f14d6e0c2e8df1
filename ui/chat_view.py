"""Streamlit rendering of chat messages: stored ones from the database, and an answer while it streams.

Text from people and models goes through `st.markdown` without `unsafe_allow_html` (HTML shows as text) after
`display_markdown` (images show as text): nothing here may ever pass `unsafe_allow_html`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from clawdbot.answers import Coalescer, Notice, caption, context_notice, display_markdown
from clawdbot.backends import ContentDelta, ThinkingDelta
from clawdbot.chat import TurnStarted
from clawdbot.conversations import TranscriptEntry
from clawdbot.gateway import ContextPlanned, Finished, GatewayEvent, Queued, Started

THINKING_LABEL = "Thinking"


def show_notice(notice: Notice) -> None:
    body = f"{notice.text}\n\nDetails: {notice.detail}" if notice.detail else notice.text
    {"info": st.info, "warning": st.warning, "error": st.error}[notice.level](body)


def attached_caption(files: Sequence[str]) -> None:
    if files:
        st.caption(display_markdown("Attached: " + ", ".join(files)))


def show_entry(entry: TranscriptEntry, files: Sequence[str] = ()) -> None:
    """One stored message; an answer with its thinking (collapsed, above it) and its figures (under it); a
    question with the names of the files attached to it."""
    message = entry.message
    if message.role not in ("user", "assistant"):
        return
    with st.chat_message(message.role):
        if entry.figures is not None and (notice := context_notice(entry.figures)):
            st.caption(notice)
        if message.thinking:
            with st.expander(THINKING_LABEL, expanded=False):
                st.markdown(display_markdown(message.thinking))
        if message.content:
            st.markdown(display_markdown(message.content))
        attached_caption(files)
        if message.tool_calls:
            names = ", ".join(str(call.get("name", "?")) for call in message.tool_calls)
            st.caption(f"Asked to use: {names}")
        if entry.figures is not None:
            st.caption(caption(entry.figures))


def show_prompt(prompt: str, files: Sequence[str] = ()) -> None:
    with st.chat_message("user"):
        st.markdown(display_markdown(prompt))
        attached_caption(files)


@dataclass
class StreamedTurn:
    """How a streamed turn ended: its conversation (when it got that far) and its `Finished` event."""

    conversation_id: int | None = None
    finished: Finished | None = None
    notices: list[str] = field(default_factory=list)
    file_notes: list[str] = field(default_factory=list)
    """What the reader of the attached files said (macros ignored, a document sent in part)."""


def stream_turn(
    turn: Generator[TurnStarted | GatewayEvent, None, None],
    on_conversation: Callable[[int], None],
    reading: bool = False,
) -> StreamedTurn:
    """Show a turn's answer as it is generated, in at most `UPDATES_PER_SECOND` screen updates a second.

    Any widget clicked meanwhile (the chat input's stop button, another conversation, another page) makes
    Streamlit raise inside this loop at its next screen update; `finally` then closes the turn, so the gateway
    records it `cancelled` and the partial answer is stored. Nothing is drawn in `finally`: after a stop, every
    Streamlit call raises again.
    """
    result = StreamedTurn()
    with st.chat_message("assistant"):
        waiting = st.empty()
        file_notes = st.empty()
        context = st.empty()
        thinking_slot = st.empty()
        answer = st.empty()
    if reading:
        waiting.info("Reading the attached files…", icon=":material/description:")
    thinking_body: list[Any] = []  # the placeholder inside the expander, made when thinking first arrives

    def render(part: str, text: str) -> None:
        if part == "thinking":
            if not thinking_body:
                thinking_body.append(thinking_slot.expander(THINKING_LABEL, expanded=False).empty())
            thinking_body[0].markdown(display_markdown(text))
        else:
            answer.markdown(display_markdown(text))

    coalescer = Coalescer(render)
    try:
        for event in turn:
            if isinstance(event, ContentDelta):
                coalescer.add("content", event.text)
            elif isinstance(event, ThinkingDelta):
                coalescer.add("thinking", event.text)
            elif isinstance(event, Queued):
                waiting.info(
                    f"Waiting for a free place on the GPU: number {event.position} in the queue…",
                    icon=":material/hourglass_top:",
                )
            elif isinstance(event, Started):
                waiting.empty()
            elif isinstance(event, ContextPlanned):
                notice = event.plan.notice()
                result.notices.append(notice)
                context.caption(notice)
            elif isinstance(event, TurnStarted):
                result.conversation_id = event.conversation_id
                result.file_notes.extend(event.notes)
                if event.notes:
                    file_notes.caption(display_markdown("\n\n".join(event.notes)))
                on_conversation(event.conversation_id)
            elif isinstance(event, Finished):
                result.finished = event
        coalescer.flush()
        waiting.empty()
    finally:
        turn.close()
    return result
