"""The station's certificate: its own name-constrained CA, the leaf it rotates, the owner's files.

Real parts: certificates made by the station's code, checked by cryptography's own X.509
path validation and by OpenSSL in real TLS handshakes on loopback against the very
``SSLContext`` the web server keeps (reloaded in place, no restart).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import logging
import plistlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Self

import aiohttp
import ifaddr
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from intercom.calls.tls import StationCert
from intercom.config import Settings, WebConfig
from intercom.deploy.stationca import (
    LEAF_DAYS,
    RENEW_DAYS,
    StationNames,
    issue_leaf,
    leaf_names,
    station_names,
)
from intercom.deploy.tlscert import CA_KEY, TLS_CERT, TLS_KEY, load_or_create_tls
from intercom.errors import ConfigError
from intercom.netaddr import NoLanAddressError, lan_address, machine_addresses
from intercom.station import Station

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
LOOP = ipaddress.ip_address("127.0.0.1")
LAN = ipaddress.ip_address("192.0.2.7")
NAMES = StationNames.of(["door-1", "door-1.local"], [LOOP])
PEM = serialization.Encoding.PEM


def verify(leaf: x509.Certificate, ca: x509.Certificate, name: x509.GeneralName,
           now: dt.datetime = T0) -> None:
    """RFC 5280 path validation by cryptography: the chain, the name, the constraints."""
    subject: verification.Subject = (
        verification.IPAddress(name.value) if isinstance(name, x509.IPAddress)
        else verification.DNSName(name.value)
    )
    verifier = (
        verification.PolicyBuilder().store(verification.Store([ca])).time(now)
        .build_server_verifier(subject)
    )
    verifier.verify(leaf, [])


def tls_files(state: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """The leaf and the root as the station wrote them."""
    leaf, root = x509.load_pem_x509_certificates((state / "keys" / TLS_CERT).read_bytes())
    return leaf, root


# --- the CA and the leaf ---------------------------------------------------------------------


def test_the_root_is_name_constrained_to_the_station(tmp_path):
    tls = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    ca = tls.ca
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    permitted = constraints.value.permitted_subtrees
    assert permitted is not None
    assert set(permitted) == {
        x509.DNSName("door-1"), x509.DNSName("door-1.local"),
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
    }
    # no IPv6 address of its own: every IPv6 address is excluded
    assert constraints.value.excluded_subtrees == [x509.IPAddress(ipaddress.ip_network("::/0"))]
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert not usage.digital_signature
    [common_name] = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert common_name.value == "door-1 door station CA"
    assert (tmp_path / "keys" / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys" / TLS_KEY).stat().st_mode & 0o777 == 0o600
    # the fingerprint pairing links carry is the root's
    der = ca.public_bytes(serialization.Encoding.DER)
    assert tls.fingerprint == hashlib.sha256(der).hexdigest()


def test_the_leaf_chains_to_the_root_for_each_station_name(tmp_path):
    tls = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    leaf, root = tls_files(tmp_path)
    assert root == tls.ca  # tls.crt: the leaf, then the root
    assert leaf == tls.leaf
    for name in NAMES.general_names():
        verify(leaf, tls.ca, name)
    with pytest.raises(verification.VerificationError):
        verify(leaf, tls.ca, x509.DNSName("other.local"))
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=LEAF_DAYS, minutes=5)


def test_the_root_cannot_vouch_for_another_name(tmp_path):
    """Even signed by the station's CA key, a certificate for another site is refused."""
    tls = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    ca_key = serialization.load_pem_private_key((tmp_path / "keys" / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    forged_names = StationNames.of(["bank.example"], [ipaddress.ip_address("10.0.0.1")])
    forged = issue_leaf(ca_key, tls.ca, ec.generate_private_key(ec.SECP256R1()).public_key(),
                        forged_names, T0)
    for name in forged_names.general_names():
        with pytest.raises(verification.VerificationError, match="constraint"):
            verify(forged, tls.ca, name)


def test_the_leaf_is_renewed_before_it_expires_and_the_root_stays(tmp_path):
    first = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    key = (tmp_path / "keys" / TLS_KEY).read_bytes()
    early = LEAF_DAYS - RENEW_DAYS - 1  # days: still more than RENEW_DAYS left
    same = load_or_create_tls(tmp_path, "door-1", NAMES, T0 + dt.timedelta(days=early))
    assert same.made == ()
    assert same.leaf == first.leaf
    later = T0 + dt.timedelta(days=early + 2)
    renewed = load_or_create_tls(tmp_path, "door-1", NAMES, later)
    assert renewed.leaf != first.leaf
    assert renewed.leaf.not_valid_after_utc > later + dt.timedelta(days=LEAF_DAYS - 1)
    assert renewed.fingerprint == first.fingerprint  # the root, what residents installed
    assert (tmp_path / "keys" / TLS_KEY).read_bytes() == key
    assert any("expires" in what for what in renewed.made)
    verify(renewed.leaf, renewed.ca, x509.IPAddress(LOOP), later)


def test_the_leaf_follows_the_names_the_root_permits(tmp_path):
    both = StationNames.of(["door-1", "door-1.local"], [LOOP, LAN])
    first = load_or_create_tls(tmp_path, "door-1", both, T0)
    assert set(leaf_names(first.leaf).ips) == {LOOP, LAN}
    # the LAN address went away: a leaf without it
    gone = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    assert set(leaf_names(gone.leaf).ips) == {LOOP}
    assert any("names changed" in what for what in gone.made)
    # a name the root was not made for is left out of the leaf, and said
    public = StationNames.of([*both.dns, "door.example.org"],
                             [*both.ips, ipaddress.ip_address("10.1.1.1")])
    wider = load_or_create_tls(tmp_path, "door-1", public, T0)
    assert wider.uncovered == ("door.example.org", "10.1.1.1")
    assert set(leaf_names(wider.leaf).ips) == {LOOP, LAN}
    assert "door.example.org" not in leaf_names(wider.leaf).dns
    assert wider.fingerprint == first.fingerprint


def test_an_old_self_signed_certificate_is_replaced_and_its_key_kept(tmp_path):
    """An install from before the CA: the key stays, a leaf of the new CA replaces it."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "door-1")])
    old = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(T0 - dt.timedelta(days=400))
        .not_valid_after(T0 + dt.timedelta(days=20 * 365))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (keys / TLS_KEY).write_bytes(key_pem)
    (keys / TLS_CERT).write_bytes(old.public_bytes(PEM))
    tls = load_or_create_tls(tmp_path, "door-1", NAMES, T0)
    old_fp = old.fingerprint(hashes.SHA256()).hex()
    assert any(f"replaces the self-signed certificate SHA-256 {old_fp}" in w for w in tls.made)
    assert "CA certificate made" in tls.made
    assert (keys / TLS_KEY).read_bytes() == key_pem
    assert tls.leaf.public_key() == key.public_key()
    verify(tls.leaf, tls.ca, x509.DNSName("door-1.local"))


def test_station_names(tmp_path):
    any_host = "0.0.0.0"  # noqa: S104 - listening on every address
    names = station_names("door-1", any_host, "https://door.example.org:8443/", "pi.local",
                          [LAN, ipaddress.ip_address("fd00::7")])
    assert names.dns == ("door-1", "door-1.local", "pi.local", "door.example.org")
    assert names.ips == (LAN, ipaddress.ip_address("fd00::7"))
    one = station_names("door-1", "127.0.0.1", "", "pi.local", [LAN])
    assert one == StationNames(("door-1", "door-1.local"), (LOOP,))


# --- the LAN address (scripts/demo --lan) ----------------------------------------------------


def adapter(name: str, *ips: str) -> ifaddr.Adapter:
    def ip(text: str) -> ifaddr.IP:
        address = ipaddress.ip_address(text)
        return ifaddr.IP(text if address.version == 4 else (text, 0, 0),
                         address.max_prefixlen, name)
    return ifaddr.Adapter(name, name, [ip(t) for t in ips])


def test_the_lan_address_is_a_reachable_one():
    lo = adapter("lo", "127.0.0.1", "::1")
    eth = adapter("eth0", "fe80::1", "fd00::2", "192.0.2.2")
    assert lan_address([lo, eth]) == ipaddress.ip_address("192.0.2.2")  # IPv4 first
    v6_only = adapter("eth0", "fe80::1", "fd00::2")
    assert lan_address([lo, v6_only]) == ipaddress.ip_address("fd00::2")
    assert machine_addresses([lo, eth]) == [ipaddress.ip_address("192.0.2.2"),
                                            ipaddress.ip_address("fd00::2")]
    # this machine's own interfaces: a reachable address when it has one
    if machine_addresses():
        assert not lan_address().is_loopback
    else:
        with pytest.raises(NoLanAddressError, match=r"127\.0\.0\.1"):
            lan_address()


def test_only_loopback_is_a_clear_error():
    with pytest.raises(NoLanAddressError) as caught:
        lan_address([adapter("lo", "127.0.0.1", "::1"), adapter("eth0", "fe80::9")])
    message = str(caught.value)
    assert "no LAN address" in message
    assert "127.0.0.1, ::1, fe80::9" in message
    assert "--lan" in message


# --- the web server's context, reloaded in place ---------------------------------------------


class TlsServer:
    """A loopback TLS server on a ``StationCert``'s live context: who is presented now."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        async def handle(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def presented(self, trust: ssl.SSLContext) -> str:
        """SHA-256 of the leaf a new, verified handshake is given."""
        _reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=trust)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return hashlib.sha256(der).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


async def test_a_renewed_leaf_is_presented_without_a_restart(tmp_path):
    clock = Clock()  # the first leaf was made long enough ago to be due now
    now = dt.datetime.now(dt.UTC)
    clock.now = now - dt.timedelta(days=LEAF_DAYS - RENEW_DAYS + 1)
    cert = StationCert(tmp_path, "door-1", WebConfig(host="127.0.0.1"), lambda: NAMES, clock)
    cert.load()
    assert cert.ca_der is not None
    trust = ssl.create_default_context(cadata=cert.ca_der)  # the name is checked: 127.0.0.1
    first = cert.leaf_fingerprint
    async with TlsServer(cert.context) as server:
        assert await server.presented(trust) == first
        assert not cert.refresh()  # nothing due
        clock.now = now
        assert cert.refresh()
        assert cert.leaf_fingerprint != first
        assert await server.presented(trust) == cert.leaf_fingerprint
    assert cert.fingerprint == hashlib.sha256(cert.ca_der).hexdigest()


# --- the owner's certificate -----------------------------------------------------------------


class OwnerCA:
    """A CA of the owner's (an ACME CA's stand-in) issuing leaves for 127.0.0.1."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "owner test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, folder: Path, *, days: float = 60, key: ec.EllipticCurvePrivateKey | None = None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A fresh key and leaf written to folder/fullchain.pem and privkey.pem."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "door")]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1) + dt.timedelta(days=min(days, 0)))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(LOOP)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        folder.mkdir(exist_ok=True)
        (folder / "fullchain.pem").write_bytes(leaf.public_bytes(PEM) + self.cert.public_bytes(PEM))
        (folder / "privkey.pem").write_bytes(key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return key, leaf

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.cert.public_bytes(serialization.Encoding.DER))


def owner_web(folder: Path) -> WebConfig:
    return WebConfig(host="127.0.0.1", tls_cert_file=folder / "fullchain.pem",
                     tls_key_file=folder / "privkey.pem")


async def test_the_owners_files_are_reloaded_and_a_bad_pair_refused(tmp_path, caplog):
    owner, live = OwnerCA(), tmp_path / "live"
    _key, leaf = owner.issue(live)
    cert = StationCert(tmp_path / "state", "door-1", owner_web(live))
    cert.load()
    assert cert.owner
    assert cert.ca_der is None
    assert cert.fingerprint == leaf.fingerprint(hashes.SHA256()).hex()  # the owner's leaf
    assert not (tmp_path / "state" / "keys" / CA_KEY).exists()  # no CA of its own needed
    async with TlsServer(cert.context) as server:
        assert await server.presented(owner.trust()) == cert.fingerprint
        assert not cert.refresh()  # files unchanged
        # ACME renewed: a new key and leaf; the poll notices and presents them
        _key, renewed = owner.issue(live)
        assert cert.refresh()
        assert cert.fingerprint == renewed.fingerprint(hashes.SHA256()).hex()
        assert await server.presented(owner.trust()) == cert.fingerprint
        # a new certificate with a key that is not its own: refused, the old pair stays
        good = cert.fingerprint
        other = ec.generate_private_key(ec.SECP256R1())
        key_pem = (live / "privkey.pem").read_bytes()
        owner.issue(live, key=other)
        (live / "privkey.pem").write_bytes(key_pem)
        with caplog.at_level(logging.WARNING, logger="intercom.calls.tls"):
            assert not cert.refresh()
        assert "web.tls_key_file" in caplog.text
        assert "refused" in caplog.text
        assert cert.fingerprint == good
        assert await server.presented(owner.trust()) == good
        # an expired certificate: refused likewise
        caplog.clear()
        owner.issue(live, days=-1)
        with caplog.at_level(logging.WARNING, logger="intercom.calls.tls"):
            assert not cert.refresh()
        assert "web.tls_cert_file" in caplog.text
        assert "expired" in caplog.text
        assert await server.presented(owner.trust()) == good
        # and a good pair after all that is taken again
        _key, fixed = owner.issue(live)
        assert cert.refresh()
        assert await server.presented(owner.trust()) == fixed.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize(
    ("spoil", "key", "reason"),
    [
        (lambda d: (d / "fullchain.pem").unlink(), "web.tls_cert_file", "cannot read"),
        (lambda d: (d / "privkey.pem").unlink(), "web.tls_key_file", "cannot read"),
        (lambda d: (d / "fullchain.pem").write_text("not a certificate\n"), "web.tls_cert_file",
         "holds no PEM certificate"),
        (lambda d: (d / "privkey.pem").write_bytes((d / "fullchain.pem").read_bytes()),
         "web.tls_key_file", "no PEM private key"),
        (lambda d: (d / "privkey.pem").write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"))),
         "web.tls_key_file", "encrypted"),
        (lambda d: (d / "privkey.pem").write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
         "web.tls_key_file", "is not the key of the certificate"),
        (lambda d: OwnerCA().issue(d, days=-2), "web.tls_cert_file", "expired on"),
    ],
    ids=["no-cert", "no-key", "garbage-cert", "cert-as-key", "encrypted-key", "other-key",
         "expired"],
)
def test_bad_owner_files_are_refused_at_start_naming_the_key(tmp_path, spoil, key, reason):
    live = tmp_path / "live"
    OwnerCA().issue(live)
    spoil(live)
    cert = StationCert(tmp_path / "state", "door-1", owner_web(live))
    with pytest.raises(ConfigError) as caught:
        cert.load()
    [problem] = caught.value.problems
    assert problem.startswith(f"{key}: ")
    assert reason in problem
    assert "BEGIN" not in problem  # never the files' contents


def with_web(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"web": settings.web.model_copy(update=update)})


async def test_a_station_with_bad_owner_files_does_not_start(sim_settings: Settings, tmp_path):
    live = tmp_path / "live"
    OwnerCA().issue(live, days=-1)
    station = Station(with_web(sim_settings, tls_cert_file=live / "fullchain.pem",
                               tls_key_file=live / "privkey.pem"))
    with pytest.raises(ConfigError, match=r"web\.tls_cert_file: .* expired on"):
        await station.start()  # which undoes what it did


# --- what the station serves -----------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_the_station_serves_its_root_and_an_ios_profile(station: Station, http):
    calls = station.calls
    assert calls is not None
    assert calls.cert is not None
    root = calls.cert.ca_der
    assert root is not None
    trust = ssl.create_default_context(cadata=root)  # verified: chain, name 127.0.0.1
    async with http.get(calls.url + "ca.crt", ssl=trust) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-x509-ca-cert"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        served = await response.read()
    assert served == root
    assert hashlib.sha256(served).hexdigest() == calls.fingerprint
    assert x509.load_der_x509_certificate(served).extensions.get_extension_for_class(
        x509.NameConstraints).critical
    async with http.get(calls.url + "ca.mobileconfig", ssl=trust) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-apple-aspen-config"
        profile = plistlib.loads(await response.read())
    assert profile["PayloadType"] == "Configuration"
    [payload] = profile["PayloadContent"]
    assert payload["PayloadType"] == "com.apple.security.root"
    assert payload["PayloadContent"] == root
    assert calls.fingerprint.upper() in profile["PayloadDescription"]
    async with http.get(calls.url + "api/info", ssl=trust) as response:
        info = await response.json()
    assert info["fingerprint"] == calls.fingerprint
    assert info["certificate"] == "station-ca"
    async with http.get(calls.url + "trust.html", ssl=trust) as response:
        assert response.status == 200
        assert "trust.js" in await response.text()
    answer = await calls.pair_request({"flat": "1"})
    assert answer["url"].endswith("&fp=" + calls.fingerprint)
    assert answer["trust_url"] == calls.url + "trust.html"


async def test_with_the_owners_certificate_there_is_nothing_to_install(
    sim_settings: Settings, tmp_path, http
):
    owner, live = OwnerCA(), tmp_path / "live"
    _key, leaf = owner.issue(live)
    station = Station(with_web(sim_settings, tls_cert_file=live / "fullchain.pem",
                               tls_key_file=live / "privkey.pem"))
    await station.start()
    try:
        calls = station.calls
        assert calls is not None
        trust = owner.trust()
        for path in ("ca.crt", "ca.mobileconfig"):
            async with http.get(calls.url + path, ssl=trust) as response:
                assert response.status == 404, path
        async with http.get(calls.url + "api/info", ssl=trust) as response:
            info = await response.json()
        assert info["fingerprint"] == leaf.fingerprint(hashes.SHA256()).hex()
        assert info["certificate"] == "owner"
        answer = await calls.pair_request({"flat": "1"})
        assert answer["url"].endswith("&fp=" + info["fingerprint"])
        assert answer["trust_url"] == ""
    finally:
        await station.stop("test finished")


def test_interfaces_that_cannot_be_read_give_no_addresses_not_a_failure(monkeypatch, caplog):
    """First boot's unit allows AF_UNIX only: ifaddr's netlink socket fails (EAFNOSUPPORT).

    That seccomp filter needs systemd as PID 1, which this machine has not, so ifaddr is
    made to fail as it does there (the image test, -m slow, boots the real thing).
    """
    import errno  # noqa: PLC0415

    import ifaddr  # noqa: PLC0415

    from intercom import netaddr  # noqa: PLC0415
    from intercom.deploy.tlscert import names_for  # noqa: PLC0415

    def refused() -> list[ifaddr.Adapter]:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(ifaddr, "get_adapters", refused)
    assert netaddr.machine_addresses() == []
    assert "cannot be read" in caplog.text
    names = names_for("door-1", WebConfig(host="0.0.0.0"))  # noqa: S104
    assert names.ips == ()
    assert "door-1.local" in names.dns
