"""Log lines on stderr: `<N>` syslog priority prefixes under journald, timestamped lines on a terminal.

journald reads the `<N>` prefix of each stderr line as the priority (SyslogLevelPrefix=yes), so the levels
survive without a journald client library. One event per line: newlines inside a message are escaped.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def under_journald(stream: TextIO) -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM names its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{_one_line(super().format(record))}"


class TerminalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return _one_line(super().format(record))


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def setup(level: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    journal = under_journald(stream) or os.environ.get("KKTD_LOG_FORMAT") == "journal"
    handler.setFormatter(JournalFormatter("%(name)s: %(message)s") if journal else TerminalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would be one line per receipt: kktd logs what matters itself.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite logs every statement at debug: thousands of lines a second under load.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
