"""Log records to the systemd journal over its native protocol, with structured fields.

Why not a binding: systemd-python (PyPI) is source-only and needs libsystemd-dev, a C compiler and the
Python headers wherever a venv is built (every `make run`, the package build), and Debian's python3-systemd
exists for Debian's own interpreter, not for kktd's venv. The native protocol is small and documented
(systemd's "Native Journal Protocol"): one datagram per record on /run/systemd/journal/socket, each field
`KEY=value\\n`, or, for a value holding a newline, `KEY\\n` + its length as 64-bit little endian + the value +
`\\n`; a record too large for a datagram goes in a sealed memfd whose descriptor is sent instead.

Only the fields named in FIELDS are taken from a record's `extra=` (a value or a list of values): receipt
contents, customer contacts, passwords and tokens are never among them, so they cannot reach the journal by
accident. Their values are escaped (no control characters) and truncated: some, such as the idempotency key,
come from clients.

The socket never blocks the event loop. When journald's queue is full (net.unix.max_dgram_qlen datagrams:
10 by kernel default, 512 where systemd sets it; a burst of log lines fills 10 at once), the record waits in
the handler's own bounded queue, in order, and goes out with its fields once the socket takes datagrams
again: retried on the event loop's timer and before the next record. Past MAX_QUEUED records (or
MAX_QUEUED_BYTES) the oldest leaves the queue for the fallback stream, and once the queue has drained one
journal entry says how many did. The fallback stream (stderr, in today's form) also takes every record when
there is no socket: under systemd it still lands in the journal, as a stream line without the extra fields;
`fallbacks` counts those records (kktd_journal_fallbacks_total).
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import traceback
from collections import deque
from typing import TextIO

JOURNAL_SOCKET = "/run/systemd/journal/socket"

SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# extra= key on a log call -> journal field. The journal can be searched by any of them:
# journalctl -u kktd RECEIPT_ID=<id>
FIELDS = {
    "receipt_id": "RECEIPT_ID",
    "idempotency_key": "IDEMPOTENCY_KEY",
    "error_code": "ERROR_CODE",
    "upstream": "UPSTREAM",
    "upstream_status": "UPSTREAM_STATUS",
}
MAX_FIELD_CHARS = 256
MAX_FIELD_VALUES = 400  # values of one field in one entry; callers log larger groups in chunks
# journald ignores an entry with more than 1024 fields (its fix for CVE-2018-16865): stay well under it.
MAX_ENTRY_FIELDS = 1000
MAX_MESSAGE_CHARS = 64 * 1024
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_TOO_BIG = (errno.EMSGSIZE, errno.ENOBUFS)
# What waits for a busy journald: a burst of a few thousand lines (a record is ~300 bytes, a large one up to
# ~200 KB, hence the byte bound too).
MAX_QUEUED = 4096
MAX_QUEUED_BYTES = 8 * 1024 * 1024
# How soon a waiting record is retried when no new record comes to push it. A timer, not loop.add_writer: an
# unconnected datagram socket polls writable while the receiver's queue is full, so add_writer would spin.
RETRY_INTERVAL_S = 0.02


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels in between round to the next more severe one)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return SYSLOG_PRIORITY[logging.DEBUG]


def escape_field(value: object, limit: int = MAX_FIELD_CHARS) -> str:
    """A client-supplied value as one printable, bounded line."""
    text = str(value)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return text if len(text) <= limit else text[:limit] + "…"


def encode_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "backslashreplace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def record_fields(record: logging.LogRecord, message: str, identifier: str) -> list[tuple[str, str]]:
    """The journal fields of one record, in order."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "…"
    fields = [
        ("MESSAGE", message),
        ("PRIORITY", str(priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", identifier),
        ("LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
    ]
    if record.funcName:
        fields.append(("CODE_FUNC", record.funcName))
    for attribute, field in FIELDS.items():
        value = record.__dict__.get(attribute)
        if value is None:
            continue
        # A list gives the field once per item: one entry can name every receipt of a group commit or
        # a delivery batch, and `journalctl RECEIPT_ID=<id>` matches any of them.
        values = value[:MAX_FIELD_VALUES] if isinstance(value, (list, tuple)) else (value,)
        fields.extend((field, escape_field(item)) for item in values)
    return fields[:MAX_ENTRY_FIELDS]


class JournalHandler(logging.Handler):
    """A logging.Handler that sends each record to journald as one native-protocol entry."""

    def __init__(
        self,
        socket_path: str = JOURNAL_SOCKET,
        identifier: str = "kktd",
        fallback: TextIO | None = None,
        max_queued: int = MAX_QUEUED,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.identifier = identifier
        self.fallback = fallback or sys.stderr
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never block the event loop on a busy journald: such a record waits in _queue instead.
        self._sock.setblocking(False)
        self.fallbacks = 0
        self._queue: deque[tuple[bytes, logging.LogRecord]] = deque()
        self._queued_bytes = 0
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._overflowed = 0  # records the full queue sent to the fallback since the last entry saying so
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Records waiting for journald to take datagrams again."""
        return len(self._queue)

    def format_message(self, record: logging.LogRecord) -> str:
        # One event per line, as on stderr: text a client chose (a path, a key) cannot forge a second line.
        # A traceback keeps its lines: it is kktd's own text, and the binary-safe form carries it whole.
        message = one_line(record.getMessage())
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            message += "\n" + record.stack_info
        return message

    def encode(self, record: logging.LogRecord) -> bytes:
        return b"".join(
            encode_field(name, value)
            for name, value in record_fields(record, self.format_message(record), self.identifier)
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            payload = self.encode(record)
        except Exception:
            self.handleError(record)
            return
        self._deliver(payload, record)

    def flush(self) -> None:
        """Send what waits, as far as journald takes it now (never blocks)."""
        self.acquire()
        try:
            self._flush_queue()
        finally:
            self.release()

    def _deliver(self, payload: bytes, record: logging.LogRecord) -> None:
        if not self._queue and self._sent(payload, record):
            return
        self._queue.append((payload, record))  # behind what waits already: the journal keeps the order
        self._queued_bytes += len(payload)
        self._drop_oldest_beyond_bounds()
        self._flush_queue()
        self._schedule_retry()

    def _sent(self, payload: bytes, record: logging.LogRecord) -> bool:
        """False when journald's queue is full (the record may wait); any other failure takes the fallback."""
        try:
            self._send(payload)
        except BlockingIOError:
            return False
        except OSError:
            self.fallbacks += 1
            self._write_fallback(record)
        return True

    def _flush_queue(self) -> None:
        while self._queue:
            payload, record = self._queue[0]
            if not self._sent(payload, record):
                return
            self._queue.popleft()
            self._queued_bytes -= len(payload)
        if self._overflowed:
            self._report_overflow()

    def _drop_oldest_beyond_bounds(self) -> None:
        while len(self._queue) > 1 and (
            len(self._queue) > self._max_queued or self._queued_bytes > self._max_queued_bytes
        ):
            payload, record = self._queue.popleft()
            self._queued_bytes -= len(payload)
            self._overflowed += 1
            self.fallbacks += 1
            self._write_fallback(record)

    def _report_overflow(self) -> None:
        count, self._overflowed = self._overflowed, 0
        record = logging.LogRecord(
            "kktd.journal",
            logging.WARNING,
            __file__,
            0,
            "%d log records went to stderr without their fields: "
            "journald's queue stayed full until %d records waited for it (net.unix.max_dgram_qlen)",
            (count, self._max_queued),
            None,
            func="_report_overflow",
        )
        self._deliver(self.encode(record), record)

    def _schedule_retry(self) -> None:
        """Retry on the event loop's timer, so a burst followed by silence still drains. From a thread
        without a running loop, the next record (or flush, or close) retries."""
        if not self._queue or self._retry is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._retry = loop.call_later(RETRY_INTERVAL_S, self._retry_now)

    def _retry_now(self) -> None:
        self.acquire()  # emit() holds it too (Handler.handle), perhaps from another thread
        try:
            self._retry = None
            self._flush_queue()
            self._schedule_retry()
        finally:
            self.release()

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendto(payload, self.socket_path)
        except OSError as exc:
            if exc.errno not in _TOO_BIG:
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        """A record larger than a datagram: written to a sealed memfd, whose descriptor journald reads."""
        fd = os.memfd_create("kktd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.socket_path
            )
        finally:
            os.close(fd)

    def _write_fallback(self, record: logging.LogRecord) -> None:
        try:
            line = one_line(self.format_message(record))
            self.fallback.write(f"<{priority(record.levelno)}>{record.name}: {line}\n")
            self.fallback.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """What journald still has not taken goes to the fallback stream: at exit nothing waits any longer."""
        self.acquire()
        try:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            self._flush_queue()
            while self._queue:
                _payload, record = self._queue.popleft()
                self.fallbacks += 1
                self._write_fallback(record)
            self._queued_bytes = 0
        finally:
            self.release()
        try:
            self._sock.close()
        finally:
            super().close()


def journal_available(socket_path: str = JOURNAL_SOCKET) -> bool:
    return os.path.exists(socket_path)
