"""The Users page in AppTest, signed in as an admin over a real database: the list, adding a user and resetting
a password (each one-time password shown exactly once), roles, disabling (which signs the user out at once),
and the refusals of the guard rails. Every action is exactly one audit event by the admin who clicked."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from clawdbot.models import Role
from tests.app_helpers import PASSWORD, AppHarness, messages
from tests.helpers import events_after, last_event_id

ADMIN = "boss"


def open_users(harness: AppHarness) -> AppTest:
    harness.user(ADMIN, "admin", "staff")
    at = harness.open(ADMIN, "users")
    assert not at.exception, at.exception
    assert at.title[0].value == "Users"
    return at


def manage(at: AppTest, name: str) -> AppTest:
    return at.selectbox(key="manage_user").select(name).run()


def signed_out(at: AppTest) -> bool:
    return any("not signed in" in str(w.value) for w in at.warning) and not at.title


def test_the_list_shows_roles_state_and_last_sign_in(app_harness: AppHarness) -> None:
    app_harness.user("erin", "staff", "auditor")
    app_harness.user("gone", "staff")
    app_harness.runtime.users.set_disabled("setup", "gone")
    at = open_users(app_harness)
    table = at.dataframe[0].value.set_index("Name")
    assert table.loc["erin", "Roles"] == "auditor, staff" and table.loc["gone", "Status"] == "disabled"
    assert table.loc[ADMIN, "Status"] == "enabled"
    assert table.loc["erin", "Last sign-in"] == "never"
    assert table.loc[ADMIN, "Last sign-in"].endswith(" UTC")  # the harness signed boss in to open the page


def test_add_a_user_and_see_the_one_time_password_once(app_harness: AppHarness) -> None:
    at = open_users(app_harness)
    before = last_event_id(app_harness.runtime.db)
    at.text_input(key="add_name").input("newbie")
    at.multiselect(key="add_roles").select("auditor")
    at.button(key="add_user_submit").click().run()
    assert not at.exception, at.exception

    shown = at.get_by_key("one_time_password")
    (password,) = [c.value for c in shown.code]
    assert "Created newbie." in messages(shown.success)[0]
    user = app_harness.runtime.users.authenticate("newbie", password)
    assert user is not None and user.must_change_password
    assert user.roles == frozenset({Role.STAFF, Role.AUDITOR})
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "user.create", "newbie", {"roles": ["auditor", "staff"]})
    ]
    assert at.text_input(key="add_name").value == ""
    assert "newbie" in at.dataframe[0].value["Name"].tolist()

    at.run()
    assert not at.code and password not in str(at)  # gone on the next run
    assert "users_secret" not in at.session_state


def test_adding_a_bad_or_taken_name_is_refused_at_the_form(app_harness: AppHarness) -> None:
    app_harness.user("erin", "staff")
    at = open_users(app_harness)
    before = last_event_id(app_harness.runtime.db)
    at.text_input(key="add_name").input("erin")
    at.button(key="add_user_submit").click().run()
    assert messages(at.error) == ["a user named 'erin' already exists"]
    at.text_input(key="add_name").input("no spaces allowed")
    at.button(key="add_user_submit").click().run()
    assert messages(at.error)[0].startswith("invalid user name 'no spaces allowed'")
    assert not at.code
    assert events_after(app_harness.runtime.db, before) == []


def test_set_roles(app_harness: AppHarness) -> None:
    app_harness.user("erin", "staff")
    at = manage(open_users(app_harness), "erin")
    before = last_event_id(app_harness.runtime.db)
    at.multiselect(key="roles:erin").select("auditor").unselect("staff")
    at.button(key="save_roles").click().run()
    assert messages(at.success) == ["Roles of erin saved."]
    assert app_harness.runtime.users.get("erin").roles == frozenset({Role.AUDITOR})
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "user.roles", "erin", {"roles": ["auditor"]})
    ]


def test_disabling_signs_the_user_out_at_once_and_enabling_lets_them_sign_in_again(
    app_harness: AppHarness,
) -> None:
    app_harness.user("erin", "staff")
    erin = app_harness.open("erin", "account")
    assert erin.title[0].value == "Account"

    at = manage(open_users(app_harness), "erin")
    before = last_event_id(app_harness.runtime.db)
    at.button(key="disable_user").click().run()
    assert messages(at.success) == ["erin is disabled and signed out everywhere."]
    assert app_harness.runtime.users.get("erin").disabled

    erin.run()  # erin's open browser session, on its next run
    assert signed_out(erin)

    at.button(key="enable_user").click().run()
    assert messages(at.success) == ["erin is enabled again."]
    erin.run()
    assert signed_out(erin)  # the old session stays ended
    assert app_harness.open("erin", "account").title[0].value == "Account"
    assert [(a, b, c) for a, b, c, _ in events_after(app_harness.runtime.db, before)] == [
        (ADMIN, "user.disable", "erin"),
        (ADMIN, "user.enable", "erin"),
        ("erin", "auth.sign_in", "erin"),
    ]


def test_reset_password_shows_a_new_one_time_password_once(app_harness: AppHarness) -> None:
    app_harness.user("erin", "staff")
    erin = app_harness.open("erin", "account")
    at = manage(open_users(app_harness), "erin")
    before = last_event_id(app_harness.runtime.db)
    at.button(key="reset_password").click().run()
    shown = at.get_by_key("one_time_password")
    (password,) = [c.value for c in shown.code]
    assert "Reset the password of erin." in messages(shown.success)[0]
    assert app_harness.runtime.users.authenticate("erin", PASSWORD) is None
    fresh = app_harness.runtime.users.authenticate("erin", password)
    assert fresh is not None and fresh.must_change_password
    assert events_after(app_harness.runtime.db, before) == [
        (ADMIN, "user.password", "erin", {"one_time": True})
    ]
    erin.run()
    assert signed_out(erin)
    at.run()
    assert not at.code


def test_guard_rails_refuse_with_a_clear_message_and_no_event(app_harness: AppHarness) -> None:
    at = manage(open_users(app_harness), ADMIN)
    before = last_event_id(app_harness.runtime.db)

    at.button(key="disable_user").click().run()
    assert messages(at.error) == ["you cannot disable your own account: another admin must do it"]

    at.multiselect(key=f"roles:{ADMIN}").unselect("admin")
    at.button(key="save_roles").click().run()
    assert messages(at.error) == ["you cannot remove your own admin role: another admin must do it"]
    assert sorted(at.multiselect(key=f"roles:{ADMIN}").value) == ["admin", "staff"]  # put back

    at.button(key="reset_password").click().run()
    assert messages(at.error) == ["change your own password on the Account page, not by a reset"]
    assert not at.code

    me = app_harness.runtime.users.get(ADMIN)
    assert not me.disabled and me.roles == frozenset({Role.ADMIN, Role.STAFF})
    assert events_after(app_harness.runtime.db, before) == []
    at.run()
    assert not at.error  # a refusal is said once
