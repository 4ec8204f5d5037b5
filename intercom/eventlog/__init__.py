"""The encrypted, tamper-evident, self-shredding event log (see docs/eventlog.md)."""

from intercom.eventlog.component import EventLog
from intercom.eventlog.errors import EventLogError, MasterKeyError, NoLogError
from intercom.eventlog.records import LoggedEvent

__all__ = ["EventLog", "EventLogError", "LoggedEvent", "MasterKeyError", "NoLogError"]
