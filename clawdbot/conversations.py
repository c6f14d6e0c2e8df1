"""Conversations and their messages: what a person sees again after a reload or in a second tab.

Each user reaches only their own conversations. Deleting hides a conversation from its owner; the audit records
of its requests stay untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Agent, Conversation, Message, Request, User, utcnow

TITLE_LIMIT = 200


@dataclass(frozen=True)
class ConversationInfo:
    id: int
    title: str
    agent: str
    updated_at: datetime


@dataclass(frozen=True)
class StoredMessage:
    role: str
    content: str
    thinking: str
    tool_calls: list[dict[str, Any]]
    request_id: int | None
    charts: list[dict[str, Any]] = field(default_factory=list)
    """Charts tools drew for this answer, as `clawdbot.charts.Chart.to_json()` made them."""

    def for_model(self) -> dict[str, Any]:
        """The message as sent back to the model in later turns (thinking is not resent)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            # Only what the model sent: the record's result, duration and error stay out of later prompts.
            message["tool_calls"] = [
                {"function": {"name": call.get("name", ""), "arguments": call.get("arguments", {})}}
                for call in self.tool_calls
            ]
        return message


@dataclass(frozen=True)
class AnswerFigures:
    """What the audit record of an answer's request says about it: shown under the answer, also after a reload."""

    status: str
    model_used: str
    ttft_ms: float | None
    tokens_per_s: float | None
    completion_tokens: int | None
    dropped_messages: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class TranscriptEntry:
    """A stored message as the chat page shows it; `figures` only for answers whose request is recorded."""

    message: StoredMessage
    figures: AnswerFigures | None


def _stored(m: Message) -> StoredMessage:
    return StoredMessage(
        m.role, m.content, m.thinking, json.loads(m.tool_calls), m.request_id, json.loads(m.charts)
    )


class Conversations:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, user: str, agent: str, title: str = "") -> int:
        with self.db.write() as session:
            user_id = session.scalar(select(User.id).where(User.name == user))
            agent_id = session.scalar(select(Agent.id).where(Agent.name == agent))
            if user_id is None:
                raise NotFoundError(f"there is no user named {user!r}")
            if agent_id is None:
                raise NotFoundError(f"there is no agent named {agent!r}: see `clawdbot agent list`")
            conversation = Conversation(user_id=user_id, agent_id=agent_id, title=title.strip()[:TITLE_LIMIT])
            session.add(conversation)
            session.flush()
            return conversation.id

    def _owned(self, session: Any, conversation_id: int, user: str) -> Conversation:
        conversation = session.scalar(
            select(Conversation)
            .join(User, User.id == Conversation.user_id)
            .where(Conversation.id == conversation_id, User.name == user, Conversation.deleted_at.is_(None))
        )
        if conversation is None:
            # The same answer whether it does not exist or belongs to someone else.
            raise NotFoundError(f"{user} has no conversation {conversation_id}")
        return conversation  # type: ignore[no-any-return]

    def agent_of(self, conversation_id: int, user: str) -> str:
        with self.db.read() as session:
            conversation = self._owned(session, conversation_id, user)
            return str(session.scalar(select(Agent.name).where(Agent.id == conversation.agent_id)))

    def history(self, conversation_id: int, user: str) -> list[StoredMessage]:
        with self.db.read() as session:
            self._owned(session, conversation_id, user)
            rows = session.scalars(
                select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
            )
            return [_stored(m) for m in rows]

    def append(self, conversation_id: int, user: str, messages: list[StoredMessage]) -> None:
        """Add the messages of one turn together, so a conversation never holds half a turn."""
        with self.db.write() as session:
            conversation = self._owned(session, conversation_id, user)
            for m in messages:
                session.add(
                    Message(
                        conversation_id=conversation_id,
                        role=m.role,
                        content=m.content.replace("\x00", "\ufffd"),
                        thinking=m.thinking.replace("\x00", "\ufffd"),
                        tool_calls=json.dumps(m.tool_calls, ensure_ascii=False),
                        request_id=m.request_id,
                        charts=json.dumps(m.charts, ensure_ascii=False),
                    )
                )
            if not conversation.title and messages:
                conversation.title = " ".join(messages[0].content.split())[:80]
            conversation.updated_at = utcnow()

    def get(self, conversation_id: int, user: str) -> ConversationInfo:
        """One of the user's own conversations; NotFoundError for anyone else's, as for one that does not exist."""
        with self.db.read() as session:
            conversation = self._owned(session, conversation_id, user)
            agent = str(session.scalar(select(Agent.name).where(Agent.id == conversation.agent_id)))
            return ConversationInfo(conversation.id, conversation.title, agent, conversation.updated_at)

    def transcript(self, conversation_id: int, user: str) -> list[TranscriptEntry]:
        """The messages in order, each answer with the figures of its request, read in one query."""
        with self.db.read() as session:
            self._owned(session, conversation_id, user)
            rows = session.execute(
                select(
                    Message,
                    Request.status,
                    Request.model_used,
                    Request.ttft_ms,
                    Request.tokens_per_s,
                    Request.completion_tokens,
                    Request.dropped_messages,
                    Request.truncated,
                )
                .outerjoin(Request, Request.id == Message.request_id)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id)
            )
            entries = []
            for m, status, model_used, ttft_ms, tokens_per_s, completion, dropped, truncated in rows:
                message = _stored(m)
                figures = None
                if m.role == "assistant" and status is not None:
                    figures = AnswerFigures(
                        status, model_used, ttft_ms, tokens_per_s, completion, dropped or 0, bool(truncated)
                    )
                entries.append(TranscriptEntry(message, figures))
            return entries

    def list_for(self, user: str) -> list[ConversationInfo]:
        with self.db.read() as session:
            rows = session.execute(
                select(Conversation.id, Conversation.title, Agent.name, Conversation.updated_at)
                .join(User, User.id == Conversation.user_id)
                .join(Agent, Agent.id == Conversation.agent_id)
                .where(User.name == user, Conversation.deleted_at.is_(None))
                .order_by(Conversation.updated_at.desc())
            )
            return [ConversationInfo(*row) for row in rows]

    def rename(self, conversation_id: int, user: str, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise UsageError("a conversation title cannot be empty")
        with self.db.write() as session:
            self._owned(session, conversation_id, user).title = title[:TITLE_LIMIT]

    def delete(self, conversation_id: int, user: str) -> None:
        with self.db.write() as session:
            self._owned(session, conversation_id, user).deleted_at = utcnow()
