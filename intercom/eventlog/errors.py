"""Errors of the event log, under the package's one exception root."""

from __future__ import annotations

from intercom.errors import IntercomError


class EventLogError(IntercomError):
    """The event log cannot be opened, read or written."""


class MasterKeyError(EventLogError, PermissionError):
    """The master key is missing, unreadable, corrupt or does not open this log."""


class NoLogError(EventLogError, FileNotFoundError):
    """There is no event log in the state directory."""
