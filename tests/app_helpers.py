"""Running the Streamlit app in-process with AppTest, signed in as a real user of a real database.

AppTest cannot send cookies, so the harness signs in through `Auth.sign_in` and puts the signed cookie value
in session state, where `ui.session.current_identity` reads it through the same checks as a browser's cookie.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamlit.testing.v1 import AppTest
from streamlit.util import calc_hash

from clawdbot.auth import SESSION_COOKIE
from clawdbot.runtime import Runtime
from tests.ollama_sim import OllamaSimulator

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
PASSWORD = "correct horse battery"


def write_entry(directory: Path) -> Path:
    """A main script that runs app.py from a directory without a `pages/` folder.

    AppTest switches Streamlit's legacy multipage mode on before every run when the main script sits next to a
    `pages/` folder, and then runs a page file without app.py; the server (asgi.py) switches that mode off.
    """
    entry = directory / "app_entry.py"
    entry.write_text(f"import runpy\nrunpy.run_path({str(APP)!r}, run_name='__main__')\n", encoding="utf-8")
    return entry


@dataclass
class AppHarness:
    """The app over one test's runtime (installed as the process's shared runtime by the fixture)."""

    runtime: Runtime
    sim: OllamaSimulator
    entry: Path

    def user(self, name: str, *roles: str, password: str = PASSWORD) -> str:
        """Create a user with its own password (no forced change); returns its name."""
        self.runtime.users.add("admin", name, roles, password)
        return name

    def open(self, name: str | None, page: str | None = None, password: str = PASSWORD) -> AppTest:
        """Run the app as `name` (None: signed out), switched to `page` ("chat", "agents", …) when given."""
        at = AppTest.from_file(str(self.entry), default_timeout=30)
        if name is not None:
            cookie, _ = self.runtime.auth.sign_in(name, password, "127.0.0.1", "AppTest")
            at.session_state[SESSION_COOKIE] = cookie
        at.run()
        if page is not None:
            # As if the browser opened http://host/<page>: st.Page keys a page by the hash of its url_path.
            # (AppTest.switch_page resolves files only, and a refused page is a callable at the same URL.)
            at._page_hash = calc_hash(page)
            at.run()
        return at


def plain(text: Any) -> str:
    """An element's text without the Markdown escapes the pages add around names and messages."""
    return re.sub(r"\\(.)", r"\1", str(text))


def messages(elements: Any) -> list[str]:
    """The plain text of each element (st.error, st.success, …) AppTest found."""
    return [plain(e.value) for e in elements]
