"""Local accounts: argon2 password hashes, roles, disabling; every change is an event in the audit chain."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clawdbot.audit import append_event
from clawdbot.db import Database
from clawdbot.errors import NotFoundError, UsageError
from clawdbot.models import Event, Role, User, UserSession, utcnow

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


@dataclass(frozen=True)
class UserActivity:
    """A user with when they last signed in and when a session of theirs was last used, for admins."""

    user: UserInfo
    last_sign_in: datetime | None
    last_seen: datetime | None


def _keep_an_admin(session: Session, user: User) -> None:
    """Refuse to leave no enabled admin: nobody could then manage users or agents from the web app."""
    if user.disabled or Role.ADMIN not in user.role_set:
        return
    # Locks every enabled user in one order (PostgreSQL), so two admins demoting each other at once
    # cannot both pass this check; SQLite's write transaction is already exclusive.
    enabled = session.scalars(
        select(User)
        .where(User.disabled.is_(False))
        .order_by(User.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if not any(other.id != user.id and Role.ADMIN in other.role_set for other in enabled):
        raise UsageError(f"{user.name} is the last enabled admin: make another user an admin first")


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

    def activity(self) -> list[UserActivity]:
        """Every user with their last sign-in (from the audit events) and last use of a session."""
        with self.db.read() as session:
            signed_in: dict[str, datetime] = {
                target: at
                for target, at in session.execute(
                    select(Event.target, func.max(Event.at))
                    .where(Event.action == "auth.sign_in")
                    .group_by(Event.target)
                )
            }
            last_seen = func.max(UserSession.last_seen_at)
            seen: dict[int, datetime] = {
                user_id: at
                for user_id, at in session.execute(
                    select(UserSession.user_id, last_seen).group_by(UserSession.user_id)
                )
            }
            return [
                UserActivity(UserInfo.of(u), signed_in.get(u.name), seen.get(u.id))
                for u in session.scalars(select(User).order_by(User.name))
            ]

    def _change(
        self,
        actor: str,
        name: str,
        action: str,
        details: dict[str, object],
        guard: Callable[[Session, User], None] | None = None,
        **values: object,
    ) -> None:
        """Set `values` on the user and append the event, after `guard` (which may refuse) had its say."""
        with self.db.write() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is None:
                raise NotFoundError(f"there is no user named {name!r}")
            if guard is not None:
                guard(session, user)
            for key, value in values.items():
                setattr(user, key, value)
            session.flush()
            append_event(session.connection(), actor, action, name, details)

    def set_disabled(self, actor: str, name: str, disabled: bool = True) -> None:
        """Disable a user, ending every session of theirs at once, or enable them again.

        Nobody disables their own account, and the last enabled admin stays enabled.
        """

        def guard(session: Session, user: User) -> None:
            if user.disabled == disabled:
                raise UsageError(f"{user.name} is already {'disabled' if disabled else 'enabled'}")
            if not disabled:
                return
            if user.name == actor:
                raise UsageError("you cannot disable your own account: another admin must do it")
            _keep_an_admin(session, user)
            # Revoked, not only refused while disabled: enabling the user again must not revive old cookies.
            session.execute(
                update(UserSession)
                .where(UserSession.user_id == user.id, UserSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )

        self._change(actor, name, "user.disable" if disabled else "user.enable", {}, guard, disabled=disabled)

    def set_roles(self, actor: str, name: str, roles: Iterable[str]) -> None:
        """Replace a user's roles; nobody removes their own admin role, and the last enabled admin stays one."""
        role_set = parse_roles(roles)

        def guard(session: Session, user: User) -> None:
            if Role.ADMIN in role_set or Role.ADMIN not in user.role_set:
                return
            if user.name == actor:
                raise UsageError("you cannot remove your own admin role: another admin must do it")
            _keep_an_admin(session, user)

        self._change(
            actor,
            name,
            "user.roles",
            {"roles": sorted(r.value for r in role_set)},
            guard,
            roles=_roles_text(role_set),
        )

    def reset_password(self, actor: str, name: str, password: str | None = None) -> str:
        """Set a new password (generated and one-time when none is given); returns it.

        The user's sessions end (they were opened before the change); an admin's own password is changed on
        the Account page instead, with the current one.
        """
        if actor == name:
            raise UsageError("change your own password on the Account page, not by a reset")
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

    def change_password(self, name: str, old: str, new: str) -> datetime:
        """A user's own change: needs the current password; returns when it changed (older sessions end)."""
        if self.authenticate(name, old) is None:
            raise UsageError("the current password is wrong")
        if new == old:
            raise UsageError("the new password must differ from the current one")
        check_password(new)
        changed_at = utcnow()
        self._change(
            name,
            name,
            "user.password",
            {"one_time": False, "own": True},
            password_hash=_hasher.hash(new),
            must_change_password=False,
            password_changed_at=changed_at,
        )
        return changed_at

    @staticmethod
    def password_matches(stored_hash: str, password: str) -> bool:
        try:
            return bool(_hasher.verify(stored_hash, password))
        except (VerificationError, InvalidHashError):
            return False

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
