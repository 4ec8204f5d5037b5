"""Local files: exports never write into or through what an unprivileged user prepared."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

from intercom.errors import IntercomError
from intercom.safefiles import (
    create_new,
    make_private_dir,
    open_new,
    replace_atomically,
    write_new,
)

from . import test_firstboot as boot
from . import test_privacy_dsr as dsr

state = dsr.state
dirs = boot.dirs

VICTIM = b"root's own file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every export that a planted link points at."""
    path = tmp_path / "elsewhere" / "victim.conf"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    return path


def prepared_dir(path: Path, links: dict[str, Path]) -> Path:
    """A world-writable folder made in advance, with links planted where files will go."""
    path.mkdir()
    path.chmod(0o777)
    for name, target in links.items():
        (path / name).symlink_to(target)
    return path


# --- the helpers ---------------------------------------------------------------------------


def test_a_private_dir_is_new_and_0700(tmp_path: Path):
    old = os.umask(0o002)
    try:
        made = make_private_dir(tmp_path / "a" / "export")
    finally:
        os.umask(old)
    assert made.stat().st_mode & 0o777 == 0o700
    path = write_new(made, "x.json", b"{}")
    assert path.read_bytes() == b"{}"
    assert path.stat().st_mode & 0o777 == 0o600


def test_existing_dirs_links_and_files_are_refused(tmp_path: Path, victim: Path):
    existing = prepared_dir(tmp_path / "open", {"manifest.json": victim})
    with pytest.raises(IntercomError, match=re.escape(str(existing))):
        make_private_dir(existing)
    assert existing.stat().st_mode & 0o777 == 0o777  # refused, not taken over
    link = tmp_path / "link"
    link.symlink_to(victim.parent)
    with pytest.raises(IntercomError, match=re.escape(str(link))):
        make_private_dir(link)
    with pytest.raises(IntercomError, match=r"manifest\.json"):
        write_new(existing, "manifest.json", b"secret")
    with pytest.raises(IntercomError, match=re.escape(str(victim))):
        open_new(victim)
    with pytest.raises(IntercomError, match=r"manifest\.json"):
        create_new(existing / "manifest.json")
    with pytest.raises(IntercomError):
        write_new(tmp_path, "../escape", b"x")
    assert victim.read_bytes() == VICTIM
    assert not (tmp_path.parent / "escape").exists()


# --- the commands that export --------------------------------------------------------------


def test_privacy_export_refuses_a_prepared_folder(state: Path, tmp_path: Path, victim: Path):
    out = prepared_dir(tmp_path / "export", {"manifest.json": victim})
    done = dsr.intercom(state, "privacy", "export", "--principal", dsr.ALICE, "--out", str(out))
    assert done.returncode == 1
    assert str(out) in done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_bytes() == VICTIM
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # only the planted link


def test_privacy_export_refuses_a_link_to_a_folder(state: Path, tmp_path: Path, victim: Path):
    out = tmp_path / "export"
    out.symlink_to(victim.parent)
    done = dsr.intercom(state, "privacy", "export", "--principal", dsr.ALICE, "--out", str(out))
    assert done.returncode == 1
    assert str(out) in done.stderr
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.conf"]


def test_privacy_snapshots_refuse_a_prepared_folder(state: Path, tmp_path: Path, victim: Path):
    links = {f"snapshot-{seq}.jpg": victim for seq in range(1, 20)}
    out = prepared_dir(tmp_path / "snaps", links)
    done = dsr.intercom(state, "privacy", "snapshots", "--out", str(out))
    assert done.returncode == 1
    assert str(out) in done.stderr
    assert victim.read_bytes() == VICTIM


def test_log_export_refuses_a_planted_link(state: Path, tmp_path: Path, victim: Path):
    output = tmp_path / "events.jsonl"
    output.symlink_to(victim)
    done = dsr.intercom(state, "log", "export", "--output", str(output))
    assert done.returncode == 1
    assert str(output) in done.stderr
    assert victim.read_bytes() == VICTIM
    fresh = tmp_path / "fresh.jsonl"
    done = dsr.intercom(state, "log", "export", "--output", str(fresh))
    assert done.returncode == 0, done.stderr
    assert fresh.stat().st_mode & 0o777 == 0o600
    assert fresh.read_text().count("\n") >= 1


# --- first boot names keys, never values ---------------------------------------------------

TURN_SECRET = str(10**11 + secrets.randbelow(9 * 10**11))  # fresh per run, as a number


def test_first_boot_errors_name_the_key_but_not_a_secret_value(dirs):
    web = (
        '\n[web]\nice_servers = [{ urls = ["turn:turn.example.net:3478"], '
        f'username = "door", credential = {TURN_SECRET} }}]\n'
    )
    (dirs["boot"] / "intercom.toml").write_text(boot.installer_file(extra=web))
    result = boot.firstboot(dirs)
    assert result.returncode == 2
    error = (dirs["boot"] / "intercom-error.txt").read_text()
    for text in (error, result.stderr):
        assert "web.ice_servers[0].credential" in text
        assert TURN_SECRET not in text
    assert TURN_SECRET.encode() not in boot.everything_under(dirs["boot"])


# --- replacing a file in place: atomically, never through a link ---------------------------


def test_replace_atomically_keeps_or_sets_the_mode_whatever_the_umask(tmp_path, victim):
    existing = tmp_path / "intercom.toml"
    existing.write_bytes(b"old\n")
    existing.chmod(0o640)
    fresh = tmp_path / "pairing-sheets.json"
    old_umask = os.umask(0o077)
    try:
        replace_atomically(existing, b"new\n")
        with pytest.raises(IntercomError, match=str(fresh)):  # missing, and no mode given
            replace_atomically(fresh, b"[]")
        replace_atomically(fresh, b"[]", 0o600)
    finally:
        os.umask(old_umask)
    assert (existing.read_bytes(), existing.stat().st_mode & 0o777) == (b"new\n", 0o640)
    assert (fresh.read_bytes(), fresh.stat().st_mode & 0o777) == (b"[]", 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    with pytest.raises(IntercomError, match="not a regular file"):
        replace_atomically(link, b"x", 0o600)
    assert victim.read_bytes() == VICTIM
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere", "intercom.toml", "link.json", "pairing-sheets.json"]
