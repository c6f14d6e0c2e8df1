"""Account page (every role): who you are, and changing your password."""

from __future__ import annotations

import streamlit as st

from clawdbot.errors import ClawdbotError
from ui.session import require_page, runtime

identity = require_page("account")
user = identity.user

st.title("Account")
st.write(f"User **{user.name}** · roles: {', '.join(sorted(r.value for r in user.roles))}")
st.caption(f"This sign-in lasts until {identity.expires_at:%Y-%m-%d %H:%M} UTC.")
if user.must_change_password:
    st.warning("You signed in with a one-time password. Choose your own password to use clawdbot.")

st.subheader("Change password")
with st.form("change_password", clear_on_submit=True):
    old = st.text_input("Current password", type="password", autocomplete="current-password")
    new = st.text_input("New password (at least 10 characters)", type="password", autocomplete="new-password")
    repeat = st.text_input("New password again", type="password", autocomplete="new-password")
    submitted = st.form_submit_button("Change password")
if submitted:
    if new != repeat:
        st.error("The two new passwords differ; type the same password twice.")
    else:
        try:
            runtime().auth.change_password(identity, old, new)
        except ClawdbotError as exc:
            st.error(exc.message)
        else:
            st.success("Your password is changed. Your other sign-ins have ended.")
            if user.must_change_password:
                st.rerun()
