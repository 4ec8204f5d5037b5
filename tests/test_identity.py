"""The station key and the way every secret file is written."""

import pytest

from intercom.errors import IntercomError
from intercom.identity import MissingKeyError, create_identity, load_identity, write_secret
from intercom.security.secretbox import create_key, load_key


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
    first = create_identity(tmp_path)
    again = create_identity(tmp_path)
    assert first.public_bytes() == again.public_bytes()
    assert first.public_key.verify(first.sign(b"x"), b"x") is None


def test_corrupt_station_key_is_an_error_not_a_new_key(tmp_path):
    create_identity(tmp_path)
    key = tmp_path / "keys" / "station.key"
    key.write_bytes(b"not a key")
    with pytest.raises(IntercomError, match="unreadable or corrupt"):
        create_identity(tmp_path)
    with pytest.raises(IntercomError, match="unreadable or corrupt"):
        load_identity(tmp_path)
    assert key.read_bytes() == b"not a key"


def test_only_the_makers_make_keys_every_other_process_loads_them(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(MissingKeyError, match="first start"):
        load_identity(state)
    with pytest.raises(MissingKeyError, match="first start"):
        load_key(state)
    assert not state.exists()  # a reader makes nothing, not even the folder
    made, key = create_identity(state), create_key(state)
    assert load_identity(state).public_bytes() == made.public_bytes()
    assert load_key(state) == key == create_key(state)  # made once, then kept
    assert (state / "keys").stat().st_mode & 0o777 == 0o700
    assert (state / "keys" / "principals.key").stat().st_mode & 0o777 == 0o600
