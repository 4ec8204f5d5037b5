"""New private files and folders for exports, never written through what was there.

An export often runs as root into a path an unprivileged user can name or prepare: a
folder made in advance (world-writable, say) or a symbolic link planted where a file
will go would let that user read the export or have root overwrite another file. So
every path here must be new: a folder is made 0700 by us, a file is created 0600 with
``O_EXCL | O_NOFOLLOW``, and anything already there is refused, naming the path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
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


def replace_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace the file ``path`` with ``data`` all at once, keeping its mode.

    A reader sees the old file or the new one, never a part (a power cut included): the
    data goes to a new temporary file beside it (``O_EXCL | O_NOFOLLOW``, in the folder
    opened without following a link), is fsynced, renamed over ``path``, and the folder
    is fsynced. ``path`` itself must be a regular file, not a link; with ``mode`` it may
    also not exist yet, and the file gets that mode. The mode is set whatever the umask.
    """
    path = Path(path)
    try:
        dir_fd = os.open(path.parent, DIRECTORY)
    except OSError as exc:
        raise _refusal(path.parent, exc) from exc
    tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            old = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if mode is None:
                raise
            new_mode = mode
        else:
            if not stat.S_ISREG(old.st_mode):
                raise IntercomError(f"{path}: not a regular file; refusing to replace it")
            new_mode = old.st_mode & 0o777 if mode is None else mode
        fd = os.open(tmp, NEW_FILE, new_mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, new_mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise IntercomError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(dir_fd)
