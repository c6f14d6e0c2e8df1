"""The users page's rules, in the core: nobody disables or demotes themselves, the last enabled admin stays,
disabling ends sessions for good, resets are one-time, and each admin action is exactly one event by its admin."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from clawdbot.auth import Auth
from clawdbot.db import Database
from clawdbot.errors import UsageError
from clawdbot.models import Event, Role, utcnow
from clawdbot.users import Users
from tests.helpers import events_after, last_event_id

PASSWORD = "correct horse battery"
SECRET = "s" * 40


@pytest.fixture
def users(db: Database) -> Users:
    users = Users(db)
    users.add("setup", "boss", ["admin", "staff"], PASSWORD)
    users.add("setup", "erin", ["staff"], PASSWORD)
    return users


def test_nobody_disables_themselves_or_drops_their_own_admin_role(db: Database, users: Users) -> None:
    users.add("setup", "second", ["admin"], PASSWORD)  # so the last-admin rule is not what refuses
    before = last_event_id(db)
    with pytest.raises(UsageError, match="you cannot disable your own account"):
        users.set_disabled("boss", "boss")
    with pytest.raises(UsageError, match="you cannot remove your own admin role"):
        users.set_roles("boss", "boss", ["staff"])
    assert events_after(db, before) == []
    assert users.get("boss").roles == frozenset({Role.ADMIN, Role.STAFF}) and not users.get("boss").disabled

    users.set_roles("boss", "boss", ["admin"])  # keeping admin is allowed
    assert events_after(db, before) == [("boss", "user.roles", "boss", {"roles": ["admin"]})]


def test_the_last_enabled_admin_is_neither_disabled_nor_demoted(db: Database, users: Users) -> None:
    users.add("setup", "retired", ["admin"], PASSWORD)
    users.set_disabled("boss", "retired")  # a disabled admin does not count
    before = last_event_id(db)
    with pytest.raises(UsageError, match="boss is the last enabled admin: make another user an admin first"):
        users.set_disabled("cli:root", "boss")
    with pytest.raises(UsageError, match="boss is the last enabled admin"):
        users.set_roles("cli:root", "boss", ["staff"])
    assert events_after(db, before) == []

    users.set_roles("boss", "erin", ["staff", "admin"])
    users.set_roles("erin", "boss", ["staff"])
    users.set_disabled("erin", "boss")
    assert [(a, b, c) for a, b, c, _ in events_after(db, before)] == [
        ("boss", "user.roles", "erin"),
        ("erin", "user.roles", "boss"),
        ("erin", "user.disable", "boss"),
    ]
    with pytest.raises(UsageError, match="erin is the last enabled admin"):
        users.set_roles("cli:root", "erin", ["staff"])


def test_two_admins_demoting_each_other_at_once_leave_one_admin(db: Database, users: Users) -> None:
    users.add("setup", "other", ["admin"], PASSWORD)
    for _ in range(8):  # a race: several rounds, so that a missing lock shows
        users.set_roles("setup", "boss", ["admin"])
        users.set_roles("setup", "other", ["admin"])
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def demote(actor: str, target: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait()
            try:
                Users(db).set_roles(actor, target, ["staff"])
                outcomes.append("ok")
            except UsageError as exc:
                outcomes.append(exc.message)

        threads = [
            threading.Thread(target=demote, args=("cli:a", "boss", barrier, outcomes)),
            threading.Thread(target=demote, args=("cli:b", "other", barrier, outcomes)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = [o for o in outcomes if o != "ok"]
        assert len(outcomes) == 2 and len(refused) == 1 and "is the last enabled admin" in refused[0]
        assert len([u for u in users.all() if u.has(Role.ADMIN) and not u.disabled]) == 1


def test_disabling_ends_every_session_for_good(db: Database, users: Users) -> None:
    auth = Auth(db, users, SECRET)
    try:
        first, _ = auth.sign_in("erin", PASSWORD)
        second, _ = auth.sign_in("erin", PASSWORD)
        assert auth.resolve(first) is not None and auth.resolve(second) is not None
        before = last_event_id(db)
        users.set_disabled("boss", "erin")
        assert auth.resolve(first) is None and auth.resolve(second) is None
        users.set_disabled("boss", "erin", disabled=False)
        # Enabled again, but the old cookies stay dead: erin signs in anew.
        assert auth.resolve(first) is None and auth.resolve(second) is None
        assert auth.resolve(auth.sign_in("erin", PASSWORD)[0]) is not None
        with pytest.raises(UsageError, match="erin is already enabled"):
            users.set_disabled("boss", "erin", disabled=False)
        assert [(a, b, c) for a, b, c, _ in events_after(db, before)] == [
            ("boss", "user.disable", "erin"),
            ("boss", "user.enable", "erin"),
            ("erin", "auth.sign_in", "erin"),
        ]
    finally:
        auth.close()


def test_a_reset_is_one_time_ends_sessions_and_is_not_for_oneself(db: Database, users: Users) -> None:
    auth = Auth(db, users, SECRET)
    try:
        cookie, _ = auth.sign_in("erin", PASSWORD)
        before = last_event_id(db)
        password = users.reset_password("boss", "erin")
        assert auth.resolve(cookie) is None
        assert users.authenticate("erin", PASSWORD) is None
        fresh = users.authenticate("erin", password)
        assert fresh is not None and fresh.must_change_password
        with pytest.raises(UsageError, match="Account page"):
            users.reset_password("boss", "boss")
        assert events_after(db, before) == [("boss", "user.password", "erin", {"one_time": True})]
    finally:
        auth.close()


def test_activity_shows_the_last_sign_in_and_the_last_use(db: Database, users: Users) -> None:
    auth = Auth(db, users, SECRET)
    try:
        started = utcnow()
        auth.sign_in("erin", PASSWORD)
        auth.sign_in("erin", PASSWORD)
        with pytest.raises(Exception, match="wrong user name or password"):
            auth.sign_in("boss", "not the password")
        activity = {entry.user.name: entry for entry in users.activity()}
        assert list(activity) == ["boss", "erin"]
        erin = activity["erin"]
        assert erin.last_sign_in is not None and erin.last_seen is not None
        assert started - timedelta(seconds=1) <= erin.last_sign_in <= utcnow()
        with db.read() as session:
            latest = session.scalar(
                select(func.max(Event.at)).where(Event.action == "auth.sign_in", Event.target == "erin")
            )
        assert erin.last_sign_in == latest
        # A failed attempt is not a sign-in.
        assert (activity["boss"].last_sign_in, activity["boss"].last_seen) == (None, None)
    finally:
        auth.close()
