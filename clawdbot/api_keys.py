"""API keys for the HTTP API: one user's credential for scripts, shown once, stored as a hash, revocable.

A key is `cb-` and 32 random bytes (`secrets.token_urlsafe`). Only its sha256 is kept. A password needs a slow,
salted hash because people choose guessable ones; a key has 256 bits of entropy, so no search over its space is
possible however fast the hash, and a fast unsalted hash lets every request find its key by an indexed lookup
instead of checking a slow hash against every key. The first characters (`prefix`) are kept in clear so people
can tell their keys apart.

Every request checks the key and its user again in the database, so a revoked key or a disabled user is refused
at once (enabling the user again brings their unrevoked keys back; revoke them to end them for good). Creating
and revoking are events in the audit chain; the last use is a hint for people, written at most once a minute.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, func, select, update

from clawdbot.audit import append_event
from clawdbot.db import Database
from clawdbot.errors import ClawdbotError, NotFoundError, UsageError
from clawdbot.models import ApiKey, Role, User, utcnow
from clawdbot.users import UserInfo

KEY_PREFIX = "cb-"
# "cb-" and 7 characters of the random part: about 42 of its 256 bits, enough to tell keys apart.
SHOWN_CHARS = 10
MAX_LABEL_CHARS = 100
MAX_ACTIVE_KEYS_PER_USER = 20
# Last use is a hint for people, not a security control: writing it on every request would be waste.
TOUCH_EVERY_S = 60.0
_KEY_SHAPE = re.compile(r"^cb-[A-Za-z0-9_-]{43}$")
_KEY_LOOKUP = (
    select(
        ApiKey.id,
        ApiKey.revoked_at,
        User.id,
        User.name,
        User.roles,
        User.disabled,
        User.must_change_password,
    )
    .join(User, User.id == ApiKey.user_id)
    .where(ApiKey.key_hash == bindparam("key_hash"))
)


class ApiKeyRefusedError(ClawdbotError):
    """A request's API key does not admit it; the message says why in words its holder can act on."""


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as people see it: never the key itself."""

    id: int
    user: str
    label: str
    prefix: str
    created_at: datetime
    created_by: str
    last_used_at: datetime | None
    last_used_ip: str
    revoked_at: datetime | None
    revoked_by: str

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def shown(self) -> str:
        """How the key is named in lists: its first characters and an ellipsis."""
        return f"{self.prefix}…"

    @classmethod
    def of(cls, key: ApiKey, user: str) -> ApiKeyInfo:
        return cls(
            key.id,
            user,
            key.label,
            key.prefix,
            key.created_at,
            key.created_by,
            key.last_used_at,
            key.last_used_ip,
            key.revoked_at,
            key.revoked_by,
        )


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: `secret` exists only here and is shown once."""

    info: ApiKeyInfo
    secret: str


def manages_all_keys(user: UserInfo) -> bool:
    """Admins see and revoke every user's keys (to cut off a leaked one); everyone else only their own."""
    return Role.ADMIN in user.roles and not user.disabled


def _clean_label(label: str) -> str:
    label = " ".join(label.split())
    if len(label) > MAX_LABEL_CHARS:
        raise UsageError(f"the label is longer than {MAX_LABEL_CHARS} characters: shorten it")
    return label


