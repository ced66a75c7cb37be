"""Server processes for the benchmark, on the test suite's runner (tests/runner.py): start, wait until they
answer, read their CPU and memory, stop.

CPU time and peak RSS come from /proc of the server's own process (all of its threads, so aiosqlite's thread
is included); nothing is sampled, so reading them costs the server nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/ scripts run as `python bench/run.py` (sys.path[0] is bench/): the runner lives in the tests package.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from tests.runner import Child, NotifySocket, cpu_seconds, free_port, peak_rss_mb

__all__ = [
    "BenchError",
    "CpuSplit",
    "NotifySocket",
    "Server",
    "cpu_seconds",
    "cpu_split",
    "free_port",
    "http_json",
    "peak_rss_mb",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server did not start, wrk failed, counts do not add up)."""


def http_json(url: str, method: str = "GET", timeout_s: float = 5.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else None


@dataclass(frozen=True)
class CpuSplit:
    """A process's CPU seconds by thread and mode: the main thread (kktd's event loop) and every other thread
    (aiosqlite's), each user and system time, from /proc/PID/task/*/stat."""

    loop_user: float
    loop_system: float
    threads_user: float
    threads_system: float

    def __sub__(self, other: CpuSplit) -> CpuSplit:
        return CpuSplit(
            self.loop_user - other.loop_user,
            self.loop_system - other.loop_system,
            self.threads_user - other.threads_user,
            self.threads_system - other.threads_system,
        )

    @property
    def total(self) -> float:
        return self.loop_user + self.loop_system + self.threads_user + self.threads_system


def cpu_split(pid: int) -> CpuSplit:
    """The split of cpu_seconds(pid) by thread (a thread that ended meanwhile drops out of the others)."""
    loop = [0.0, 0.0]
    threads = [0.0, 0.0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended between the listing and the read
        fields = text[text.rindex(")") + 2 :].split()
        into = loop if int(task.name) == pid else threads
        into[0] += int(fields[11]) / CLOCK_TICKS
        into[1] += int(fields[12]) / CLOCK_TICKS
    return CpuSplit(loop[0], loop[1], threads[0], threads[1])


class Server(Child):
    """One server process answering HTTP at `base_url`; its log collects stdout and stderr for the report."""

    def __init__(
        self, name: str, argv: Sequence[str], base_url: str, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(name, argv, log, env=env, error=BenchError)
        self.base_url = base_url

    def wait_ready(self, path: str = "/v1/health", timeout_s: float = START_TIMEOUT_S) -> float:
        """Poll until `path` answers (any HTTP status): returns seconds since start."""
        self.wait_until(lambda: self._answers(path), timeout_s, f"to answer {path}")
        return time.monotonic() - self.started_at

    def _answers(self, path: str) -> bool:
        try:
            http_json(self.base_url + path, timeout_s=1.0)
            return True
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit code."""
        code = super().stop(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        super().kill()
        self.proc = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
