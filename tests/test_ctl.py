"""The operator CLI (kktd/ctl.py) against a small fake daemon (aiohttp) and against a real `kktd serve`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kktd import ctl
from kktd.ctl import State
from tests.support import KKTD_BIN, KktdProcess, free_port, post_many, receipts, wait_until

NOW = 1_800_000_000.0


def healthy_status(**overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "counts": {"pending": 3, "sent": 120, "failed": 0},
        "capacity": 200000,
        "fill_ratio": 0.000015,
        "oldest_pending_age_s": 4.2,
        "oldest_pending_alarm": "ok",
        "db_size_bytes": 5 * 1024 * 1024,
        "writer": {"commits": 10, "rows_committed": 123},
        "sync": {
            "breaker": "closed",
            "consecutive_failures": 0,
            "cycles": 5,
            "delivered_total": 120,
            "rejected_total": 0,
            "dead_lettered_total": 0,
            "last_success_at": "2027-01-15T07:59:50.000Z",
            "last_error": None,
            "last_error_at": None,
            "retry_in_s": None,
            "held_back": 0,
        },
    }
    status.update(overrides)
    return status


@dataclass
class FakeDaemon:
    """Canned answers per (method, path); records what was asked."""

    answers: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    export_chunks: list[bytes] = field(default_factory=list)
    export_gate: asyncio.Event | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.query_string))
        if request.path == "/v1/kkt/receipts":
            return await self.export(request)
        key = (request.method, request.path)
        if key not in self.answers:
            return web.json_response({"error": {"code": "not_found", "message": "no route"}}, status=404)
        status, body = self.answers[key]
        if callable(body):
            body = body(request)
        if isinstance(body, bytes):
            return web.Response(body=body, status=status, content_type="text/html")
        return web.json_response(body, status=status)

    async def export(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for index, chunk in enumerate(self.export_chunks):
            await response.write(chunk)
            if index == 0 and self.export_gate is not None:
                await asyncio.wait_for(self.export_gate.wait(), 10)
        await response.write_eof()
        return response


@pytest.fixture
async def daemon() -> AsyncIterator[FakeDaemon]:
    fake = FakeDaemon()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    fake.answers[("GET", "/v1/kkt/buffer/status")] = (200, healthy_status())
    fake.answers[("GET", "/v1/health")] = (200, {"status": "ok", "warnings": [], "pending": 3})
    try:
        yield fake
    finally:
        await server.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Binary(io.BytesIO):
    def __init__(self, on_write: Callable[[bytes], None] | None = None) -> None:
        super().__init__()
        self.on_write = on_write

    def write(self, data: Any) -> int:
        if self.on_write is not None:
            self.on_write(bytes(data))
        return super().write(data)


@dataclass
class Ran:
    code: int
    out: str


async def run_ctl(url: str, *argv: str, stdout: io.StringIO | None = None, out_bytes: io.BytesIO | None = None) -> Ran:
    parser = ctl.build_parser()
    args = parser.parse_args(list(argv))
    ctl.check_arguments(parser, args)
    stdout = stdout or io.StringIO()
    # The CLI is synchronous (urllib): it runs in a thread so the fake daemon's event loop keeps serving.
    code = await asyncio.to_thread(ctl.run, args, url, stdout, io.StringIO(), out_bytes)
    return Ran(code, stdout.getvalue())


# ---- status ----


async def test_status_ok_is_a_plugin_line_and_a_readable_summary(daemon: FakeDaemon) -> None:
    ran = await run_ctl(daemon.url, "status")
    assert ran.code == 0
    first, *rest = ran.out.splitlines()
    assert first.startswith(
        "KKTD OK - 3 pending, oldest 4s, upstream reachable | pending=3;;;0;200000 "
        "failed=0;1;;0 oldest_pending_age=4s db_size=5242880B"
    )
    text = "\n".join(rest)
    for expected in (
        "breaker closed",
        "last delivery  2027-01-15T07:59:50.000Z",
        "dead letters   0",
        "database       5.0 MiB",
        "alarm: ok",
    ):
        assert expected in text, text
    assert "\033[" not in ran.out  # not a terminal: no colour


@pytest.mark.parametrize(
    "status_overrides, health, code, words",
    [
        (
            {"oldest_pending_alarm": "warning", "oldest_pending_age_s": 4 * 86400.0},
            (200, {"status": "warning", "warnings": ["oldest pending receipt is 345600s old"]}),
            1,
            "WARNING",
        ),
        (
            {"counts": {"pending": 0, "sent": 5, "failed": 2}},
            (200, {"status": "ok", "warnings": []}),
            1,
            "2 dead letters",
        ),
        (
            {"oldest_pending_alarm": "critical", "oldest_pending_age_s": 26 * 86400.0},
            (
                503,
                {
                    "status": "error",
                    "problems": ["oldest pending receipt is 2246400s old: past pending_critical_age"],
                    "warnings": [],
                },
            ),
            2,
            "CRITICAL",
        ),
        (
            {},
            (503, {"status": "error", "problems": ["database does not answer: timeout"], "warnings": []}),
            2,
            "database does not answer",
        ),
        (
            {
                "sync": {
                    **healthy_status()["sync"],
                    "breaker": "open",
                    "last_error": "OFD unavailable: connect_error",
                    "last_error_at": "2027-01-15T08:00:00.000Z",
                }
            },
            (200, {"status": "warning", "warnings": ["OFD circuit breaker is open"]}),
            1,
            "upstream unreachable",
        ),
    ],
)
async def test_status_states_follow_the_plugin_convention(
    daemon: FakeDaemon, status_overrides: dict[str, Any], health: tuple[int, Any], code: int, words: str
) -> None:
    daemon.answers[("GET", "/v1/kkt/buffer/status")] = (200, healthy_status(**status_overrides))
    daemon.answers[("GET", "/v1/health")] = health
    ran = await run_ctl(daemon.url, "status")
    assert ran.code == code, ran.out
    assert ran.out.startswith(f"KKTD {State(code).name} - ")
    assert words in ran.out.splitlines()[0]


async def test_status_json(daemon: FakeDaemon) -> None:
    ran = await run_ctl(daemon.url, "status", "--json")
    assert ran.code == 0
    data = json.loads(ran.out)
    assert data["state"] == "OK" and data["status"]["counts"]["pending"] == 3 and data["health"]["status"] == "ok"


async def test_unreachable_daemon_is_unknown() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["status"], ["receipt", "x"], ["dlq", "list"], ["sync-now"], ["status", "--json"]):
        ran = await run_ctl(url, *argv)
        assert ran.code == 3, argv
        assert "not reachable" in ran.out
    assert json.loads(ran.out)["state"] == "UNKNOWN"


async def test_something_else_answering_is_unknown(daemon: FakeDaemon) -> None:
    daemon.answers[("GET", "/v1/kkt/buffer/status")] = (200, b"<html>a router's login page</html>")
    ran = await run_ctl(daemon.url, "status")
    assert ran.code == 3 and "is it kktd?" in ran.out


async def test_colour_only_on_a_terminal_and_never_with_no_color(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    ran = await run_ctl(daemon.url, "status", stdout=Terminal())
    assert ran.out.startswith("\033[32mKKTD OK")
    monkeypatch.setenv("NO_COLOR", "1")
    ran = await run_ctl(daemon.url, "status", stdout=Terminal())
    assert "\033[" not in ran.out
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    monkeypatch.setenv("TERM", "dumb")
    ran = await run_ctl(daemon.url, "status", stdout=Terminal())
    assert "\033[" not in ran.out
    monkeypatch.setenv("TERM", "xterm")
    ran = await run_ctl(daemon.url, "status", "--json", stdout=Terminal())
    assert "\033[" not in ran.out


# ---- receipt ----


def stored_receipt(status: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "receipt_id": "018f2a",
        "idempotency_key": "pos-1-42",
        "status": status,
        "total": 12345,
        "attempts": 2,
        "last_error": None,
        "accepted_at": "2027-01-15T07:00:00.000Z",
        "updated_at": "2027-01-15T07:00:03.000Z",
        "receipt": {"items": []},
        "ofd": None,
    }
    body.update(overrides)
    return body


@pytest.mark.parametrize("status, code", [("sent", 0), ("pending", 1), ("submitted", 1), ("failed", 2)])
async def test_receipt(daemon: FakeDaemon, status: str, code: int) -> None:
    fiscal = (
        {
            "fiscal_document_number": 77,
            "fiscal_sign": "3174512298",
            "ofd_received_at": "2027-01-15T07:00:02Z",
            "sent_at": "2027-01-15T07:00:03.000Z",
        }
        if status == "sent"
        else None
    )
    error = "http_422: bad item" if status == "failed" else None
    daemon.answers[("GET", "/v1/kkt/receipt/018f2a")] = (200, stored_receipt(status, ofd=fiscal, last_error=error))
    ran = await run_ctl(daemon.url, "receipt", "018f2a")
    assert ran.code == code
    assert ran.out.startswith(f"receipt 018f2a: {status}")
    assert "123.45 RUB" in ran.out and "attempts         2" in ran.out
    if fiscal:
        assert "fiscal_document_number 77" in ran.out and "fiscal_sign            3174512298" in ran.out
    if error:
        assert "last error       http_422: bad item" in ran.out
    assert "items" not in ran.out  # the receipt's contents only with --json
    data = json.loads((await run_ctl(daemon.url, "receipt", "018f2a", "--json")).out)
    assert data["status"] == status and data["receipt"] == {"items": []}


async def test_unknown_receipt_and_odd_ids(daemon: FakeDaemon) -> None:
    ran = await run_ctl(daemon.url, "receipt", "../v1/health?x=1 #ё")
    assert ran.code == 2 and ran.out.startswith("no receipt ")
    assert daemon.requests[-1][1] == "/v1/kkt/receipt/../v1/health?x=1 #ё"


# ---- dead letters ----


def letter(index: int) -> dict[str, Any]:
    return {**stored_receipt("failed", receipt_id=f"r{index:04d}", last_error="rejected: bad inn"), "seq": index}


async def test_dlq_list_empty_and_paged(daemon: FakeDaemon) -> None:
    daemon.answers[("GET", "/v1/kkt/dlq")] = (200, {"dead_letters": [], "count": 0})
    ran = await run_ctl(daemon.url, "dlq", "list")
    assert (ran.code, ran.out.strip()) == (0, "no dead letters")

    def page(request: web.Request) -> dict[str, Any]:
        after = int(request.query["after_seq"])
        limit = int(request.query["limit"])
        rows = [letter(i) for i in range(after + 1, min(after + limit, 700) + 1)]
        return {
            "dead_letters": rows,
            "count": len(rows),
            "next_after_seq": after + limit if len(rows) == limit else None,
        }

    daemon.answers[("GET", "/v1/kkt/dlq")] = (200, page)
    ran = await run_ctl(daemon.url, "dlq", "list")
    assert ran.code == 1
    lines = ran.out.splitlines()
    assert lines[0] == "700 dead letters" and len(lines) == 701
    assert "r0700" in lines[-1] and "rejected: bad inn" in lines[-1]
    assert [q for m, p, q in daemon.requests if p == "/v1/kkt/dlq"][-2:] == [
        "limit=500&after_seq=0",
        "limit=500&after_seq=500",
    ]


async def test_dlq_requeue_one_and_all(daemon: FakeDaemon) -> None:
    daemon.answers[("GET", "/v1/kkt/dlq")] = (200, {"dead_letters": [letter(1), letter(2), letter(3)], "count": 3})
    for index in (1, 2):
        daemon.answers[("POST", f"/v1/kkt/dlq/r{index:04d}/requeue")] = (200, {"status": "pending"})
    daemon.answers[("POST", "/v1/kkt/dlq/r0003/requeue")] = (
        409,
        {"error": {"code": "not_dead_letter", "message": "receipt r0003 is pending, not failed"}},
    )
    ran = await run_ctl(daemon.url, "dlq", "requeue", "r0001")
    assert (ran.code, ran.out.strip()) == (0, "requeued 1 of 1")
    ran = await run_ctl(daemon.url, "dlq", "requeue", "--all")
    assert ran.code == 1
    assert ran.out.splitlines() == ["requeued 2 of 3", "  r0003: not_dead_letter: receipt r0003 is pending, not failed"]
    ran = await run_ctl(daemon.url, "dlq", "requeue", "nope", "--json")
    assert ran.code == 2 and json.loads(ran.out)["failed"] == ["nope: not_found: no route"]


def test_dlq_requeue_needs_ids_or_all() -> None:
    parser = ctl.build_parser()
    for argv in (["dlq", "requeue"], ["dlq", "requeue", "x", "--all"]):
        with pytest.raises(SystemExit):
            ctl.check_arguments(parser, parser.parse_args(argv))


# ---- sync-now ----


async def test_sync_now(daemon: FakeDaemon) -> None:
    daemon.answers[("POST", "/v1/kkt/buffer/sync")] = (
        200,
        {
            "delivered": 50,
            "rejected": 1,
            "dead_lettered": 1,
            "batches": 2,
            "pending": 0,
            "error": None,
            "breaker": "closed",
        },
    )
    ran = await run_ctl(daemon.url, "sync-now")
    assert ran.code == 0
    assert ran.out.strip() == "delivered 50, rejected 1, dead-lettered 1 in 2 batches; 0 pending, breaker closed"
    daemon.answers[("POST", "/v1/kkt/buffer/sync")] = (
        200,
        {
            "delivered": 0,
            "rejected": 0,
            "dead_lettered": 0,
            "batches": 0,
            "pending": 9,
            "error": "OFD unavailable: connect_error",
            "breaker": "open",
        },
    )
    ran = await run_ctl(daemon.url, "sync-now")
    assert ran.code == 1 and "error: OFD unavailable: connect_error" in ran.out


# ---- export ----


async def test_export_streams_json_lines(daemon: FakeDaemon) -> None:
    """The first lines reach the output while the daemon is still sending: nothing waits for the whole."""
    line = json.dumps(stored_receipt("sent")).encode() + b"\n"
    daemon.export_chunks = [line * 10, line * 20_000]  # ~8 MiB after the first chunk
    daemon.export_gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    first_write = asyncio.Event()

    def seen(_data: bytes) -> None:
        loop.call_soon_threadsafe(first_write.set)

    out = Binary(seen)
    task = asyncio.create_task(
        run_ctl(daemon.url, "export", "--since", "2027-01-01", "--until", "2027-01-15T10:00:00+03:00", out_bytes=out)
    )
    await asyncio.wait_for(first_write.wait(), 10)
    assert not task.done()
    daemon.export_gate.set()
    ran = await task
    assert ran.code == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 20_010 and all(json.loads(x)["receipt_id"] == "018f2a" for x in lines[:3])
    assert daemon.requests[-1][2] == "since=2027-01-01T00:00:00.000Z&until=2027-01-15T07:00:00.000Z"


async def test_export_error_is_reported(daemon: FakeDaemon) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ran = await run_ctl(url, "export", out_bytes=Binary())
    assert ran.code == 3 and "not reachable" in ran.out


@pytest.fixture
def in_moscow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The terminal's zone is UTC+3 (a POSIX TZ string: no tzdata needed)."""
    monkeypatch.setenv("TZ", "MSK-3")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_parse_moment(in_moscow: None) -> None:
    # A date is the terminal's local midnight: a till's day, not UTC's.
    assert ctl.parse_moment("2027-01-01") == "2026-12-31T21:00:00.000Z"
    assert ctl.parse_moment("2027-01-01T03:00:00+03:00") == "2027-01-01T00:00:00.000Z"
    assert ctl.parse_moment("2027-01-01T00:00:00.5Z") == "2027-01-01T00:00:00.500Z"
    with pytest.raises(Exception, match="not a date"):
        ctl.parse_moment("yesterday")
    with pytest.raises(Exception, match="has no zone"):
        ctl.parse_moment("2027-01-01T10:00:00")


