"""Server processes for the benchmark, on the test suite's runner (tests/runner.py): start, wait until they
answer, read their CPU and memory, stop.

CPU time and peak RSS come from /proc of the server's own process (all of its threads, so aiosqlite's thread
is included); nothing is sampled, so reading them costs the server nothing.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# bench/ scripts run as `python bench/run.py` (sys.path[0] is bench/): the runner lives in the tests package.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from tests.runner import Child, NotifySocket, cpu_seconds, free_port, peak_rss_mb

__all__ = ["BenchError", "Server", "NotifySocket", "cpu_seconds", "free_port", "peak_rss_mb", "http_json"]

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
