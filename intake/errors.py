"""The errors intake raises, in one small tree.

    IntakeError
     ├── ConfigError            invalid settings, rules or templates: stop start-up, name the culprit
     │    └── RulesError        a broken rules file (file, rule, what is wrong)
     ├── StorageUnavailableError storage could not commit: the sender must retry (SMTP 451, HTTP 503)
     ├── SchemaBehindError      the database schema is older than this code: run `intake db upgrade`
     └── SendError              an outgoing note could not be delivered
          ├── TransientSendError   try again later (a 4xx for this note, 429)
          │    └── ChannelUnavailableError  the channel itself is down (relay unreachable or
          │                                 refusing us, Slack unreachable or our token refused):
          │                                 every note of it would fail the same way
          └── PermanentSendError   retrying cannot help (5xx from the relay, invalid recipient)

Adapters map these to protocol answers; the core never answers a protocol itself.
"""

from __future__ import annotations


class IntakeError(Exception):
    """Base of every error intake raises on purpose."""


class ConfigError(IntakeError):
    """Settings, rules or templates are invalid; start-up must stop with this message."""


class RulesError(ConfigError):
    """A rules file is broken. The message names the file, the rule and what is wrong."""


class StorageUnavailableError(IntakeError):
    """Storage failed to commit; nothing was stored and the sender should retry."""


class SchemaBehindError(IntakeError):
    """The database schema is behind this code's migrations."""


class SendError(IntakeError):
    """An outgoing note could not be delivered."""


class TransientSendError(SendError):
    """Delivery failed for now; retry later. ``retry_after`` (seconds) when the peer said so."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChannelUnavailableError(TransientSendError):
    """The channel cannot take any note now: the SMTP relay is unreachable, times out, closes
    the connection (421) or refuses our greeting, TLS or login; Slack's API is unreachable,
    failing (5xx) or refuses our token. Not this note's fault: the outbox holds the channel's
    notes until a check finds the channel back, instead of failing them one by one."""


class PermanentSendError(SendError):
    """Delivery can never succeed as it is (a 5xx from the relay, a rejected recipient)."""
