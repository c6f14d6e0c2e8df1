"""Streamlit entry point: layout and calls only; everything else lives in the clawdbot package."""

from __future__ import annotations

import streamlit as st

from clawdbot.errors import ClawdbotError
from clawdbot.runtime import Runtime


@st.cache_resource
def runtime() -> Runtime:
    """One runtime (settings, database engine, audit store) per server process, shared by every session."""
    return Runtime.open()


st.set_page_config(page_title="clawdbot", page_icon="🦀")
st.title("clawdbot")
try:
    rt = runtime()
except ClawdbotError as exc:
    st.error(exc.message)
    st.stop()
st.caption(f"Database: {rt.db.safe_url}")
st.info(
    "The sign-in, chat, admin and audit pages are not part of this build yet; use the `clawdbot` command."
)
