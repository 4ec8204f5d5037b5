"""The installer console: the station's set-up API for an installer's phone (``installer.html``)."""

from intercom.console.api import Console, ConsolePorts

__all__ = ["Console", "ConsolePorts"]
