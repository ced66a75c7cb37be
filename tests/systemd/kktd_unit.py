"""kktd.service inside a sandbox: install, drop-ins, HTTP helpers, a load generator and per-test reset."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kktd.receipt import sample_receipt
from tests.support import free_port, http, wait_until

from .systemd_sandbox import Sandbox, SandboxError

UNIT = "kktd.service"
MOCK_UNIT = "kktd-test-mock-ofd.service"
DROPIN_DIR = "/etc/systemd/system/kktd.service.d"
BASE_DROPIN = "10-test-checkout.conf"
STATE_DIR = "/var/lib/kktd"
CONFIG_FILE = "/etc/kktd/kktd.toml"
# systemd drops an inactive unit's runtime state (ExecMainStatus, Result) when it garbage-collects it, so
# the test drop-in records each exit from ExecStopPost's $SERVICE_RESULT/$EXIT_CODE/$EXIT_STATUS instead.
EXIT_LOG = "/run/kktd-test-exits"
# ProtectHome= hides these; a checkout below them must stay visible to the service under test.
HOME_PATHS = ("/home", "/root", "/run/user")
PRIVATE_TMP_PATHS = ("/tmp", "/var/tmp")


def answers(url: str) -> bool:
    try:
        http("GET", url, timeout=2)
    except (urllib.error.URLError, OSError):
        return False
    return True


@dataclass
class KktdUnit:
    """The shipped kktd.service installed in a sandbox, with a drop-in pointing at the checkout's venv."""

    sandbox: Sandbox
    unit_file: Path
    sysusers_file: Path
    venv: Path
    port: int = field(default_factory=free_port)
    ofd_port: int = field(default_factory=free_port)
    ofd_admin_port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ofd_url(self) -> str:
        return f"http://127.0.0.1:{self.ofd_port}"

    @property
    def ofd_admin_url(self) -> str:
        # The mock's admin listener stays up while "offline" (its main listener is really closed then).
        return f"http://127.0.0.1:{self.ofd_admin_port}"

    # -- installation ----------------------------------------------------------------------------------
    def install(self) -> None:
        """Installs the unit and sysusers entry exactly as shipped, plus the test drop-in, and creates
        the kktd user (boot-time systemd-sysusers only runs when /etc needs an update)."""
        self.sandbox.write_file(f"/etc/systemd/system/{UNIT}", self.unit_file.read_text())
        self.sandbox.write_file("/etc/sysusers.d/kktd.conf", self.sysusers_file.read_text())
        self.sandbox.run(["systemd-sysusers", "/etc/sysusers.d/kktd.conf"])
        self.sandbox.write_file(f"{DROPIN_DIR}/{BASE_DROPIN}", self.base_dropin())
        self.sandbox.systemctl("daemon-reload")

    def base_dropin(self) -> str:
        lines = [
            "# Written by tests/systemd: run the checkout's kktd instead of the packaged venv.",
            "[Service]",
            "ExecStart=",
            f"ExecStart={self.venv}/bin/kktd serve",
            f"Environment=KKTD_LISTEN=127.0.0.1:{self.port}",
            f"Environment=KKTD_OFD_URL={self.ofd_url}",
            # Short OFD timings keep the delivery tests quick; they do not change durability.
            "Environment=KKTD_SYNC_INTERVAL=0.2 KKTD_BACKOFF_MAX=0.5 KKTD_BREAKER_RESET=0.5",
            # "+": runs outside the sandboxing, which (rightly) makes /run read-only for kktd.
            f"ExecStopPost=+/bin/sh -c 'echo \"$SERVICE_RESULT $EXIT_CODE $EXIT_STATUS\" >> {EXIT_LOG}'",
        ]
        if any(str(self.venv).startswith(p + "/") for p in HOME_PATHS):
            lines.append("# The checkout lies below a ProtectHome= path: it must stay reachable (read-only).")
            lines.append("ProtectHome=read-only")
        if any(str(self.venv).startswith(p + "/") for p in PRIVATE_TMP_PATHS):
            # PrivateTmp= gives kktd an empty /tmp of its own; the checkout is bound into it, read-only,
            # so PrivateTmp= itself stays on.
            lines.append("# The checkout lies below /tmp or /var/tmp: bound read-only into kktd's private /tmp.")
            lines.append(f"BindReadOnlyPaths={self.venv.parent}")
        return "\n".join(lines) + "\n"

    def faults_dropin(self) -> str:
        """Drop-in lines that run kktd through the test-only entry point with fault hooks (tests.faulty_kktd)."""
        return "\n".join(
            [
                "ExecStart=",
                f"ExecStart={self.venv}/bin/python -m tests.faulty_kktd serve",
                f"Environment=PYTHONPATH={self.venv.parent}",
            ]
        )

    def dropin(self, name: str, text: str) -> None:
        """Adds a per-test drop-in (removed again by reset())."""
        self.sandbox.write_file(f"{DROPIN_DIR}/{name}.conf", "[Service]\n" + text.strip() + "\n")
        self.sandbox.systemctl("daemon-reload")

    # -- control ---------------------------------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.sandbox.systemctl(*args, check=check)

    def show(self, *props: str) -> dict[str, str]:
        return self.sandbox.show(UNIT, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self, *extra: str) -> list[dict[str, Any]]:
        return self.sandbox.journal(UNIT, *extra)

    def journal_text(self) -> str:
        return "\n".join(str(entry.get("MESSAGE", "")) for entry in self.journal())

    def exits(self) -> list[str]:
        """One "SERVICE_RESULT EXIT_CODE EXIT_STATUS" line per exit of kktd's main process, oldest first."""
        done = self.sandbox.run(["cat", EXIT_LOG], check=False)
        return done.stdout.splitlines() if done.returncode == 0 else []

    def wait_active_and_answering(self, timeout: float = 30) -> None:
        wait_until(
            lambda: self.show("ActiveState")["ActiveState"] == "active",
            timeout,
            "kktd to be active",
            interval=0.1,
            error=SandboxError,
        )
        wait_until(
            lambda: answers(f"{self.url}/v1/health"),
            timeout,
            "kktd to answer /v1/health",
            interval=0.1,
            error=SandboxError,
        )

    # -- the mock OFD, as its own transient unit inside the sandbox ------------------------------------
    def start_mock_ofd(self, mode: str = "normal") -> None:
        self.sandbox.run(
            [
                "systemd-run",
                f"--unit={MOCK_UNIT}",
                "--property=Type=exec",
                "--property=StateDirectory=kktd-mock-ofd",
                "--setenv=KKTD_LOG_FORMAT=journal",
                f"{self.venv}/bin/kktd",
                "mock-ofd",
                "--listen",
                f"127.0.0.1:{self.ofd_port}",
                "--admin-listen",
                f"127.0.0.1:{self.ofd_admin_port}",
                "--db",
                "/var/lib/kktd-mock-ofd/ofd.db",
            ]
        )
        wait_until(
            lambda: answers(f"{self.ofd_admin_url}/admin/stats"),
            30,
            "the mock OFD admin API",
            interval=0.1,
            error=SandboxError,
        )
        self.set_ofd_mode(mode)

    def set_ofd_mode(self, mode: str) -> None:
        status, body = http("POST", f"{self.ofd_admin_url}/admin/mode", {"mode": mode})
        assert status == 200, body

    def ofd_stats(self) -> dict[str, Any]:
        status, body = http("GET", f"{self.ofd_admin_url}/admin/stats")
        assert status == 200, body
        return dict(body)

    # -- receipts --------------------------------------------------------------------------------------
    def post_receipt(self, key: str) -> tuple[int, Any]:
        return http("POST", f"{self.url}/v1/kkt/receipt", sample_receipt(key))

    def get_receipt(self, receipt_id: str) -> tuple[int, Any]:
        return http("GET", f"{self.url}/v1/kkt/receipt/{receipt_id}")

    def buffer_counts(self) -> dict[str, int]:
        status, body = http("GET", f"{self.url}/v1/kkt/buffer/status")
        assert status == 200, body
        return dict(body["counts"])

    # -- per-test clean-up -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to a freshly installed unit: stopped, no failure record, no state, no extra drop-ins."""
        for unit in (UNIT, MOCK_UNIT):
            self.systemctl("stop", unit, check=False)
            self.systemctl("reset-failed", unit, check=False)
        self.sandbox.run(["find", DROPIN_DIR, "-name", "*.conf", "!", "-name", BASE_DROPIN, "-delete"])
        self.sandbox.remove(STATE_DIR)
        self.sandbox.remove("/var/lib/private/kktd")
        self.sandbox.remove("/var/lib/kktd-mock-ofd")
        self.sandbox.remove(CONFIG_FILE)
        self.sandbox.remove(EXIT_LOG)
        self.sandbox.systemctl("daemon-reload")