def test_export_help_names_the_zone_dates_are_in(in_moscow: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ctl.main(["export", "--help"])
    assert "midnight in the terminal's zone, MSK, UTC+03:00" in " ".join(capsys.readouterr().out.split())


def test_wildcard_listen_is_reached_on_loopback() -> None:
    assert ctl.base_url("0.0.0.0", 8731) == "http://127.0.0.1:8731"
    assert ctl.base_url("::", 8731) == "http://[::1]:8731"
    assert ctl.base_url("10.1.2.3", 1) == "http://10.1.2.3:1"


def test_address_from_the_daemons_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No daemon at the configured address: UNKNOWN naming that address; a bad config: UNKNOWN too."""
    port = free_port()
    config = tmp_path / "kktd.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\n')
    for key in [k for k in os.environ if k.startswith("KKTD_")]:
        monkeypatch.delenv(key)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert ctl.main(["status", "--config", str(config)]) == 3
    assert f"http://127.0.0.1:{port}" in out.getvalue()
    config.write_text('listen = "nowhere"\n')
    assert ctl.main(["status", "--config", str(config)]) == 3
    assert "configuration error: listen" in out.getvalue()


# ---- against a real daemon ----


def kktd_ctl(port: int, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k != "NO_COLOR"}
    return subprocess.run(
        [str(KKTD_BIN), *argv, "--listen", f"127.0.0.1:{port}", "--config", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_against_a_real_kktd(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    """The upstream is down (nothing listens at the OFD address): receipts wait, and the CLI says so."""
    kktd = KktdProcess(tmp_path / "buffer.db", extra_args=["--breaker-threshold", "1"])
    kktds.append(kktd)
    kktd.start()
    ran = kktd_ctl(kktd.port, "status")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("KKTD OK - 0 pending")

    posted = asyncio.run(post_many(kktd.url, receipts("ctl", 3)))
    assert [p.status for p in posted] == [201] * 3
    receipt_id = posted[0].body["receipt_id"]
    ran = kktd_ctl(kktd.port, "receipt", receipt_id)
    assert ran.returncode == 1 and ran.stdout.startswith(f"receipt {receipt_id}: pending"), ran.stdout
    by_key = kktd_ctl(kktd.port, "receipt", "--key", "ctl-0")
    assert by_key.returncode == 1 and by_key.stdout == ran.stdout, by_key.stdout + by_key.stderr
    assert kktd_ctl(kktd.port, "receipt", "--key", "never-posted").stdout.startswith("no receipt key never-posted")

    ran = kktd_ctl(kktd.port, "sync-now", "--json")
    assert ran.returncode in (0, 1)
    assert json.loads(ran.stdout)["pending"] == 3

    wait_until(lambda: kktd_ctl(kktd.port, "status").returncode == 1, 30, "the open breaker to show in status")
    ran = kktd_ctl(kktd.port, "status", "--json")
    data = json.loads(ran.stdout)
    assert data["state"] == "WARNING" and data["status"]["counts"]["pending"] == 3
    assert "upstream unreachable" in kktd_ctl(kktd.port, "status").stdout
    ran = kktd_ctl(kktd.port, "dlq", "list")
    assert (ran.returncode, ran.stdout.strip()) == (0, "no dead letters")

    kktd.stop()
    ran = kktd_ctl(kktd.port, "status")
    assert ran.returncode == 3 and ran.stdout.startswith("KKTD UNKNOWN - kktd is not reachable")
