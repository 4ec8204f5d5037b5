"""Signed update bundles: a tar of wheels and a manifest signed with an Ed25519 release key.

Layout of a bundle (an uncompressed tar; wheels are compressed already)::

    manifest.json   {"format": 1, "product": "intercom", "version": ..., "key_id": ...,
                     "wheels": [{"name": ..., "sha256": ..., "size": ...}, ...]}
    manifest.sig    base64 of the Ed25519 signature of manifest.json, byte for byte
    wheels/*.whl    exactly the wheels the manifest lists, nothing else

The signature covers the manifest, the manifest covers every wheel by SHA-256: a
station installs exactly the files the release key signed, with no resolution of
dependencies at install time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from intercom.errors import IntercomError
from intercom.identity import write_secret

FORMAT = 1
PRODUCT = "intercom"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WHEEL_DIR = "wheels"
MAX_MANIFEST_BYTES = 1 << 20
MAX_BUNDLE_BYTES = 1 << 30
WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\.whl$")


class UpdateRefusedError(IntercomError, PermissionError):
    """An update bundle was refused: bad signature, unknown key, downgrade, bad form."""


@dataclass(frozen=True)
class Manifest:
    """The signed description of one release."""

    version: Version
    key_id: str
    wheels: dict[str, tuple[str, int]]  # wheel file name -> (sha256 hex, size)
    raw: bytes


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name of a release key: the first 16 hex digits of SHA-256 of it."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_release_key(private_path: Path, public_path: Path) -> str:
    """Make a new release key pair (private PEM 0600, public PEM); return its key id."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(private_path, pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a release signing key (PEM, PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IntercomError(f"release key {path}: cannot read: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IntercomError(f"release key {path}: not an Ed25519 private key")
    return key


