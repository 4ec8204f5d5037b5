"""The systemd notify protocol (READY=1, WATCHDOG=1, STOPPING=1), without libsystemd.

Without ``$NOTIFY_SOCKET`` (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to the service manager's notify socket."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours else None

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return bool(self._address)

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines; returns whether they were delivered."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop on a service manager that does not read.
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), self._address)
        except BlockingIOError:
            log.debug("notify socket full, dropped %s", lines[0])
            return False
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell the service manager start-up is complete."""
        return self.send("READY=1", f"STATUS={status}") if status else self.send("READY=1")

    def watchdog(self) -> bool:
        """Keep the watchdog from firing."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Tell the service manager we are stopping."""
        return self.send("STOPPING=1")
