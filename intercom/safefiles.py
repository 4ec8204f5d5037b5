"""New private files and folders for exports, never written through what was there.

An export often runs as root into a path an unprivileged user can name or prepare: a
folder made in advance (world-writable, say) or a symbolic link planted where a file
will go would let that user read the export or have root overwrite another file. So
every path here must be new: a folder is made 0700 by us, a file is created 0600 with
``O_EXCL | O_NOFOLLOW``, and anything already there is refused, naming the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from intercom.errors import IntercomError

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _refusal(path: Path, exc: OSError) -> IntercomError:
    if isinstance(exc, FileExistsError):
        return IntercomError(
            f"{path} exists already; give a path that does not exist "
            "(an export never writes into or through what is there)"
        )
    return IntercomError(f"cannot write {path}: {exc.strerror or exc}")


def make_private_dir(path: Path) -> Path:
    """Make the new folder ``path`` (mode 0700); refuse one that exists, link or not.

    Missing parents are made too (0700); an existing parent is used as it is.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
        fd = os.open(path, DIRECTORY)
    except OSError as exc:
        raise _refusal(path, exc) from exc
    try:
        os.fchmod(fd, 0o700)  # whatever the umask
    finally:
        os.close(fd)
    return path


def create_new(path: Path) -> int:
    """A write-only descriptor of the new file ``path`` (mode 0600); refuse any existing path."""
    try:
        return os.open(path, NEW_FILE, 0o600)
    except OSError as exc:
        raise _refusal(Path(path), exc) from exc


def open_new(path: Path) -> BinaryIO:
    """The new file ``path`` (mode 0600) open for writing bytes; refuse any existing path."""
    return os.fdopen(create_new(path), "wb")


def write_new(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to the new file ``name`` (0600) in ``directory``; its path.

    The file is created relative to the folder opened without following a link, so a
    folder swapped for a link after it was made is refused, not written through.
    """
    path = Path(directory) / name
    if not name or "/" in name or name in {".", ".."}:
        raise IntercomError(f"{path}: not a plain file name")
    try:
        dir_fd = os.open(directory, DIRECTORY)
    except OSError as exc:
        raise _refusal(Path(directory), exc) from exc
    try:
        fd = os.open(name, NEW_FILE, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(path, exc) from exc
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path
