"""Unlock authorization: principals, signed commands with TOTP, and the one verifier."""

from intercom.security.verifier import Decision, Site, Verifier

__all__ = ["Decision", "Site", "Verifier"]