@dataclass
class LoadResult:
    acked: dict[str, str]  # idempotency key -> receipt_id from its 2xx answer
    statuses: dict[int, int]  # HTTP status -> how many answers
    connection_errors: int
    unfinished: list[str]  # keys never acknowledged before the deadline


class Load:
    """Posts receipts from a background thread with `workers` concurrent clients until stop().

    Each client behaves like a POS: it re-sends the same receipt (same idempotency key) until kktd answers
    2xx, so a key is either acknowledged or reported unfinished. Bounded by `max_receipts`.
    """

    def __init__(self, url: str, prefix: str, workers: int = 4, max_receipts: int = 2000) -> None:
        self.url = url
        self.prefix = prefix
        self.workers = workers
        self.max_receipts = max_receipts
        self.result = LoadResult({}, {}, 0, [])
        self._stop = threading.Event()
        self._finish_by = 0.0
        self._next = 0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"load-{prefix}")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop(finish_within=5)

    def acked_count(self) -> int:
        with self._lock:
            return len(self.result.acked)

    def wait_acked(self, n: int, timeout: float = 30) -> None:
        wait_until(
            lambda: self.acked_count() >= n,
            timeout,
            f"{n} receipts acknowledged under load",
            interval=0.1,
            error=SandboxError,
        )

    def stop(self, finish_within: float = 30) -> LoadResult:
        """Starts no new receipts; keys in flight are retried until acknowledged or `finish_within` ends."""
        if not self._stop.is_set():
            self._finish_by = time.monotonic() + finish_within
            self._stop.set()
        self._thread.join(timeout=finish_within + 15)
        if self._thread.is_alive():
            raise SandboxError("load generator did not stop")
        if self._error is not None:
            raise AssertionError(f"load generator failed: {self._error!r}") from self._error
        return self.result

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: B902 - handed to the test thread by stop()
            self._error = exc

    def _take_key(self) -> str | None:
        with self._lock:
            if self._stop.is_set() or self._next >= self.max_receipts:
                return None
            self._next += 1
            return f"{self.prefix}-{self._next:06d}"

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session) for _ in range(self.workers)))

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while (key := self._take_key()) is not None:
            await self._deliver(session, key)

    async def _deliver(self, session: aiohttp.ClientSession, key: str) -> None:
        while not (self._stop.is_set() and time.monotonic() > self._finish_by):
            try:
                async with session.post(f"{self.url}/v1/kkt/receipt", json=sample_receipt(key)) as response:
                    body = await response.json(content_type=None)
                    with self._lock:
                        statuses = self.result.statuses
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                    if 200 <= response.status < 300:
                        self._record(key, str(body["receipt_id"]))
                        return
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                with self._lock:
                    self.result.connection_errors += 1
            # kktd is restarting or refused: back off briefly like a POS would, then re-send the same key.
            await asyncio.sleep(0.05)
        with self._lock:
            self.result.unfinished.append(key)

    def _record(self, key: str, receipt_id: str) -> None:
        with self._lock:
            previous = self.result.acked.setdefault(key, receipt_id)
        if previous != receipt_id:
            raise AssertionError(f"key {key} acknowledged as {previous} and as {receipt_id}")
