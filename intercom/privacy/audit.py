"""Who did a privileged action, and logging it from a command run beside the daemon."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

from intercom.config import EventLogConfig
from intercom.eventlog.errors import NoLogError
from intercom.eventlog.records import Entry
from intercom.eventlog.store import open_log
from intercom.eventlog.writer import LogWriter
from intercom.events import PrivilegedAction
from intercom.identity import STATION_KEY, load_or_create_identity

log = logging.getLogger(__name__)

# A config file has no signer: the station notes the change when it starts with it.
CONFIG_ACTOR = "local:config-file"
# Pairing codes are made only through the control socket (mode 0600: root or the
# station's own user); the daemon logs the pairing under that actor.
PAIRING_ACTOR = "local:control-socket"


def local_actor() -> str:
    """``local:<user>`` for the OS user running this command (and who used sudo)."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    sudo = os.environ.get("SUDO_USER")
    return f"local:{user}" + (f" (sudo by {sudo})" if sudo and sudo != user else "")


def log_action(state_dir: Path, action: PrivilegedAction) -> int | None:
    """Append a privileged action to the state dir's event log; its seq, None if no log.

    The writer takes the chain head inside its own transaction, so this is safe beside a
    running station (as ``intercom log purge`` is).
    """
    if not (state_dir / "keys" / STATION_KEY).exists():
        log.warning("privileged action not logged: no station key in %s", state_dir)
        return None
    try:
        conn, keyring = open_log(state_dir, create=False)
    except NoLogError:
        log.warning("privileged action not logged: no event log in %s yet", state_dir)
        return None
    writer = LogWriter(conn, keyring, load_or_create_identity(state_dir), EventLogConfig())
    try:
        seqs, _ = writer.append([Entry.from_event(action)])
    finally:
        writer.close()
    return seqs[0]
