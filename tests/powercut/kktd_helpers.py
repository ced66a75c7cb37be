"""kktd and the mock OFD as child processes, load clients and the ledger of what kktd acknowledged."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import aiohttp

from kktd.receipt import sample_receipt

from ..support import KKTD_BIN, free_port

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)


def child_env() -> dict[str, str]:
    """No systemd notification socket and no stray KKTD_* settings from the caller's shell."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
    return {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k not in drop}


def log_tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


@dataclass
class ChildProcess:
    """A child in its own session, its output in a log file outside the power-cut filesystem."""

    args: Sequence[str]
    log_path: Path
    proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(list(self.args), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)

    def exited(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL: the power is already off, the process gets no chance to do anything more."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


async def wait_http_ok(session: aiohttp.ClientSession, url: str, child: ChildProcess, timeout: float,
                       what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.exited() is not None:
            raise AssertionError(f"{what} exited with {child.exited()}:\n{log_tail(child.log_path)}")
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not healthy at {url} within {timeout}s:\n{log_tail(child.log_path)}")
        await asyncio.sleep(0.05)


@dataclass
class Kktd:
    db: Path
    log_dir: Path
    ofd_url: str
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    child: Optional[ChildProcess] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> "Kktd":
        args = [str(KKTD_BIN), "serve", "--db", str(self.db), "--listen", f"127.0.0.1:{self.port}",
                "--ofd-url", self.ofd_url, "--config", os.devnull, *self.extra_args]
        self.child = ChildProcess(args, self.log_dir / f"kktd-{self.port}.log")
        self.child.start()
        await wait_http_ok(session, f"{self.url}/v1/health", self.child, timeout, "kktd")
        return self

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def log_tail(self) -> str:
        return "(not started)" if self.child is None else log_tail(self.child.log_path)


@dataclass
class MockOfd:
    db: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    child: Optional[ChildProcess] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> "MockOfd":
        args = [str(KKTD_BIN), "mock-ofd", "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{self.admin_port}", "--db", str(self.db),
                "--log-level", "warning"]
        self.child = ChildProcess(args, self.log_dir / f"mock-ofd-{self.port}.log")
        self.child.start()
        await wait_http_ok(session, f"{self.admin_url}/admin/stats", self.child, timeout, "mock OFD")
        return self

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.admin_url}/admin/stats") as response:
            assert response.status == 200
            stats: dict[str, Any] = await response.json()
            return stats

    async def stored(self, session: aiohttp.ClientSession) -> dict[str, str]:
        """idempotency_key -> receipt_id of everything the mock stored, page by page."""
        stored: dict[str, str] = {}
        while True:
            url = f"{self.admin_url}/admin/receipts?after={len(stored)}&limit=5000"
            async with session.get(url) as response:
                assert response.status == 200
                page = (await response.json())["receipts"]
            if not page:
                return stored
            for record in page:
                assert record["idempotency_key"] not in stored, f"stored twice: {record}"
                stored[record["idempotency_key"]] = record["receipt_id"]

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@dataclass
class Ledger:
    """What the POS side knows: every key it posted, which got a 2xx (and with which receipt_id)."""

    acked: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_doubt: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    cycle_acked: list[str] = field(default_factory=list)

    def new_receipt(self, key: str, client: int) -> dict[str, Any]:
        body = sample_receipt(key, pos_id=f"POS-{client:03d}")
        self.bodies[key] = body
        self.in_doubt.add(key)
        return body

    def answered(self, key: str, status: int, body: Any) -> bool:
        """Record an answer; True when it was a 2xx acknowledgement."""
        if status not in (200, 201):
            return False
        receipt_id = body["receipt_id"]
        known = self.acked.get(key)
        if known is not None and known != receipt_id:
            self.violations.append(f"key {key} acknowledged as {known} and later as {receipt_id}")
        if known is not None and status == 201:
            self.violations.append(f"key {key} was acknowledged before, yet a repost created it anew")
        if known is None:
            self.acked[key] = receipt_id
            self.cycle_acked.append(key)
        self.in_doubt.discard(key)
        return True


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{url}/v1/kkt/receipt", json=body) as response:
        return response.status, await response.json(content_type=None)


async def load(session: aiohttp.ClientSession, url: str, ledger: Ledger, prefix: str, clients: int,
               stop: asyncio.Event) -> None:
    """`clients` POS clients posting new receipts back to back until told to stop or kktd dies."""

    async def client(number: int) -> None:
        sequence = 0
        while not stop.is_set():
            key = f"{prefix}-c{number}-{sequence}"
            sequence += 1
            body = ledger.new_receipt(key, number)
            try:
                status, answer = await post(session, url, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return  # kktd is gone: the power is off
            if not ledger.answered(key, status, answer):
                return  # storage errors after the cut; the key stays in doubt

    await asyncio.gather(*(client(n) for n in range(clients)))


async def resolve_in_doubt(session: aiohttp.ClientSession, url: str, ledger: Ledger) -> int:
    """Retry every unanswered key with the same body, as a POS would: each must now be acknowledged."""
    keys = sorted(ledger.in_doubt)
    for key in keys:
        status, answer = await post(session, url, ledger.bodies[key])
        if not ledger.answered(key, status, answer):
            ledger.violations.append(f"retry of in-doubt key {key} answered {status}: {answer}")
    return len(keys)


async def replay_acked(session: aiohttp.ClientSession, url: str, ledger: Ledger, keys: Sequence[str]) -> None:
    """A replay of an acknowledged key must answer 200 with the same receipt_id, across cuts too."""
    for key in keys:
        status, answer = await post(session, url, ledger.bodies[key])
        if status != 200 or answer.get("receipt_id") != ledger.acked[key]:
            ledger.violations.append(f"replay of {key} answered {status} {answer}, "
                                     f"expected 200 {ledger.acked[key]}")


async def missing_via_api(session: aiohttp.ClientSession, url: str, ledger: Ledger, keys: Sequence[str]
                          ) -> list[str]:
    missing = []
    for key in keys:
        async with session.get(f"{url}/v1/kkt/receipt/{ledger.acked[key]}") as response:
            body = await response.json(content_type=None)
            if response.status != 200 or body.get("idempotency_key") != key:
                missing.append(key)
    return missing


@dataclass
class ImageCheck:
    integrity: str
    rows: int
    missing: list[str]


def check_image(image: Path, scratch: Path, acked: dict[str, str]) -> ImageCheck:
    """Open a copy of the post-crash image with plain sqlite3 (the copy keeps the image untouched for
    kktd's own recovery): integrity, and every acknowledged receipt present with its receipt_id."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for name in ("buffer.db", "buffer.db-wal", "buffer.db-journal"):
        if (image / name).exists():
            shutil.copyfile(image / name, scratch / name)
    if not (scratch / "buffer.db").exists():
        return ImageCheck("buffer.db missing", 0, sorted(acked))
    try:
        conn = sqlite3.connect(scratch / "buffer.db")
        try:
            integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
            stored = dict(conn.execute("SELECT idempotency_key, receipt_id FROM receipts").fetchall())
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return ImageCheck(f"unreadable: {exc}", 0, sorted(acked))
    missing = sorted(key for key, receipt_id in acked.items() if stored.get(key) != receipt_id)
    return ImageCheck(integrity, len(stored), missing)


async def buffer_counts(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/v1/kkt/buffer/status") as response:
        assert response.status == 200
        counts: dict[str, int] = (await response.json())["counts"]
        return counts
