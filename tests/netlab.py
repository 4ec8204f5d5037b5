"""A network lab for "answer from anywhere": real Linux namespaces, NATs, coturn and nginx.

Everything here is real: ``lab()`` makes five network namespaces joined by veth pairs, a
home router with iptables MASQUERADE and a TCP port forward, a carrier NAT with
``MASQUERADE --random-fully`` (a symmetric NAT), and runs Debian's ``turnserver``
(coturn) and ``nginx`` in the "internet" between them. Nothing touches the host's own
interfaces or firewall; it needs root (``ip netns``), as the tests and CI have.

::

    namespace  addresses (LAN | WAN)       what it is
    home       192.168.77.2                the station's LAN
    router     192.168.77.1 | 203.0.113.2  home NAT with a port forward
    internet   203.0.113.1 | 198.51.100.1  coturn and nginx on 203.0.113.1
    mrouter    10.77.0.1 | 198.51.100.2    carrier NAT (symmetric)
    mobile     10.77.0.2                   the resident's phone

Linux conntrack makes the home router an endpoint-independent mapping with address- and
port-dependent filtering, and the carrier NAT maps each destination to a new port, so
neither host nor server-reflexive candidates connect ``home`` and ``mobile``: only a
TURN relay does. Namespaces are named ``icl<pid>n<n>-<name>`` so parallel runs do not
clash; ``lab()`` removes those of dead processes before it starts and tears its own
down (processes killed, namespaces deleted) when it ends, however it ends.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import hashlib
import hmac
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")

PREFIX = "icl"
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # per-namespace files ``ip netns exec`` mounts over /etc
UDPDELAY = Path(__file__).with_name("udpdelay.py")
CLONE_NEWNET = 0x40000000
_SERIAL = itertools.count()  # labs made by this process, for unique names


@dataclass(frozen=True)
class Addresses:
    """The lab's addresses: documentation ranges, and private ones behind the NATs."""

    home: str = "192.168.77.2"  # the station
    router_lan: str = "192.168.77.1"
    router_wan: str = "203.0.113.2"  # the home's public address
    public: str = "203.0.113.1"  # coturn and nginx, the internet's side toward the home
    internet_mobile: str = "198.51.100.1"  # the internet's side toward the carrier
    mrouter_wan: str = "198.51.100.2"  # the carrier NAT's public address
    mrouter_lan: str = "10.77.0.1"
    mobile: str = "10.77.0.2"  # the resident's phone


ADDRESSES = Addresses()
A = ADDRESSES
NAMESPACES = ("home", "router", "internet", "mrouter", "mobile")
# (namespace, interface, address/len) at each end of a veth pair
LINKS = (
    (("home", "eth0", f"{A.home}/24"), ("router", "lan", f"{A.router_lan}/24")),
    (("router", "wan", f"{A.router_wan}/24"), ("internet", "isp-home", f"{A.public}/24")),
    (("mrouter", "wan", f"{A.mrouter_wan}/24"),
     ("internet", "isp-mobile", f"{A.internet_mobile}/24")),
    (("mobile", "eth0", f"{A.mobile}/24"), ("mrouter", "lan", f"{A.mrouter_lan}/24")),
)
DEFAULT_ROUTES = {
    "home": A.router_lan,
    "router": A.public,
    "mrouter": A.internet_mobile,
    "mobile": A.mrouter_lan,
}
FORWARDING = ("router", "internet", "mrouter")
TURN_PORT = 3478

