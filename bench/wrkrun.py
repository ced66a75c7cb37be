"""Run wrk with bench/receipts.lua for a fixed number of requests and parse its KKTD_BENCH line."""

from __future__ import annotations

import json
import resource
import secrets
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proc import BenchError

SCRIPT = Path(__file__).resolve().parent / "receipts.lua"
# wrk's latency histogram has one bucket per microsecond up to --timeout; 10 s is far above any latency
# seen here and keeps it at 80 MB of mostly untouched virtual memory.
WRK_TIMEOUT = "10s"
DONE_MARK = "KKTD_THREAD_DONE"
RESULT_MARK = "KKTD_BENCH "


@dataclass(frozen=True)
class WrkResult:
    connections: int
    threads: int
    issued: int
    completed: int
    ok2xx: int
    errors: dict[str, int]
    seconds: float  # first request sent .. last response received, over all threads
    latency_us: dict[str, float]
    finished: bool  # every thread reached its budget (False: stopped by the time cap)
    wrk_cpu_s: float  # the load generator's own CPU time: it shares the machine's cores with the server
    ok2xx_counted: int | None  # 2xx counted by the Lua response() hook, only when asked for
    ok2xx_derived: int  # completed - errors.status

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "threads": self.threads,
            "issued": self.issued,
            "completed": self.completed,
            "ok2xx": self.ok2xx,
            "errors": self.errors,
            "seconds": self.seconds,
            "receipts_per_s": self.rate,
            "latency_us": self.latency_us,
            "finished": self.finished,
            "wrk_cpu_s": self.wrk_cpu_s,
            "ok2xx_counted_in_lua": self.ok2xx_counted,
            "ok2xx_derived": self.ok2xx_derived,
        }


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed (make bench installs Debian's wrk; or: apt-get install wrk)")
    return path


def threads_for(connections: int) -> int:
    # wrk needs at least one connection per thread: the single-connection run uses one thread.
    return 2 if connections >= 2 else 1


def command(url: str, connections: int, requests: int, nonce: str, cap_s: int, count2xx: bool) -> list[str]:
    threads = threads_for(connections)
    per_thread_conns = connections // threads
    per_thread = -(-requests // threads)  # ceil: every thread gets the same budget
    argv = [
        wrk_binary(),
        "-t",
        str(threads),
        "-c",
        str(per_thread_conns * threads),
        "-d",
        f"{cap_s}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(SCRIPT),
        url,
        "--",
        str(per_thread),
        str(per_thread_conns),
        nonce,
    ]
    return argv + (["count2xx"] if count2xx else [])


def run(url: str, connections: int, requests: int, cap_s: int = 300, count2xx: bool = False) -> WrkResult:
    """POST `requests` receipts (rounded up to a multiple of the thread count) over `connections`."""
    nonce = secrets.token_hex(6)
    argv = command(url, connections, requests, nonce, cap_s, count2xx)
    threads = threads_for(connections)
    # wrk is the only child reaped in this window (servers are reaped later), so the delta is wrk's CPU.
    children_before = _children_cpu()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done = _wait_threads_done(process, threads, cap_s + 30)
        stdout = _interrupt(process) if process.poll() is None else process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    wrk_cpu = _children_cpu() - children_before
    if process.returncode != 0:
        raise BenchError(f"wrk exited with {process.returncode}: {' '.join(argv)}\n{stdout[-2000:]}")
    return _parse(stdout, connections, threads, done == threads, wrk_cpu)


def _interrupt(process: subprocess.Popen[str], attempts: int = 60) -> str:
    """wrk's main thread sleeps out -d; SIGINT ends that sleep and it prints its summary at once. wrk installs
    its handler just before it starts sleeping: a SIGINT that lands in between (a very fast run, e.g. the
    minimal arm with a few dozen requests) is noted and then slept through, so it is sent again every second
    until wrk exits."""
    for _ in range(attempts):
        process.send_signal(signal.SIGINT)
        try:
            return process.communicate(timeout=1)[0]
        except subprocess.TimeoutExpired:
            continue
    raise BenchError(f"wrk did not exit within {attempts} SIGINTs")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wait_threads_done(process: subprocess.Popen[str], threads: int, timeout_s: float) -> int:
    """Count DONE marks on wrk's stderr until every thread reported or wrk exited; returns the count."""
    assert process.stderr is not None
    seen = 0
    all_done = threading.Event()
    other_lines: list[str] = []

    def read() -> None:
        nonlocal seen
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith(DONE_MARK):
                seen += 1
                if seen == threads:
                    all_done.set()
            else:
                other_lines.append(line)
        all_done.set()  # EOF: wrk exited (duration cap or error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not all_done.wait(timeout_s):
        raise BenchError(f"wrk did not finish within {timeout_s:.0f}s")
    if other_lines:
        print("wrk stderr: " + "".join(other_lines[-10:]).strip())
    return seen


def _parse(stdout: str, connections: int, threads: int, finished: bool, wrk_cpu: float) -> WrkResult:
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise BenchError(f"wrk printed no {RESULT_MARK.strip()} line:\n{stdout[-2000:]}")
    data = json.loads(lines[-1][len(RESULT_MARK) :])
    seconds = (data["last_response_us"] - data["first_request_us"]) / 1e6
    if not finished or seconds <= 0:
        # Stopped by the cap: wrk's own runtime is the honest denominator.
        seconds = data["wrk_runtime_us"] / 1e6
    return WrkResult(
        connections=connections,
        threads=threads,
        issued=data["issued"],
        completed=data["completed"],
        ok2xx=data["ok2xx"],
        errors=data["errors"],
        seconds=seconds,
        latency_us=data["latency_us"],
        finished=finished,
        wrk_cpu_s=wrk_cpu,
        ok2xx_counted=data["ok2xx_counted_in_lua"],
        ok2xx_derived=data["ok2xx_derived"],
    )
