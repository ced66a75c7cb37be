"""kktd/journal.py against a fake journal: a datagram socket bound in a temporary directory, read with a
parser of the native protocol (plain fields, the binary-safe length form, records passed as a memfd)."""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kktd import journal, logs
from kktd.journal import FIELDS, JournalHandler
from tests.support import async_wait_until

JOURNAL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def parse_entry(data: bytes) -> dict[str, str]:
    """The journal's side of the protocol (systemd's journald-native.c), as a test oracle."""
    fields: dict[str, str] = {}
    rest = data
    while rest:
        newline = rest.index(b"\n")
        line = rest[:newline]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            rest = rest[newline + 1 :]
        else:
            name = line
            (length,) = struct.unpack("<Q", rest[newline + 1 : newline + 9])
            start = newline + 9
            value = rest[start : start + length]
            assert rest[start + length : start + length + 1] == b"\n", "binary field not closed by a newline"
            rest = rest[start + length + 1 :]
        assert name and name.isupper() or b"_" in name, name
        fields[name.decode()] = value.decode()
    return fields


class FakeJournal:
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "journal.socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.memfds = 0

    def entries(self) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return found
            for level, kind, payload in ancillary:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds = array.array("i")
                fds.frombytes(payload[:4])
                self.memfds += 1
                # journald accepts only a memfd sealed against every change.
                seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
                assert seals & JOURNAL_SEALS == JOURNAL_SEALS, seals
                with os.fdopen(fds[0], "rb") as memfd:
                    assert data == b""
                    memfd.seek(0)  # journald maps the whole sealed file; the sender's offset is at its end
                    data = memfd.read()
            found.append(parse_entry(data))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def logger(fake_journal: FakeJournal) -> Iterator[tuple[logging.Logger, JournalHandler, io.StringIO]]:
    fallback = io.StringIO()
    handler = JournalHandler(fake_journal.path, fallback=fallback)
    log = logging.getLogger(f"kktd.test.journal.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        yield log, handler, fallback
    finally:
        log.removeHandler(handler)
        handler.close()


def test_structured_fields(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    log, _handler, fallback = logger
    log.warning(
        "receipt %s rejected by the upstream",
        "r-1",
        extra={
            "receipt_id": "r-1",
            "idempotency_key": "key-1",
            "error_code": "invalid_value",
            "upstream": "kktd_ofd",
            "upstream_status": "http_422",
        },
    )
    [entry] = fake_journal.entries()
    assert entry["MESSAGE"] == "receipt r-1 rejected by the upstream"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "kktd"
    assert entry["RECEIPT_ID"] == "r-1"
    assert entry["IDEMPOTENCY_KEY"] == "key-1"
    assert entry["ERROR_CODE"] == "invalid_value"
    assert entry["UPSTREAM"] == "kktd_ofd"
    assert entry["UPSTREAM_STATUS"] == "http_422"
    assert entry["CODE_FILE"] == __file__
    assert int(entry["CODE_LINE"]) > 0 and entry["CODE_FUNC"] == "test_structured_fields"
    assert entry["LOGGER"] == log.name
    assert fallback.getvalue() == ""


@pytest.mark.parametrize(
    "level, priority",
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
        (25, "6"),
        (45, "3"),
    ],
)
def test_priorities(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO], level: int, priority: str
) -> None:
    log, _handler, _fallback = logger
    log.log(level, "event")
    assert [e["PRIORITY"] for e in fake_journal.entries()] == [priority]


