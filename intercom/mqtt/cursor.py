"""The bridge's persisted position in the event log: the last seq the broker acknowledged."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class Cursor:
    """A seq kept in a small file, replaced atomically on every save.

    The file is not fsynced: after a power cut it may hold an older seq (or be unreadable,
    which starts from 0). Either way events are published again, never skipped, and
    consumers drop the repeats by seq.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0

    def load(self) -> int:
        """Read the saved seq (0 when there is none or it is unreadable)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            self.seq = 0
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("mqtt cursor %s unreadable (%s); publishing from the start", self.path, exc)
            self.seq = 0
            return 0
        if not text.isdigit():
            log.warning("mqtt cursor %s is corrupt; publishing from the start", self.path)
            self.seq = 0
            return 0
        self.seq = int(text)
        return self.seq

    def save(self, seq: int) -> None:
        """Remember ``seq`` as acknowledged."""
        self.seq = seq
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(f"{seq}\n", encoding="ascii")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot save the mqtt cursor %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
