"""The test harness, one of each for the whole suite (tests/, tests/systemd/, tests/powercut/):

- CI detection and `require` (skip on a developer's machine, fail under CI=true, and as root where asked);
- from tests/runner.py (shared with the benchmark): `Child`, `NotifySocket`, `free_port`, `wait_until`,
  `cpu_seconds`; here `async_wait_until` (in an event loop), with a deadline, never a bare sleep; `FakeTime`,
  an injected clock and sleep;
- `http` (sync, urllib: usable from threads and from code that has no event loop) and `http_async`
  (aiohttp, with or without a session of the caller's): one JSON request, answering (status, body);
- `KktdProcess` and `MockOfdProcess`: kktd and the mock OFD as `Child` processes (notify socket, logs where
  the caller wants them, a custom database), stopped by the fixtures that started them.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kktd.receipt import sample_receipt
from tests.runner import Child, NotifySocket, cpu_seconds, free_port, wait_until

__all__ = [
    "sample_receipt",
    "free_port",
    "wait_until",
    "async_wait_until",
    "FakeTime",
    "NotifySocket",
    "KktdProcess",
    "post_receipt",
    "post_many",
    "Posted",
    "REPO",
    "KKTD_BIN",
    "IN_CI",
    "require",
    "MockOfdProcess",
    "Child",
    "cpu_seconds",
    "receipts",
    "http",
    "http_async",
    "child_env",
]

REPO = Path(__file__).resolve().parent.parent
KKTD_BIN = Path(sys.executable).parent / "kktd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str, *, as_root_too: bool = False) -> None:
    """Skip for a clear reason on a developer's machine, but fail loudly in CI: CI must run everything.
    With `as_root_too`, fail as root as well: `make test` as root installs every prerequisite itself, so one
    missing there is a fault, not a reason to skip."""
    import pytest

    if condition:
        return
    if IN_CI or (as_root_too and os.geteuid() == 0):
        where = f"CI={os.environ.get('CI', '')!r}, uid {os.geteuid()}"
        pytest.fail(f"a prerequisite is missing ({where}): {reason}", pytrace=False)
    pytest.skip(reason)


async def async_wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """wait_until inside an event loop: `predicate` may return a value or an awaitable of one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One JSON request without an event loop; returns (status, decoded body or None). An HTTP error status
    is an answer too; connection errors propagate (URLError / OSError)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        return exc.code, json.loads(payload) if payload else None


async def http_async(
    method: str, url: str, body: Any = None, *, session: aiohttp.ClientSession | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One JSON request in an event loop, on the caller's session or a new one; returns (status, decoded
    body or None). Connection errors propagate (aiohttp.ClientError)."""
    if session is None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as own:
            return await http_async(method, url, body, session=own)
    async with session.request(method, url, json=body) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


class FakeTime:
    """A monotonic clock that moves only when told, for kktd.clock's Clock and Sleep: `advance()`, or
    `sleep(s)`, which moves the clock by s and returns at once (after yielding to the event loop once), so
    code that backs off for minutes runs in milliseconds. Every sleep asked for is recorded in `sleeps`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child kktd: no stray KKTD_* settings from the caller's shell and no systemd
    variables of the caller's own (the harness sets its own NOTIFY_SOCKET)."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_") and k not in drop}
    env.update(extra or {})
    return env


