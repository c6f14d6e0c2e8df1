"""Chat page (staff): talk with an agent, watch the answer stream, stop it, and come back to it later.

Layout and calls only: conversations and turns live in `clawdbot/`, rendering in `ui/chat_view.py`. The one piece
of state is the selected conversation, kept in the URL (`?c=<id>`), so a reload or a second tab shows the same
conversation; every message on screen is read from the database on each run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import streamlit as st

from clawdbot.answers import Notice, display_markdown, outcome_notice
from clawdbot.attachments import Upload
from clawdbot.chat import ATTACHMENT_PROMPT, MAX_PROMPT_CHARS
from clawdbot.conversations import ConversationInfo
from clawdbot.errors import ClawdbotError, NotFoundError
from clawdbot.extraction import ACCEPTED_SUFFIXES
from clawdbot.models import Status
from ui.chat_view import show_entry, show_notice, show_prompt, stream_turn
from ui.session import require_page, runtime

identity = require_page("chat")
st.title("Chat")

log = logging.getLogger("clawdbot.pages.chat")

CONVERSATION_PARAM = "c"
PROMPT_KEY = "chat_prompt"
# What to tell the person after the rerun that follows a turn (a refusal leaves nothing in the database).
FLASH_KEY = "chat_flash"
# What the reader of the attached files said, shown again after that rerun.
FILE_NOTES_KEY = "chat_file_notes"
UNEXPECTED = (
    "Something went wrong on our side, and it has been logged. "
    "Try again; if it keeps happening, tell an operator."
)
# A refused message is put back into the input for another try; a stopped or rejected one is not.
NOT_REFILLED = frozenset({Status.OK, Status.CANCELLED, Status.REJECTED_INPUT})


def select(conversation_id: int | None) -> None:
    """Open a conversation (None: start a new one) by putting it in the URL."""
    if conversation_id is None:
        st.query_params.pop(CONVERSATION_PARAM, None)
    else:
        st.query_params[CONVERSATION_PARAM] = str(conversation_id)


def open_conversation(user: str) -> ConversationInfo | None:
    """The conversation named in the URL, checked to be the user's own by `Conversations.get`."""
    raw = st.query_params.get(CONVERSATION_PARAM)
    if raw is None:
        return None
    try:
        return runtime().conversations.get(int(raw), user)
    except (ValueError, NotFoundError):
        st.error(f"You have no conversation {raw!r}: it was deleted, or it is not yours. Pick one of yours.")
        return None


def sidebar(user: str, current: ConversationInfo | None) -> str | None:
    """New-conversation button, agent picker and conversation list; returns the agent picked for a new one."""
    picked: str | None = None
    with st.sidebar:
        st.button("New conversation", key="chat_new", icon=":material/add:", on_click=select, args=(None,))
        if current is None:
            agents = [agent.name for agent in runtime().agents.all()]
            if agents:
                picked = st.selectbox("Agent", agents, key="chat_agent")
            else:
                st.info("There is no agent to talk to yet: an admin adds agents on the Agents page.")
        st.subheader("Your conversations")
        conversations = runtime().conversations.list_for(user)
        if not conversations:
            st.caption("None yet: your first message starts one.")
        for c in conversations:
            st.button(
                display_markdown(c.title) or "Untitled",
                key=f"chat_open_{c.id}",
                help=f"with {c.agent}, last message {c.updated_at:%Y-%m-%d %H:%M} UTC",
                type="primary" if current is not None and c.id == current.id else "tertiary",
                on_click=select,
                args=(c.id,),
            )
    return picked


def header(user: str, current: ConversationInfo) -> None:
    """Title and agent of the open conversation, with rename and delete."""
    conversations = runtime().conversations
    st.subheader(display_markdown(current.title) or "Untitled")
    st.caption(f"With **{current.agent}**")
    actions = st.container(horizontal=True)
    with actions.popover("Rename", icon=":material/edit:"), st.form("chat_rename"):
        title = st.text_input("Title", value=current.title, max_chars=200, key=f"chat_title_{current.id}")
        renamed = st.form_submit_button("Save")
    with actions.popover("Delete", icon=":material/delete:"):
        st.write("Delete this conversation? It leaves your list; the audit log keeps its records.")
        deleted = st.button("Delete conversation", key="chat_delete", type="primary")
    try:
        if renamed:
            conversations.rename(current.id, user, title)
            st.rerun()
        if deleted:
            conversations.delete(current.id, user)
            select(None)
            st.rerun()
    except ClawdbotError as exc:
        st.error(exc.message)


def client_ip() -> str:
    """The browser connection's address for the audit record (None from localhost, and not a string in tests)."""
    address = st.context.ip_address
    return address if isinstance(address, str) else ""


def send(
    user: str, prompt: str, current: ConversationInfo | None, agent: str | None, files: Sequence[Any] = ()
) -> None:
    """Stream one turn, then rerun so the page shows what the database now holds."""
    show_prompt(prompt if prompt.strip() or not files else ATTACHMENT_PROMPT, [f.name for f in files])
    turn = runtime().chat.turn(
        user,
        prompt,
        agent=None if current is not None else agent,
        conversation_id=current.id if current is not None else None,
        client_ip=client_ip(),
        attachments=[Upload(f.name, f.getvalue()) for f in files],
    )
    streamed = stream_turn(turn, on_conversation=select, reading=bool(files))
    st.session_state[FILE_NOTES_KEY] = streamed.file_notes
    finished = streamed.finished
    if finished is not None and (notice := outcome_notice(finished)) is not None:
        refill = finished.status not in NOT_REFILLED and not (finished.response or finished.thinking)
        st.session_state[FLASH_KEY] = (notice, prompt if refill else "")
    st.rerun()


def page() -> None:
    user = identity.user.name
    current = open_conversation(user)
    agent = sidebar(user, current)
    if current is not None:
        header(user, current)
        attached = runtime().chat.attachments.names_by_request(current.id)
        for entry in runtime().conversations.transcript(current.id, user):
            request_id = entry.message.request_id
            files = (
                attached.get(request_id, [])
                if request_id is not None and entry.message.role == "user"
                else []
            )
            show_entry(entry, files)
        for note in st.session_state.pop(FILE_NOTES_KEY, []):
            st.caption(display_markdown(note))
    flash = st.session_state.pop(FLASH_KEY, None)
    if flash is not None:
        notice, refill = flash
        if isinstance(notice, Notice):
            show_notice(notice)
        if refill:
            st.session_state[PROMPT_KEY] = refill  # shown in the input, sent only when the person sends it
    if current is None and agent is None:
        return
    message = st.chat_input(
        f"Message {current.agent if current is not None else agent}",
        key=PROMPT_KEY,
        max_chars=MAX_PROMPT_CHARS,
        submit_mode="stop",  # while the answer streams, the send button is the stop button
        accept_file="multiple",
        file_type=list(ACCEPTED_SUFFIXES),
        max_upload_size=runtime().settings.max_upload_mb,
    )
    if message and (message.text or message.files):
        send(user, message.text, current, agent, message.files)


try:
    page()
except ClawdbotError as exc:
    st.error(exc.message)
except Exception:
    log.exception("the chat page failed")
    st.error(UNEXPECTED)
