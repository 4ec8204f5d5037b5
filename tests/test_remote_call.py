"""A resident answers the door from away: through NAT, the owner's TURN server and a
reverse proxy, with no cloud (docs/remote.md).

Real: network namespaces made by the test (tests/netlab.py): the station (``intercom run
--simulate``) in a home network behind a NAT router, Debian's coturn and nginx (configured
with docs/remote.md's own ``server`` block) in an "internet", and Debian's Chromium, the
resident's phone, behind a symmetric carrier NAT, where a direct or server-reflexive path
cannot work (tests/test_netlab.py shows that with aiortc peers). The phone is paired at
home, by the public URL, and the same browser profile answers from the mobile network
without pairing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyotp
import pytest
from playwright.sync_api import Page, sync_playwright

from .browser import SimStation, pair_device, wait_call_state
from .remote_rig import PUBLIC_URL, Remote, first_page, remote_station
from .test_webclient import stats as page_stats
from .test_webclient import wait_stats


def relayed(stats: dict[str, Any]) -> bool:
    return (stats.get("dtlsState") == "connected" and stats.get("localCandidate") == "relay"
            and stats.get("remoteCandidate") == "relay")


def pair_at_home(remote: Remote, p: Any, profile: Path, home: Path) -> pyotp.TOTP:
    """Pair the phone on the home network by the public URL; its TOTP generator."""
    context = remote.phone(p, "home", profile, home)
    try:
        page = first_page(context)
        link = remote.station.pair_link("1")
        assert link.startswith(f"{PUBLIC_URL}#pair="), link  # the public URL, also at home
        enrolment = pair_device(page, link)
        wait_stats(page, relayed, "the standing connection through TURN at home")
        return pyotp.parse_uri(enrolment["totp_uri"])
    finally:
        context.close()


def speaker(station: SimStation) -> int:
    return int(station.status()["speaker"]["audible_frames"])


def ring_answer_talk_unlock(station: SimStation, page: Page, totp: pyotp.TOTP) -> dict[str, Any]:
    """The whole call from the phone; the page's statistics during it."""
    station.wait("idle station", lambda s: s["call"] == "idle")
    heard = speaker(station)
    station.press()
    wait_call_state(page, "ringing", timeout=20)
    page.wait_for_function(  # the preview plays before the answer
        "() => window.intercom.stats().then(s => s.framesDecoded > 3)", timeout=20000)
    page.click("#btn-answer")
    wait_call_state(page, "in_call", timeout=20)
    page.wait_for_function(
        "() => window.intercom.stats().then(s => (s.audioBytesReceived ?? 0) > 2000)",
        timeout=20000)
    station.wait("the phone's audio at the door", lambda _s: speaker(station) > heard + 5,
                 timeout=20)
    during = page_stats(page)
    page.click("#btn-open")
    page.fill("#unlock-code", totp.now())
    page.click("#unlock-send")
    page.wait_for_selector("#unlock-result[data-result='granted']", timeout=20000)
    pulse = station.wait("relay pulse", lambda _s: station.events("LockStateChanged"))
    assert pulse[0]["reason"] == "unlock via call"
    return during


def test_paired_at_home_answers_and_opens_from_the_mobile_network_through_turn(tmp_path):
    with remote_station(tmp_path) as (remote, home), sync_playwright() as p:
        profile = tmp_path / "phone-profile"
        totp = pair_at_home(remote, p, profile, home)
        # the same phone (its profile, its key in IndexedDB) on the mobile network
        context = remote.phone(p, "mobile", profile, home)
        try:
            page = first_page(context)
            page.goto(PUBLIC_URL)
            page.wait_for_selector("body[data-link='online']", timeout=30000)
            wait_stats(page, relayed, "the standing connection through TURN from mobile")
            during = ring_answer_talk_unlock(remote.station, page, totp)
        finally:
            context.close()
    # the media took the relay at both ends, encrypted (DTLS-SRTP)
    assert relayed(during), during
    assert during["srtpCipher"].startswith(("SRTP_AEAD_AES", "AES_CM_128")), during


def counted(listing: str, target: str) -> int:
    """Packets an ``iptables -L -v -x`` listing counts for its rules jumping to ``target``."""
    return sum(int(line.split()[0]) for line in listing.splitlines()
               if len(line.split()) > 2 and line.split()[2] == target)


def lossy_call(folder: Path, rtt_ms: float, loss: float, seconds: float,
               rate_kbps: float | None = None, queue_ms: float = 200.0,
               camera: Mapping[str, object] | None = None) -> tuple[dict[str, Any], bool]:
    """A whole call from the mobile network, its phone's path to coturn ``rtt_ms`` long,
    losing ``loss`` of its UDP and (``rate_kbps``) a bottleneck of that rate each way with
    a ``queue_ms`` drop-tail queue, kept up ``seconds``: the page's statistics after it
    (with the bottleneck's own counts, ``link``), and whether the delay and the losses
    were on the media's path (also for the bench). ``camera``: the station's
    ``[media.camera]`` keys."""
    with remote_station(folder, udp_only=True, camera=camera) as (remote, home), \
            sync_playwright() as p:
        profile = folder / "phone-profile"
        totp = pair_at_home(remote, p, profile, home)
        # before the phone's flows start: they take it
        remote.lab.impair(rtt_ms, loss, rate_kbps, queue_ms)
        context = remote.phone(p, "mobile", profile, home)
        try:
            page = first_page(context)
            page.goto(PUBLIC_URL)
            page.wait_for_selector("body[data-link='online']", timeout=60000)
            wait_stats(page, relayed, "the standing connection through TURN", timeout=60)
            ring_answer_talk_unlock(remote.station, page, totp)
            page.wait_for_timeout(seconds * 1000)
            after = page_stats(page)
            # the phone's flows went through the delay relay, and some datagrams were lost
            delayed = remote.lab.sh("mobile", "iptables", "-w", "-t", "nat", "-n", "-v", "-x",
                                    "-L", "OUTPUT")
            dropped = remote.lab.sh("mrouter", "iptables", "-w", "-n", "-v", "-x", "-L", "LOSS")
            lost = loss == 0 or counted(dropped, "DROP") > 0
            remote.lab.impair(0, 0)  # the relay logs its bottleneck's counts as it stops
            log = (remote.lab.folder / "udpdelay.log").read_text(errors="replace")
            after["link"] = [line.removeprefix("udpdelay ") for line in log.splitlines()
                             if "dropped at the queue" in line]
            return after, counted(delayed, "DNAT") > 0 and lost
        finally:
            context.close()


@pytest.mark.slow
def test_a_60_s_call_over_a_lossy_100_ms_mobile_link_does_not_freeze(tmp_path):
    """100 ms RTT and 2 % loss between the phone and coturn; a 60 s call: Chromium's
    freezeCount stays at most 2 and the freezes together last at most 1 s. TURN over UDP
    only: the lab impairs UDP (an unimpaired TCP relay would be chosen instead)."""
    after, impaired = lossy_call(tmp_path, 100, 0.02, 60)
    assert relayed(after), after
    assert after["relayProtocol"] == "udp", after
    assert impaired, "the delay and the losses were not on the media's path"
    assert after["freezeCount"] <= 2, after
    assert after["totalFreezesDuration"] <= 1.0, after
