"""Where log records go: the journal's native protocol under systemd, plain lines elsewhere.

Under journald (stderr is the journal stream systemd connected) each record goes to the journal with its
structured fields (kktd/journal.py: PRIORITY, RECEIPT_ID, ERROR_CODE, CODE_FILE, ...). Elsewhere, or with
KKTD_LOG_FORMAT=journal, stderr lines carry a `<N>` syslog priority prefix, which journald reads as the
priority (SyslogLevelPrefix=yes); on a terminal, timestamped lines. One event per line: newlines inside a
message are escaped.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from kktd.journal import JOURNAL_SOCKET, SYSLOG_PRIORITY, JournalHandler, journal_available


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


_journal: JournalHandler | None = None  # the handler in use, when it is the journal's


def journal_fallbacks() -> int:
    """Records that went to stderr instead of the journal's socket (no socket, journald's queue full):
    they reached the journal as plain stream lines, without their fields."""
    return _journal.fallbacks if _journal is not None else 0


def make_handler(stream: TextIO, journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    global _journal
    if under_journald(stream) and journal_available(journal_socket):
        _journal = JournalHandler(journal_socket, fallback=stream)
        return _journal
    handler = logging.StreamHandler(stream)
    prefixed = under_journald(stream) or os.environ.get("KKTD_LOG_FORMAT") == "journal"
    handler.setFormatter(JournalFormatter("%(name)s: %(message)s") if prefixed else TerminalFormatter())
    return handler


def setup(level: str, stream: TextIO | None = None, journal_socket: str = JOURNAL_SOCKET) -> None:
    handler = make_handler(stream or sys.stderr, journal_socket)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # aiohttp's access log would be one line per receipt: kktd logs what matters itself.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientMistakeFilter())


class ClientMistakeFilter(logging.Filter):
    """aiohttp logs a request its parser refuses (an unknown method, a URL over 8 KiB, a bad header, a body
    that breaks its framing) as an error with a traceback, though the client is wrong and aiohttp answered 400:
    one short warning line instead, the client's text escaped and cut short, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            from kktd.safetext import escape

            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "refused a malformed HTTP request (400): %s", (escape(str(exc), 200),)
            record.exc_info, record.exc_text = None, None
        return True


def set_level(level: str) -> None:
    """The log level, at start and on reload."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # aiosqlite logs every statement at debug: thousands of lines a second under load.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