# A home router: LAN out through the WAN address, replies back in, port forwards in,
# nothing else. Conntrack keeps the source port (endpoint-independent mapping) and lets
# in only replies from the address and port a flow was sent to. Unsolicited WAN input is
# rejected, as OpenWrt's wan zone does: a packet that is dropped or rejected leaves no
# conntrack entry behind, one accepted to a closed port would, and that entry would then
# make conntrack move the mapping of a later outgoing flow to another port.
ROUTER_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
{forwards}
-A POSTROUTING -o wan -j MASQUERADE
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i wan -j REJECT
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i lan -o wan -j ACCEPT
-A FORWARD -i wan -o lan -m conntrack --ctstate DNAT -j ACCEPT
COMMIT
"""
FORWARD_RULE = "-A PREROUTING -i wan -p tcp --dport {port} -j DNAT --to-destination {home}:{port}"

# A carrier NAT: a random source port for every new flow, so the mapping depends on the
# destination (a symmetric NAT). LOSS is where impair() puts its random drops.
MROUTER_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o wan -j MASQUERADE --random-fully
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:LOSS - [0:0]
-A INPUT -j LOSS
-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i wan -j REJECT
-A FORWARD -j LOSS
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i lan -o wan -j ACCEPT
COMMIT
"""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def in_namespace(namespace: str, make: Callable[[], T]) -> T:
    """``make()`` called in a short-lived thread that has joined ``namespace``.

    A socket made there stays in that namespace after the thread ends, and the caller's
    own threads never change namespace.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with (NETNS_DIR / namespace).open() as handle:
                _setns(handle.fileno())
            result.append(make())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netlab-{namespace}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process left in ``namespace`` (all of them started by a lab)."""
    with contextlib.suppress(subprocess.CalledProcessError):
        for word in _ip("netns", "pids", namespace).split():
            if int(word) != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(word), signal.SIGKILL)


def _delete_namespace(namespace: str) -> None:
    _kill_inside(namespace)
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "delete", namespace)
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


def _dead_run(name: str) -> bool:
    match = re.match(rf"{PREFIX}(\d+)n\d+-", name)
    return match is not None and not _pid_alive(int(match.group(1)))


def remove_stale() -> list[str]:
    """Delete the ``icl*`` namespaces (and temporary folders) of runs whose process is gone.

    The namespaces' names are returned.
    """
    stale = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if _dead_run(name):
            _delete_namespace(name)
            stale.append(name)
    for folder in Path(tempfile.gettempdir()).glob(f"netlab-{PREFIX}*"):
        if _dead_run(folder.name.removeprefix("netlab-")):
            shutil.rmtree(folder, ignore_errors=True)
    return stale


def turn_credentials(secret: str, name: str, ttl_s: int = 3600) -> tuple[str, str]:
    """TURN REST API credentials: username ``<expiry>:<name>``, password its HMAC-SHA1."""
    username = f"{int(time.time()) + ttl_s}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


STUN_COOKIE = 0x2112A442


def stun_request(transaction: bytes) -> bytes:
    """A STUN Binding request (RFC 5389) with a 12-byte transaction id, no attributes."""
    return (0x0001).to_bytes(2, "big") + bytes(2) + STUN_COOKIE.to_bytes(4, "big") + transaction


def stun_answered(data: bytes) -> bytes | None:
    """The transaction id of a STUN Binding success response, else None."""
    if len(data) >= 20 and data[:2] == b"\x01\x01" and data[4:8] == STUN_COOKIE.to_bytes(4, "big"):
        return data[8:20]
    return None


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, SIGKILL if it has not ended within 5 s, and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _wait_until(what: str, ready: Callable[[], bool], proc: subprocess.Popen[Any],
                log: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} not up (exit {proc.poll()}): {text}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Traffic:
    """Packets and bytes an iptables rule counted."""

    packets: int
    bytes: int


@dataclass(frozen=True)
class TurnTraffic:
    """What went to and from coturn's port (3478), counted by iptables in ``internet``."""

    udp_in: Traffic
    udp_out: Traffic
    tcp_in: Traffic
    tcp_out: Traffic

    @property
    def total_bytes(self) -> int:
        """Bytes both ways, UDP and TCP."""
        return sum(t.bytes for t in (self.udp_in, self.udp_out, self.tcp_in, self.tcp_out))


