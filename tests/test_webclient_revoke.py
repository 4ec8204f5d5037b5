"""A revoked phone in Chromium is disconnected at once and never rung again."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from .browser import SimStation, chromium, new_device, pair_device, wait_call_state
from .conftest import INTERCOM

CALL_STATES = """() => {
    window.__calls = [document.body.dataset.call];
    new MutationObserver(() => window.__calls.push(document.body.dataset.call))
        .observe(document.body, {attributes: true, attributeFilter: ['data-call']});
}"""


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimStation]:
    st = SimStation(tmp_path_factory.mktemp("revoke") / "state")
    yield st
    st.stop()


@pytest.fixture(scope="module")
def browser(station: SimStation) -> Iterator[Browser]:
    with chromium(station.url) as b:
        yield b


def devices_online(station: SimStation) -> int:
    return int(station.status()["calls"]["devices_online"])


def test_a_revoked_phone_is_dropped_and_never_rung_again(station: SimStation,
                                                          browser: Browser) -> None:
    context, page = new_device(browser, station.url)
    try:
        pair_device(page, station.pair_link("1"))
        pid = page.text_content("#info-principal")
        assert isinstance(pid, str)
        assert pid.startswith("res-")
        station.press()
        wait_call_state(page, "ringing")  # paired and rung: the phone works
        station.request({"request": "hangup"})
        wait_call_state(page, "idle")
        station.wait("the device online", lambda s: s["calls"]["devices_online"] == 1)

        revoked = subprocess.run(
            [*INTERCOM, "principals", "revoke", pid, "--state-dir", str(station.state_dir)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert revoked.returncode == 0, revoked.stderr
        # The station dropped its session when it revoked (not at a later timer).
        station.wait("the revoked device dropped", lambda s: s["calls"]["devices_online"] == 0)
        page.wait_for_selector("body:not([data-link='online'])", timeout=10000)
        page.evaluate(CALL_STATES)
        station.press()
        missed = station.wait("the press missed", lambda s: [
            e for e in s["recent_events"] if e["type"] == "CallMissed"
        ])
        assert missed
        assert devices_online(station) == 0  # its reconnects are refused (4401)
        assert "ringing" not in page.evaluate("window.__calls")
        log = station.log()
        assert "principal revoked" in log
    finally:
        context.close()


def test_revocation_is_in_the_event_log(station: SimStation) -> None:
    shown = subprocess.run(
        [*INTERCOM, "log", "show", "--type", "PrincipalRevoked", "--state-dir",
         str(station.state_dir)], capture_output=True, text=True, timeout=60, check=True,
    )
    assert "PrincipalRevoked" in shown.stdout
    assert Path(station.state_dir).exists()
