"""API keys: created once and stored hashed, listed without the key, revoked, checked on every use; the CLI and
the API keys page over real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from clawdbot import migrate
from clawdbot.api_keys import (
    MAX_ACTIVE_KEYS_PER_USER,
    TOUCH_EVERY_S,
    ApiKeyRefusedError,
    ApiKeys,
    api_keys_of,
)
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import ApiKey, Event, User
from clawdbot.users import Users
from tests.app_helpers import AppHarness
from tests.cli_helpers import run_cli

PASSWORD = "correct horse battery"


@pytest.fixture
def users(db: Database) -> Users:
    users = Users(db)
    users.add("root", "alice", ["staff"], PASSWORD)
    users.add("root", "bob", ["staff"], PASSWORD)
    users.add("root", "ada", ["admin"], PASSWORD)
    return users


def events(db: Database) -> list[tuple[str, str, str, dict[str, object]]]:
    with db.read() as session:
        rows = session.execute(
            select(Event.actor, Event.action, Event.target, Event.details)
            .where(Event.action.like("api_key.%"))
            .order_by(Event.id)
        ).all()
    return [(actor, action, target, json.loads(details)) for actor, action, target, details in rows]


def test_a_key_is_returned_once_and_only_its_hash_is_stored(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    created = keys.create("alice", "alice", "  nightly   report ")
    secret = created.secret
    assert secret.startswith("cb-") and len(secret) == 46
    assert created.info.label == "nightly report"
    assert created.info.shown == secret[:10] + "…"
    with db.read() as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
    stored = " ".join(str(v) for v in vars(row).values())
    assert secret not in stored and secret[10:] not in stored
    assert events(db) == [("alice", "api_key.create", "alice", {"key_id": row.id, "label": "nightly report"})]
    # two keys never collide, and listing never shows a key
    other = keys.create("alice", "alice")
    assert other.secret != secret
    assert [k.id for k in keys.all("alice")] == [other.info.id, created.info.id]


def test_authentication_names_the_user_and_refuses_revoked_keys_at_once(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    secret = keys.create("root", "alice").secret
    assert keys.authenticate(secret, "10.0.0.7").name == "alice"
    info = keys.all("alice")[0]
    assert info.last_used_at is not None and info.last_used_ip == "10.0.0.7"

    revoked = keys.revoke("root", info.id)
    assert revoked.revoked_by == "root" and not revoked.active
    with pytest.raises(ApiKeyRefusedError, match="revoked"):
        keys.authenticate(secret)
    with pytest.raises(UsageError, match="already revoked"):
        keys.revoke("root", info.id)
    assert [e[1] for e in events(db)] == ["api_key.create", "api_key.revoke"]


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "cb-",
        "sk-" + "a" * 43,
        "cb-" + "a" * 42,
        "cb-" + "a" * 43,
        "cb-" + "a" * 42 + "!",
        "cb-" + "a" * 44,
    ],
)
def test_malformed_and_unknown_keys_are_refused(db: Database, users: Users, secret: str) -> None:
    ApiKeys(db).create("root", "alice")
    with pytest.raises(ApiKeyRefusedError, match="not valid"):
        ApiKeys(db).authenticate(secret)


def test_a_disabled_user_s_keys_stop_at_once_and_come_back_when_enabled(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    secret = keys.create("root", "alice").secret
    keys.authenticate(secret)
    users.set_disabled("ada", "alice")
    with pytest.raises(ApiKeyRefusedError, match="alice of this API key is disabled"):
        keys.authenticate(secret)
    with pytest.raises(UsageError, match="disabled"):
        keys.create("root", "alice")
    users.set_disabled("ada", "alice", disabled=False)
    assert keys.authenticate(secret).name == "alice"


def test_last_use_is_written_at_most_once_a_minute_per_key(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    secret = keys.create("root", "alice").secret
    keys.authenticate(secret, "10.0.0.1")
    first = keys.all("alice")[0].last_used_at
    keys.authenticate(secret, "10.0.0.2")
    again = keys.all("alice")[0]
    assert again.last_used_at == first and again.last_used_ip == "10.0.0.1"
    # a minute later (the throttle's clock moved back instead of waiting) the next use is written
    with keys._touch_lock:
        keys._touched = {k: v - TOUCH_EVERY_S - 1 for k, v in keys._touched.items()}
    keys.authenticate(secret, "10.0.0.3")
    assert keys.all("alice")[0].last_used_ip == "10.0.0.3"


def test_people_revoke_their_own_keys_and_admins_everyone_s(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    alice_key = keys.create("alice", "alice").info
    bob_key = keys.create("bob", "bob").info
    alice, ada = users.get("alice"), users.get("ada")
    assert [k.user for k in keys.visible_to(alice)] == ["alice"]
    assert {k.user for k in keys.visible_to(ada)} == {"alice", "bob"}
    with pytest.raises(NotFoundError, match=f"you have no API key with id {bob_key.id}"):
        keys.revoke_as(alice, bob_key.id)
    assert keys.revoke_as(alice, alice_key.id).revoked_by == "alice"
    assert keys.revoke_as(ada, bob_key.id).revoked_by == "ada"
    with pytest.raises(NotFoundError, match="there is no API key with id 999"):
        keys.revoke("root", 999)


def test_keys_are_limited_per_user_and_labels_in_length(db: Database, users: Users) -> None:
    keys = ApiKeys(db)
    with pytest.raises(UsageError, match="longer than 100"):
        keys.create("alice", "alice", "x" * 101)
    with pytest.raises(NotFoundError, match="no user named 'nobody'"):
        keys.create("root", "nobody")
    made = [keys.create("alice", "alice").info for _ in range(MAX_ACTIVE_KEYS_PER_USER)]
    with pytest.raises(UsageError, match=f"already has {MAX_ACTIVE_KEYS_PER_USER} active keys"):
        keys.create("alice", "alice")
    keys.revoke("alice", made[0].id)
    keys.create("alice", "alice")
    assert api_keys_of(db) is api_keys_of(db)


def test_deleting_a_user_deletes_their_keys(db: Database, users: Users) -> None:
    """The foreign key cascades, so no key outlives its user row (users are disabled, not deleted, in the app)."""
    keys = ApiKeys(db)
    keys.create("root", "bob")
    with db.write() as session:
        session.execute(delete(User).where(User.name == "bob"))
    assert keys.all("bob") == []
    assert keys.all() == []


def test_the_cli_creates_lists_and_revokes_keys(tmp_path: Path, workdir: Path) -> None:
    """Real `clawdbot` processes on a SQLite file (the key store itself is tested on both databases above)."""
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    db = Database(db_url)
    migrate.upgrade(db)
    Users(db).add("root", "alice", ["staff"], PASSWORD)
    created = run_cli(["key", "create", "--user", "alice", "--label", "ci job"], db_url, workdir)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("cb-") and "shown only this once" in created.stderr
    assert ApiKeys(db).authenticate(secret).name == "alice"

    listed = run_cli(["key", "list", "--user", "alice"], db_url, workdir)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    key_id, user, shown, label, state, used = line.split("\t")
    assert (user, shown, label, state) == ("alice", secret[:10] + "…", "ci job", "active")
    assert used.endswith("Z") and secret not in listed.stdout

    revoked = run_cli(["key", "revoke", key_id], db_url, workdir)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked API key {key_id}" in revoked.stdout
    assert ApiKeys(db).all("alice")[0].revoked_at is not None
    actor, action, target, _ = events(db)[-1]
    assert actor.startswith("cli:") and (action, target) == ("api_key.revoke", "alice")

    again = run_cli(["key", "revoke", key_id], db_url, workdir)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already revoked" in again.stderr
    missing = run_cli(["key", "list", "--user", "nobody"], db_url, workdir)
    assert missing.returncode == 2 and "no user named 'nobody'" in missing.stderr
    db.dispose()


def test_the_page_shows_a_new_key_once_and_revokes_it(app_harness: AppHarness) -> None:
    app_harness.user("alice", "staff")
    at = app_harness.open("alice", "api-keys")
    assert not at.exception and at.title[0].value == "API keys"
    assert at.info[0].value == "No keys yet."
    at.text_input[0].input("<b>report</b>")
    at.button[0].click().run()
    (shown,) = at.code
    secret = shown.value
    assert ApiKeys(app_harness.runtime.db).authenticate(secret).name == "alice"
    assert "shown only this once" in at.success[0].value
    table = at.dataframe[0].value
    assert list(table["label"]) == ["<b>report</b>"] and secret not in table.to_string()
    at.run()  # the next run no longer shows the key
    assert not at.code

    at.button[1].click().run()  # revoke the one active key
    assert "Revoked key" in at.success[0].value
    with pytest.raises(ApiKeyRefusedError, match="revoked"):
        ApiKeys(app_harness.runtime.db).authenticate(secret)


def test_admins_see_and_revoke_everyone_s_keys_on_the_page(app_harness: AppHarness) -> None:
    app_harness.user("alice", "staff")
    app_harness.user("ada", "admin")
    keys = ApiKeys(app_harness.runtime.db)
    alice_key = keys.create("alice", "alice", "alice's script")
    at = app_harness.open("ada", "api-keys")
    assert at.subheader[0].value == "All keys"
    assert list(at.dataframe[0].value["user"]) == ["alice"]
    at.button[1].click().run()
    with pytest.raises(ApiKeyRefusedError, match="revoked"):
        keys.authenticate(alice_key.secret)
    assert keys.all("alice")[0].revoked_by == "ada"
    # a staff user sees only their own keys, and no user column
    at = app_harness.open("alice", "api-keys")
    assert at.subheader[0].value == "Your keys" and "user" not in at.dataframe[0].value.columns


def test_the_page_needs_a_sign_in(app_harness: AppHarness) -> None:
    at = app_harness.open(None, "api-keys")
    assert not at.title or at.title[0].value != "API keys"
    assert any("not signed in" in w.value for w in at.warning)
