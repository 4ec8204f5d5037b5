"""The station's own certificate authority: a name-constrained root and the leaves it signs.

A resident installs the root once, after comparing its SHA-256 fingerprint with the one
on the pairing link or sheet; from then on the browser trusts the station like any site,
so the web client installs as an app and its service worker runs. The root's
NameConstraints extension (critical) permits only the station's own names and addresses,
so even a stolen CA key cannot vouch for any other site on the resident's device.

Nothing here touches files: ``tlscert.py`` keeps the keys and certificates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from intercom.netaddr import ANY_HOSTS, Address

CA_DAYS = 20 * 365  # the root a resident installs once
LEAF_DAYS = 90  # the certificate the web server presents, re-issued by the station
RENEW_DAYS = 45  # re-issued when fewer days are left (monitor.cert_expiry_days is 30)
ORGANIZATION = "intercom door station"
ANY_V4 = ipaddress.ip_network("0.0.0.0/0")
ANY_V6 = ipaddress.ip_network("::/0")


@dataclass(frozen=True)
class StationNames:
    """The DNS names and addresses a certificate carries (lower-case, no duplicates)."""

    dns: tuple[str, ...]
    ips: tuple[Address, ...]

    @classmethod
    def of(cls, dns: Iterable[str], ips: Iterable[Address]) -> StationNames:
        """Names in order, each once."""
        return cls(tuple(dict.fromkeys(d.lower().rstrip(".") for d in dns if d)),
                   tuple(dict.fromkeys(ips)))

    def general_names(self) -> list[x509.GeneralName]:
        """As X.509 subject alternative names."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        names += [x509.IPAddress(ip) for ip in self.ips]
        return names

    def describe(self) -> list[str]:
        """Each name as text."""
        return [*self.dns, *(str(ip) for ip in self.ips)]

    def same(self, other: StationNames) -> bool:
        """The same names, in any order."""
        return set(self.dns) == set(other.dns) and set(self.ips) == set(other.ips)


def host_names(host: str) -> StationNames:
    """A host as a URL or the config names it: an address, or a DNS name."""
    host = host.strip("[]")
    if not host or host in ANY_HOSTS:
        return StationNames((), ())
    try:
        return StationNames.of((), [ipaddress.ip_address(host.split("%", 1)[0])])
    except ValueError:
        return StationNames.of([host], ())


def station_names(
    station_id: str,
    listen_host: str,
    public_url: str,
    machine_name: str,
    addresses: Iterable[Address],
) -> StationNames:
    """Every name residents may open the station by.

    ``<id>`` and ``<id>.local`` always; the public URL's host; the listen address, or,
    listening on every address, the machine's name and its reachable ``addresses``.
    """
    parts = [StationNames.of([station_id, f"{station_id}.local"], ())]
    if listen_host in ANY_HOSTS:
        short = machine_name.split(".", 1)[0]
        parts.append(StationNames.of([machine_name, f"{short}.local"], addresses))
    else:
        parts.append(host_names(listen_host))
    if public_url:
        parts.append(host_names(urlsplit(public_url).hostname or ""))
    return StationNames.of([d for p in parts for d in p.dns], [i for p in parts for i in p.ips])


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: the form pairing links carry."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def grouped(hex_fingerprint: str) -> str:
    """A fingerprint as browsers show it: ``AB:CD:...``."""
    upper = hex_fingerprint.replace(":", "").upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def _network(ip: Address) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA's (certificates and CRLs) or a TLS server's (handshake signatures) key usage."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=signs_certificates, crl_sign=signs_certificates, encipher_only=False,
        decipher_only=False,
    )


def make_ca(key: ec.EllipticCurvePrivateKey, station_id: str, names: StationNames,
            now: dt.datetime) -> x509.Certificate:
    """The station's root, allowed to vouch only for ``names``.

    Permitted: each DNS name (and, as RFC 5280 has it, names under it) and each address
    as a /32 or /128. An address family with no permitted address is excluded whole, or
    a leaf could carry any address of it.
    """
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, f"{station_id} door station CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ])
    permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in names.dns]
    permitted += [x509.IPAddress(_network(ip)) for ip in names.ips]
    versions = {ip.version for ip in names.ips}
    excluded = [x509.IPAddress(n) for n in (ANY_V4, ANY_V6) if n.version not in versions]
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=permitted or None,
                                 excluded_subtrees=excluded or None),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def permitted_names(ca: x509.Certificate) -> StationNames:
    """The DNS names and addresses the root's name constraints permit."""
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return StationNames((), ())
    dns: list[str] = []
    ips: list[Address] = []
    for general in constraints.permitted_subtrees or []:
        if isinstance(general, x509.DNSName):
            dns.append(general.value)
        elif isinstance(general, x509.IPAddress) and isinstance(
            general.value, ipaddress.IPv4Network | ipaddress.IPv6Network
        ):
            ips.append(general.value.network_address)
    return StationNames.of(dns, ips)


def split_covered(names: StationNames, ca: x509.Certificate) -> tuple[StationNames, list[str]]:
    """The names the root may vouch for, and the others (as text) it may not."""
    allowed = permitted_names(ca)

    def dns_ok(name: str) -> bool:
        return any(name == p or name.endswith("." + p) for p in allowed.dns)

    inside = StationNames.of([d for d in names.dns if dns_ok(d)],
                             [ip for ip in names.ips if ip in allowed.ips])
    outside = [d for d in names.dns if not dns_ok(d)]
    outside += [str(ip) for ip in names.ips if ip not in allowed.ips]
    return inside, outside


def issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    names: StationNames,
    now: dt.datetime,
) -> x509.Certificate:
    """The web server's certificate for ``names`` (server auth), valid ``LEAF_DAYS``."""
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, (names.describe() or ["station"])[0]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ])
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if names.dns or names.ips:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names.general_names()), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def leaf_names(cert: x509.Certificate) -> StationNames:
    """The DNS names and addresses a certificate carries."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return StationNames((), ())
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress)
           if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)]
    return StationNames.of(san.get_values_for_type(x509.DNSName), ips)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (its name and signature)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
