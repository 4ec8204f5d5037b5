"""Signed update bundles applied for real: pip into a venv, a real daemon probed for READY."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from intercom.deploy.bundle import (
    UpdateRefusedError,
    build_bundle,
    generate_release_key,
    load_private_key,
)
from intercom.deploy.health import ProbeCheck
from intercom.deploy.releases import Layout, UpdateFailedError, apply, verify

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "intercom"
# The dependencies come from the test venv; the release venv holds only intercom itself.
DEPS_ENV = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}

BROKEN = {
    "ok": "",
    "crash": '\n\ndef main(argv=None):\n    raise SystemExit("this release is broken")\n',
    "hang": "\n\ndef main(argv=None):\n    import time\n    time.sleep(600)\n",
}


def make_wheel(out_dir: Path, version: str, flaw: str = "ok") -> Path:
    """A pure wheel of this repo's package at ``version``, optionally broken."""
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"intercom-{version}-py3-none-any.whl"
    files: dict[str, bytes] = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"intercom/{path.relative_to(PACKAGE).as_posix()}"] = path.read_bytes()
    files["intercom/__init__.py"] = (
        f'"""Privacy-first video intercom door station."""\n\n__version__ = "{version}"\n'
    ).encode()
    files["intercom/cli/__init__.py"] += BROKEN[flaw].encode()
    info = f"intercom-{version}.dist-info"
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: intercom\nVersion: {version}\n".encode()
    )
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\nintercom = intercom.cli:main\n"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([name, f"sha256={digest}", len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue().encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("keys")
    generate_release_key(base / "release.key", base / "release.pem")
    generate_release_key(base / "other.key", base / "other.pem")
    return base


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keys):
    """Bundles by name, all signed with the release key unless the name says otherwise."""
    base = tmp_path_factory.mktemp("bundles")
    key = load_private_key(keys / "release.key")
    made = {}
    for name, version, flaw in [
        ("0.1.0", "0.1.0", "ok"), ("0.2.0", "0.2.0", "ok"), ("0.1.5", "0.1.5", "ok"),
        ("crash", "0.3.0", "crash"), ("hang", "0.3.1", "hang"),
    ]:
        wheel = make_wheel(base / f"wheels-{name}", version, flaw)
        made[name] = base / f"{name}.bundle"
        build_bundle([wheel], key, made[name])
    other = make_wheel(base / "wheels-other", "0.4.0")
    made["other-key"] = base / "other-key.bundle"
    build_bundle([other], load_private_key(keys / "other.key"), made["other-key"])
    return made


@pytest.fixture
def root(tmp_path, keys):
    root = tmp_path / "root"
    key_dir = Layout(root).key_dir
    key_dir.mkdir(parents=True)
    (key_dir / "release.pem").write_bytes((keys / "release.pem").read_bytes())
    return root


def probe(timeout_s: float = 60) -> ProbeCheck:
    return ProbeCheck(env=DEPS_ENV)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intercom", "update", *args],
        capture_output=True, text=True, env=DEPS_ENV, timeout=timeout, check=False,
    )


def running_version(root: Path) -> str:
    python = Layout(root).current / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", "import intercom; print(intercom.__version__, intercom.__file__)"],
        capture_output=True, text=True, env=DEPS_ENV, check=True, cwd=root,
    ).stdout.split()
    assert out[1].startswith(str(root)), out  # imported from the release, not the test venv
    return out[0]


def test_first_install_and_upgrade_reach_ready(root, bundles):
    layout = Layout(root)
    first = apply(layout, bundles["0.1.0"], probe(), timeout_s=60)
    assert first.health.ready, first.health.detail
    assert running_version(root) == "0.1.0"
    second = apply(layout, bundles["0.2.0"], probe(), timeout_s=60)
    assert second.health.ready
    assert str(second.previous) == "0.1.0"
    assert layout.current.readlink() == Path("releases/0.2.0")
    assert running_version(root) == "0.2.0"
    assert layout.read_state()["highest"] == "0.2.0"
    assert (layout.releases / "0.1.0").is_dir()  # kept for a manual roll-back


