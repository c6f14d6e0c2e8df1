"""API keys page (every role): create a key for the HTTP API (shown once) and revoke keys.

Admins see and may revoke every user's keys, to cut off a leaked one; everyone else sees only their own.
"""

from __future__ import annotations

import streamlit as st

from clawdbot.api_keys import api_keys_of, manages_all_keys
from clawdbot.errors import ClawdbotError
from ui.session import require_page, runtime

_NEW_KEY = "_clawdbot_new_api_key"
_NOTICE = "_clawdbot_api_key_notice"

identity = require_page("api-keys")
user = identity.user
keys = api_keys_of(runtime().db)

st.title("API keys")
st.write(
    "Scripts and tools that speak the OpenAI API reach the agents at `/v1` with a key, as you, through the "
    "same limits and audit log as this app. See the HTTP API notes (docs/api.md) for examples."
)

notice = st.session_state.pop(_NOTICE, None)
if isinstance(notice, str):
    st.success(notice)
created = st.session_state.pop(_NEW_KEY, None)
if isinstance(created, str):
    st.success("Your new key is below. Copy it now: it is shown only this once and cannot be shown again.")
    st.code(created, language=None)

with st.form("create_key", clear_on_submit=True):
    label = st.text_input(
        "Label (what the key is for)", max_chars=100, placeholder="e.g. nightly report script"
    )
    if st.form_submit_button("Create key", icon=":material/add:"):
        try:
            new = keys.create(user.name, user.name, label)
        except ClawdbotError as exc:
            st.error(exc.message)
        else:
            st.session_state[_NEW_KEY] = new.secret
            st.rerun()

every_user = manages_all_keys(user)
st.subheader("All keys" if every_user else "Your keys")
listed = keys.visible_to(user)
if not listed:
    st.info("No keys yet." if not every_user else "Nobody has a key yet.")
else:
    st.dataframe(
        [
            {
                "id": key.id,
                **({"user": key.user} if every_user else {}),
                "key": key.shown,
                "label": key.label,
                "created": key.created_at,
                "last used": key.last_used_at,
                "last address": key.last_used_ip,
                "revoked": key.revoked_at,
            }
            for key in listed
        ],
        hide_index=True,
    )
    active = [key for key in listed if key.active]
    if active:
        with st.form("revoke_key"):
            chosen = st.selectbox(
                "Key to revoke",
                active,
                format_func=lambda key: (
                    f"{key.id} · {key.shown} · {key.label or 'no label'}"
                    + (f" · {key.user}" if every_user else "")
                ),
            )
            if st.form_submit_button("Revoke key", icon=":material/block:") and chosen is not None:
                try:
                    revoked = keys.revoke_as(user, chosen.id)
                except ClawdbotError as exc:
                    st.error(exc.message)
                else:
                    st.session_state[_NOTICE] = (
                        f"Revoked key {revoked.id} ({revoked.shown}): requests with it are refused now."
                    )
                    st.rerun()
