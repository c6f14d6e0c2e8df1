"""The server `clawdbot run` starts: the Streamlit UI of app.py and clawdbot's HTTP routes in one process.

Sharing the process is what lets the UI and the HTTP routes share one gateway, hence one concurrency cap.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from clawdbot.runtime import shared_runtime
from clawdbot.tcp_nodelay import disable_nagle_on_listeners
from clawdbot.web import middleware, routes
from ui.session import sso_providers

# app.py registers pages with st.navigation by role. Without this, Streamlit's legacy multipage mode would take
# pages/ as the page list for the first script run of each process, so the first visitor could open any page
# file directly (each page checks the role again, but it must not even be registered).
PagesManager.uses_pages_directory = False

log = logging.getLogger("clawdbot.app")


def on_script_error(exc: Exception) -> bool:
    """An unexpected error in a page: logged in full for operators, one plain sentence for the user."""
    log.error("unexpected error in the app", exc_info=exc)
    st.error("Something went wrong on this page; it was logged for the operators. Reload the page to go on.")
    return True


@asynccontextmanager
async def lifespan(_app: Any) -> AsyncIterator[None]:
    """At start-up, before the first connection: TCP_NODELAY on the listening socket (see clawdbot.tcp_nodelay)."""
    log.debug("TCP_NODELAY set on %d listening socket(s)", disable_nagle_on_listeners())
    yield


SSO_PROVIDERS = sso_providers()
app = st.App(
    Path(__file__).with_name("app.py"),
    on_script_error=on_script_error,
    lifespan=lifespan,
    routes=routes(shared_runtime, SSO_PROVIDERS),
    middleware=middleware(shared_runtime, sso=bool(SSO_PROVIDERS)),
)
