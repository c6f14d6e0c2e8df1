"""Streamlit rendering of chat messages: stored ones from the database, and an answer while it streams.

Text from people and models goes through `st.markdown` without `unsafe_allow_html` (HTML shows as text) after
`display_markdown` (images show as text): nothing here may ever pass `unsafe_allow_html`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.io as pio
import streamlit as st

from clawdbot.answers import Coalescer, Notice, caption, context_notice, display_markdown
from clawdbot.backends import ContentDelta, ThinkingDelta
from clawdbot.charts import Chart
from clawdbot.chat import TurnStarted
from clawdbot.conversations import TranscriptEntry
from clawdbot.gateway import ContextPlanned, Finished, GatewayEvent, Queued, Started
from clawdbot.tools import ToolResult

THINKING_LABEL = "Thinking"


def show_notice(notice: Notice) -> None:
    body = f"{notice.text}\n\nDetails: {notice.detail}" if notice.detail else notice.text
    {"info": st.info, "warning": st.warning, "error": st.error}[notice.level](body)


def show_chart(chart: Chart, key: str) -> None:
    """A chart a tool drew; its texts were made markup-free when it was built (`clawdbot.charts.plain`)."""
    st.plotly_chart(pio.from_json(json.dumps(chart.figure)), key=key, width="stretch")


def tools_caption(calls: list[dict[str, Any]]) -> str:
    """Which tools an answer used, and which of them failed (the model was told why)."""
    parts = []
    for call in calls:
        name = str(call.get("name", "?"))
        parts.append(f"{name} (failed)" if call.get("error") else name)
    return "Tools used: " + ", ".join(parts)


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
        for index, chart in enumerate(message.charts):
            show_chart(Chart.from_json(chart), key=f"chart_{message.request_id}_{index}")
        if message.tool_calls:
            st.caption(display_markdown(tools_caption(message.tool_calls)))
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
    message = st.chat_message("assistant")
    with message:
        waiting = st.empty()
        context = st.empty()
        thinking_slot = st.empty()
        answer = st.empty()
    # The caption of the tools used and a box for charts, made when a tool first runs.
    tool_slots: list[Any] = []
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
    used: list[dict[str, Any]] = []
    try:
        for event in turn:
            if isinstance(event, ContentDelta):
                coalescer.add("content", event.text)
            elif isinstance(event, ThinkingDelta):
                coalescer.add("thinking", event.text)
            elif isinstance(event, ToolResult):
                used.append(event.record())
                if not tool_slots:
                    tool_slots.extend((message.empty(), message.container()))
                tool_slots[0].caption(display_markdown(tools_caption(used)))
                if event.chart is not None:
                    with tool_slots[1]:
                        show_chart(event.chart, key=f"chart_live_{len(used)}")
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
                context.caption(display_markdown("\n\n".join([*result.file_notes, notice])))
            elif isinstance(event, TurnStarted):
                result.conversation_id = event.conversation_id
                result.file_notes.extend(event.notes)
                if event.notes:
                    context.caption(display_markdown("\n\n".join(event.notes)))
                on_conversation(event.conversation_id)
            elif isinstance(event, Finished):
                result.finished = event
        coalescer.flush()
        waiting.empty()
    finally:
        turn.close()
    return result
