"""``scripts/demo --lan`` and ``intercom run --simulate --lan``: documented, and the address.

No station is started on a LAN address here (the tests use loopback only): the address
choice itself is tested with interfaces given to it (tests/test_tls.py) and with this
machine's own through the very settings ``intercom run`` would use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from intercom.cli import build_parser
from intercom.cli.run import settings_for
from intercom.netaddr import NoLanAddressError, machine_addresses

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_the_demo_documents_lan_and_port():
    result = run(str(DEMO), "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "--lan" in text
    assert "--port PORT" in text
    assert "8443" in text
    assert "trust.html" in text
    assert "loopback" in text


def test_the_demo_refuses_a_port_without_lan_or_a_bad_one():
    result = run(str(DEMO), "--port", "9443")
    assert result.returncode == 2
    assert "--port goes with --lan" in result.stderr
    result = run(str(DEMO), "--lan", "--port", "http")
    assert result.returncode == 2
    assert "--port must be a TCP port" in result.stderr


def test_intercom_run_documents_lan():
    result = run(sys.executable, "-m", "intercom", "run", "--help")
    assert result.returncode == 0, result.stderr
    assert "--lan" in result.stdout
    assert "LAN address" in result.stdout


def test_lan_needs_a_simulated_station(tmp_path):
    result = run(sys.executable, "-m", "intercom", "run", "--lan", "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--lan: only with --simulate" in result.stderr


def test_a_simulated_lan_station_listens_on_a_reachable_address(tmp_path):
    args = build_parser().parse_args(
        ["run", "--simulate", "--lan", "--state-dir", str(tmp_path / "state")]
    )
    if not machine_addresses():  # only loopback here: the clear error instead
        with pytest.raises(NoLanAddressError, match="no LAN address"):
            settings_for(args)
        return
    settings = settings_for(args)
    assert settings.web.host == str(machine_addresses()[0])
    without = build_parser().parse_args(["run", "--simulate", "--state-dir", str(tmp_path)])
    assert settings_for(without).web.host == "127.0.0.1"  # no --lan: loopback as before
