"""Which role may use which page of the web app: the one table the navigation and every page check.

A page a user may not use is never registered in the navigation, and each page checks again on every run, so
neither a hidden link nor a typed URL reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

from clawdbot.models import Role
from clawdbot.users import UserInfo

ANY_ROLE = frozenset(Role)


@dataclass(frozen=True)
class PageAccess:
    """A page's URL path (as in http://host/chat), its title and the roles that may use it."""

    url_path: str
    title: str
    icon: str
    roles: frozenset[Role]

    @property
    def script(self) -> str:
        """The page's file in `pages/`: its URL path as a module name ("api-keys" is pages/api_keys.py)."""
        return f"{self.url_path.replace('-', '_')}.py"


PAGES: tuple[PageAccess, ...] = (
    PageAccess("chat", "Chat", ":material/chat:", frozenset({Role.STAFF})),
    PageAccess("agents", "Agents", ":material/smart_toy:", frozenset({Role.ADMIN})),
    PageAccess("users", "Users", ":material/group:", frozenset({Role.ADMIN})),
    PageAccess("dashboard", "Dashboard", ":material/monitoring:", frozenset({Role.ADMIN})),
    PageAccess("audit", "Audit", ":material/policy:", frozenset({Role.AUDITOR})),
    PageAccess("account", "Account", ":material/person:", ANY_ROLE),
    PageAccess("api-keys", "API keys", ":material/key:", ANY_ROLE),
)
PAGES_BY_PATH = {page.url_path: page for page in PAGES}


def may_use(user: UserInfo, url_path: str) -> bool:
    """Whether `user` may open the page; a user who must change a one-time password may open only Account."""
    page = PAGES_BY_PATH.get(url_path)
    if page is None or user.disabled:
        return False
    if user.must_change_password and url_path != "account":
        return False
    return bool(page.roles & user.roles)


def pages_for(user: UserInfo) -> list[PageAccess]:
    """The pages `user` may use, in menu order."""
    return [page for page in PAGES if may_use(user, page.url_path)]
