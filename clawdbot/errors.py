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


class RetryLaterError(ClawdbotError):
    """Refused for now; `retry_after` says in how many seconds trying again should work."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BusyError(RetryLaterError):
    """The GPU is at its concurrency cap and the queue is full, or a queued request waited too long."""

    exit_code = 3


class RateLimitedError(RetryLaterError):
    """The user sent more requests than their rate limit allows."""

    exit_code = 4


class ModelUnavailableError(ClawdbotError):
    """The model could not answer after the retries and the fallback."""

    exit_code = 5


class TimedOutError(ClawdbotError):
    """The model server went silent for longer than the read timeout."""

    exit_code = 6


class RejectedInputError(UsageError):
    """Input the product refuses to process (an attachment it cannot read safely, an empty prompt)."""