def load_trusted_keys(key_dir: Path) -> dict[str, Ed25519PublicKey]:
    """The release public keys a station trusts (``*.pem`` in ``key_dir``), by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(key_dir.glob("*.pem")) if key_dir.is_dir() else []:
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise IntercomError(f"release key {path}: cannot read: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise IntercomError(f"release key {path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


def wheel_version(name: str) -> Version | None:
    """The version in an ``intercom-VERSION-...whl`` file name, else None."""
    parts = name.split("-")
    if len(parts) >= 5 and parts[0] == PRODUCT:
        try:
            return Version(parts[1])
        except InvalidVersion:
            return None
    return None


def build_bundle(wheels: list[Path], key: Ed25519PrivateKey, out: Path) -> Manifest:
    """Write a signed bundle of ``wheels`` to ``out``; the version is the intercom wheel's."""
    versions = {v for v in (wheel_version(w.name) for w in wheels) if v is not None}
    if len(versions) != 1:
        raise IntercomError(
            f"a bundle needs exactly one {PRODUCT} wheel, found {len(versions)} versions"
        )
    version = versions.pop()
    entries = []
    for wheel in sorted(wheels, key=lambda p: p.name):
        if not WHEEL_NAME.match(wheel.name):
            raise IntercomError(f"{wheel}: not a wheel file name")
        data = wheel.read_bytes()
        entries.append(
            {"name": wheel.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        )
    kid = key_id(key.public_key())
    manifest = {
        "format": FORMAT,
        "product": PRODUCT,
        "version": str(version),
        "key_id": kid,
        "created": int(time.time()),
        "wheels": entries,
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    signature = base64.b64encode(key.sign(raw)) + b"\n"
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST, raw)
        _add_bytes(tar, SIGNATURE, signature)
        for wheel in sorted(wheels, key=lambda p: p.name):
            _add_bytes(tar, f"{WHEEL_DIR}/{wheel.name}", wheel.read_bytes())
    tmp.replace(out)
    return _parse_manifest(raw)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def verify_bundle(path: Path, trusted: dict[str, Ed25519PublicKey]) -> Manifest:
    """Check a bundle's signature against the trusted keys; return its manifest."""
    with _open_tar(path) as tar:
        members = _members(tar)
        raw = _read(tar, members, MANIFEST, MAX_MANIFEST_BYTES)
        sig_text = _read(tar, members, SIGNATURE, 1024)
    try:
        claimed = json.loads(raw)
        kid = str(claimed["key_id"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UpdateRefusedError(f"{path}: the manifest is not valid JSON with a key_id") from exc
    if not trusted:
        raise UpdateRefusedError("no release keys are installed; cannot check any bundle")
    key = trusted.get(kid)
    if key is None:
        raise UpdateRefusedError(
            f"{path}: signed by an unknown key {kid!r}; this station trusts "
            f"{', '.join(sorted(trusted))}"
        )
    try:
        signature = base64.b64decode(sig_text.strip(), validate=True)
        key.verify(signature, raw)
    except (InvalidSignature, ValueError) as exc:
        raise UpdateRefusedError(
            f"{path}: bad signature: the bundle was altered or not signed by release key {kid}"
        ) from exc
    return _parse_manifest(raw)


def extract_wheels(path: Path, manifest: Manifest, dest: Path) -> list[Path]:
    """Extract exactly the manifest's wheels into ``dest``, checking size and SHA-256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    with _open_tar(path) as tar:
        members = _members(tar)
        extra = set(members) - {MANIFEST, SIGNATURE} - {
            f"{WHEEL_DIR}/{name}" for name in manifest.wheels
        }
        if extra:
            raise UpdateRefusedError(f"{path}: files the manifest does not list: {sorted(extra)}")
        for name, (digest, size) in sorted(manifest.wheels.items()):
            data = _read(tar, members, f"{WHEEL_DIR}/{name}", size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise UpdateRefusedError(f"{path}: {name} does not match its signed SHA-256")
            target = dest / name
            target.write_bytes(data)
            out.append(target)
    return out


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise UpdateRefusedError(f"{path}: larger than {MAX_BUNDLE_BYTES} bytes")
        return tarfile.open(path, "r:")
    except (OSError, tarfile.TarError, ValueError) as exc:  # ValueError: bad PAX records
        raise UpdateRefusedError(f"{path}: not an update bundle: {exc}") from exc


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    try:
        for member in tar.getmembers():
            if not member.isfile() or member.name in members:
                raise UpdateRefusedError(f"bundle member {member.name!r}: not a unique file")
            members[member.name] = member
    except (tarfile.TarError, ValueError) as exc:  # ValueError: bad PAX/sparse records
        raise UpdateRefusedError(f"not an update bundle: {exc}") from exc
    return members


def _read(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, limit: int
) -> bytes:
    member = members.get(name)
    if member is None:
        raise UpdateRefusedError(f"not an update bundle: {name} is missing")
    if member.size > limit:
        raise UpdateRefusedError(f"bundle member {name}: larger than {limit} bytes")
    handle = tar.extractfile(member)
    if handle is None:
        raise UpdateRefusedError(f"bundle member {name}: unreadable")
    return handle.read()


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        data: dict[str, Any] = json.loads(raw)
        if data["format"] != FORMAT or data["product"] != PRODUCT:
            raise UpdateRefusedError(
                f"bundle is format {data['format']!r} for {data['product']!r}; "
                f"this station takes format {FORMAT} for {PRODUCT!r}"
            )
        version = Version(str(data["version"]))
        wheels = {}
        for entry in data["wheels"]:
            name = str(entry["name"])
            if not WHEEL_NAME.match(name) or "/" in name:
                raise UpdateRefusedError(f"manifest wheel name {name!r} is not a wheel file name")
            size = entry["size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise UpdateRefusedError(f"manifest wheel {name}: size must be a whole number")
            wheels[name] = (str(entry["sha256"]), size)
        return Manifest(version=version, key_id=str(data["key_id"]), wheels=wheels, raw=raw)
    except (KeyError, TypeError, ValueError, InvalidVersion, RecursionError) as exc:
        raise UpdateRefusedError(f"the signed manifest is malformed: {exc}") from exc
