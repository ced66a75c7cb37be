"""Child processes, one runner for the test suite and the benchmark (bench/proc.py builds on it).

Only the standard library, so `make bench` can import it without pytest:

- `Child`: one process started in its own session with its output in a log file; waits with a deadline
  that notice the process dying; SIGTERM then SIGKILL; never left running by the code that started it;
- `NotifySocket`: a datagram socket standing in for systemd's NOTIFY_SOCKET, with each message's arrival
  time (the benchmark times READY=1 from it);
- `wait_until`, `free_port`, `cpu_seconds`, `peak_rss_mb`.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port nothing listens on right now (also the 'upstream is down' address: connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.02,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; at the deadline raise `error`
    (AssertionError, or the caller's own error type) naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)  # the polling interval of a deadline-bounded wait, not synchronisation


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread, so aiosqlite's is included), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; everything after its closing parenthesis is space-separated.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _tail(path: Path | None, limit: int) -> str:
    try:
        return path.read_text(errors="replace")[-limit:] if path is not None else "(not started)"
    except OSError:
        return "(no log)"


@dataclass
class Child:
    """One child process. `error` is what its waits raise: AssertionError in tests, the benchmark's own
    error type there; the message always carries the end of the log."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    error: type[Exception] = AssertionError
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.monotonic() at start

    def start(self) -> Child:
        env = dict(os.environ if self.env is None else self.env)
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,  # a test's Ctrl-C or a killed process group never reaches it
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise self.error(f"{self.name} is not running")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, limit: int = 3000) -> str:
        return _tail(self.log_path, limit)

    def check_alive(self, when: str) -> None:
        """Raise if the process has exited: a wait for it to do something would otherwise run to its deadline."""
        if self.proc is not None and self.proc.poll() is not None:
            raise self.error(
                f"{self.name} exited with {self.proc.returncode} {when}; log {self.log_path}:\n{self.log_tail()}"
            )

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
        """wait_until that fails at once when the process exits, and shows its log when the deadline passes."""

        def alive_and(value: Callable[[], Any]) -> Any:
            self.check_alive(f"before {what}")
            return value()

        try:
            return wait_until(lambda: alive_and(predicate), timeout, f"{self.name}: {what}", interval, self.error)
        except self.error as exc:
            if self.running():
                raise self.error(f"{exc}; log {self.log_path}:\n{self.log_tail()}") from None
            raise

    def signal(self, signum: int) -> None:
        if self.proc is None:
            raise self.error(f"{self.name} is not running")
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            raise self.error(f"{self.name} is not running")
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would end it: nothing is flushed or closed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@dataclass
class NotifySocket:
    """An AF_UNIX datagram socket at `path` (default: in a new temporary directory); pass its path to the
    child as NOTIFY_SOCKET. Every line received is kept with its arrival time (time.monotonic())."""

    path: str = ""
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._dir = "" if self.path else tempfile.mkdtemp(prefix="kktd-notify-")
        self.path = self.path or os.path.join(self._dir, "notify.sock")
        Path(self.path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def collect(self) -> list[str]:
        """Every line received so far (reads what is queued, never blocks)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            arrived = time.monotonic()
            self.messages.extend((arrived, line) for line in data.decode(errors="replace").splitlines())
        return [line for _, line in self.messages]

    def wait_for(self, line: str, timeout: float, since: float | None = None, child: Child | None = None) -> float:
        """Until a message holding `line` arrives (failing at once if `child` exits first); returns the
        seconds from `since` (time.monotonic(), default now) to its arrival. select() wakes on the datagram
        itself, so the time is the arrival's, not a polling interval's."""
        start = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        error = child.error if child is not None else AssertionError
        while True:
            self.collect()
            for arrived, text in self.messages:
                if text == line:
                    return arrived - start
            if child is not None:
                child.check_alive(f"before {line}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise error(f"no notify message {line!r} within {timeout:g}s; got {[t for _, t in self.messages]}")
            select.select([self.sock], [], [], min(0.2, remaining))

    def close(self) -> None:
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)
        if self._dir:
            os.rmdir(self._dir)

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
