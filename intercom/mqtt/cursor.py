"""The bridge's persisted position in the event log: the last seq the broker acknowledged."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SAVE_EVERY_S = 1.0


class Cursor:
    """A seq kept in memory and, at most once a second, in a small file.

    The file is replaced atomically but not fsynced, and a rename can take milliseconds
    on an SD card, so the bridge saves from a worker thread, at most every
    ``SAVE_EVERY_S`` during a burst, when idle, and on stop. After a crash or power cut
    the file may hold an older seq (or be unreadable, which starts from 0): events are
    then published again, never skipped, and consumers drop the repeats by seq.
    """

    def __init__(
        self,
        path: Path,
        save_every_s: float = SAVE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.seq = 0
        self.saved_seq = 0
        self._save_every_s = save_every_s
        self._clock = clock
        self._saved_at = -1e18
        self._mutex = threading.Lock()

    def load(self) -> int:
        """Read the saved seq (0 when there is none or it is unreadable)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = "0"
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("mqtt cursor %s unreadable (%s); publishing from the start", self.path, exc)
            text = "0"
        if not text.isdigit():
            log.warning("mqtt cursor %s is corrupt; publishing from the start", self.path)
            text = "0"
        self.seq = self.saved_seq = int(text)
        return self.seq

    def advance(self, seq: int) -> None:
        """Move to ``seq`` in memory (``save`` writes it)."""
        self.seq = seq

    @property
    def dirty(self) -> bool:
        """Whether memory is ahead of (or behind) the file."""
        return self.seq != self.saved_seq

    def save_due(self) -> bool:
        """Whether a save is due during a burst."""
        return self.dirty and self._clock() - self._saved_at >= self._save_every_s

    def save(self) -> None:
        """Write the current seq (blocking: call it from a thread on the loop)."""
        with self._mutex:
            seq = self.seq
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text(f"{seq}\n", encoding="ascii")
                tmp.replace(self.path)
            except OSError as exc:
                log.warning("cannot save the mqtt cursor %s: %s", self.path, exc)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return
            self.saved_seq = seq
            self._saved_at = self._clock()
