"""Unlock authorization: principals, signed commands with TOTP, and the one verifier."""

from intercom.security.registry import Registry
from intercom.security.verifier import Context, Decision, Site, Verifier

__all__ = ["Context", "Decision", "Registry", "Site", "Verifier"]
