"""kktd/server.py in isolation: the descriptor budget, the summary of multiplied events, the accept-error
handler, the eviction order at the cap; and the api's logging of clients that go away or send hostile paths."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path

import pytest

from kktd.safetext import FORBIDDEN_TEXT_RE
from kktd.server import (
    RESERVED_DESCRIPTORS,
    ConnectionGuard,
    EventSummary,
    descriptor_budget,
    install_accept_error_summary,
)
from tests.conftest import AppFactory
from tests.support import KktdProcess, wait_until


def test_descriptor_budget_fits_the_cap_under_the_soft_limit() -> None:
    assert descriptor_budget(1024, (2048, 4096)).connection_cap == 1024
    assert descriptor_budget(1024, (1024, 4096)).connection_cap == 1024 - RESERVED_DESCRIPTORS
    assert descriptor_budget(1024, (10, 10)).connection_cap == 1
    assert (
        "descriptor limit 2048 (hard 4096), at most 1024 client connections"
        in descriptor_budget(1024, (2048, 4096)).describe()
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_summary_logs_the_first_event_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    summary = EventSummary(logging.getLogger("kktd.test"), interval=10, clock=clock)
    for _ in range(10_000):
        summary.event("things", logging.WARNING, "a thing happened")
    clock.now = 11
    summary.event("things", logging.WARNING, "a thing happened")
    summary.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "a thing happened",
        "9999 more things in the last 10s (logged once per interval)",
        "a thing happened",
    ]


async def test_accept_errors_are_one_line_per_interval_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    summary = EventSummary(logging.getLogger("kktd.server"), interval=3600)
    install_accept_error_summary(loop, summary, descriptor_budget(100, (128, 128)))
    try:
        for _ in range(5_000):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                }
            )
        summary.close()
    finally:
        loop.set_exception_handler(previous)
    records = [r for r in caplog.records if r.name == "kktd.server"]
    assert len(records) == 2, [r.getMessage() for r in records]
    assert "Too many open files" in records[0].getMessage() and "descriptor limit 128" in records[0].getMessage()
    assert records[1].getMessage().startswith("4999 more accept errors")
    assert not any(r.exc_info for r in records)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_at_the_cap_the_connection_silent_longest_is_dropped() -> None:
    clock = Clock()
    summary = EventSummary(logging.getLogger("kktd.test"), clock=clock)
    guard = ConnectionGuard(asyncio.Protocol, cap=3, summary=summary, clock=clock)
    transports = [FakeTransport() for _ in range(4)]
    connections = []
    for i in range(3):
        clock.now = float(i)
        connection = guard()
        connection.connection_made(transports[i])
        connections.append(connection)
    clock.now = 10.0
    connections[0].data_received(b"GET / HTTP/1.1\r\n")  # the oldest speaks again: it stays
    guard().connection_made(transports[3])
    assert [t.aborted for t in transports] == [False, True, False, False]
    assert guard.open_connections == 3 and guard.evicted_total == 1 and guard.peak == 3
    summary.close()


# ---- the api's log lines for what clients do ----


def test_a_client_gone_mid_body_is_one_info_line(kktds: list[KktdProcess], tmp_path: Path) -> None:
    kktd = KktdProcess(tmp_path / "buffer.db", env={"KKTD_LOG_LEVEL": "info"})
    kktds.append(kktd)
    kktd.start()

    async def hang_up_mid_body() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", kktd.port)
        writer.write(
            b"POST /v1/kkt/receipt HTTP/1.1\r\nHost: kktd\r\nContent-Type: application/json\r\n"
            b'Content-Length: 500\r\n\r\n{"idempotency_key"'
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(hang_up_mid_body())
    line = wait_until(lambda: [entry for entry in kktd.log().splitlines() if "went away" in entry], 10, "the log line")
    assert len(line) == 1 and " INFO " in line[0], line
    assert " ERROR " not in kktd.log() and "Traceback" not in kktd.log()


@pytest.mark.parametrize(
    "path", ["/v1/kkt/receipt/%00%1b[31m%E2%80%AEevil", "/" + "x" * 7_000, "/v1/kkt/%0d%0aFAKE LOG LINE"]
)
async def test_hostile_paths_are_logged_escaped_and_short(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    caplog.set_level(logging.DEBUG)
    app = await app_factory()
    response = await app.client.get(path)
    assert response.status == 404
    body = await response.text()
    assert len(body) < 1_000
    for record in caplog.records:
        if record.name.startswith("kktd"):
            assert len(record.getMessage()) < 1_000
            assert FORBIDDEN_TEXT_RE.search(record.getMessage()) is None, record.getMessage()


async def test_content_type_is_echoed_escaped(app_factory: AppFactory, tmp_path: Path) -> None:
    app = await app_factory()
    response = await app.client.post("/v1/kkt/receipt", data=b"{}", headers={"Content-Type": "text/" + "x" * 5000})
    answer = await response.json()
    assert response.status == 415 and len(answer["error"]["message"]) < 300
