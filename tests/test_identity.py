"""The station key and the way every secret file is written."""

import pytest

from intercom.errors import IntercomError
from intercom.identity import load_or_create_identity, write_secret


def test_secret_is_private_and_never_replaced(tmp_path):
    path = tmp_path / "a.key"
    write_secret(path, b"first")
    assert path.read_bytes() == b"first"
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_secret(path, b"second")
    assert path.read_bytes() == b"first"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_half_written_temporary_from_a_power_cut_is_cleared(tmp_path):
    stale = tmp_path / ".a.key.12345.tmp"
    stale.write_bytes(b"hal")
    write_secret(tmp_path / "a.key", b"whole")
    assert not stale.exists()


def test_station_key_is_made_once_and_kept(tmp_path):
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert first.public_bytes() == again.public_bytes()
    assert first.public_key.verify(first.sign(b"x"), b"x") is None


def test_corrupt_station_key_is_an_error_not_a_new_key(tmp_path):
    load_or_create_identity(tmp_path)
    key = tmp_path / "keys" / "station.key"
    key.write_bytes(b"not a key")
    with pytest.raises(IntercomError, match="unreadable or corrupt"):
        load_or_create_identity(tmp_path)
    assert key.read_bytes() == b"not a key"