# Nothing else is read: turnserver is given this file with -c, never /etc/turnserver.conf;
# its SQLite user database (unused with use-auth-secret) is made here, not in /var/lib/turn.
# The three lines after no-software-attribute are those Debian's own file sets (less
# amplification; one address cannot do RFC 5780's NAT discovery anyway).
# coturn 4.6 refuses only loopback (allow-loopback-peers is off), 0.0.0.0/8 and, with
# no-multicast-peers, multicast peers; it has no default denied-peer-ip ranges, so the
# lab's documentation ranges (the peers are its own relay addresses, 203.0.113.1) need no
# allowed-peer-ip.
COTURN_CONF = """\
listening-ip={public}
relay-ip={public}
listening-port={port}
realm={realm}
use-auth-secret
static-auth-secret={secret}
fingerprint
no-cli
no-tls
no-dtls
no-multicast-peers
no-software-attribute
no-rfc5780
no-stun-backward-compatibility
response-origin-only-with-rfc5780
log-file={folder}/turnserver.log
simple-log
pidfile={folder}/turnserver.pid
userdb={folder}/turndb
"""


class Coturn:
    """Debian's ``turnserver`` in the lab's ``internet`` namespace, TURN REST API auth."""

    def __init__(self, lab: Lab, folder: Path, secret: str, realm: str) -> None:
        self.lab = lab
        self.folder = folder
        self.secret = secret
        self.realm = realm
        self.address = (ADDRESSES.public, TURN_PORT)
        self.log = folder / "turnserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        """``turn:`` URLs for UDP and TCP."""
        host = f"{ADDRESSES.public}:{TURN_PORT}"
        return [f"turn:{host}?transport=udp", f"turn:{host}?transport=tcp"]

    def credentials(self, name: str, ttl_s: int = 3600) -> tuple[str, str]:
        """TURN REST API username and password for ``name`` with this server's secret."""
        return turn_credentials(self.secret, name, ttl_s)

    def start(self) -> None:
        """Count its port's traffic, start it, wait until it answers over UDP and TCP."""
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "turnserver.conf"
        conf.write_text(COTURN_CONF.format(public=ADDRESSES.public, port=TURN_PORT,
                                           realm=self.realm, secret=self.secret,
                                           folder=self.folder))
        for chain, way, end in (("INPUT", "in", "--dport"), ("OUTPUT", "out", "--sport")):
            for proto in ("udp", "tcp"):
                self.lab.sh("internet", "iptables", "-w", "-A", chain, "-p", proto, end,
                            str(TURN_PORT), "-m", "comment", "--comment", f"turn-{proto}-{way}")
        self.proc = self.lab.run("internet", ["turnserver", "-c", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until("coturn", self._answers, self.proc, self.log)

    def _answers(self) -> bool:
        with self.lab.socket("internet", socket.SOCK_DGRAM) as udp, \
                self.lab.socket("internet") as tcp:
            udp.settimeout(0.2)
            tcp.settimeout(0.2)
            try:
                udp.sendto(stun_request(b"netlab-ready"), self.address)
                answered = stun_answered(udp.recv(2048)) == b"netlab-ready"
                tcp.connect(self.address)
            except OSError:
                return False
            return answered

    def traffic(self) -> TurnTraffic:
        """Packets and bytes to and from port 3478 since the server started."""
        counted: dict[str, Traffic] = {}
        for chain in ("INPUT", "OUTPUT"):
            listing = self.lab.sh("internet", "iptables", "-w", "-n", "-v", "-x", "-L", chain)
            for line in listing.splitlines():
                match = re.search(r"/\* turn-(\w+)-(\w+) \*/", line)
                if match:
                    packets, size = line.split()[:2]
                    counted[f"{match[1]}_{match[2]}"] = Traffic(int(packets), int(size))
        return TurnTraffic(**counted)

    def stop(self) -> None:
        """Stop the server (the lab stops it too)."""
        if self.proc is not None:
            stop_process(self.proc)


NGINX_SERVER = """\
server {{
        listen {public}:443 ssl;
        server_name {server_name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass https://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto https;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {upstream_ca};
            proxy_ssl_name {server_name};
            proxy_ssl_server_name on;
            # the station's WebSocket is quiet between 10 s heartbeats; 60 s is nginx's default
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
"""

NGINX_CONF = """\
user root;  # the lab runs as root; workers read the temp dirs made here
worker_processes 1;
pid {folder}/nginx.pid;
lock_file {folder}/nginx.lock;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
{server}
}}
"""


class Nginx:
    """Debian's nginx in ``internet``: TLS with a public certificate, proxying to the home.

    Its prefix, config, pid file, logs and temp dirs are all in ``folder``; the ``-e`` and
    ``-c`` flags keep it from reading or writing /etc/nginx, /var/log/nginx or /run.
    """

    def __init__(self, lab: Lab, folder: Path, upstream: str, server_name: str,
                 cert_pem: Path, key_pem: Path, upstream_ca: Path,
                 server: str = NGINX_SERVER) -> None:
        self.lab = lab
        self.folder = folder
        self.url = f"https://{server_name}/"
        fields = {"public": ADDRESSES.public, "server_name": server_name, "cert": cert_pem,
                  "key": key_pem, "upstream": upstream, "upstream_ca": upstream_ca}
        self.conf_text = NGINX_CONF.format(folder=folder, server=server.format(**fields))
        self.log = folder / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it in the foreground (``daemon off``) and wait until it listens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "nginx.conf"
        conf.write_text(self.conf_text)
        self.proc = self.lab.run(
            "internet",
            ["nginx", "-p", f"{self.folder}/", "-c", str(conf), "-e", str(self.log),
             "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_until("nginx", self._listens, self.proc, self.log)

    def _listens(self) -> bool:
        with self.lab.socket("internet") as sock:
            sock.settimeout(0.2)
            return sock.connect_ex((ADDRESSES.public, 443)) == 0

    def stop(self) -> None:
        """Stop the server (the lab stops it too)."""
        if self.proc is not None:
            stop_process(self.proc)


@dataclass(frozen=True)
class Certificate:
    """A test CA and a server certificate it signed, as PEM files (and the CA as DER)."""

    ca_pem: Path
    ca_der: bytes
    cert_pem: Path
    key_pem: Path


def server_certificate(folder: Path, name: str = "door.example.test",
                       ca_name: str = "Netlab Public CA") -> Certificate:
    """A fresh CA and a certificate for ``name`` from it: what Let's Encrypt would give."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = Certificate(folder / "ca.pem", ca.public_bytes(serialization.Encoding.DER),
                        folder / "cert.pem", folder / "key.pem")
    files.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key_pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.key_pem.chmod(0o600)
    return files


class Lab:
    """The five namespaces of one run, the processes started in them, and their files."""

    def __init__(self, prefix: str, folder: Path, forwards: Sequence[int] = (8443,)) -> None:
        self.folder = folder
        self.prefix = prefix
        self.addresses = ADDRESSES
        self.forwards = tuple(forwards)
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        self._delay: subprocess.Popen[bytes] | None = None
        self._closed = False

    def ns(self, name: str) -> str:
        """The full name of one of the lab's namespaces (``home``, ``mobile``, …)."""
        if name not in NAMESPACES:
            raise ValueError(f"no namespace {name!r} in the lab; there are {NAMESPACES}")
        return f"{self.prefix}-{name}"

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside namespace ``name`` (for asyncio's subprocesses)."""
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(self, name: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in namespace ``name``; it is killed at teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(name, argv), **popen)
        self._procs.append(proc)
        return proc

    def sh(self, name: str, *argv: str, stdin: str | None = None) -> str:
        """Run a command to its end inside namespace ``name``; its output."""
        done = subprocess.run(self.argv(name, argv), input=stdin, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {name} failed: {done.stderr.strip()}")
        return done.stdout

    def socket(self, name: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new IPv4 socket in namespace ``name``, usable from any thread or loop."""
        return in_namespace(self.ns(name), lambda: socket.socket(socket.AF_INET, kind))

    def wrapper(self, name: str, program: str) -> Path:
        """An executable that runs ``program`` (with its arguments) inside namespace ``name``.

        For launchers that take a program's path, such as Playwright's ``executable_path``
        to run Chromium in ``mobile``; the process keeps the wrapper's pid.
        """
        path = self.folder / f"in-{name}-{Path(program).name}"
        command = f"exec ip netns exec {self.ns(name)} {shlex.quote(program)}"
        path.write_text(f'#!/bin/sh\n{command} "$@"\n')
        path.chmod(0o755)
        return path

    def hosts(self, name: str, entries: dict[str, str]) -> None:
        """Host names that programs run in ``name`` resolve (``/etc/hosts`` there)."""
        lines = ["127.0.0.1 localhost", *(f"{addr} {host}" for host, addr in entries.items())]
        (ETC_NETNS / self.ns(name) / "hosts").write_text("\n".join(lines) + "\n")

    def build(self) -> None:
        """Make the namespaces, links, addresses, routes and NAT rules."""
        for name in NAMESPACES:
            _ip("netns", "add", self.ns(name))
            self._made.append(self.ns(name))
            forward = "1" if name in FORWARDING else "0"
            self.sh(name, "sysctl", "-qw", f"net.ipv4.ip_forward={forward}",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", self.ns(name), "link", "set", "lo", "up")
            # No name server: a lookup fails at once on the namespace's own loopback instead
            # of waiting for the host's server, which the lab cannot reach.
            (ETC_NETNS / self.ns(name)).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / self.ns(name) / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        for (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) in LINKS:
            _ip("-n", self.ns(ns_a), "link", "add", if_a, "type", "veth",
                "peer", "name", if_b, "netns", self.ns(ns_b))
            for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
                _ip("-n", self.ns(ns), "addr", "add", addr, "dev", ifname)
                _ip("-n", self.ns(ns), "link", "set", ifname, "up")
        for name, gateway in DEFAULT_ROUTES.items():
            _ip("-n", self.ns(name), "route", "add", "default", "via", gateway)
        forwards = "\n".join(FORWARD_RULE.format(port=p, home=A.home) for p in self.forwards)
        self.sh("router", "iptables-restore", stdin=ROUTER_RULES.format(forwards=forwards))
        self.sh("mrouter", "iptables-restore", stdin=MROUTER_RULES)

    def coturn(self, secret: str, realm: str) -> Coturn:
        """Debian's coturn in ``internet`` on 203.0.113.1:3478 (UDP and TCP), REST API auth."""
        server = Coturn(self, self.folder / "coturn", secret, realm)
        server.start()
        return server

    def nginx(
        self, upstream: str, server_name: str, cert_pem: Path, key_pem: Path, upstream_ca: Path,
        server: str = NGINX_SERVER,
    ) -> Nginx:
        """Debian's nginx in ``internet`` on 203.0.113.1:443, proxying to ``https://upstream``.

        ``server`` is its ``server`` block, a template with the fields ``public``,
        ``server_name``, ``cert``, ``key``, ``upstream`` and ``upstream_ca`` (literal braces
        doubled); by default the lab's own.
        """
        proxy = Nginx(self, self.folder / "nginx", upstream, server_name, cert_pem, key_pem,
                      upstream_ca, server)
        proxy.start()
        return proxy

    def carrier_nat(self, symmetric: bool) -> None:
        """Make the carrier NAT symmetric (as built) or a port-keeping cone NAT.

        A control for the tests: through a cone NAT the two NATs' server-reflexive
        addresses do connect. It applies to flows that start after the call.
        """
        random = ["--random-fully"] if symmetric else []
        self.sh("mrouter", "iptables", "-w", "-t", "nat", "-R", "POSTROUTING", "1",
                "-o", "wan", "-j", "MASQUERADE", *random)

    def impair(self, rtt_ms: float, loss: float, rate_kbps: float | None = None,
               queue_ms: float = 200.0) -> None:
        """Make the mobile's path to coturn long, lossy and (``rate_kbps``) slow;
        ``impair(0, 0)`` undoes it.

        ``loss`` drops that share of UDP datagrams arriving at the carrier NAT (``mrouter``)
        from either side. ``rtt_ms`` is added to the mobile's UDP flows to 203.0.113.1:3478
        by ``udpdelay.py`` in ``mrouter`` (10.77.0.1:3478); a DNAT in ``mobile`` sends them
        there, so nothing in the mobile is configured. It applies to flows that start after
        the call (conntrack keeps an existing flow's NAT); TURN over TCP is not delayed.
        ``rate_kbps`` makes that relay a bottleneck of that rate each way, with a drop-tail
        queue of ``queue_ms`` (a slow mobile link); None (the default): no limit.
        """
        self.sh("mrouter", "iptables", "-w", "-F", "LOSS")
        self.sh("mobile", "iptables", "-w", "-t", "nat", "-F", "OUTPUT")
        if self._delay is not None:
            stop_process(self._delay)
            self._delay = None
        if loss > 0:
            self.sh("mrouter", "iptables", "-w", "-A", "LOSS", "-p", "udp", "-m", "statistic",
                    "--mode", "random", "--probability", f"{loss:.6f}", "-j", "DROP")
        if rtt_ms > 0 or rate_kbps is not None:
            self._delay = self._start_delay(rtt_ms, rate_kbps, queue_ms)
            self.sh("mobile", "iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", A.public,
                    "-p", "udp", "--dport", str(TURN_PORT), "-j", "DNAT",
                    "--to-destination", f"{A.mrouter_lan}:{TURN_PORT}")

    def _start_delay(self, rtt_ms: float, rate_kbps: float | None = None,
                     queue_ms: float = 200.0, timeout: float = 10) -> subprocess.Popen[bytes]:
        log = (self.folder / "udpdelay.log").open("ab")
        rate = [] if rate_kbps is None else ["--rate-kbps", str(rate_kbps),
                                             "--queue-ms", str(queue_ms)]
        proc = self.run("mrouter", [
            sys.executable, str(UDPDELAY), "--listen", f"{A.mrouter_lan}:{TURN_PORT}",
            "--upstream", f"{A.public}:{TURN_PORT}", "--rtt-ms", str(rtt_ms), *rate,
        ], stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready or proc.stdout.readline() != b"listening\n":
            stop_process(proc)
            log_text = (self.folder / "udpdelay.log").read_text(errors="replace")
            raise RuntimeError(f"udpdelay did not start: {log_text}")
        return proc

    def close(self) -> None:
        """Stop every process the lab started and delete its namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self._procs):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                stop_process(proc)
        for namespace in reversed(self._made):
            _delete_namespace(namespace)


@contextmanager
def lab(folder: Path | None = None, forwards: Sequence[int] = (8443,)) -> Iterator[Lab]:
    """A fresh lab, its logs and configs in ``folder`` (else a temporary one), torn down after.

    ``forwards`` are the TCP ports the home router forwards from its WAN address to the
    same port of the station (192.168.77.2).
    """
    remove_stale()
    prefix = f"{PREFIX}{os.getpid()}n{next(_SERIAL)}"
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix=f"netlab-{prefix}-")))
        folder.mkdir(parents=True, exist_ok=True)
        the_lab = Lab(prefix, folder, forwards)
        atexit.register(the_lab.close)  # an interrupted run that skips ``finally``
        try:
            the_lab.build()
            yield the_lab
        finally:
            the_lab.close()
            atexit.unregister(the_lab.close)
