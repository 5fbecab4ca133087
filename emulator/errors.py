"""The one exception tree of smslab.

Every error a user can see derives from ``SmslabError`` and carries a message that says
what was wrong and, where there is one, what to do (``hint``). The CLI prints the message
and the hint, never a traceback unless ``--debug``.
"""

from __future__ import annotations


class SmslabError(Exception):
    """Root of every smslab error."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ProtocolError(SmslabError):
    """Abstract: a rule of the protocol was broken (use a subclass)."""


class LocalProtocolError(ProtocolError):
    """We asked the protocol core for something illegal in its current state."""


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol (malformed envelope, wrong lab, wrong destination)."""


class MalformedEnvelope(RemoteProtocolError, ValueError):
    """The bytes on the wire are not a valid smslab message."""


class TransportError(SmslabError):
    """The broker connection failed or a publish was not confirmed."""


class BrokerUnavailable(TransportError):
    """Connecting failed, or the connection was lost; retrying may help."""


class StoreError(SmslabError):
    """The site's SQLite store failed."""


class CorruptBackup(StoreError):
    """A backup is unreadable, incomplete, or belongs to another site or lab."""


class ConfigError(SmslabError, ValueError):
    """A topology file, lab directory or command-line value is wrong."""


class LabError(SmslabError):
    """The lab is not in a state that allows the operation (not up, site unknown...)."""


class OutputClosed(KeyboardInterrupt):
    """The reader of the command's output went away (``smslab run ... | head``): the command
    stops as it does on Ctrl-C or SIGTERM (a run takes its lab down), and writes no more.
    Not a ``SmslabError``: nothing is wrong to report, and nobody is left to read it."""
