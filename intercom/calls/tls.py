"""The web server's TLS: the certificate it presents, kept current without a restart.

Two sources (``deploy/tlscert.py``): the station's own CA and the leaf it issues (the
default), or the owner's certificate and key (``[web] tls_cert_file``/``tls_key_file``).
aiohttp keeps the ``SSLContext`` it was given, so a new certificate is loaded into that
same object (``load_cert_chain``) and every new handshake presents it; connections
already open keep theirs.

- own CA: checked at start and every ``CHECK_S`` (a day); the leaf is re-issued before it
  expires or when the station's names (its addresses) change;
- owner's files: read every ``POLL_S``; a changed pair is checked
  whole before it is loaded, a bad one is refused with a log line and the old one stays.

The fingerprint pairing links carry: the root's SHA-256 with the own CA (stable across
leaf renewals), the owner's leaf's SHA-256 otherwise (it changes at each renewal).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from intercom.config import WebConfig
from intercom.deploy.stationca import StationNames
from intercom.deploy.tlscert import (
    TLS_CERT,
    TlsIdentity,
    load_or_create_tls,
    load_owner_pair,
    names_for,
)
from intercom.errors import ConfigError, IntercomError
from intercom.identity import key_dir

log = logging.getLogger(__name__)

CHECK_S = 24 * 3600.0  # the own leaf: renewal and names
POLL_S = 5.0  # the owner's files: changed?

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _files_digest(*paths: Path) -> bytes:
    """What tells a changed pair: SHA-256 over the files' contents (a few KiB, links followed).

    Contents, not modification times: two writes within the clock's tick look the same.
    """
    digest = hashlib.sha256()
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            data = f"unreadable: {exc.errno}".encode()
        digest.update(hashlib.sha256(data).digest())
    return digest.digest()


@dataclass(frozen=True)
class Pending:
    """A certificate checked (in a worker thread) and ready to be presented (on the loop)."""

    pem: bytes  # the chain, then the key, as checked on a scratch context
    fingerprint: str
    leaf_fingerprint: str
    ca_der: bytes | None
    not_after: dt.datetime
    notes: tuple[tuple[int, str], ...]  # log level and line, logged once it is presented


def dns_names(pem: bytes) -> tuple[str, ...]:
    """The DNS names of the first (leaf) certificate in ``pem`` (lower-case)."""
    leaf = x509.load_pem_x509_certificates(pem)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName))


class StationCert:
    """The certificate the web server presents, its fingerprint, and its reloading.

    ``owner`` is True when the owner's files are served; ``ca_der`` is the station's
    root (DER) residents install, None then. Checking reads files and may take a while
    (``check``, in a worker thread); presenting (``present``) loads the checked bytes
    into the live context and belongs on the loop, where the handshakes use it.
    """

    def __init__(
        self,
        state_dir: Path,
        station_id: str,
        web: WebConfig,
        names: Callable[[], StationNames] | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self._state_dir = state_dir
        self._station_id = station_id
        self._web = web
        self._names = names or (lambda: names_for(station_id, web))
        self._clock = clock
        self.owner = web.tls_cert_file is not None
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.fingerprint = ""  # lowercase hex, no separators (64 characters)
        self.leaf_fingerprint = ""
        self.ca_der: bytes | None = None
        self.not_after: dt.datetime | None = None
        self.hosts: tuple[str, ...] = ()  # DNS names the presented certificate carries
        self._owner_state = b""
        self._uncovered: tuple[str, ...] = ()

    @property
    def cert_path(self) -> Path:
        """The certificate file presented (the leaf first), for the monitor's expiry check."""
        if self._web.tls_cert_file is not None:
            return self._web.tls_cert_file
        return key_dir(self._state_dir) / TLS_CERT

    def load(self) -> None:
        """At start: check and present; ConfigError (naming the key) or IntercomError."""
        pending = self._check_owner(starting=True) if self.owner else self._check_own()
        if pending is not None:
            self.present(pending)

    def check(self) -> Pending | None:
        """A new certificate to present, or None (nothing changed, or refused: logged)."""
        try:
            return self._check_owner(starting=False) if self.owner else self._check_own()
        except Exception as exc:  # noqa: BLE001 - the old certificate stays; say why
            log.warning("web: certificate not renewed, the current one stays: %s", exc)
            return None

    def refresh(self) -> bool:
        """One check and, when there is a new certificate, present it; whether there was."""
        pending = self.check()
        if pending is None:
            return False
        self.present(pending)
        return True

    async def keep(self) -> None:
        """Check forever (the calls component runs it as a task)."""
        interval = POLL_S if self.owner else CHECK_S
        while True:
            await asyncio.sleep(interval)
            pending = await asyncio.to_thread(self.check)
            if pending is not None:
                self.present(pending)

    def present(self, pending: Pending) -> None:
        """Load a checked certificate into the live context: new handshakes get it."""
        self._load_into(self.context, pending.pem)
        self.fingerprint = pending.fingerprint
        self.leaf_fingerprint = pending.leaf_fingerprint
        self.ca_der = pending.ca_der
        self.not_after = pending.not_after
        self.hosts = dns_names(pending.pem)
        for level, line in pending.notes:
            log.log(level, "%s", line)

    # --- the station's own CA ---------------------------------------------------------------

    def _check_own(self) -> Pending | None:
        tls = load_or_create_tls(self._state_dir, self._station_id, self._names(), self._clock())
        if tls.uncovered and tls.uncovered != self._uncovered:
            log.warning(
                "web: the station's CA may not vouch for %s (it was made for other names): "
                "residents opening the station by these names get a certificate warning; "
                "see docs/security.md, 'The station's certificate'", ", ".join(tls.uncovered))
        self._uncovered = tls.uncovered
        if self.ca_der is not None and not tls.made:
            return None
        pem = tls.cert_path.read_bytes() + tls.key_path.read_bytes()
        self._load_into(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), pem)
        return Pending(pem, tls.fingerprint, tls.leaf_fingerprint,
                       tls.ca.public_bytes(serialization.Encoding.DER),
                       tls.leaf.not_valid_after_utc, self._own_notes(tls))

    def _own_notes(self, tls: TlsIdentity) -> tuple[tuple[int, str], ...]:
        notes = []
        for what in tls.made:
            if "replaces the self-signed" in what:
                notes.append((logging.WARNING,
                              f"web: {what}; the station's CA has SHA-256 {tls.fingerprint}"))
            else:
                notes.append((logging.INFO, f"web: {what}"))
        if self.ca_der is None:
            line = (f"web: certificate issued by the station's CA, SHA-256 {tls.fingerprint} "
                    f"(pairing links carry it), valid until "
                    f"{tls.leaf.not_valid_after_utc:%Y-%m-%d}")
            notes.append((logging.INFO, line))
        return tuple(notes)

    # --- the owner's certificate ------------------------------------------------------------

    def _check_owner(self, *, starting: bool) -> Pending | None:
        """The owner's pair, checked; at start raise, later refuse and log (None)."""
        web = self._web
        assert web.tls_cert_file is not None  # noqa: S101 - only with the owner's files
        assert web.tls_key_file is not None  # noqa: S101
        state = _files_digest(web.tls_cert_file, web.tls_key_file)
        if not starting and state == self._owner_state:
            return None
        self._owner_state = state
        try:
            pair = load_owner_pair(web.tls_cert_file, web.tls_key_file, self._clock())
            if pair.fingerprint == self.leaf_fingerprint:
                return None
            try:
                self._load_into(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), pair.pem)
            except IntercomError as exc:
                raise ConfigError([f"web.tls_cert_file: {exc}"]) from None
        except ConfigError as exc:
            if starting:
                raise
            log.warning("web: the new certificate files are refused, the current certificate "
                        "(SHA-256 %s) stays: %s", self.fingerprint, exc)
            return None
        until = pair.leaf.not_valid_after_utc
        note = (f"web: {'presenting the' if starting else 'loaded a new'} certificate of "
                f"web.tls_cert_file, SHA-256 {pair.fingerprint} (pairing links carry it), "
                f"valid until {until:%Y-%m-%d}")
        return Pending(pair.pem, pair.fingerprint, pair.fingerprint, None, until,
                       ((logging.INFO, note),))

    # --- both -------------------------------------------------------------------------------

    def _load_into(self, context: ssl.SSLContext, pem: bytes) -> None:
        """Load the chain and key in ``pem`` into ``context`` (through a private file).

        The same bytes are loaded into a scratch context while checking and into the live
        one when presenting, so what was checked is what is presented: the live context
        never holds a new certificate with the old key.
        """
        folder = key_dir(self._state_dir, create=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".tls-load.", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            try:
                context.load_cert_chain(name)
            except (ssl.SSLError, OSError) as exc:
                raise IntercomError(f"OpenSSL refuses the certificate and key: {exc}") from None
        finally:
            Path(name).unlink(missing_ok=True)
