"""Errors a person can act on. Each carries the one-line message shown to them and the CLI exit code.

The exit codes are part of the contract (`clawdbot ask`): 2 bad usage or rejected input, 3 busy, 4 rate limited,
5 model unavailable, 6 timed out, 1 anything else.
"""

from __future__ import annotations


class ClawdbotError(Exception):
    """Base of errors whose message is fit to show as it is."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SettingsError(ClawdbotError):
    """A setting has a value the product cannot use."""

    exit_code = 2


class UsageError(ClawdbotError):
    """The caller asked for something that cannot be done as asked (unknown user, duplicate name, bad filter)."""

    exit_code = 2


class NotFoundError(UsageError):
    """A named user, agent, conversation or record does not exist."""


class DatabaseUnavailableError(ClawdbotError):
    """The database cannot be reached or is not at the expected schema."""


class AlreadyFinalizedError(ClawdbotError):
    """A request record was finalized twice; the audit store refuses the second time."""
