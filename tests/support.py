"""Helpers shared by the test suites: a kktd subprocess with its own notify socket, load clients, polling."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import aiohttp

from kktd.receipt import sample_receipt

__all__ = ["sample_receipt", "free_port", "wait_until", "async_wait_until", "NotifySocket", "KktdProcess",
           "post_receipt", "post_many", "Posted", "REPO", "KKTD_BIN", "require", "MockOfdProcess",
           "cpu_seconds", "receipts", "get_json"]

REPO = Path(__file__).resolve().parent.parent
KKTD_BIN = Path(sys.executable).parent / "kktd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip for a clear reason on a developer's machine, but fail loudly in CI: CI must run everything."""
    import pytest

    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Awaitable[Any]], timeout: float, what: str,
                           interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message with its time."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="kktd-notify-")
        self.path = os.path.join(self._dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def collect(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))
        return [line for _, line in self.messages]

    def wait_for(self, line: str, timeout: float) -> None:
        wait_until(lambda: line in self.collect(), timeout, f"notify message {line!r}")

    def close(self) -> None:
        self.sock.close()
        for path in (self.path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.rmdir(self._dir)


@dataclass
class KktdProcess:
    """`kktd serve` as a child process, the way systemd would run it (minus systemd)."""

    db: Path
    ofd_url: str = "http://127.0.0.1:9"  # discard port: nothing listens, the OFD is "down"
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    watchdog_usec: int | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    log_path: Path | None = None
    log_dir: Path | None = None  # default: beside the database (not on a filesystem a test cuts)
    faults: bool = False  # run tests.faulty_kktd: kktd plus POST /v1/test/fault

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> KktdProcess:
        self.notify = NotifySocket()
        self.log_path = (self.log_dir or self.db.parent) / f"kktd-{self.port}-{int(time.time() * 1000)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k not in (
            "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
        env.update({"NOTIFY_SOCKET": self.notify.path, "KKTD_LOG_LEVEL": "debug", **self.env})
        if self.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        command = [sys.executable, "-m", "tests.faulty_kktd"] if self.faults else [str(KKTD_BIN)]
        if self.faults:
            env["PYTHONPATH"] = str(REPO)
        args = [*command, "serve", "--db", str(self.db), "--listen", f"127.0.0.1:{self.port}",
                "--ofd-url", self.ofd_url, "--config", os.devnull, *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while "READY=1" not in self.notify.collect():
            if self.proc.poll() is not None:
                raise AssertionError(f"kktd exited with {self.proc.returncode} before READY:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kktd not READY within {timeout}s:\n{self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush or finish anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Make sure nothing is left behind, whatever state the test left the process in."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


@dataclass
class Posted:
    key: str
    status: int
    body: dict[str, Any]


async def post_receipt(session: aiohttp.ClientSession, url: str, receipt: dict[str, Any]) -> Posted:
    async with session.post(f"{url}/v1/kkt/receipt", json=receipt) as response:
        body = await response.json(content_type=None)
        return Posted(receipt["idempotency_key"], response.status, body)


async def post_many(url: str, receipts: Iterable[dict[str, Any]], concurrency: int = 16,
                    stop_on_error: bool = False) -> list[Posted]:
    """Post receipts with `concurrency` clients; a connection error ends that client (the server died).
    Returns what was answered: only these can have been acknowledged."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for receipt in receipts:
        queue.put_nowait(receipt)
    answered: list[Posted] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            receipt = queue.get_nowait()
            try:
                answered.append(await post_receipt(session, url, receipt))
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
                if stop_on_error:
                    return

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return answered


def receipts(prefix: str, count: int) -> list[dict[str, Any]]:
    return [sample_receipt(f"{prefix}-{i}") for i in range(count)]


async def get_json(url: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}{path}") as response:
            return response.status, await response.json(content_type=None)


@dataclass
class MockOfdProcess:
    """`kktd mock-ofd` as its own process: its store outlives any kktd crash."""

    workdir: Path
    db: Path | None = None
    seed: int | None = 1
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> MockOfdProcess:
        args = [str(KKTD_BIN), "mock-ofd", "--listen", f"127.0.0.1:{self.port}",
                "--admin-listen", f"127.0.0.1:{self.admin_port}", "--log-level", "warning"]
        if self.db is not None:
            args += ["--db", str(self.db)]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        log_path = self.workdir / f"mock-ofd-{self.port}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._answers, 20, "the mock OFD to answer")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mock OFD exited with {self.proc.returncode}")
        try:
            self.stats()
            return True
        except OSError:
            return False

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.admin_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self._admin("GET", "/admin/stats")  # type: ignore[no-any-return]

    def set_mode(self, mode: str, **params: Any) -> None:
        self._admin("POST", "/admin/mode", {"mode": mode, **params})

    def reject_pos_ids(self, pos_ids: list[str]) -> None:
        self._admin("POST", "/admin/reject", {"pos_ids": pos_ids})

    def stored(self, receipt_id: str) -> dict[str, Any] | None:
        import urllib.error

        try:
            return self._admin("GET", f"/admin/receipts/{receipt_id}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks to seconds)."""
    fields_after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields_after_name[11]) + int(fields_after_name[12])
    return ticks / os.sysconf("SC_CLK_TCK")