class ApiKeys:
    """Creating, listing, revoking and checking API keys."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._touched: dict[int, float] = {}
        self._touch_lock = threading.Lock()

    def create(self, actor: str, user: str, label: str = "") -> NewApiKey:
        """A new key for `user`; the returned secret is the only copy there will ever be."""
        label = _clean_label(label)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.db.write() as session:
            owner = session.scalar(select(User).where(User.name == user))
            if owner is None:
                raise NotFoundError(f"there is no user named {user!r}")
            if owner.disabled:
                raise UsageError(f"{user} is disabled: enable the user before creating a key")
            active = session.scalar(
                select(func.count(ApiKey.id)).where(ApiKey.user_id == owner.id, ApiKey.revoked_at.is_(None))
            )
            if (active or 0) >= MAX_ACTIVE_KEYS_PER_USER:
                raise UsageError(
                    f"{user} already has {MAX_ACTIVE_KEYS_PER_USER} active keys: revoke one before creating another"
                )
            key = ApiKey(
                user_id=owner.id,
                label=label,
                prefix=secret[:SHOWN_CHARS],
                key_hash=hash_key(secret),
                created_at=utcnow(),
                created_by=actor,
                last_used_ip="",
                revoked_by="",
            )
            session.add(key)
            session.flush()
            append_event(
                session.connection(), actor, "api_key.create", user, {"key_id": key.id, "label": label}
            )
            return NewApiKey(ApiKeyInfo.of(key, owner.name), secret)

    def all(self, user: str | None = None, *, include_revoked: bool = True) -> list[ApiKeyInfo]:
        """Keys of `user` (every user's when None), newest first."""
        query = select(ApiKey, User.name).join(User, User.id == ApiKey.user_id)
        if user is not None:
            query = query.where(User.name == user)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self.db.read() as session:
            rows = session.execute(query.order_by(ApiKey.id.desc())).all()
        return [ApiKeyInfo.of(key, name) for key, name in rows]

    def visible_to(self, viewer: UserInfo) -> list[ApiKeyInfo]:
        """The keys `viewer` may see: everyone's for an admin, else their own."""
        return self.all(None if manages_all_keys(viewer) else viewer.name)

    def revoke(self, actor: str, key_id: int, *, owner: str | None = None) -> ApiKeyInfo:
        """Revoke a key at once; with `owner`, only a key of that user (another's is "not found")."""
        with self.db.write() as session:
            found = session.execute(
                select(ApiKey, User.name).join(User, User.id == ApiKey.user_id).where(ApiKey.id == key_id)
            ).first()
            if found is None or (owner is not None and found[1] != owner):
                whose = "you have" if owner is not None else "there is"
                raise NotFoundError(f"{whose} no API key with id {key_id}")
            key, name = found
            if key.revoked_at is not None:
                raise UsageError(f"API key {key_id} ({key.prefix}…) is already revoked")
            key.revoked_at = utcnow()
            key.revoked_by = actor
            session.flush()
            append_event(
                session.connection(), actor, "api_key.revoke", name, {"key_id": key.id, "label": key.label}
            )
            return ApiKeyInfo.of(key, name)

    def revoke_as(self, viewer: UserInfo, key_id: int) -> ApiKeyInfo:
        """Revoke on behalf of a signed-in user: an admin any key, anyone else only their own."""
        return self.revoke(viewer.name, key_id, owner=None if manages_all_keys(viewer) else viewer.name)

    def authenticate(self, secret: str, client_ip: str = "") -> UserInfo:
        """The user behind an active key of an enabled user; records the last use now and then.

        Raises `ApiKeyRefusedError` saying why not: unknown, revoked, or its user disabled (only someone who
        holds the key learns which).
        """
        if not _KEY_SHAPE.match(secret):
            raise ApiKeyRefusedError(
                "the API key is not valid: check that it was copied whole (it starts with cb- and has "
                "46 characters)"
            )
        # Every API request runs this: a Core query of the few columns needed, without an ORM session.
        with self.db.engine.connect() as conn:
            found = conn.execute(_KEY_LOOKUP, {"key_hash": hash_key(secret)}).first()
        if found is None:
            raise ApiKeyRefusedError("the API key is not valid: check that it was copied whole")
        key_id, revoked_at, user_id, name, roles, disabled, must_change_password = found
        if revoked_at is not None:
            raise ApiKeyRefusedError("this API key was revoked: create a new one on the API keys page")
        if disabled:
            raise ApiKeyRefusedError(f"the user {name} of this API key is disabled; ask an admin")
        self._touch(key_id, client_ip)
        return UserInfo(
            user_id, name, frozenset(Role(r) for r in roles.split()), disabled, must_change_password
        )

    def _touch(self, key_id: int, client_ip: str) -> None:
        now = time.monotonic()
        with self._touch_lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < TOUCH_EVERY_S:
                return
            self._touched[key_id] = now
        with self.db.write() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id)
                .values(last_used_at=utcnow(), last_used_ip=client_ip[:64])
            )


_shared: weakref.WeakKeyDictionary[Database, ApiKeys] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def api_keys_of(db: Database) -> ApiKeys:
    """The one `ApiKeys` of a database in this process, so the last-use throttle holds across requests."""
    with _shared_lock:
        keys = _shared.get(db)
        if keys is None:
            keys = _shared[db] = ApiKeys(db)
        return keys
