"""Browser sign-in: local accounts, signed session cookies, throttled failures, every outcome an audit event.

The cookie carries a random token signed with the secret key (`CLAWDBOT_SECRET_KEY`); the database keeps only
the token's sha256 with its user, expiry and revocation. Every page run resolves the cookie again, so signing
out, disabling a user or resetting a password ends the user's sessions at once, in every tab and process.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import select, update

from clawdbot.audit import append_event
from clawdbot.db import Database
from clawdbot.errors import ClawdbotError, RateLimitedError
from clawdbot.models import User, UserSession, utcnow
from clawdbot.ratelimit import RateLimiter
from clawdbot.users import UserInfo, Users

SESSION_COOKIE = "clawdbot_session"
SESSION_LIFETIME = timedelta(hours=12)
# Failed sign-ins allowed per user name and per client address before the next attempt must wait.
SIGN_IN_FAILURE_LIMIT = "5/minute;20/hour"
# The session id of an identity proven by the OIDC provider: its cookie is Streamlit's, not in our table.
EXTERNAL_SESSION = 0
# last_seen_at is a hint for admins, not a security control: writing it on every page run would be waste.
_TOUCH_EVERY = timedelta(minutes=1)


class SignInRefusedError(ClawdbotError):
    """A sign-in that did not succeed; the message is safe to show (it never says which part was wrong)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """The signed-in user of one browser session, as every page sees it."""

    user: UserInfo
    session_id: int
    expires_at: datetime


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    """Sign-in, session resolution and sign-out for the web app."""

    def __init__(self, db: Database, users: Users, secret: str, redis_url: str = "") -> None:
        self.db = db
        self.users = users
        self._signer = URLSafeSerializer(secret, salt="clawdbot.session")
        self._failures = RateLimiter(SIGN_IN_FAILURE_LIMIT, redis_url, namespace="clawdbot-signin")

    def sign_in(
        self, name: str, password: str, client_ip: str = "", user_agent: str = ""
    ) -> tuple[str, Identity]:
        """Check the credentials and open a session; returns the cookie value and the identity.

        Raises `SignInRefusedError` for a wrong name or password, a disabled account or too many failures.
        """
        name = name.strip()[:64]
        keys = [f"name:{name.lower()}"] + ([f"ip:{client_ip}"] if client_ip else [])
        wait = max(self._failures.retry_after(key) for key in keys)
        if wait:
            self._event(name, "auth.sign_in_throttled", {"client_ip": client_ip, "retry_after": wait})
            raise SignInRefusedError(f"too many failed sign-ins; try again in {wait:.0f} s", retry_after=wait)
        user = self.users.authenticate(name, password) if name and password else None
        if user is None:
            reason = (
                "disabled" if name and password and self._is_disabled(name, password) else "bad_credentials"
            )
            for key in keys:
                with contextlib.suppress(RateLimitedError):
                    self._failures.check(key)
            self._event(name, "auth.sign_in_failed", {"client_ip": client_ip, "reason": reason})
            if reason == "disabled":
                raise SignInRefusedError("this account is disabled; ask an admin to enable it")
            raise SignInRefusedError("wrong user name or password")
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = UserSession(
            token_hash=_token_hash(token),
            user_id=user.id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + SESSION_LIFETIME,
            client_ip=client_ip[:64],
            user_agent=user_agent[:255],
        )
        with self.db.write() as session:
            session.add(row)
            session.flush()
            append_event(session.connection(), user.name, "auth.sign_in", user.name, {"client_ip": client_ip})
        return self._signer.dumps(token), Identity(user, row.id, row.expires_at)

    def resolve(self, cookie: str | None) -> Identity | None:
        """The identity behind a cookie value, or None when it is missing, forged, expired or revoked."""
        if not cookie:
            return None
        try:
            token = self._signer.loads(cookie)
        except BadSignature:
            return None
        if not isinstance(token, str):
            return None
        now = utcnow()
        with self.db.read() as session:
            found = session.execute(
                select(UserSession, User)
                .join(User, User.id == UserSession.user_id)
                .where(UserSession.token_hash == _token_hash(token))
            ).first()
        if found is None:
            return None
        row, user = found
        if row.revoked_at is not None or row.expires_at <= now or user.disabled:
            return None
        if row.created_at < user.password_changed_at:
            return None  # the password changed since: sessions opened with the old one end
        if now - row.last_seen_at > _TOUCH_EVERY:
            with self.db.write() as session:
                session.execute(update(UserSession).where(UserSession.id == row.id).values(last_seen_at=now))
        return Identity(UserInfo.of(user), row.id, row.expires_at)

    def sign_out(self, identity: Identity) -> None:
        """End this session; the cookie no longer resolves anywhere (the OIDC cookie is the caller's)."""
        with self.db.write() as session:
            session.execute(
                update(UserSession)
                .where(UserSession.id == identity.session_id, UserSession.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            append_event(session.connection(), identity.user.name, "auth.sign_out", identity.user.name)

    def external_identity(self, name: str) -> Identity:
        """The identity of a user signed in by the OIDC provider (`st.login`): a local account of that name.

        The provider proves who the person is; roles and disabling stay with clawdbot's own account.
        """
        with self.db.read() as session:
            user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise SignInRefusedError(f"there is no clawdbot account for {name}; ask an admin to add one")
        if user.disabled:
            raise SignInRefusedError("this account is disabled; ask an admin to enable it")
        return Identity(UserInfo.of(user), EXTERNAL_SESSION, utcnow() + SESSION_LIFETIME)

    def record_external_sign_in(self, identity: Identity, client_ip: str = "") -> None:
        with self.db.write() as session:
            append_event(
                session.connection(),
                identity.user.name,
                "auth.sign_in",
                identity.user.name,
                {"client_ip": client_ip, "method": "oidc"},
            )

    def change_password(self, identity: Identity, old: str, new: str) -> None:
        """Change the signed-in user's password: every other session ends, this one stays open."""
        changed_at = self.users.change_password(identity.user.name, old, new)
        with self.db.write() as session:
            session.execute(
                update(UserSession).where(UserSession.id == identity.session_id).values(created_at=changed_at)
            )

    def close(self) -> None:
        self._failures.close()

    def _is_disabled(self, name: str, password: str) -> bool:
        """Whether the credentials are right but the account is disabled, to tell the user so."""
        with self.db.read() as session:
            user = session.scalar(select(User).where(User.name == name))
        return (
            user is not None and user.disabled and self.users.password_matches(user.password_hash, password)
        )

    def _event(self, actor: str, action: str, details: dict[str, object]) -> None:
        with self.db.write() as session:
            append_event(session.connection(), actor or "(empty)", action, actor, details)
