"""Streamlit entry point: builds the navigation from the signed-in user's roles on every run.

A page the user may not use is never registered: its URL shows "not permitted" instead (see clawdbot.access).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import streamlit as st

from clawdbot.access import PAGES, pages_for
from ui.session import current_identity, open_first_page, show_not_permitted, show_signed_out, sign_out

PAGES_DIR = Path(__file__).with_name("pages")

st.set_page_config(page_title="clawdbot", page_icon="🦀", layout="wide")
identity = current_identity()

if identity is None:
    st.navigation([st.Page(show_signed_out, title="Sign in", url_path="signed-out")], position="hidden").run()
    st.stop()

allowed = pages_for(identity.user)
allowed_paths = {page.url_path for page in allowed}
registered = [
    st.Page(PAGES_DIR / page.script, title=page.title, icon=page.icon, url_path=page.url_path)
    for page in allowed
]
# The pages this user may not use answer "not permitted" at their URL instead of falling back to another page.
refused = [
    st.Page(
        partial(show_not_permitted, page.url_path, identity),
        title=page.title,
        url_path=page.url_path,
        visibility="hidden",
    )
    for page in PAGES
    if page.url_path not in allowed_paths
]

# "/" opens the user's first page under its own URL, so /chat, /audit, … always name the page they show.
home = st.Page(
    partial(open_first_page, registered[0]), title="Home", url_path="home", default=True, visibility="hidden"
)
page = st.navigation([home, *registered, *refused])
with st.sidebar:
    user = identity.user
    st.caption(f"Signed in as **{user.name}** · {', '.join(sorted(r.value for r in user.roles))}")
    if st.button("Sign out", key="sign_out", icon=":material/logout:"):
        sign_out(identity)
page.run()