@dataclass
class KktdProcess:
    """`kktd serve` as a child process, the way systemd would run it (minus systemd): its own session, a
    notify socket standing in for systemd's, its output in a log file (beside the database unless `log_dir`
    says elsewhere, e.g. off a filesystem the test cuts)."""

    db: Path
    ofd_url: str = "http://127.0.0.1:9"  # discard port: nothing listens, the OFD is "down"
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    watchdog_usec: int | None = None
    port: int = field(default_factory=free_port)
    child: Child | None = None
    notify: NotifySocket | None = None
    log_dir: Path | None = None  # default: beside the database
    log_level: str = "debug"
    faults: bool = False  # run tests.faulty_kktd: kktd plus the /v1/test/ fault hooks

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc if self.child is not None else None

    @property
    def log_path(self) -> Path | None:
        return self.child.log_path if self.child is not None else None

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> KktdProcess:
        self.notify = NotifySocket()
        env = child_env({"NOTIFY_SOCKET": self.notify.path, "KKTD_LOG_LEVEL": self.log_level, **self.env})
        if self.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.watchdog_usec)
        command = [sys.executable, "-m", "tests.faulty_kktd"] if self.faults else [str(KKTD_BIN)]
        if self.faults:
            env["PYTHONPATH"] = str(REPO)
        args = [
            *command,
            "serve",
            "--db",
            str(self.db),
            "--listen",
            f"127.0.0.1:{self.port}",
            *(["--ofd-url", self.ofd_url] if self.ofd_url else []),  # "": left to the config file
            "--config",
            os.devnull,
            *self.extra_args,
        ]
        log_path = (self.log_dir or self.db.parent) / f"kktd-{self.port}-{int(time.time() * 1000)}.log"
        self.child = Child("kktd", args, log_path, env=env).start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _child(self) -> Child:
        assert self.child is not None, "kktd was not started"
        return self.child

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until kktd sent READY=1 (database open and recovered, socket bound); fails if it exits first."""
        assert self.notify is not None
        self.notify.wait_for("READY=1", timeout, child=self._child())

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Until GET /v1/health answers 200."""
        self._child().wait_until(lambda: self._health() == 200, timeout, f"health 200 at {self.url}", 0.05)

    def _health(self) -> int | None:
        try:
            return http("GET", f"{self.url}/v1/health", timeout=5)[0]
        except OSError:
            return None

    def log(self) -> str:
        return self.child.log() if self.child is not None else ""

    def log_tail(self, limit: int = 3000) -> str:
        return self.child.log_tail(limit) if self.child is not None else "(not started)"

    def signal(self, signum: int) -> None:
        self._child().signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self._child().wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush or finish anything."""
        if self.child is not None:
            self.child.kill()

    def stop(self) -> None:
        """Make sure nothing is left behind, whatever state the test left the process in."""
        if self.child is not None:
            self.child.stop()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


@dataclass
class Posted:
    key: str
    status: int
    body: dict[str, Any]


async def post_receipt(session: aiohttp.ClientSession, url: str, receipt: dict[str, Any]) -> Posted:
    status, body = await http_async("POST", f"{url}/v1/kkt/receipt", receipt, session=session)
    return Posted(receipt["idempotency_key"], status, body)


async def post_many(
    url: str, receipts: Iterable[dict[str, Any]], concurrency: int = 16, stop_on_error: bool = False
) -> list[Posted]:
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
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
                if stop_on_error:
                    return

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return answered


def receipts(prefix: str, count: int) -> list[dict[str, Any]]:
    return [sample_receipt(f"{prefix}-{i}") for i in range(count)]


@dataclass
class MockOfdProcess:
    """`kktd mock-ofd` as its own process: its store outlives any kktd crash. Its log goes to `workdir`."""

    workdir: Path
    db: Path | None = None
    seed: int | None = 1
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc if self.child is not None else None

    def start(self, timeout: float = 20.0) -> MockOfdProcess:
        args = [
            str(KKTD_BIN),
            "mock-ofd",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--admin-listen",
            f"127.0.0.1:{self.admin_port}",
            "--log-level",
            "warning",
        ]
        if self.db is not None:
            args += ["--db", str(self.db)]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        log_path = self.workdir / f"mock-ofd-{self.port}.log"
        self.child = Child("the mock OFD", args, log_path, env=child_env()).start()
        self.child.wait_until(self._answers, timeout, "its admin API to answer")
        return self

    def _answers(self) -> bool:
        try:
            self.stats()
            return True
        except OSError:
            return False

    def _admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(method, f"{self.admin_url}{path}", body)

    def _admin_ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self._admin(method, path, body)
        assert status == 200, (path, status, answer)
        return answer

    def stats(self) -> dict[str, Any]:
        return dict(self._admin_ok("GET", "/admin/stats"))

    def set_mode(self, mode: str, **params: Any) -> None:
        self._admin_ok("POST", "/admin/mode", {"mode": mode, **params})

    def reject_pos_ids(self, pos_ids: list[str]) -> None:
        self._admin_ok("POST", "/admin/reject", {"pos_ids": pos_ids})

    def stored(self, receipt_id: str) -> dict[str, Any] | None:
        status, answer = self._admin("GET", f"/admin/receipts/{receipt_id}")
        if status == 404:
            return None
        assert status == 200, (receipt_id, status, answer)
        return dict(answer)

    def stored_keys(self) -> dict[str, str]:
        """idempotency_key -> receipt_id of everything the mock stored, page by page; a key stored twice
        fails."""
        stored: dict[str, str] = {}
        while True:
            page = self._admin_ok("GET", f"/admin/receipts?after={len(stored)}&limit=5000")["receipts"]
            if not page:
                return stored
            for record in page:
                assert record["idempotency_key"] not in stored, f"stored twice: {record}"
                stored[record["idempotency_key"]] = record["receipt_id"]

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)
