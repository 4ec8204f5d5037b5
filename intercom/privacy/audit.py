"""Who did a privileged action: the actors named in PrivilegedAction events."""

from __future__ import annotations

import os

from intercom.control import user_actor

# A config file has no signer: the station notes the change when it starts with it.
CONFIG_ACTOR = "local:config-file"
# Pairing codes are made only through the control socket (mode 0600: root or the
# station's own user); the daemon logs the pairing under that actor.
PAIRING_ACTOR = "local:control-socket"


def local_actor() -> str:
    """``local:<user>`` for the OS user running this command (and who used sudo)."""
    return user_actor(os.geteuid(), os.environ.get("SUDO_USER"))
