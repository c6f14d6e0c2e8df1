"""In a real browser: sign-in, the HttpOnly cookie surviving a reload, sign-out, and pages by role."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.browser_helpers import PASSWORD, LiveServer, sign_in


@pytest.fixture(scope="module")
def users(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("sam", "staff")
    live_server.add_user("ada", "admin")
    live_server.add_user("aud", "auditor")
    yield live_server


def test_the_first_visit_of_a_fresh_server_registers_only_permitted_pages(
    users: LiveServer, page: Page
) -> None:
    # The first script run of a process: Streamlit's legacy pages/ mode must not register every page file.
    sign_in(page, users, "sam", path="/agents")
    expect(page.get_by_text("Not permitted")).to_be_visible()
    expect(page.get_by_role("heading", name="Agents")).to_have_count(0)
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav).to_contain_text("Chat")
    expect(nav).not_to_contain_text("Agents")
    expect(nav).not_to_contain_text("Users")


def test_sign_in_survives_a_reload_and_the_cookie_is_httponly(users: LiveServer, page: Page) -> None:
    page.goto(users.url + "/account")
    expect(page).to_have_url(users.url + "/signin?next=%2Faccount")
    page.get_by_label("User name").fill("ada")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("wrong user name or password")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Account")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "clawdbot_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert "clawdbot_session" not in page.evaluate("document.cookie")
    page.reload()
    expect(page.get_by_role("heading", name="Account")).to_be_visible()
    expect(page.get_by_test_id("stSidebar")).to_contain_text("Signed in as ada")
    nav = page.get_by_test_id("stSidebarNav")
    for title in ("Agents", "Users", "Account"):
        expect(nav).to_contain_text(title)


def test_sign_out_returns_to_the_sign_in_page(users: LiveServer, page: Page) -> None:
    sign_in(page, users, "aud")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    page.goto(users.url + "/account")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    result = users.cli("audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
