"""An admin creates an agent through the form in a real browser, and staff chat with it; script and
image-onerror payloads in the system prompt, the message and the model's answer stay inert text.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from clawdbot.models import Agent, AgentVersion
from tests.browser_helpers import LiveServer, sign_in

pytestmark = pytest.mark.browser

PROMPT_PAYLOAD = "Answer briefly. <script>window.__xss = 'prompt'</script>"
ANSWER_PAYLOAD = (
    "Done <img src=x onerror=\"window.__xss='answer'\"> and <script>window.__xss='script'</script>"
)
MESSAGE_PAYLOAD = "<img src=y onerror=\"window.__xss='message'\"> what is new?"


@pytest.fixture(scope="module")
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    live_server.add_user("ada", "admin")
    live_server.add_user("stan", "staff")
    yield live_server


def test_an_admin_creates_an_agent_and_staff_chat_with_it_without_any_payload_running(
    server: LiveServer, page: Page
) -> None:
    sign_in(page, server, "ada", path="/agents")
    page.get_by_label("Name", exact=True).fill("helpdesk")
    page.get_by_label("System prompt").fill(PROMPT_PAYLOAD)
    page.get_by_role("button", name="Create agent").click()
    expect(page.get_by_role("heading", name="helpdesk")).to_be_visible()

    db = server.database()
    try:
        with db.read() as session:
            version = session.execute(
                select(AgentVersion)
                .join(Agent, AgentVersion.agent_id == Agent.id)
                .where(Agent.name == "helpdesk")
            ).scalar_one()
            assert (version.version, version.system_prompt, version.created_by) == (1, PROMPT_PAYLOAD, "ada")
    finally:
        db.dispose()
    # The version history shows the prompt as text.
    expect(page.get_by_text("window.__xss = 'prompt'").first).to_be_attached()

    page.context.clear_cookies()
    server.sim.script(content=ANSWER_PAYLOAD)
    sign_in(page, server, "stan", path="/chat")
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill(MESSAGE_PAYLOAD)
    box.press("Enter")
    last = page.get_by_test_id("stChatMessage").last
    expect(last).to_contain_text("window.__xss='script'")
    expect(last).to_contain_text("onerror")
    expect(page.get_by_test_id("stChatMessage").first).to_contain_text("what is new?")
    assert page.locator("img[src='x'], img[src='y']").count() == 0
    assert page.evaluate("window.__xss") is None
