"""Logging to stderr in a form journald understands."""

from __future__ import annotations

import logging
import os
import sys

# sd-daemon(3) priority prefixes, which journald turns into log levels.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` lines; journald adds time and unit itself."""

    def format(self, record: logging.LogRecord) -> str:
        """Prefix the priority; indent continuation lines (tracebacks)."""
        text = super().format(record).replace("\n", "\n    ")
        return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {text}"


def setup_logging(level: str = "info") -> None:
    """Log to stderr: journald form under systemd, timestamped lines elsewhere."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries chatter at INFO; their warnings still show.
    for name in ("aioice", "aiortc", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
