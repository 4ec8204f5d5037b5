"""Calls: the HTTPS server, pairing, signalling, the ring group and WebRTC media."""

from intercom.calls.component import Calls

__all__ = ["Calls"]
