"""Sign-in state and roles decide which pages exist: checked for every role and every page."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from clawdbot.access import PAGES, may_use
from clawdbot.auth import SESSION_COOKIE
from clawdbot.models import Event, Role
from tests.app_helpers import APP, PASSWORD, AppHarness

ROLE_SETS = [("staff",), ("admin",), ("auditor",), ("staff", "admin", "auditor")]


def test_every_page_in_the_table_has_its_file_and_every_file_a_row() -> None:
    pages_dir = APP.with_name("pages")
    assert sorted(page.script for page in PAGES) == sorted(p.name for p in pages_dir.glob("*.py"))


@pytest.mark.parametrize("roles", ROLE_SETS, ids="+".join)
def test_every_page_opens_only_for_its_roles(app_harness: AppHarness, roles: tuple[str, ...]) -> None:
    name = app_harness.user("u_" + "_".join(roles), *roles)
    user = app_harness.runtime.users.get(name)
    for page in PAGES:
        at = app_harness.open(name, page.url_path)
        assert not at.exception, at.exception
        refused = [e.value for e in at.error if "Not permitted" in str(e.value)]
        if page.roles & {Role(r) for r in roles}:
            assert may_use(user, page.url_path)
            assert not refused, f"{page.url_path} refused to {roles}"
            assert at.title and at.title[0].value == page.title
        else:
            assert not may_use(user, page.url_path)
            assert refused, f"{page.url_path} shown to {roles}"
            assert not at.title, f"{page.url_path} rendered its content for {roles}"


def test_signed_out_visitor_sees_only_the_way_to_sign_in(app_harness: AppHarness) -> None:
    at = app_harness.open(None)
    assert not at.exception
    assert any("not signed in" in str(w.value) for w in at.warning)
    assert not at.title
    assert not at.sidebar.button


def event_actions(harness: AppHarness) -> list[str]:
    with harness.runtime.db.read() as session:
        return list(session.scalars(select(Event.action).order_by(Event.id)))


def test_signing_out_ends_the_session(app_harness: AppHarness) -> None:
    app_harness.user("carol", "staff")
    at = app_harness.open("carol", "account")
    assert at.title[0].value == "Account"
    at.button(key="sign_out").click().run()
    assert any("not signed in" in str(w.value) for w in at.warning)
    assert not at.title
    assert event_actions(app_harness)[-2:] == ["auth.sign_in", "auth.sign_out"]


def test_a_forged_cookie_is_signed_out(app_harness: AppHarness) -> None:
    app_harness.user("dave", "admin")
    cookie, _ = app_harness.runtime.auth.sign_in("dave", PASSWORD)
    payload, _, signature = cookie.rpartition(".")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[SESSION_COOKIE] = payload + "." + signature[::-1]
    at.run()
    assert any("not signed in" in str(w.value) for w in at.warning)
    assert not at.title


def test_a_disabled_user_is_signed_out_on_the_next_run(app_harness: AppHarness) -> None:
    app_harness.user("erin", "staff")
    at = app_harness.open("erin", "account")
    assert at.title[0].value == "Account"
    app_harness.runtime.users.set_disabled("admin", "erin")
    at.run()
    assert any("not signed in" in str(w.value) for w in at.warning)


def test_a_one_time_password_allows_only_the_account_page(app_harness: AppHarness) -> None:
    _, one_time = app_harness.runtime.users.add("admin", "fred", ["staff"])
    at = app_harness.open("fred", "chat", password=one_time)
    assert any("Change your one-time password" in str(w.value) for w in at.warning)
    assert not at.title
    at = app_harness.open("fred", "account", password=one_time)
    at.text_input[0].input(one_time)
    at.text_input[1].input("my own long password")
    at.text_input[2].input("my own long password")
    at.form_submit_button[0].click().run()
    assert not at.error
    assert not app_harness.runtime.users.get("fred").must_change_password
    at.run()  # the same session stays signed in and now reaches the other pages
    at = app_harness.open("fred", "chat", password="my own long password")
    assert at.title and at.title[0].value == "Chat"


OIDC_SECRETS = {
    "redirect_uri": "http://127.0.0.1:8501/oauth2callback",
    "cookie_secret": "a" * 40,
    "client_id": "clawdbot",
    "client_secret": "secret",
    "server_metadata_url": "https://idp.example/.well-known/openid-configuration",
}


def sso_app(harness: AppHarness, email: str) -> AppTest:
    at = AppTest.from_file(str(harness.entry), default_timeout=30)
    at.secrets["auth"] = OIDC_SECRETS
    at.user = {"is_logged_in": True, "email": email}
    return at.run()


def test_single_sign_on_signs_in_the_local_account_of_that_email(app_harness: AppHarness) -> None:
    app_harness.user("jane@corp.example", "auditor")
    at = sso_app(app_harness, "jane@corp.example")
    assert not at.exception
    assert "Signed in as **jane@corp.example**" in at.sidebar.caption[0].value
    assert at.title[0].value == "Audit"  # an auditor's first page
    at.run()
    with app_harness.runtime.db.read() as session:
        details = list(session.scalars(select(Event.details).where(Event.action == "auth.sign_in")))
    assert len(details) == 1 and '"method":"oidc"' in details[0].replace(" ", "")


def test_single_sign_on_without_an_account_or_disabled_is_refused(app_harness: AppHarness) -> None:
    at = sso_app(app_harness, "stranger@corp.example")
    assert any("no clawdbot account for stranger@corp.example" in str(e.value) for e in at.error)
    assert not at.title
    app_harness.user("gone@corp.example", "staff")
    app_harness.runtime.users.set_disabled("admin", "gone@corp.example")
    at = sso_app(app_harness, "gone@corp.example")
    assert any("disabled" in str(e.value) for e in at.error)
    assert not at.title