def test_only_known_fields_leave_the_process(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    """Receipt contents, contacts, passwords and tokens are never journal fields, whatever a caller passes."""
    log, _handler, _fallback = logger
    log.info(
        "event",
        extra={
            "receipt_id": "r-2",
            "body": '{"items": []}',
            "customer_email": "a@b.ru",
            "password": "hunter2",
            "token": "secret-token",
            "MESSAGE_ID": "forged",
        },
    )
    [entry] = fake_journal.entries()
    fixed = {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LOGGER", "CODE_FILE", "CODE_LINE", "CODE_FUNC"}
    assert set(entry) == fixed | {"RECEIPT_ID"}
    text = repr(entry)
    for secret in ("hunter2", "secret-token", "a@b.ru", "items", "forged"):
        assert secret not in text


def test_newlines_in_a_message_cannot_forge_an_entry(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    log, _handler, _fallback = logger
    log.info("GET %s -> 404", "/x\nPRIORITY=0\nMESSAGE=forged", extra={"idempotency_key": "k\nRECEIPT_ID=evil"})
    [entry] = fake_journal.entries()
    assert entry["PRIORITY"] == "6"
    assert entry["MESSAGE"] == "GET /x\\nPRIORITY=0\\nMESSAGE=forged -> 404"
    assert entry["IDEMPOTENCY_KEY"] == "k\\nRECEIPT_ID=evil"
    assert "RECEIPT_ID" not in entry


def test_long_client_values_are_truncated(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    log, _handler, _fallback = logger
    log.info("event", extra={"idempotency_key": "k" * 10_000})
    [entry] = fake_journal.entries()
    assert entry["IDEMPOTENCY_KEY"] == "k" * journal.MAX_FIELD_CHARS + "…"


def test_traceback_travels_whole_in_the_binary_safe_form(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    log, _handler, _fallback = logger
    try:
        raise ValueError("broken")
    except ValueError:
        log.exception("job crashed", extra={"receipt_id": "r-3"})
    [entry] = fake_journal.entries()
    assert entry["MESSAGE"].startswith("job crashed\nTraceback (most recent call last):\n")
    assert entry["MESSAGE"].endswith("ValueError: broken")
    assert entry["PRIORITY"] == "3" and entry["RECEIPT_ID"] == "r-3"


def test_a_record_too_large_for_a_datagram_goes_through_a_memfd(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    log, handler, fallback = logger
    fake_journal.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    handler._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    try:
        raise RuntimeError("x" * 60_000)
    except RuntimeError:
        log.exception("big", extra={"receipt_id": "r-4"})
    log.error("big too", exc_info=(RuntimeError, RuntimeError("y" * 60_000), None))
    entries = fake_journal.entries()
    assert fake_journal.memfds == 2
    assert [e["RECEIPT_ID"] for e in entries[:1]] == ["r-4"]
    assert entries[0]["MESSAGE"].endswith("RuntimeError: " + "x" * 60_000)
    assert entries[1]["MESSAGE"].endswith("y" * 60_000)
    assert fallback.getvalue() == "" and handler.fallbacks == 0


def test_no_journal_falls_back_to_prefixed_lines(tmp_path: Path) -> None:
    fallback = io.StringIO()
    handler = JournalHandler(str(tmp_path / "absent.socket"), fallback=fallback)
    record = logging.LogRecord("kktd.api", logging.WARNING, __file__, 1, "line\none %s", ("two",), None)
    try:
        handler.emit(record)
    finally:
        handler.close()
    assert fallback.getvalue() == "<4>kktd.api: line\\none two\n"
    assert handler.fallbacks == 1


def test_a_busy_journal_never_blocks_and_loses_nothing(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    """journald not reading: the socket queue fills, then the handler's own; past that its oldest records go to
    the fallback stream at once. Once journald reads again, the rest reach it."""
    log, handler, fallback = logger
    count = 0
    while handler.fallbacks == 0:
        log.info("record %d", count)
        count += 1
        assert count < 100_000, "the fake journal never filled up"
    for extra in range(5):
        log.info("record %d", count + extra)
    delivered = fake_journal.entries()
    while handler.queued:
        handler.flush()
        delivered += fake_journal.entries()
    # The handler's own entry saying how many records its full queue sent to the fallback is not one of them.
    delivered = [entry for entry in delivered if entry["LOGGER"] == log.name]
    lines = fallback.getvalue().splitlines()
    numbers = [int(e["MESSAGE"].split()[1]) for e in delivered] + [int(line.split()[-1]) for line in lines]
    assert sorted(numbers) == list(range(count + 5))
    assert handler.fallbacks == len(lines) >= 1


@settings(max_examples=300, deadline=None)
@given(message=st.text(), key=st.text(), code=st.text(max_size=80))
def test_any_text_round_trips_as_one_entry(message: str, key: str, code: str) -> None:
    """Whatever text a client manages to put in a message or a field, the journal gets exactly one entry
    with exactly the fields kktd meant, each readable and on one line."""
    record = logging.LogRecord("kktd.api", logging.INFO, __file__, 7, "%s", (message,), None, func="probe")
    record.idempotency_key = key
    record.error_code = code
    handler = JournalHandler(os.devnull)
    try:
        data = handler.encode(record)
    finally:
        handler.close()
    entry = parse_entry(data)
    assert set(entry) == {
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "LOGGER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "IDEMPOTENCY_KEY",
        "ERROR_CODE",
    }
    assert "\n" not in entry["MESSAGE"] and "\n" not in entry["IDEMPOTENCY_KEY"]
    assert entry["IDEMPOTENCY_KEY"].isprintable() and entry["ERROR_CODE"].isprintable()
    assert len(entry["IDEMPOTENCY_KEY"]) <= journal.MAX_FIELD_CHARS + 1


def test_logs_setup_uses_the_journal_only_under_journald(
    tmp_path: Path, fake_journal: FakeJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream_path = tmp_path / "stderr"
    monkeypatch.setattr(logs, "_journal", None)  # restored after the test
    with open(stream_path, "w") as stream:
        st_ = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st_.st_dev}:{st_.st_ino}")
        handler = logs.make_handler(stream, fake_journal.path)
        assert isinstance(handler, JournalHandler)
        handler.fallbacks = 2
        assert logs.journal_fallbacks() == 2  # what /metrics reports as kktd_journal_fallbacks_total
        handler.close()
        # Under journald but without its socket (a container, a chroot): prefixed stderr lines.
        handler = logs.make_handler(stream, str(tmp_path / "absent.socket"))
        assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, logs.JournalFormatter)
        monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # another stream: a terminal or a pipe
        handler = logs.make_handler(stream, fake_journal.path)
        assert isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, logs.TerminalFormatter)
    assert set(FIELDS.values()) == {"RECEIPT_ID", "IDEMPOTENCY_KEY", "ERROR_CODE", "UPSTREAM", "UPSTREAM_STATUS"}
    assert sys.stderr is not None


def test_a_list_gives_the_field_once_per_item(fake_journal: FakeJournal) -> None:
    """One entry for a whole group commit or delivery batch, naming every receipt in it."""
    handler = JournalHandler(fake_journal.path)
    record = logging.LogRecord("kktd.store", logging.INFO, __file__, 1, "accepted", (), None, func="f")
    record.receipt_id = [f"r{i}" for i in range(300)]
    record.idempotency_key = ("k\n1", "k2")
    try:
        data = handler.encode(record)
        handler.emit(record)
    finally:
        handler.close()
    assert data.count(b"\nRECEIPT_ID=") == 300
    assert b"IDEMPOTENCY_KEY=k\\n1\n" in data and b"IDEMPOTENCY_KEY=k2\n" in data
    [entry] = fake_journal.entries()  # the parser keeps the last value of a repeated field
    assert entry["RECEIPT_ID"] == "r299"


def test_an_entry_stays_under_journalds_field_limit(fake_journal: FakeJournal) -> None:
    """journald ignores an entry of more than 1024 fields: lists are capped, and so is the whole entry."""
    record = logging.LogRecord("kktd.store", logging.INFO, __file__, 1, "big", (), None, func="f")
    record.receipt_id = [f"r{i}" for i in range(600)]
    record.idempotency_key = [f"k{i}" for i in range(600)]
    record.upstream = "kktd-ofd"
    fields = journal.record_fields(record, "big", "kktd")
    assert len(fields) <= journal.MAX_ENTRY_FIELDS < 1024
    assert sum(1 for name, _ in fields if name == "RECEIPT_ID") == journal.MAX_FIELD_VALUES
    assert fields[0] == ("MESSAGE", "big") and ("PRIORITY", "6") in fields


def fill_socket_queue(fake: FakeJournal) -> None:
    """journald busy: its socket's datagram queue full of other senders' datagrams."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.setblocking(False)
        while True:
            try:
                other.sendto(b"MESSAGE=another sender\n", fake.path)
            except BlockingIOError:
                return


def drain_socket_queue(fake: FakeJournal) -> None:
    """journald catches up: what the socket holds is read (and here thrown away)."""
    while True:
        try:
            fake.sock.recv(1 << 20)
        except BlockingIOError:
            return


async def test_a_burst_waits_for_the_journal_with_its_fields(
    fake_journal: FakeJournal, logger: tuple[logging.Logger, JournalHandler, io.StringIO]
) -> None:
    """journald's queue full (net.unix.max_dgram_qlen is 10 by default): the records wait in the handler and
    reach the journal with their fields once it reads again, in order; nothing takes the stderr fallback."""
    log, handler, fallback = logger
    fill_socket_queue(fake_journal)
    for number in range(40):
        log.info("burst %d", number, extra={"receipt_id": f"r{number}"})
    assert handler.fallbacks == 0 and fallback.getvalue() == "" and handler.queued == 40
    drain_socket_queue(fake_journal)
    delivered: list[dict[str, str]] = []

    async def all_delivered() -> bool:
        delivered.extend(fake_journal.entries())
        return len(delivered) == 40

    await async_wait_until(all_delivered, 10, "the queued records to reach the journal")
    assert [entry["RECEIPT_ID"] for entry in delivered] == [f"r{number}" for number in range(40)]
    assert handler.queued == 0 and handler.fallbacks == 0 and fallback.getvalue() == ""


def test_an_overflowing_queue_sends_its_oldest_to_the_fallback_and_says_so(fake_journal: FakeJournal) -> None:
    fallback = io.StringIO()
    handler = JournalHandler(fake_journal.path, fallback=fallback, max_queued=3)
    try:
        fill_socket_queue(fake_journal)
        for number in range(5):
            handler.emit(logging.LogRecord("kktd.api", logging.INFO, __file__, 1, "record %d", (number,), None))
        assert handler.queued == 3 and handler.fallbacks == 2
        assert fallback.getvalue() == "<6>kktd.api: record 0\n<6>kktd.api: record 1\n"
        drain_socket_queue(fake_journal)
        handler.flush()
        entries = fake_journal.entries()
    finally:
        handler.close()
    assert [entry["MESSAGE"] for entry in entries[:3]] == ["record 2", "record 3", "record 4"]
    [summary] = entries[3:]
    assert summary["LOGGER"] == "kktd.journal" and summary["PRIORITY"] == "4"
    assert summary["MESSAGE"].startswith("2 log records went to stderr without their fields")
