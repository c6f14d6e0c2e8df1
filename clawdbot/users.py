"""Local accounts: argon2 password hashes, roles, disabling; every change is an event in the audit chain."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from clawdbot.audit import append_event
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Role, User, utcnow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_LENGTH = 10
FIRST_ADMIN = "admin"

_hasher = PasswordHasher()


@cache
def _dummy_hash() -> str:
    """Verifying against this keeps a wrong user name as slow as a wrong password."""
    return _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True)
class UserInfo:
    """A user as the rest of the product sees it: no password hash."""

    id: int
    name: str
    roles: frozenset[Role]
    disabled: bool
    must_change_password: bool

    @classmethod
    def of(cls, user: User) -> UserInfo:
        return cls(user.id, user.name, user.role_set, user.disabled, user.must_change_password)

    def has(self, role: Role) -> bool:
        return role in self.roles


def parse_roles(roles: Iterable[str]) -> frozenset[Role]:
    """Role names to roles; at least one, each one of staff, admin, auditor."""
    allowed = ", ".join(r.value for r in Role)
    parsed = set()
    for name in roles:
        try:
            parsed.add(Role(name.strip().lower()))
        except ValueError:
            raise UsageError(f"unknown role {name!r}: use one of {allowed}") from None
    if not parsed:
        raise UsageError(f"give at least one role: {allowed}")
    return frozenset(parsed)


def _roles_text(roles: Iterable[Role]) -> str:
    return " ".join(sorted(r.value for r in roles))


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsageError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > 1024:
        raise UsageError("the password is too long: use at most 1024 characters")


def generate_password() -> str:
    return secrets.token_urlsafe(12)


class Users:
    """User administration and sign-in checks."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self, actor: str, name: str, roles: Iterable[str], password: str | None = None
    ) -> tuple[UserInfo, str]:
        """Create a user; returns it and its password (generated when none is given)."""
        if not NAME_PATTERN.match(name):
            raise UsageError(
                f"invalid user name {name!r}: use 1 to 64 letters, digits, '_', '.', '@' or '-', "
                "starting with a letter or digit"
            )
        role_set = parse_roles(roles)
        generated = password is None
        password = generate_password() if password is None else password
        check_password(password)
        user = User(
            name=name,
            roles=_roles_text(role_set),
            password_hash=_hasher.hash(password),
            must_change_password=generated,
        )
        try:
            with self.db.write() as session:
                if session.scalar(select(User.id).where(User.name == name)) is not None:
                    raise UsageError(f"a user named {name!r} already exists")
                session.add(user)
                session.flush()
                append_event(
                    session.connection(),
                    actor,
                    "user.create",
                    name,
                    {"roles": sorted(r.value for r in role_set)},
                )
        except IntegrityError:
            raise UsageError(f"a user named {name!r} already exists") from None
        return UserInfo.of(user), password

    def ensure_first_admin(self) -> str | None:
        """When there is no user at all, create `admin` and return its one-time password."""
        with self.db.read() as session:
            if session.scalar(select(func.count(User.id))):
                return None
        try:
            _, password = self.add("clawdbot", FIRST_ADMIN, [Role.ADMIN.value, Role.STAFF.value])
        except UsageError:
            return None  # another process created it first
        return password

    def all(self) -> list[UserInfo]:
        with self.db.read() as session:
            return [UserInfo.of(u) for u in session.scalars(select(User).order_by(User.name))]

    def get(self, name: str) -> UserInfo:
        with self.db.read() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                raise NotFoundError(f"there is no user named {name!r}")
            return UserInfo.of(user)

    def _change(
        self, actor: str, name: str, action: str, details: dict[str, object], **values: object
    ) -> None:
        with self.db.write() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                raise NotFoundError(f"there is no user named {name!r}")
            for key, value in values.items():
                setattr(user, key, value)
            session.flush()
            append_event(session.connection(), actor, action, name, details)

    def set_disabled(self, actor: str, name: str, disabled: bool = True) -> None:
        self._change(actor, name, "user.disable" if disabled else "user.enable", {}, disabled=disabled)

    def set_roles(self, actor: str, name: str, roles: Iterable[str]) -> None:
        role_set = parse_roles(roles)
        self._change(
            actor,
            name,
            "user.roles",
            {"roles": sorted(r.value for r in role_set)},
            roles=_roles_text(role_set),
        )

    def reset_password(self, actor: str, name: str, password: str | None = None) -> str:
        """Set a new password (generated and one-time when none is given); returns it."""
        generated = password is None
        password = generate_password() if password is None else password
        check_password(password)
        self._change(
            actor,
            name,
            "user.password",
            {"one_time": generated},
            password_hash=_hasher.hash(password),
            must_change_password=generated,
            password_changed_at=utcnow(),
        )
        return password

    def authenticate(self, name: str, password: str) -> UserInfo | None:
        """The user if the name and password match an enabled account, else None."""
        with self.db.read() as session:
            user = session.scalar(select(User).where(User.name == name))
            stored = user.password_hash if user is not None else _dummy_hash()
        try:
            _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if user is None or user.disabled:
            return None
        if _hasher.check_needs_rehash(stored):
            with self.db.write() as session:
                fresh = session.get(User, user.id)
                if fresh is not None:
                    fresh.password_hash = _hasher.hash(password)
        return UserInfo.of(user)
