"""image-build/host-mirror: the build's default mirror is the one this host's apt uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST_MIRROR = REPO / "image-build" / "host-mirror"


def mirrors(etc: Path, suite: str = "bookworm") -> list[str]:
    out = subprocess.run([sys.executable, str(HOST_MIRROR), suite, str(etc)],
                         capture_output=True, text=True, check=True).stdout
    return out.split("\n")[:2]


def test_deb822_sources_give_the_mirror_and_the_security_mirror(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://ftp.de.debian.org/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://ftp.de.debian.org/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert mirrors(tmp_path) == ["http://ftp.de.debian.org/debian",
                                 "http://ftp.de.debian.org/debian-security"]


def test_one_line_format_with_options_and_disabled_or_foreign_entries(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://other.example/debian trixie main\n"
        "deb [ arch=amd64 ] http://mirror.example/debian bookworm main non-free-firmware\n"
    )
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "off.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    (tmp_path / "sources.list.d" / "vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/apt\nSuites: bookworm-security\n"
        "Components: stable\n"
    )
    assert mirrors(tmp_path) == ["http://mirror.example/debian", ""]


def test_no_entry_for_the_suite_leaves_the_default_to_the_build(tmp_path):
    (tmp_path / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu jammy main\n")
    assert mirrors(tmp_path) == ["", ""]
    build = (REPO / "image-build" / "build").read_text()
    assert "MIRROR=${MIRROR:-http://deb.debian.org/debian}" in build
