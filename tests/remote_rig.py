"""A resident away from home, for real: the station behind a home NAT, reached through
nginx (the reverse proxy of docs/remote.md, its very ``server`` block) and coturn, and
Debian's Chromium behind a symmetric carrier NAT (``tests/netlab.py``).

The station is ``intercom run --simulate`` with a config file in the ``home`` namespace
(``--lan``: it listens on its LAN address), ``web.public_url`` the proxy's name,
``web.ice_policy = "relay"`` and ``[web.turn]`` the lab's coturn with a secret made for
this run. Chromium trusts the proxy's public CA (a test CA, as Let's Encrypt's would be
for a real name), not the station's: the proxy checks the station's certificate against
the station's CA. Used by tests/test_remote_call.py and scripts/bench_remote.py.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, Playwright

from .browser import CHROMIUM, CHROMIUM_ARGS, PHONE, SimStation, tone_wav, trusting_home
from .netlab import ADDRESSES, Coturn, Lab, Nginx, lab, server_certificate

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_NAME = "door.example.test"
PUBLIC_URL = f"https://{PUBLIC_NAME}/"


def documented_nginx_server() -> str:
    """docs/remote.md's nginx ``server`` block as a netlab template (its fields filled in)."""
    text = (ROOT / "docs" / "remote.md").read_text()
    match = re.search(r"```nginx\n(.*?)```", text, re.DOTALL)
    if match is None:
        raise AssertionError("docs/remote.md has no nginx block")
    block = match.group(1).replace("{", "{{").replace("}", "}}")
    for documented, field in (
        ("listen 443 ssl;", "listen {public}:443 ssl;"),
        ("door.example.org", "{server_name}"),
        ("/etc/letsencrypt/live/{server_name}/fullchain.pem", "{cert}"),
        ("/etc/letsencrypt/live/{server_name}/privkey.pem", "{key}"),
        ("STATION_ADDRESS:8443", "{upstream}"),
        ("/etc/nginx/intercom-ca.crt", "{upstream_ca}"),
    ):
        if documented not in block:
            raise AssertionError(f"docs/remote.md's nginx block lost {documented!r}")
        block = block.replace(documented, field)
    return block


def station_config(folder: Path, turn: Coturn, secret: str, udp_only: bool = False,
                   camera: Mapping[str, object] | None = None) -> Path:
    """The station's config: public URL, the proxy trusted, coturn, relay only (over UDP
    only with ``udp_only``); ``camera``: keys of its ``[media.camera]`` (else the
    simulated station's synthetic camera)."""
    secret_file = folder / "turn-secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    urls = ", ".join(f'"{u}"' for u in turn.urls if not udp_only or u.endswith("=udp"))
    config = folder / "station.toml"
    config.write_text(f"""
[station]
id = "door-remote"
state_dir = "{folder / 'state'}"

[hardware]
buttons = [{{ name = "bell", pin = 17, flat = "1" }}]
relay = {{ pin = 27, door = "front" }}
door_contact = {{ pin = 22 }}
tamper = {{ pin = 23 }}

[web]
port = 8443
public_url = "{PUBLIC_URL}"
ice_policy = "relay"
trusted_proxies = ["{ADDRESSES.public}"]

[web.turn]
urls = [{urls}]
secret_file = "{secret_file}"
""")
    if camera:
        with config.open("a") as out:
            out.write("\n[media.camera]\n")
            out.writelines(f"{key} = {json.dumps(value)}\n" for key, value in camera.items())
    return config


@dataclass
class Remote:
    """The lab, its servers and the station running in ``home``."""

    lab: Lab
    turn: Coturn
    proxy: Nginx
    station: SimStation
    public_ca_der: bytes
    folder: Path

    def phone(self, p: Playwright, where: str, profile: Path, home: Path) -> BrowserContext:
        """Chromium in namespace ``where`` (``home`` or ``mobile``), its profile kept in
        ``profile`` (the same device when launched again), a steady fake microphone."""
        tone = tone_wav(self.folder / "voice.wav")
        # Not --allow-loopback-in-peer-connection: the namespaces have real interfaces,
        # and a TURN allocation tried from loopback would hold the gathering for ~40 s.
        args = [*(a for a in CHROMIUM_ARGS if a != "--allow-loopback-in-peer-connection"),
                f"--use-file-for-fake-audio-capture={tone}",
                f"--host-resolver-rules=MAP {PUBLIC_NAME} {ADDRESSES.public}"]
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(self.lab.wrapper(where, CHROMIUM)), args=args,
            env={"HOME": str(home), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True,
        )
        context.grant_permissions(["microphone", "camera"], origin=PUBLIC_URL.rstrip("/"))
        return context


def first_page(context: BrowserContext) -> Page:
    """The context's page (a persistent context opens with one)."""
    return context.pages[0] if context.pages else context.new_page()


@contextmanager
def remote_station(folder: Path, udp_only: bool = False,
                   camera: Mapping[str, object] | None = None) -> Iterator[tuple[Remote, Path]]:
    """The whole setup; yields it and a ``$HOME`` whose NSS trusts the proxy's public CA.

    ``udp_only``: the station hands out only coturn's UDP URL (the lab impairs UDP only,
    and an unimpaired TCP relay would win the race). ``camera``: ``[media.camera]`` keys
    (a file source's picture and ``vp8_per_device`` are kept by ``--simulate``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with lab(folder / "lab") as net:
        secret = secrets.token_urlsafe(24)
        turn = net.coturn(secret, realm="turn.example.test")
        config = station_config(folder, turn, secret, udp_only, camera)
        station = SimStation(
            folder / "state", ("--config", str(config), "--lan"),
            command=net.argv("home", [sys.executable, "-m", "intercom"]),
        )
        try:
            public = server_certificate(folder / "public", PUBLIC_NAME)
            proxy = net.nginx(
                f"{ADDRESSES.router_wan}:8443", PUBLIC_NAME, public.cert_pem, public.key_pem,
                folder / "state" / "keys" / "ca.crt", documented_nginx_server(),
            )
            remote = Remote(net, turn, proxy, station, public.ca_der, folder)
            with trusting_home(public.ca_der) as home:
                yield remote, home
        finally:
            station.stop()