def test_downgrade_is_refused_with_a_clear_message(root, bundles):
    apply(Layout(root), bundles["0.2.0"], None, timeout_s=10)
    result = cli("apply", str(bundles["0.1.5"]), "--root", str(root), "--check", "none")
    assert result.returncode == 1
    assert "version 0.1.5 is older than the installed 0.2.0: downgrades are refused" in (
        result.stderr
    )
    same = cli("verify", str(bundles["0.2.0"]), "--root", str(root))
    assert same.returncode == 1
    assert "already installed" in same.stderr


def test_downgrade_is_refused_even_after_current_was_pointed_back(root, bundles):
    layout = Layout(root)
    apply(layout, bundles["0.1.0"], None, timeout_s=10)
    apply(layout, bundles["0.2.0"], None, timeout_s=10)
    layout.switch("0.1.0")  # someone re-points the link by hand
    with pytest.raises(UpdateRefusedError, match=r"0\.2\.0, the newest this station has run"):
        verify(layout, bundles["0.1.5"])


def test_unknown_key_is_refused(root, bundles):
    result = cli("apply", str(bundles["other-key"]), "--root", str(root), "--check", "none")
    assert result.returncode == 1
    assert "signed by an unknown key" in result.stderr
    assert not Layout(root).releases.exists()


def rewrite(bundle: Path, out: Path, change) -> Path:
    """Copy a bundle, passing each member's bytes through ``change(name, data)``."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            handle = src.extractfile(member)
            assert handle is not None
            data = change(member.name, handle.read())
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def test_altered_manifest_fails_the_signature(root, bundles, tmp_path):
    def bump(name, data):
        return data.replace(b'"version": "0.1.5"', b'"version": "9.9.9"') if (
            name == "manifest.json") else data

    forged = rewrite(bundles["0.1.5"], tmp_path / "forged.bundle", bump)
    result = cli("apply", str(forged), "--root", str(root), "--check", "none")
    assert result.returncode == 1
    assert "bad signature" in result.stderr


def test_altered_wheel_fails_its_hash(root, bundles, tmp_path):
    def flip(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(".whl") else data

    forged = rewrite(bundles["0.1.5"], tmp_path / "forged.bundle", flip)
    result = cli("apply", str(forged), "--root", str(root), "--check", "none")
    assert result.returncode == 1
    assert "does not match its signed SHA-256" in result.stderr
    assert not (Layout(root).releases / "0.1.5").exists()


def test_not_a_bundle_is_refused(root, tmp_path):
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"not a tar at all" * 100)
    result = cli("verify", str(junk), "--root", str(root))
    assert result.returncode == 1
    assert "not an update bundle" in result.stderr


@pytest.mark.parametrize("flaw", ["crash", "hang"])
def test_release_that_does_not_reach_ready_is_rolled_back(root, bundles, flaw):
    layout = Layout(root)
    apply(layout, bundles["0.2.0"], probe(), timeout_s=60)
    result = cli("apply", str(bundles[flaw]), "--root", str(root), "--check", "probe",
                 "--timeout", "4")
    assert result.returncode == 1, result.stdout
    assert "did not reach READY within 4 s" in result.stderr
    assert "rolled back to 0.2.0 and it is READY again" in result.stderr
    assert layout.current.readlink() == Path("releases/0.2.0")
    assert running_version(root) == "0.2.0"
    assert [p.name for p in layout.releases.iterdir() if not p.name.startswith(".")] == ["0.2.0"]
    state = layout.read_state()
    assert state["highest"] == "0.2.0"
    assert state["history"][-1]["ready"] is False


def test_first_install_that_fails_has_nothing_to_roll_back_to(root, bundles):
    with pytest.raises(UpdateFailedError, match="no earlier release"):
        apply(Layout(root), bundles["crash"], probe(), timeout_s=5)


def test_build_and_keygen_commands(tmp_path, root, keys):
    made = cli("keygen", str(tmp_path / "new"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "new.key").stat().st_mode & 0o777 == 0o600
    again = cli("keygen", str(tmp_path / "new"))
    assert again.returncode == 1
    make_wheel(tmp_path / "wheels", "0.7.0")
    built = cli("build", "--wheels", str(tmp_path / "wheels"), "--key", str(keys / "release.key"),
                "--out", str(tmp_path / "b.bundle"))
    assert built.returncode == 0, built.stderr
    checked = cli("verify", str(tmp_path / "b.bundle"), "--root", str(root))
    assert checked.returncode == 0, checked.stderr
    assert "intercom 0.7.0" in checked.stdout
