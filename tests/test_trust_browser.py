"""Debian's Chromium trusts the station once its CA is installed, and only for its names.

The station's root goes into the NSS database of a fresh ``$HOME`` (``certutil``), as a
resident installs it; Chromium gets no ``--ignore-certificate-errors*`` flag at all. Then
the page loads with no certificate error and the service worker reaches ``activated``
(browsers run none for a certificate merely accepted at a warning). A browser trusting
another CA refuses the station, and a certificate the station's own CA key signs for
another site is refused by Chromium's name-constraint check.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import ipaddress
import ssl
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Error as PlaywrightError

from intercom.deploy.stationca import StationNames, grouped, issue_leaf, make_ca
from intercom.deploy.tlscert import CA_KEY

from .browser import CHROMIUM_ARGS, SimStation, chromium, station_ca

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
ACTIVATED = """async () => {
  const registration = await navigator.serviceWorker.register("sw.js");
  const worker = registration.installing || registration.waiting || registration.active;
  if (worker.state !== "activated") {
    await new Promise((resolve) => worker.addEventListener("statechange", () => {
      if (worker.state === "activated") resolve();
    }));
  }
  return worker.state;
}"""


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimStation]:
    st = SimStation(tmp_path_factory.mktemp("trust") / "state")
    try:
        yield st
    finally:
        st.stop()


def root_of(station: SimStation) -> bytes:
    pem = (station.state_dir / "keys" / "ca.crt").read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(DER)


def test_chromium_with_the_station_ca_installed_trusts_the_station(station):
    assert not [a for a in CHROMIUM_ARGS if a.startswith("--ignore-certificate-errors")]
    root = root_of(station)
    assert station_ca(station.url) == root  # what /ca.crt serves
    fp = station.pair_link().split("&fp=")[1]
    assert fp == hashlib.sha256(root).hexdigest()  # the link carries the root's fingerprint
    with chromium(station.url, ca_der=root) as browser:
        context = browser.new_context()
        page = context.new_page()
        response = page.goto(station.url)
        assert response is not None
        assert response.ok
        assert page.evaluate("() => window.isSecureContext")
        assert page.evaluate(ACTIVATED) == "activated"
        # the trust page: the fingerprint of the file it offers, checked against the link's
        page.goto(f"{station.url}trust.html#fp={fp}")
        page.wait_for_selector("body[data-ready='1']")
        assert page.text_content("#station") == station.status()["station"]
        assert page.text_content("#fp") == grouped(fp)
        assert page.text_content("#fp-check") == "It matches your pairing link."
        assert page.text_content("#error") == ""
        with page.expect_download() as download:
            page.click("#get-crt")
        assert Path(download.value.path()).read_bytes() == root
        page.goto("about:blank")
        page.goto(f"{station.url}trust.html#fp={'00' * 32}")
        page.wait_for_selector("body[data-ready='1']")
        assert "NOT the fingerprint of your pairing link" in (page.text_content("#fp-check") or "")
        context.close()


def test_chromium_trusting_another_ca_refuses_the_station(station):
    key = ec.generate_private_key(ec.SECP256R1())
    names = StationNames.of(["other"], [ipaddress.ip_address("127.0.0.1")])
    other = make_ca(key, "other", names, dt.datetime.now(dt.UTC)).public_bytes(DER)
    with chromium(station.url, ca_der=other) as browser:
        page = browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(station.url)


@contextmanager
def tls_site(pem: bytes) -> Iterator[int]:
    """A loopback HTTPS server presenting the chain and key in ``pem``; its port."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>site</title>hello"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.NamedTemporaryFile(suffix=".pem") as file:
        file.write(pem)
        file.flush()
        context.load_cert_chain(file.name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_station_ca_cannot_vouch_for_another_site(station):
    """Signed with the station's own CA key, a certificate for another name is refused."""
    keys = station.state_dir / "keys"
    ca = x509.load_pem_x509_certificate((keys / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((keys / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    station_id = station.status()["station"]
    now = dt.datetime.now(dt.UTC)

    def site(name: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = issue_leaf(ca_key, ca, key.public_key(), StationNames.of([name], []), now)
        return leaf.public_bytes(PEM) + key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    own, forged = f"{station_id}.local", "bank.example"
    rules = f"--host-resolver-rules=MAP {own} 127.0.0.1, MAP {forged} 127.0.0.1"
    with (
        tls_site(site(own)) as own_port,
        tls_site(site(forged)) as forged_port,
        chromium(station.url, (rules,), ca_der=ca.public_bytes(DER)) as browser,
    ):
        page = browser.new_page()
        response = page.goto(f"https://{own}:{own_port}/")  # a name the CA may vouch for
        assert response is not None
        assert response.ok
        with pytest.raises(PlaywrightError, match="ERR_CERT"):
            page.goto(f"https://{forged}:{forged_port}/")
