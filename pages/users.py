"""Users page (admins): who may sign in and with which roles; add, change roles, disable, reset passwords.

The rules (nobody disables or demotes themselves, the last enabled admin stays) live in clawdbot.users; this page
shows their refusals. Actions run in button callbacks, before the page is drawn, so the page below already shows
their result. A one-time password is kept in session state for exactly one run: shown once, gone on the next.
"""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from clawdbot.errors import ClawdbotError
from clawdbot.models import Role
from clawdbot.users import UserActivity, UserInfo, Users
from ui.markdown import escape
from ui.session import require_page, runtime

ROLE_NAMES = [role.value for role in Role]
# Session-state keys of what an action leaves for the next run to show, once.
SECRET = "users_secret"  # noqa: S105 (a session-state key, not a secret)
NOTICE = "users_notice"
PROBLEM = "users_problem"

identity = require_page("users")
st.title("Users")
users: Users = runtime().users
actor = identity.user.name


def _done(message: str) -> None:
    st.session_state[NOTICE] = message


def _refused(where: str, exc: ClawdbotError) -> None:
    st.session_state[PROBLEM] = (where, exc.message)


def _problem_at(where: str) -> None:
    """Show the refusal of the action made from `where`, there."""
    problem = st.session_state.get(PROBLEM)
    if problem is not None and problem[0] == where:
        st.error(escape(problem[1]))


def _roles_key(name: str) -> str:
    return f"roles:{name}"


def add_user() -> None:
    name = str(st.session_state.get("add_name", "")).strip()
    try:
        info, password = users.add(actor, name, st.session_state.get("add_roles", []))
    except ClawdbotError as exc:
        _refused("add", exc)
        return
    st.session_state[SECRET] = (info.name, password, "created")
    st.session_state["add_name"] = ""


def save_roles(name: str) -> None:
    try:
        users.set_roles(actor, name, st.session_state.get(_roles_key(name), []))
    except ClawdbotError as exc:
        _refused("manage", exc)
        st.session_state[_roles_key(name)] = sorted(r.value for r in users.get(name).roles)
        return
    _done(f"Roles of {escape(name)} saved.")


def set_disabled(name: str, disabled: bool) -> None:
    try:
        users.set_disabled(actor, name, disabled)
    except ClawdbotError as exc:
        _refused("manage", exc)
        return
    shown = escape(name)
    _done(f"{shown} is disabled and signed out everywhere." if disabled else f"{shown} is enabled again.")


def reset_password(name: str) -> None:
    try:
        password = users.reset_password(actor, name)
    except ClawdbotError as exc:
        _refused("manage", exc)
        return
    st.session_state[SECRET] = (name, password, "reset")


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M} UTC" if at is not None else "never"


def _row(entry: UserActivity) -> dict[str, str]:
    user = entry.user
    return {
        "Name": user.name,
        "Roles": ", ".join(sorted(r.value for r in user.roles)),
        "Status": "disabled" if user.disabled else "enabled",
        "Password": "one-time" if user.must_change_password else "own",
        "Last sign-in": _when(entry.last_sign_in),
        "Last seen": _when(entry.last_seen),
    }


def manage(user: UserInfo) -> None:
    name = user.name
    # Seeded through session state, not `default`, so a refused change can put the stored roles back.
    st.session_state.setdefault(_roles_key(name), sorted(r.value for r in user.roles))
    st.multiselect(
        "Roles",
        ROLE_NAMES,
        key=_roles_key(name),
        help="staff: chat; admin: agents and users; auditor: the audit log.",
    )
    with st.container(horizontal=True):
        st.button("Save roles", key="save_roles", on_click=save_roles, args=(name,))
        if user.disabled:
            st.button("Enable", key="enable_user", on_click=set_disabled, args=(name, False))
        else:
            st.button("Disable", key="disable_user", on_click=set_disabled, args=(name, True))
        st.button(
            "Reset password",
            key="reset_password",
            on_click=reset_password,
            args=(name,),
            help="Gives a new one-time password and ends the user's sign-ins.",
        )
    _problem_at("manage")


secret = st.session_state.pop(SECRET, None)
if secret is not None:
    name, password, what = secret
    verb = "Created" if what == "created" else "Reset the password of"
    with st.container(border=True, key="one_time_password"):
        st.success(
            f"{verb} {escape(name)}. Their one-time password is below: it is shown only now, so pass it on. "
            "They choose their own password when they first sign in."
        )
        st.code(password, language=None)
notice = st.session_state.pop(NOTICE, None)
if notice is not None:
    st.success(notice)

everyone = users.activity()
st.dataframe([_row(entry) for entry in everyone], hide_index=True)

st.subheader("Add a user")
with st.form("add_user"):
    st.text_input("User name", key="add_name", max_chars=64, help="Letters, digits, '_', '.', '@' or '-'.")
    st.multiselect("Roles", ROLE_NAMES, default=[Role.STAFF.value], key="add_roles")
    st.form_submit_button("Add user", key="add_user_submit", on_click=add_user)
_problem_at("add")

st.subheader("Change a user")
names = [entry.user.name for entry in everyone]
if names:
    picked = st.selectbox("User", names, key="manage_user")
    chosen = next(entry.user for entry in everyone if entry.user.name == picked)
    manage(chosen)

st.session_state.pop(PROBLEM, None)
