"""The one place pages get the process runtime and the signed-in user from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

import streamlit as st
from streamlit.errors import StreamlitAPIException
from streamlit.navigation.page import StreamlitPage

from clawdbot.access import PAGES_BY_PATH, may_use
from clawdbot.auth import EXTERNAL_SESSION, SESSION_COOKIE, Identity, SignInRefusedError
from clawdbot.errors import ClawdbotError
from clawdbot.runtime import Runtime, shared_runtime
from clawdbot.web import SIGN_IN_PATH

_SSO_RECORDED = "_clawdbot_sso_recorded"
_SSO_REFUSAL = "_clawdbot_sso_refusal"


def runtime() -> Runtime:
    """The process's shared runtime; when it cannot open (database down) the page says why and stops."""
    try:
        return shared_runtime()
    except ClawdbotError as exc:
        stop_with_error(f"clawdbot cannot start: {exc.message}")


def stop_with_error(message: str) -> NoReturn:
    st.error(message)
    st.stop()


def current_identity() -> Identity | None:
    """Who is signed in to this browser session, checked against the database on every run.

    The cookie comes with the browser's connection; tests that run the app in-process (AppTest, which
    cannot send cookies) put the same signed value in session state, and it goes through the same checks.
    """
    cookie = st.context.cookies.get(SESSION_COOKIE)
    if not isinstance(cookie, str) or not cookie:  # AppTest's client has no real cookies
        cookie = st.session_state.get(SESSION_COOKIE)
    try:
        identity = runtime().auth.resolve(cookie)
        if identity is None and sso_providers() and st.user.is_logged_in:
            identity = _sso_identity()
    except ClawdbotError as exc:
        stop_with_error(f"clawdbot cannot check your sign-in: {exc.message}")
    return identity


def sso_providers() -> list[str]:
    """OIDC providers configured for `st.login` in .streamlit/secrets.toml ("" for a single unnamed one)."""
    try:
        section = st.secrets.get("auth")
    except (FileNotFoundError, KeyError, StreamlitAPIException):
        return []
    if not section:
        return []
    named = [name for name, value in section.items() if isinstance(value, Mapping)]
    return named or [""]


def _sso_identity() -> Identity | None:
    """The local account of the person the OIDC provider signed in; the first run records the sign-in."""
    email = st.user.get("email")
    try:
        identity = runtime().auth.external_identity(str(email or ""))
    except SignInRefusedError as exc:
        st.session_state[_SSO_REFUSAL] = exc.message
        return None
    if st.session_state.get(_SSO_RECORDED) != identity.user.name:
        runtime().auth.record_external_sign_in(identity, st.context.ip_address or "")
        st.session_state[_SSO_RECORDED] = identity.user.name
    return identity


def sign_out(identity: Identity) -> None:
    """End the session: ours in the database, or the OIDC provider's through `st.logout`."""
    runtime().auth.sign_out(identity)
    st.session_state.pop(_SSO_RECORDED, None)
    if identity.session_id == EXTERNAL_SESSION:
        st.logout()
    st.rerun()


def require_page(url_path: str) -> Identity:
    """The identity of a user allowed on this page; anyone else sees why not and the page stops."""
    identity = current_identity()
    if identity is None:
        show_signed_out()
        st.stop()
    if not may_use(identity.user, url_path):
        show_not_permitted(url_path, identity)
        st.stop()
    return identity


def show_signed_out(message: str = "You are not signed in.") -> None:
    """Tell the visitor and send the browser to the sign-in page, which sets the session cookie."""
    provider = st.query_params.get("sso")
    if provider is not None and provider in sso_providers():
        st.login(provider or None)
        return
    refusal = st.session_state.pop(_SSO_REFUSAL, None)
    if refusal:
        st.error(f"Single sign-on worked, but {refusal}.")
        if st.button("Sign out of single sign-on"):
            st.logout()
        return
    st.warning(f"{message} Taking you to the sign-in page…")
    st.markdown(f"If nothing happens, [sign in here]({SIGN_IN_PATH}).")
    # A constant script: a full page load is the only way to reach the route that sets an HttpOnly cookie.
    st.html(f"<script>window.location.assign({SIGN_IN_PATH!r});</script>", unsafe_allow_javascript=True)


def open_first_page(page: StreamlitPage) -> None:
    """The page behind "/": switches to the user's first page, which keeps its own URL path."""
    st.switch_page(page)


def show_not_permitted(url_path: str, identity: Identity | None = None) -> None:
    page = PAGES_BY_PATH.get(url_path)
    title = page.title if page else url_path
    if identity is not None and identity.user.must_change_password:
        st.warning(f"Change your one-time password on the Account page before you use the {title} page.")
        return
    st.error(f"Not permitted: your account may not use the {title} page.")
