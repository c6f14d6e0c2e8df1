"""Fitting a conversation into the context budget, so the model never loses its instructions.

Ollama silently cuts the front of a prompt that does not fit, system prompt first, and still answers. So every
request is planned here against `CLAWDBOT_CONTEXT_BUDGET` before it is sent:

- the system prompt and the new message are always kept;
- older turns go oldest first and whole (an assistant's tool calls stay with their results);
- they go in chunks at fixed places in the conversation (every quarter budget of history, counted from its
  start), so the kept part keeps the same beginning for several turns and the server's prompt cache stays valid;
- a message too large on its own is cut, with a marker in its text saying so;
- the caller learns what was dropped, to say it in plain words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

CUT_MARKER = "\n[… {n} tokens of this message were cut to fit the context budget …]"
CHUNKS_PER_BUDGET = 4
# What a cut message keeps at least, so a huge system prompt cannot squeeze the question out entirely.
MIN_MESSAGE_TOKENS = 64


class TokenCounter(Protocol):
    """What planning needs from a tokenizer (see `clawdbot.tokens`)."""

    name: str
    exact: bool

    def count_text(self, text: str) -> int: ...

    def count_message(self, message: Mapping[str, Any]) -> int: ...

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int: ...

    def count_messages(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> int: ...


@dataclass(frozen=True)
class ContextPlan:
    """The messages to send and what planning did to them, as the audit record keeps it."""

    messages: list[dict[str, Any]]
    tokens_before: int
    tokens_after: int
    dropped: list[dict[str, Any]] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    """Roles of the messages that were cut (for the notice shown to the user)."""

    @property
    def truncated(self) -> bool:
        return bool(self.dropped or self.cut)

    def audit_fields(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.tokens_after,
            "context_tokens_before": self.tokens_before,
            "context_tokens_after": self.tokens_after,
            "dropped_messages": len(self.dropped),
            "truncated": self.truncated,
        }

    def notice(self) -> str:
        """A sentence for the person asking, or empty when everything was sent."""
        parts = []
        if self.dropped:
            n = len(self.dropped)
            parts.append(
                f"{n} earlier message{'s' if n != 1 else ''} not sent: the conversation is longer than "
                "the agent's context budget"
            )
        for role in self.cut:
            what = (
                "your message"
                if role == "user"
                else "the agent's instructions"
                if role == "system"
                else "a message"
            )
            parts.append(f"{what} was cut to fit the context budget")
        return "; ".join(parts)


def _turns(history: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group messages into turns: each starts at a user message; tool results stay with the calls before them."""
    turns: list[list[dict[str, Any]]] = []
    for message in history:
        if message.get("role") == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def cut_text(counter: TokenCounter, text: str, max_tokens: int) -> str:
    """The longest beginning of `text` that counts at most `max_tokens` (binary search on its length)."""
    if counter.count_text(text) <= max_tokens:
        return text
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if counter.count_text(text[:middle]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def _cut(counter: TokenCounter, message: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    content = str(message.get("content", ""))
    overhead = counter.count_message({**message, "content": ""})
    total = counter.count_text(content)
    keep = max(max_tokens - overhead - counter.count_text(CUT_MARKER.format(n=total)), 0)
    while True:
        kept = cut_text(counter, content, keep)
        cut = {**message, "content": kept + CUT_MARKER.format(n=total - counter.count_text(kept))}
        # Tokens can merge across the join with the marker: shrink until the whole message fits.
        excess = counter.count_message(cut) - max_tokens
        if excess <= 0 or keep == 0:
            return cut
        keep = max(keep - excess, 0)


def plan_context(
    counter: TokenCounter,
    system: dict[str, Any] | None,
    history: Sequence[dict[str, Any]],
    new: dict[str, Any],
    budget: int,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ContextPlan:
    """Choose what to send: the system prompt, as many recent whole turns as fit, and the new message."""
    fixed = [m for m in (system, new) if m is not None]
    everything = [*([system] if system else []), *history, new]
    before = counter.count_messages(everything, tools)
    if before <= budget:
        return ContextPlan(list(everything), before, before)

    cut_roles: list[str] = []
    base = counter.count_messages(fixed, tools)
    if base > budget:
        # Too large even alone: cut the new message first, then the system prompt.
        over = base - budget
        new_size = counter.count_message(new)
        if new_size - over >= MIN_MESSAGE_TOKENS or system is None:
            new = _cut(counter, new, new_size - over)
            cut_roles.append(str(new.get("role", "user")))
        else:
            new = _cut(counter, new, MIN_MESSAGE_TOKENS)
            cut_roles.append(str(new.get("role", "user")))
            rest = counter.count_messages([new], tools)
            system = _cut(counter, system, budget - rest)
            cut_roles.append("system")
        fixed = [m for m in (system, new) if m is not None]
        base = counter.count_messages(fixed, tools)
        # Template tokens around the messages are not in the per-message counts: trim the rest off the larger.
        for _ in range(4):
            if base <= budget:
                break
            if system is not None and counter.count_message(system) > counter.count_message(new):
                system = _cut(counter, system, counter.count_message(system) - (base - budget))
            else:
                new = _cut(counter, new, counter.count_message(new) - (base - budget))
            fixed = [m for m in (system, new) if m is not None]
            base = counter.count_messages(fixed, tools)

    turns = _turns(history)
    sizes = [sum(counter.count_message(m) for m in turn) for turn in turns]
    room = budget - base
    # Fixed chunk boundaries: a turn starts a new chunk when the history before it crosses a quarter budget.
    chunk_tokens = max(budget // CHUNKS_PER_BUDGET, 1)
    boundaries, cumulative = [], 0
    for index, size in enumerate(sizes):
        if index == 0 or cumulative // chunk_tokens != (cumulative + size) // chunk_tokens:
            boundaries.append(index)
        cumulative += size
    boundaries.append(len(turns))
    start = len(turns)
    for boundary in boundaries:
        if sum(sizes[boundary:]) <= room:
            start = boundary
            break
    kept_history = [m for turn in turns[start:] for m in turn]
    dropped = [m for turn in turns[:start] for m in turn]
    messages = [*([system] if system else []), *kept_history, new]
    after = counter.count_messages(messages, tools)
    return ContextPlan(messages, before, after, dropped, cut_roles)
