"""Secrets the database must hold (HTTP tools' header values) sealed with a key derived from the server's secret.

A copy of the database (a backup, a dump handed over for an audit, a PostgreSQL replica) then holds no usable API
token: the key stays in `CLAWDBOT_SECRET_KEY` or the data dir. Values are Fernet tokens (AES-128-CBC with
HMAC-SHA256) behind a prefix, so a value stored before sealing existed is still read as it is.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clawdbot.errors import ClawdbotError

PREFIX = "sealed:v1:"


class SecretUnreadableError(ClawdbotError):
    """A sealed value that this server's key cannot open: the secret key changed since it was stored."""


class SecretBox:
    """Seals and opens short secrets with a key of their own, derived from the server's secret key."""

    def __init__(self, server_secret: str, purpose: bytes = b"clawdbot: stored tool secrets") -> None:
        # A key for this purpose only: the session-signing key itself never encrypts anything.
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
            server_secret.encode("utf-8")
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, value: str) -> str:
        return PREFIX + self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def open(self, stored: str) -> str:
        """The secret as it was sealed; a value without the prefix (stored before sealing) as it is."""
        if not stored.startswith(PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored.removeprefix(PREFIX).encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError):
            raise SecretUnreadableError(
                "a stored secret cannot be read with this server's secret key (was CLAWDBOT_SECRET_KEY "
                "changed?); enter the value again on the Agents page"
            ) from None
