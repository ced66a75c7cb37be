"""`make bench`: kktd's intake against three baselines (also on a slow-flush model of an SD card), plus drain,
restart, memory and intake-while-draining.

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--only SECTION]... [--requests N] [--json PATH]

SECTION is intake, sdcard, drain, restart, memory, concurrent, scrape, atol or register (all nine by default), or
luacount (only on request: does counting 2xx answers in wrk's Lua response() hook slow wrk down?). sdcard:
naive vs kktd with every fsync/fdatasync of the server delayed (bench/slowsync.c). scrape: intake with and
without a Prometheus-style GET /metrics every 100 ms, side by side, and what one scrape costs kktd. atol:
10,000 pending receipts drained through the ATOL Online v5 mock (`kktd mock-atol`), two HTTP calls each.
register: 2,000 pending receipts drained to the till's own register through the ATOL driver v10 mock
(`kktd mock-atol-driver --print-time 0`): kktd's own cost per receipt; then intake at 16 connections while
that drain runs against intake with the register unreachable, interleaved.

A benchmark, not a test: it prints figures and which targets they meet. Exit status: 0 when it ran to the end
(targets met or not), 2 when a run lost or invented receipts (database rows != 2xx answers, a drain that did
not deliver everything, receipts lost across a SIGKILL), 1 when it could not run. docs/performance.md explains
every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dataset
import wrkrun
from proc import BenchError, NotifySocket, Server, cpu_seconds, cpu_split, free_port, http_json, peak_rss_mb

BENCH_DIR = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
ARMS = ("minimal", "bare", "naive", "kktd")
STORING_ARMS = ("naive", "kktd")
CONNECTIONS = (1, 16, 64)
DEFAULT_SECTIONS = ("intake", "sdcard", "drain", "restart", "memory", "concurrent", "scrape", "atol", "register")
SECTIONS = DEFAULT_SECTIONS + ("luacount",)
STATUS_POLL_S = 0.05  # drain progress is read this often; one status GET costs kktd well under a millisecond
SCRAPE_EVERY_S = 0.1  # far more often than any Prometheus (15 s to 1 min): an upper bound on the cost
SCRAPE_CONNECTIONS = 16
COMMAND = ".venv/bin/python bench/run.py"
# The slow-flush model of an SD card (bench/slowsync.c, built by `make slowsync`): every fsync/fdatasync of
# the server waits this long first.
SLOWSYNC = BENCH_DIR.parent / "build" / "slowsync.so"
SD_DELAY_MS = 5.0


@dataclass(frozen=True)
class Plan:
    """How much work each figure gets. `full` fits in ~10 minutes here (plus a one-time database build)."""

    rounds: int
    intake_requests: dict[int, int]
    warmup_requests: int
    drain_pending: int
    big_pending: int
    big_sent: int
    restarts: int
    load_requests: int
    concurrent_rounds: int
    sd_rounds: int
    sd_requests: dict[int, int]
    sd_warmup_requests: int
    scrape_requests: int
    quick: bool
    atol_pending: int = 10_000
    register_pending: int = 2000
    register_drain_rounds: int = 3
    register_printing_pending: int = 50

    @classmethod
    def full(cls) -> Plan:
        return cls(
            rounds=5,
            intake_requests={1: 3000, 16: 15000, 64: 20000},
            warmup_requests=1000,
            drain_pending=100_000,
            big_pending=100_000,
            big_sent=900_000,
            restarts=3,
            load_requests=20000,
            concurrent_rounds=2,
            sd_rounds=3,
            sd_requests={1: 1000, 16: 2000, 64: 3000},
            sd_warmup_requests=200,
            scrape_requests=15000,
            quick=False,
            atol_pending=10_000,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            rounds=1,
            intake_requests={1: 300, 16: 1000, 64: 1000},
            warmup_requests=100,
            drain_pending=5000,
            big_pending=1000,
            big_sent=9000,
            restarts=1,
            load_requests=2000,
            concurrent_rounds=1,
            sd_rounds=1,
            sd_requests={1: 40, 16: 100, 64: 200},
            sd_warmup_requests=20,
            scrape_requests=1000,
            quick=True,
            atol_pending=2000,
            register_pending=200,
            register_drain_rounds=1,
            register_printing_pending=10,
        )


@dataclass
class Context:
    plan: Plan
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    integrity_failures: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def check(self, ok: bool, what: str) -> None:
        """A broken invariant is not a slow figure: it is recorded, shouted and turns the exit status to 2."""
        if not ok:
            self.integrity_failures.append(what)
            print(f"  !! INTEGRITY: {what}", flush=True)


# ---- servers ----


def kktd_server(
    ctx: Context,
    name: str,
    db: Path,
    ofd_url: str | None = None,
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> Server:
    """kktd as deployed, quiet; the OFD defaults to a port nobody listens on (connection refused)."""
    port = free_port()
    config = ctx.path("empty.toml")  # never pick up /etc/kktd/kktd.toml of the machine
    config.touch()
    argv = [
        str(VENV_BIN / "kktd"),
        "serve",
        "--config",
        str(config),
        "--db",
        str(db),
        "--listen",
        f"127.0.0.1:{port}",
        "--ofd-url",
        ofd_url or f"http://127.0.0.1:{free_port()}",
        "--log-level",
        "warning",
        "--drain-timeout",
        "2",
        "--max-pending",
        "2000000",
        *extra,
    ]
    return Server(name, argv, f"http://127.0.0.1:{port}", ctx.path(f"{name}.log"), env=server_env(env))


def baseline_server(ctx: Context, kind: str, db: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "baselines.py"), kind, "--listen", f"127.0.0.1:{port}"]
    if kind == "naive":
        argv += ["--db", str(db)]
    return Server(kind, argv, f"http://127.0.0.1:{port}", ctx.path(f"{kind}.log"), env=server_env(env))


def mock_ofd(ctx: Context) -> tuple[Server, str]:
    """kktd's mock OFD (in-memory store); returns the server (admin URL) and the OFD URL for kktd."""
    port, admin = free_port(), free_port()
    argv = [
        str(VENV_BIN / "kktd"),
        "mock-ofd",
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin}",
        "--log-level",
        "warning",
    ]
    server = Server("mock-ofd", argv, f"http://127.0.0.1:{admin}", ctx.path("mock-ofd.log"), env=server_env())
    return server, f"http://127.0.0.1:{port}"


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would reconfigure a server behind our back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KKTD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra or {})
    return env


def count_rows(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM receipts").fetchone()[0])
    finally:
        conn.close()


def remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def pending_of(server: Server) -> int:
    status, body = http_json(server.base_url + "/v1/kkt/buffer/status")
    if status != 200:
        raise BenchError(f"{server.name}: GET /v1/kkt/buffer/status answered {status}: {body}")
    return int(body["counts"]["pending"])


def reproduce(args: str) -> None:
    print(f"  reproduce: {COMMAND} {args}", flush=True)


def ms(microseconds: float) -> float:
    return microseconds / 1000


# ---- intake: bare / naive / kktd, interleaved ----


def intake_once(
    ctx: Context,
    arm: str,
    connections: int,
    requests: int,
    label: str,
    env: dict[str, str] | None = None,
    warmup: int | None = None,
) -> dict[str, Any]:
    """One fresh server on a fresh database: warm-up, then the measured run; rows checked after stopping.
    The warm-up starts as soon as the server answers, so its latencies are those of the first second after
    READY (where a stall of the first checkpoint or of file growth would show); they are kept too."""
    db = ctx.path(f"{arm}-{label}.db")
    server = kktd_server(ctx, "kktd", db, env=env) if arm == "kktd" else baseline_server(ctx, arm, db, env)
    with server:
        server.wait_ready()
        url = server.base_url + "/v1/kkt/receipt"
        # Warm-up at the same concurrency: connections, imports and caches are not what is measured.
        warm = wrkrun.run(url, connections, ctx.plan.warmup_requests if warmup is None else warmup)
        cpu_before = cpu_seconds(server.pid)
        result = wrkrun.run(url, connections, requests)
        cpu = cpu_seconds(server.pid) - cpu_before
        rss = peak_rss_mb(server.pid)
        exit_code = server.stop()
    row = {
        "arm": arm,
        **result.as_dict(),
        "server_cpu_s": cpu,
        "peak_rss_mb": rss,
        "exit_code": exit_code,
        "cpu_ms_per_1000": 1e6 * cpu / result.completed if result.completed else 0.0,
        "warmup": {"completed": warm.completed, "receipts_per_s": warm.rate, "latency_us": warm.latency_us},
    }
    where = f"{arm} c{connections}"
    ctx.check(result.finished, f"{where}: wrk stopped by its time cap, not its request count")
    ctx.check(
        result.ok2xx == result.completed, f"{where}: {result.completed - result.ok2xx} non-2xx answers {result.errors}"
    )
    if arm in STORING_ARMS:
        rows, expected = count_rows(db), warm.ok2xx + result.ok2xx
        row.update(db_rows=rows, rows_match=rows == expected)
        ctx.check(rows == expected, f"{where}: {rows} rows in the database, {expected} 2xx answers")
    remove_db(db)
    return row


def print_intake_row(round_no: int, row: dict[str, Any]) -> None:
    latency = row["latency_us"]
    rows = "  rows = 2xx" if row.get("rows_match") else ""
    print(
        f"  round {round_no} c{row['connections']:<3} {row['arm']:<7} {row['receipts_per_s']:8.0f}/s  "
        f"p50 {ms(latency['p50']):6.2f} ms  p99 {ms(latency['p99']):7.2f} ms  "
        f"(warm-up p99 {ms(row['warmup']['latency_us']['p99']):7.2f} ms)  "
        f"cpu {row['cpu_ms_per_1000']:4.0f} ms/1k  rss {row['peak_rss_mb']:5.1f} MB{rows}",
        flush=True,
    )


def section_intake(ctx: Context) -> None:
    reproduce(f"--only intake --rounds {ctx.plan.rounds}" + (" --quick" if ctx.plan.quick else ""))
    runs: list[dict[str, Any]] = []
    for round_no in range(1, ctx.plan.rounds + 1):
        for connections in CONNECTIONS:
            for arm in ARMS:  # A B C A B C ...: slow drifts of a shared machine hit every arm alike
                row = intake_once(
                    ctx, arm, connections, ctx.plan.intake_requests[connections], f"r{round_no}-c{connections}"
                )
                row["round"] = round_no
                runs.append(row)
                print_intake_row(round_no, row)
    medians = {
        f"{arm}/c{c}": intake_medians([r for r in runs if r["arm"] == arm and r["connections"] == c])
        for arm in ARMS
        for c in CONNECTIONS
    }
    ratios = {}
    for c in CONNECTIONS:
        kktd = medians[f"kktd/c{c}"]["receipts_per_s"]
        ratios[f"c{c}"] = {
            f"kktd/{arm}": kktd / medians[f"{arm}/c{c}"]["receipts_per_s"] for arm in ARMS if arm != "kktd"
        }
    kktd_c64 = [r for r in runs if r["arm"] == "kktd" and r["connections"] == 64]
    worst_p99 = max(ms(max(r["latency_us"]["p99"], r["warmup"]["latency_us"]["p99"])) for r in kktd_c64)
    ctx.results["intake"] = {
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
        "kktd_c64_worst_p99_ms": worst_p99,
        "peak_rss_mb": {arm: max(r["peak_rss_mb"] for r in runs if r["arm"] == arm) for arm in ARMS},
    }


def intake_medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "receipts_per_s": median(r["receipts_per_s"] for r in rows),
        "p50_ms": median(ms(r["latency_us"]["p50"]) for r in rows),
        "p99_ms": median(ms(r["latency_us"]["p99"]) for r in rows),
        "server_cpu_s": median(r["server_cpu_s"] for r in rows),
        "cpu_ms_per_1000": median(r["cpu_ms_per_1000"] for r in rows),
        "wrk_cpu_ms_per_1000": median(1e6 * r["wrk_cpu_s"] / r["completed"] for r in rows),
        "peak_rss_mb": median(r["peak_rss_mb"] for r in rows),
        "warmup_p99_ms": median(ms(r["warmup"]["latency_us"]["p99"]) for r in rows),
        "requests": rows[0]["completed"],
        "rounds": len(rows),
    }


# ---- sdcard: naive vs kktd with every flush delayed (the slow-flush model of an SD card) ----


def slowsync_env(delay_ms: float) -> dict[str, str]:
    if not SLOWSYNC.exists():
        raise BenchError(f"{SLOWSYNC} is missing: `make slowsync` builds it (`make bench` does)")
    return {"LD_PRELOAD": str(SLOWSYNC), "KKTD_SLOW_FSYNC_MS": f"{delay_ms:g}"}


# One 4 KiB write + fdatasync, 50 times, in the database's directory: what one flush costs under the shim
# (the delay, the sleep's overshoot and the real flush of this disk), and without it.
FLUSH_PROBE = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
times = []
for i in range(50):
    os.pwrite(fd, b"x" * 4096, (i % 8) * 4096)
    started = time.monotonic()
    os.fdatasync(fd)
    times.append(time.monotonic() - started)
os.close(fd)
os.unlink(sys.argv[1])
print(sorted(times)[len(times) // 2] * 1000)
"""


def flush_ms(ctx: Context, env: dict[str, str] | None) -> float:
    result = subprocess.run(
        [sys.executable, "-c", FLUSH_PROBE, str(ctx.path("flush.probe"))],
        env=server_env(env),
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout)


def section_sdcard(ctx: Context) -> None:
    """naive (one commit, so one flush, per receipt) against kktd (one flush per group) when every fsync and
    fdatasync of the server waits SD_DELAY_MS first: a commit costs what a flush of an SD card costs."""
    reproduce("--only sdcard" + (" --quick" if ctx.plan.quick else ""))
    env = slowsync_env(SD_DELAY_MS)
    flush_plain, flush_slowed = flush_ms(ctx, None), flush_ms(ctx, env)
    print(
        f"  one fdatasync (median of 50): {flush_plain:.2f} ms on this disk, {flush_slowed:.2f} ms under the "
        f"shim ({SD_DELAY_MS:g} ms delay)",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for round_no in range(1, ctx.plan.sd_rounds + 1):
        for connections in CONNECTIONS:
            for arm in STORING_ARMS:
                row = intake_once(
                    ctx,
                    arm,
                    connections,
                    ctx.plan.sd_requests[connections],
                    f"sd-r{round_no}-c{connections}",
                    env=env,
                    warmup=ctx.plan.sd_warmup_requests,
                )
                row["round"] = round_no
                runs.append(row)
                print_intake_row(round_no, row)
    medians = {
        f"{arm}/c{c}": intake_medians([r for r in runs if r["arm"] == arm and r["connections"] == c])
        for arm in STORING_ARMS
        for c in CONNECTIONS
    }
    ratios = {
        f"c{c}": medians[f"kktd/c{c}"]["receipts_per_s"] / medians[f"naive/c{c}"]["receipts_per_s"] for c in CONNECTIONS
    }
    ceiling = 1000 / SD_DELAY_MS
    ctx.results["sdcard"] = {
        "delay_ms": SD_DELAY_MS,
        "runs": runs,
        "medians": medians,
        "ratios": ratios,
        "one_flush_per_s": ceiling,
        "kktd_c1_of_one_flush": medians["kktd/c1"]["receipts_per_s"] / ceiling,
        "flush_ms_plain": flush_plain,
        "flush_ms_slowed": flush_slowed,
        "kktd_c1_of_measured_flush": medians["kktd/c1"]["receipts_per_s"] * flush_slowed / 1000,
    }


# ---- drain: 100,000 pending delivered to the mock OFD ----


def drain_run(
    ctx: Context, label: str, source: Path, during: Callable[[Server], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """kktd on a copy of `source` with the mock OFD up: time until the buffer status shows nothing pending.
    `during` runs right after kktd answers, while the drain goes on (the concurrent section's load)."""
    db = ctx.path(f"drain-{label}.db")
    dataset.copy_to(source, db)
    total = count_rows(db)
    mock, ofd_url = mock_ofd(ctx)
    kktd = kktd_server(ctx, "kktd", db, ofd_url=ofd_url)
    extra: dict[str, Any] = {}
    with mock:
        mock.wait_ready("/admin/stats")
        with kktd:
            ready_s = kktd.wait_ready()
            # The sync loop starts before the server answers: time the drain from the first status read
            # and count what was pending then, not from process start against the whole database.
            first_at = time.monotonic()
            pending_at_first = pending_of(kktd)
            cpu_before = cpu_seconds(kktd.pid)
            if during is not None:
                extra = during(kktd)
            drained_s = wait_drained(kktd) - first_at
            cpu = cpu_seconds(kktd.pid) - cpu_before
            mock_cpu = cpu_seconds(mock.pid)
            rss = peak_rss_mb(kktd.pid)
            _, stats = http_json(mock.base_url + "/admin/stats")
    remove_db(db)
    # Receipts taken in during the drain (the concurrent section) are drained too and count here.
    timed = pending_at_first + int(extra.get("intake", {}).get("ok2xx", 0))
    return {
        "receipts": total,
        "delivered_unique_at_ofd": int(stats["unique"]),
        "ready_s": ready_s,
        "pending_at_first_status": pending_at_first,
        "drain_s": drained_s,
        "total_s": ready_s + drained_s,
        "receipts_per_s": timed / drained_s,
        "kktd_cpu_s": cpu,
        "mock_ofd_cpu_s": mock_cpu,
        "peak_rss_mb": rss,
        **extra,
    }


def wait_drained(kktd: Server, timeout_s: float = 600.0) -> float:
    """Poll the buffer status until nothing is pending; returns that moment (time.monotonic)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pending_of(kktd) == 0:
            return time.monotonic()
        time.sleep(STATUS_POLL_S)  # polling interval of a deadline-bounded wait
    raise BenchError(f"kktd did not drain within {timeout_s:.0f}s; log: {kktd.log_path}")


def section_drain(ctx: Context) -> None:
    reproduce("--only drain" + (" --quick" if ctx.plan.quick else ""))
    result = drain_run(ctx, "alone", prepared(ctx, ctx.plan.drain_pending, 0))
    ctx.check(
        result["delivered_unique_at_ofd"] == result["receipts"],
        f"drain: the OFD holds {result['delivered_unique_at_ofd']} receipts of {result['receipts']}",
    )
    print(
        f"  drained {result['pending_at_first_status']} pending in {result['drain_s']:.2f}s from the first "
        f"status read: {result['receipts_per_s']:.0f}/s ({result['total_s']:.2f}s from process start); "
        f"kktd cpu {result['kktd_cpu_s']:.1f}s, mock OFD cpu {result['mock_ofd_cpu_s']:.1f}s",
        flush=True,
    )
    ctx.results["drain"] = result


# ---- atol: 10,000 pending through the ATOL Online v5 mock ----

ATOL_LOGIN, ATOL_GROUP, ATOL_INN = "bench", "bench-group", "5544332219"


def mock_atol(ctx: Context) -> tuple[Server, list[str]]:
    """`kktd mock-atol` (in memory); returns the server (base URL = its root) and kktd's flags for it."""
    port = free_port()
    password = ctx.path("atol_password")
    password.write_text("bench-password\n")
    argv = [
        str(VENV_BIN / "kktd"),
        "mock-atol",
        "--listen",
        f"127.0.0.1:{port}",
        "--login",
        ATOL_LOGIN,
        "--password",
        "bench-password",
        "--group-code",
        ATOL_GROUP,
        "--inn",
        ATOL_INN,
        "--log-level",
        "warning",
    ]
    server = Server("mock-atol", argv, f"http://127.0.0.1:{port}", ctx.path("mock-atol.log"), env=server_env())
    flags = [
        "--upstream",
        "atol-online-v5",
        "--atol-url",
        f"http://127.0.0.1:{port}/possystem/v5",
        "--atol-login",
        ATOL_LOGIN,
        "--atol-group-code",
        ATOL_GROUP,
        "--atol-password-file",
        str(password),
        "--company-inn",
        ATOL_INN,
        "--company-email",
        "shop@example.ru",
        "--company-payment-address",
        "https://shop.example.ru",
    ]
    return server, flags


def undelivered_of(server: Server) -> int:
    """Receipts not yet fiscalized: pending, and (two-phase upstreams) registered but awaiting their result."""
    status, body = http_json(server.base_url + "/v1/kkt/buffer/status")
    if status != 200:
        raise BenchError(f"{server.name}: GET /v1/kkt/buffer/status answered {status}: {body}")
    counts = body["counts"]
    return int(counts["pending"]) + int(counts.get("submitted", 0))


def section_atol(ctx: Context) -> None:
    reproduce("--only atol" + (" --quick" if ctx.plan.quick else ""))
    pending = ctx.plan.atol_pending
    db = ctx.path("atol.db")
    dataset.copy_to(prepared(ctx, pending, 0, contact=True), db)
    mock, flags = mock_atol(ctx)
    kktd = kktd_server(ctx, "kktd-atol", db, extra=flags)
    with mock:
        mock.wait_ready("/admin/stats")
        with kktd:
            ready_s = kktd.wait_ready()
            first_at = time.monotonic()
            at_first = undelivered_of(kktd)
            cpu_before = cpu_seconds(kktd.pid)
            deadline = first_at + 600
            while undelivered_of(kktd) > 0:
                if time.monotonic() > deadline:
                    raise BenchError(f"kktd did not drain through ATOL within 600s; log: {kktd.log_path}")
                time.sleep(STATUS_POLL_S)  # polling interval of a deadline-bounded wait
            drained_s = time.monotonic() - first_at
            cpu = cpu_seconds(kktd.pid) - cpu_before
            mock_cpu = cpu_seconds(mock.pid)
            _, stats = http_json(mock.base_url + "/admin/stats")
            _, status = http_json(kktd.base_url + "/v1/kkt/buffer/status")
    remove_db(db)
    ctx.check(
        stats["fiscalized"] == pending and status["counts"]["sent"] == pending,
        f"atol: the mock fiscalized {stats['fiscalized']} documents, kktd marked {status['counts']['sent']} "
        f"sent, of {pending}",
    )
    ctx.check(stats["documents"] == pending, f"atol: {stats['documents']} documents for {pending} receipts")
    result = {
        "receipts": pending,
        "undelivered_at_first_status": at_first,
        "ready_s": ready_s,
        "drain_s": drained_s,
        "receipts_per_s": at_first / drained_s,
        "kktd_cpu_s": cpu,
        "kktd_cpu_ms_per_1000": 1e6 * cpu / at_first if at_first else 0.0,
        "mock_atol_cpu_s": mock_cpu,
        "http_requests": stats["registration_requests"] + stats["report_requests"] + stats["token_requests"],
        "early_polls": stats["early_polls"],
    }
    print(
        f"  drained {at_first} receipts through ATOL in {drained_s:.2f}s: {result['receipts_per_s']:.0f}/s, "
        f"{result['http_requests']} HTTP requests; kktd cpu {cpu:.2f}s = "
        f"{result['kktd_cpu_ms_per_1000']:.0f} ms per 1,000 receipts; mock cpu {mock_cpu:.1f}s",
        flush=True,
    )
    ctx.results["atol"] = result


# ---- register: the till's own register (ATOL driver v10's web server) through its mock, print time 0 ----

REGISTER_CONNECTIONS = 16
REGISTER_PRINT_TIME_S = 0.2  # the mock's default; a real register takes about a second
REGISTER_RECEIPT_TASKS = frozenset({"sell", "sellReturn", "buy", "buyReturn"})
STATUS_COST_SAMPLES = 100  # status GETs on the idle daemon that price the harness's own drain polling


def mock_register(ctx: Context, label: str, print_time_s: float = 0.0) -> Server:
    """`kktd mock-atol-driver` as its own process, by default printing in no time: what is left is kktd's own
    cost, the mock's and the HTTP between them. Its base URL serves the protocol (/api/v2) and the admin API
    (/admin)."""
    port = free_port()
    argv = [
        str(VENV_BIN / "kktd"),
        "mock-atol-driver",
        "--listen",
        f"127.0.0.1:{port}",
        "--print-time",
        f"{print_time_s:g}",
        "--log-level",
        "warning",
    ]
    log = ctx.path(f"mock-register-{label}.log")
    return Server("mock-atol-driver", argv, f"http://127.0.0.1:{port}", log, env=server_env())


def register_flags(url: str) -> list[str]:
    return ["--upstream", "atol-driver", "--atol-driver-url", url]


def status_counts(server: Server) -> dict[str, int]:
    status, body = http_json(server.base_url + "/v1/kkt/buffer/status")
    if status != 200:
        raise BenchError(f"{server.name}: GET /v1/kkt/buffer/status answered {status}: {body}")
    return {key: int(value) for key, value in body["counts"].items()}


def status_counts_in(db: Path) -> dict[str, int]:
    """The receipts by status in a stopped kktd's database (exact: nothing moves any more)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {str(s): int(n) for s, n in conn.execute("SELECT status, count(*) FROM receipts GROUP BY status")}
    finally:
        conn.close()


def register_receipts(mock: Server) -> tuple[int, int]:
    """The mock register's fiscal documents that are receipts (a shift opening is a document too): how many,
    and how many distinct task uuids among them (fewer would be a receipt fiscalized twice)."""
    status, body = http_json(mock.base_url + "/admin/documents", timeout_s=30.0)
    if status != 200:
        raise BenchError(f"mock-atol-driver: GET /admin/documents answered {status}")
    receipts = [d for d in body["documents"] if d["type"] in REGISTER_RECEIPT_TASKS]
    return len(receipts), len({d["uuid"] for d in receipts})


def register_drain_once(ctx: Context, source: Path, label: str, print_time_s: float = 0.0) -> dict[str, Any]:
    """kktd on a copy of the pending database with the mock register up: from the first status read until
    nothing is pending or awaiting its result; kktd's CPU and the mock's over that span, separately."""
    db = ctx.path(f"register-{label}.db")
    dataset.copy_to(source, db)
    total = count_rows(db)
    mock = mock_register(ctx, label, print_time_s)
    kktd = kktd_server(ctx, "kktd-register", db, extra=register_flags(mock.base_url))
    with mock:
        mock.wait_ready("/admin/stats")
        with kktd:
            ready_s = kktd.wait_ready()
            # The sync loop starts before the server answers: time from the first status read and count what
            # was undelivered then, like the other drains.
            first_at = time.monotonic()
            kktd_before, mock_before = cpu_split(kktd.pid), cpu_seconds(mock.pid)
            at_first = undelivered_of(kktd)
            polls = 1
            deadline = first_at + 600
            while undelivered_of(kktd) > 0:
                polls += 1
                if time.monotonic() > deadline:
                    raise BenchError(f"kktd did not drain to the register within 600s; log: {kktd.log_path}")
                time.sleep(STATUS_POLL_S)  # polling interval of a deadline-bounded wait
            drained_s = time.monotonic() - first_at
            split, mock_cpu = cpu_split(kktd.pid) - kktd_before, cpu_seconds(mock.pid) - mock_before
            # What the harness's own status reads cost kktd: the same GET on the drained, idle daemon.
            idle_before = cpu_seconds(kktd.pid)
            for _ in range(STATUS_COST_SAMPLES):
                status_counts(kktd)
            status_cpu_ms = 1000 * (cpu_seconds(kktd.pid) - idle_before) / STATUS_COST_SAMPLES
            counts = status_counts(kktd)
            rss = peak_rss_mb(kktd.pid)
            _, stats = http_json(mock.base_url + "/admin/stats")
            documents, unique = register_receipts(mock)
    remove_db(db)
    where = f"register drain {label}"
    ctx.check(
        counts["sent"] == total and counts["failed"] == 0,
        f"{where}: kktd marked {counts['sent']} of {total} sent, {counts['failed']} dead letters",
    )
    ctx.check(documents == total, f"{where}: the register holds {documents} receipts for {total}")
    ctx.check(unique == documents, f"{where}: {documents - unique} receipts fiscalized twice")
    done = at_first or 1
    polls_cpu_ms = polls * status_cpu_ms
    kktd_cpu = split.total
    return {
        "receipts": total,
        "print_time_s": print_time_s,
        "undelivered_at_first_status": at_first,
        "ready_s": ready_s,
        "drain_s": drained_s,
        "receipts_per_s": at_first / drained_s,
        "kktd_cpu_s": kktd_cpu,
        "kktd_cpu_ms_per_1000": 1e6 * kktd_cpu / done,
        "kktd_cpu_share": kktd_cpu / drained_s,
        # Where kktd's CPU goes: its event loop (the main thread) in user and kernel mode (HTTP, polling),
        # and the other threads: aiosqlite's (SQLite, the commits), and any of the default executor.
        "kktd_cpu_ms_per_1000_by_thread": {
            "loop_user": 1e6 * split.loop_user / done,
            "loop_system": 1e6 * split.loop_system / done,
            "other_threads": 1e6 * (split.threads_user + split.threads_system) / done,
        },
        "mock_cpu_s": mock_cpu,
        "mock_cpu_ms_per_1000": 1e6 * mock_cpu / done,
        "mock_cpu_share": mock_cpu / drained_s,
        "status_polls": polls,
        "status_get_cpu_ms": status_cpu_ms,
        "status_polls_cpu_ms_per_1000": 1000 * polls_cpu_ms / done,
        "register_receipts": documents,
        "register_unique_uuids": unique,
        "register_documents": int(stats["documents"]),
        "posts": int(stats["posts"]),
        "duplicate_posts": int(stats["duplicate_posts"]),
        "gets": int(stats["gets"]),
        "requests_per_receipt": (int(stats["posts"]) + int(stats["gets"])) / total,
        "gets_per_receipt": int(stats["gets"]) / total,
        "peak_rss_mb": rss,
    }


def register_intake_once(ctx: Context, source: Path, draining: bool, requests: int, label: str) -> dict[str, Any]:
    """Intake at 16 connections into a copy of the pending database, with the register unreachable (alone:
    nothing drains) or the mock register up (the backlog drains meanwhile). The draining kktd is stopped
    right after the load, mid-drain: what it sent must be on the register once, and no more than it had on
    the wire."""
    db = ctx.path(f"register-intake-{label}.db")
    dataset.copy_to(source, db)
    rows_before = count_rows(db)
    mock = mock_register(ctx, label) if draining else None
    url = mock.base_url if mock is not None else f"http://127.0.0.1:{free_port()}"  # nobody listens there
    kktd = kktd_server(ctx, "kktd-register", db, extra=register_flags(url))
    extra: dict[str, Any] = {}
    with mock if mock is not None else contextlib.nullcontext():
        if mock is not None:
            mock.wait_ready("/admin/stats")
        with kktd:
            kktd.wait_ready()
            before = status_counts(kktd)
            cpu_before = cpu_seconds(kktd.pid)
            result = wrkrun.run(kktd.base_url + "/v1/kkt/receipt", REGISTER_CONNECTIONS, requests)
            cpu = cpu_seconds(kktd.pid) - cpu_before
            after = status_counts(kktd)
            kktd.stop()
        if mock is not None:
            documents, unique = register_receipts(mock)
            extra = {"register_receipts": documents, "register_unique_uuids": unique}
    rows = count_rows(db)
    where = f"register intake {label}"
    ctx.check(result.finished, f"{where}: wrk stopped by its time cap, not its request count")
    ctx.check(result.ok2xx == result.completed, f"{where}: {result.completed - result.ok2xx} non-2xx {result.errors}")
    ctx.check(rows == rows_before + result.ok2xx, f"{where}: {rows - rows_before} rows added, {result.ok2xx} 2xx")
    by_status = status_counts_in(db)
    sent, submitted = by_status.get("sent", 0), by_status.get("submitted", 0)
    if mock is not None:
        documents, unique = extra["register_receipts"], extra["register_unique_uuids"]
        ctx.check(unique == documents, f"{where}: {documents - unique} receipts fiscalized twice")
        # Every sent receipt is on the register; besides them only those registered (awaiting their result)
        # and at most the one call on the wire when kktd stopped (max_in_flight 1).
        ctx.check(
            sent <= documents <= sent + submitted + 1,
            f"{where}: the register holds {documents} receipts, kktd has {sent} sent and {submitted} awaiting",
        )
    else:
        ctx.check(sent == 0, f"{where}: {sent} receipts sent with the register unreachable")
    remove_db(db)
    undelivered_after = after["pending"] + after["submitted"]
    row = {
        "draining": draining,
        **result.as_dict(),
        "kktd_cpu_s": cpu,
        "kktd_cpu_ms_per_1000": 1e6 * cpu / result.completed if result.completed else 0.0,
        "sent_during_load": after["sent"] - before["sent"],
        "undelivered_at_load_end": undelivered_after,
        "sent_at_stop": sent,
        **extra,
    }
    if draining:
        # The comparison is only fair if the drain was still running when the last receipt was answered.
        row["overlap"] = "yes" if undelivered_after > result.ok2xx else "NO"
        # What the register printed meanwhile (and in the moment to the stop): the drain's share of the loop.
        # kktd marks them sent only once it asks for their results, after the pending ones are all registered.
        row["printed_per_s_during_load"] = row["register_receipts"] / result.seconds if result.seconds else 0.0
    return row


def section_register(ctx: Context) -> None:
    reproduce(f"--only register --rounds {ctx.plan.rounds}" + (" --quick" if ctx.plan.quick else ""))
    source = prepared(ctx, ctx.plan.register_pending, 0)
    drains = []
    for round_no in range(1, ctx.plan.register_drain_rounds + 1):
        d = register_drain_once(ctx, source, f"drain-{round_no}")
        d["round"] = round_no
        drains.append(d)
        t = d["kktd_cpu_ms_per_1000_by_thread"]
        print(
            f"  drain {round_no}: {d['undelivered_at_first_status']} receipts to the register in {d['drain_s']:.2f}s "
            f"= {d['receipts_per_s']:.0f}/s; kktd cpu {d['kktd_cpu_ms_per_1000']:.0f} ms/1k "
            f"({100 * d['kktd_cpu_share']:.0f} % of a core: event loop {t['loop_user']:.0f} user + "
            f"{t['loop_system']:.0f} system, other threads (aiosqlite) {t['other_threads']:.0f}; "
            "the harness's status reads "
            f"{d['status_polls_cpu_ms_per_1000']:.0f} of it), mock cpu {d['mock_cpu_ms_per_1000']:.0f} ms/1k "
            f"({100 * d['mock_cpu_share']:.0f} %); {d['posts']} POST + {d['gets']} GET "
            f"= {d['requests_per_receipt']:.2f} per receipt; register receipts {d['register_receipts']} "
            f"({d['register_unique_uuids']} distinct)",
            flush=True,
        )
    # A register that takes time to print: kktd asks for the result of every registered receipt every
    # poll interval until it is printed, so the GETs per receipt grow with the backlog (not a target; tracked).
    printing = register_drain_once(
        ctx, prepared(ctx, ctx.plan.register_printing_pending, 0), "printing", REGISTER_PRINT_TIME_S
    )
    print(
        f"  printing {REGISTER_PRINT_TIME_S:g} s per receipt: {printing['receipts']} receipts in "
        f"{printing['drain_s']:.1f}s = {printing['receipts_per_s']:.1f}/s; {printing['gets']} GET = "
        f"{printing['gets_per_receipt']:.1f} per receipt; kktd cpu {printing['kktd_cpu_ms_per_1000'] / 1000:.1f} ms "
        f"per receipt ({100 * printing['kktd_cpu_share']:.0f} % of a core; the harness's status reads "
        f"{printing['status_polls_cpu_ms_per_1000'] / 1000:.1f} of it), mock "
        f"{printing['mock_cpu_ms_per_1000'] / 1000:.1f} ms",
        flush=True,
    )
    requests = ctx.plan.intake_requests[REGISTER_CONNECTIONS]
    runs = []
    for round_no in range(1, ctx.plan.rounds + 1):
        for draining in (False, True):  # alone, draining, alone, draining...
            row = register_intake_once(ctx, source, draining, requests, f"r{round_no}-{int(draining)}")
            row["round"] = round_no
            runs.append(row)
            extra = (
                f"; the register printed {row['printed_per_s_during_load']:.0f}/s meanwhile "
                f"({row['register_receipts']}, {row['sent_at_stop']} of them marked sent), drain still running "
                f"at the end: {row['overlap']}"
                if draining
                else ""
            )
            print(
                f"  round {round_no} c{REGISTER_CONNECTIONS} {'draining' if draining else 'alone':<8} "
                f"{row['receipts_per_s']:8.0f}/s  p50 {ms(row['latency_us']['p50']):6.2f} ms  "
                f"p99 {ms(row['latency_us']['p99']):7.2f} ms  cpu {row['kktd_cpu_ms_per_1000']:4.0f} ms/1k{extra}",
                flush=True,
            )
    alone = [r for r in runs if not r["draining"]]
    busy = [r for r in runs if r["draining"]]
    result: dict[str, Any] = {
        "pending": ctx.plan.register_pending,
        "drains": drains,
        "receipts_per_s": median(d["receipts_per_s"] for d in drains),
        "kktd_cpu_ms_per_1000": median(d["kktd_cpu_ms_per_1000"] for d in drains),
        "mock_cpu_ms_per_1000": median(d["mock_cpu_ms_per_1000"] for d in drains),
        "kktd_cpu_share": median(d["kktd_cpu_share"] for d in drains),
        "kktd_cpu_ms_per_1000_by_thread": {
            key: median(d["kktd_cpu_ms_per_1000_by_thread"][key] for d in drains)
            for key in ("loop_user", "loop_system", "other_threads")
        },
        "mock_cpu_share": median(d["mock_cpu_share"] for d in drains),
        "status_polls_cpu_ms_per_1000": median(d["status_polls_cpu_ms_per_1000"] for d in drains),
        "requests_per_receipt": median(d["requests_per_receipt"] for d in drains),
        "printing": printing,
        "intake_runs": runs,
        "alone_receipts_per_s": median(r["receipts_per_s"] for r in alone),
        "draining_receipts_per_s": median(r["receipts_per_s"] for r in busy),
        "alone_p99_ms": median(ms(r["latency_us"]["p99"]) for r in alone),
        "draining_p99_ms": median(ms(r["latency_us"]["p99"]) for r in busy),
        "printed_per_s_during_load": median(r["printed_per_s_during_load"] for r in busy),
        "overlap_every_round": all(r["overlap"] == "yes" for r in busy),
    }
    result["intake_ratio"] = result["draining_receipts_per_s"] / result["alone_receipts_per_s"]
    ctx.results["register"] = result


# ---- restart: READY with 1,000,000 rows ----


def big_database(ctx: Context) -> Path:
    """A private copy of the 1,000,000-row database, shared by restart and memory (one copy per run)."""
    db = ctx.path("big.db")
    if not db.exists():
        dataset.copy_to(prepared(ctx, ctx.plan.big_pending, ctx.plan.big_sent), db)
    return db


def section_restart(ctx: Context) -> None:
    """READY=1 after a clean stop (kktd defers its integrity check then) and after a SIGKILL (a -wal file is
    left behind, so kktd checks the database before announcing readiness)."""
    reproduce("--only restart" + (" --quick" if ctx.plan.quick else ""))
    db = big_database(ctx)
    clean = [timed_start(ctx, db, f"clean {n}") for n in range(1, ctx.plan.restarts + 1)]
    crashed = []
    for n in range(1, ctx.plan.restarts + 1):
        rows_before = count_rows(db)
        taken = crash(ctx, db)
        ctx.check(Path(f"{db}-wal").exists(), "restart: no -wal file after SIGKILL")
        crashed.append(timed_start(ctx, db, f"after SIGKILL {n}"))
        rows = count_rows(db)
        ctx.check(
            rows == rows_before + taken,
            f"restart: {rows - rows_before} rows added across a SIGKILL, {taken} 2xx answers",
        )
    ctx.results["restart"] = {
        "rows": ctx.plan.big_pending + ctx.plan.big_sent,
        "clean": clean,
        "after_kill": crashed,
        "median_ready_s": median(r["ready_s"] for r in clean),
        "median_ready_after_kill_s": median(r["ready_s"] for r in crashed),
    }


def timed_start(ctx: Context, db: Path, label: str) -> dict[str, Any]:
    """Start kktd with our own NOTIFY_SOCKET; seconds from exec to READY=1; then a clean SIGTERM stop."""
    with NotifySocket(str(ctx.path("notify.sock"))) as notify:
        kktd = kktd_server(ctx, "kktd", db, env={"NOTIFY_SOCKET": str(notify.path)})
        with kktd:
            ready_s = notify.wait_for("READY=1", 120.0, since=kktd.started_at, child=kktd)
            rss, cpu = peak_rss_mb(kktd.pid), cpu_seconds(kktd.pid)
            stop_started = time.monotonic()
            exit_code = kktd.stop()
            stop_s = time.monotonic() - stop_started
    print(
        f"  {label}: READY=1 {ready_s:.3f}s after exec (cpu {cpu:.2f}s, rss {rss:.1f} MB); "
        f"SIGTERM -> exit {exit_code} in {stop_s:.2f}s",
        flush=True,
    )
    return {"ready_s": ready_s, "cpu_s_to_ready": cpu, "peak_rss_mb": rss, "stop_s": stop_s, "exit_code": exit_code}


def crash(ctx: Context, db: Path) -> int:
    """Take a few receipts, then SIGKILL kktd; returns the receipts it acknowledged."""
    kktd = kktd_server(ctx, "kktd", db)
    with kktd:
        kktd.wait_ready()
        result = wrkrun.run(kktd.base_url + "/v1/kkt/receipt", 2, 20)
        kktd.kill()
    return result.ok2xx


# ---- memory: peak RSS with 1,000,000 rows while serving ----


def section_memory(ctx: Context) -> None:
    reproduce("--only memory" + (" --quick" if ctx.plan.quick else ""))
    db = big_database(ctx)
    rows_before = count_rows(db)
    kktd = kktd_server(ctx, "kktd", db)
    with kktd:
        kktd.wait_ready()
        result = wrkrun.run(kktd.base_url + "/v1/kkt/receipt", 16, ctx.plan.load_requests)
        rss = peak_rss_mb(kktd.pid)
        kktd.stop()
    rows = count_rows(db)
    ctx.check(
        rows == rows_before + result.ok2xx, f"memory: {rows - rows_before} rows added, {result.ok2xx} 2xx answers"
    )
    print(
        f"  peak RSS {rss:.1f} MB with {rows_before} rows while taking {result.completed} receipts at c16 "
        f"({result.rate:.0f}/s, p99 {ms(result.latency_us['p99']):.2f} ms)",
        flush=True,
    )
    ctx.results["memory"] = {"rows_before": rows_before, "peak_rss_mb": rss, "load": result.as_dict()}


# ---- intake while draining vs intake alone ----


def section_concurrent(ctx: Context) -> None:
    reproduce("--only concurrent" + (" --quick" if ctx.plan.quick else ""))
    source = prepared(ctx, ctx.plan.drain_pending, 0)
    requests = ctx.plan.intake_requests[16]
    runs = []
    for round_no in range(1, ctx.plan.concurrent_rounds + 1):
        alone = intake_on_copy(ctx, source, requests, f"alone-{round_no}")
        busy = drain_run(ctx, f"busy-{round_no}", source, during=lambda kktd: load_during_drain(ctx, kktd, requests))
        expected, held = busy["receipts"] + busy["intake"]["ok2xx"], busy["delivered_unique_at_ofd"]
        ctx.check(held == expected, f"concurrent: the OFD holds {held} receipts, expected {expected}")
        runs.append({"alone": alone, "draining": busy})
        load = busy["intake"]
        print(
            f"  round {round_no}: intake alone {alone['receipts_per_s']:.0f}/s "
            f"(p99 {ms(alone['latency_us']['p99']):.2f} ms), while draining {load['receipts_per_s']:.0f}/s "
            f"(p99 {ms(load['latency_us']['p99']):.2f} ms; drain still running at the end of the load: "
            f"{busy['overlap']}); drain {busy['receipts_per_s']:.0f}/s",
            flush=True,
        )
    alone_rate = median(r["alone"]["receipts_per_s"] for r in runs)
    busy_rate = median(r["draining"]["intake"]["receipts_per_s"] for r in runs)
    ctx.results["concurrent"] = {
        "runs": runs,
        "alone_receipts_per_s": alone_rate,
        "draining_receipts_per_s": busy_rate,
        "ratio": busy_rate / alone_rate,
    }


def intake_on_copy(ctx: Context, source: Path, requests: int, label: str) -> dict[str, Any]:
    """Intake at 16 connections into a copy of the pending database with the OFD unreachable: no drain."""
    db = ctx.path(f"conc-{label}.db")
    dataset.copy_to(source, db)
    rows_before = count_rows(db)
    kktd = kktd_server(ctx, "kktd", db)
    with kktd:
        kktd.wait_ready()
        result = wrkrun.run(kktd.base_url + "/v1/kkt/receipt", 16, requests)
        kktd.stop()
    rows = count_rows(db)
    ctx.check(
        rows == rows_before + result.ok2xx,
        f"concurrent {label}: {rows - rows_before} rows added, {result.ok2xx} 2xx answers",
    )
    remove_db(db)
    return result.as_dict()


def load_during_drain(ctx: Context, kktd: Server, requests: int) -> dict[str, Any]:
    pending_before = pending_of(kktd)
    result = wrkrun.run(kktd.base_url + "/v1/kkt/receipt", 16, requests)
    pending_after = pending_of(kktd)
    ctx.check(
        result.ok2xx == result.completed,
        f"concurrent: {result.completed - result.ok2xx} non-2xx answers {result.errors}",
    )
    # The comparison is only fair if the drain was still running when the last receipt was answered.
    return {
        "intake": result.as_dict(),
        "pending_at_load_start": pending_before,
        "pending_at_load_end": pending_after,
        "overlap": "yes" if pending_after > 0 else "NO",
    }


# ---- scrape: intake with and without GET /metrics every 100 ms ----


class Scraper:
    """A Prometheus stand-in: GET /metrics every SCRAPE_EVERY_S on its own thread (of the bench, not kktd),
    timing each answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.durations_s: list[float] = []
        self.sizes: list[int] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    body = response.read()
                    ok = response.status == 200 and b"kktd_receipts_accepted_total" in body
            except OSError:
                ok, body = False, b""
            elapsed = time.perf_counter() - started
            if ok:
                self.durations_s.append(elapsed)
                self.sizes.append(len(body))
            else:
                self.failures += 1
            self._stop.wait(max(0.0, SCRAPE_EVERY_S - elapsed))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def scrape_once(ctx: Context, scraped: bool, label: str) -> dict[str, Any]:
    db = ctx.path(f"scrape-{label}.db")
    server = kktd_server(ctx, "kktd", db)
    with server:
        server.wait_ready()
        url = server.base_url + "/v1/kkt/receipt"
        warm = wrkrun.run(url, SCRAPE_CONNECTIONS, ctx.plan.warmup_requests)
        scraper = Scraper(server.base_url + "/metrics")
        cpu_before = cpu_seconds(server.pid)
        if scraped:
            with scraper:
                result = wrkrun.run(url, SCRAPE_CONNECTIONS, ctx.plan.scrape_requests)
        else:
            result = wrkrun.run(url, SCRAPE_CONNECTIONS, ctx.plan.scrape_requests)
        cpu = cpu_seconds(server.pid) - cpu_before
        # What one scrape costs kktd on its own, with nothing else running: CPU over a burst of scrapes.
        idle_cpu_before = cpu_seconds(server.pid)
        for _ in range(200):
            with urllib.request.urlopen(server.base_url + "/metrics", timeout=5) as response:
                response.read()
        idle_cpu_ms = 1000 * (cpu_seconds(server.pid) - idle_cpu_before) / 200
        server.stop()
    where = f"scrape {'with' if scraped else 'without'}"
    ctx.check(result.ok2xx == result.completed, f"{where}: {result.completed - result.ok2xx} non-2xx answers")
    rows, expected = count_rows(db), warm.ok2xx + result.ok2xx
    ctx.check(rows == expected, f"{where}: {rows} rows in the database, {expected} 2xx answers")
    ctx.check(scraper.failures == 0, f"{where}: {scraper.failures} scrapes failed")
    remove_db(db)
    row = {"scraped": scraped, **result.as_dict(), "server_cpu_s": cpu, "scrape_cpu_ms_idle": idle_cpu_ms}
    if scraped:
        row.update(
            scrapes=len(scraper.durations_s),
            scrape_ms_p50=1000 * median(scraper.durations_s),
            scrape_ms_max=1000 * max(scraper.durations_s, default=0.0),
            scrape_bytes=median(scraper.sizes),
        )
    return row


def section_scrape(ctx: Context) -> None:
    reproduce(f"--only scrape --rounds {ctx.plan.rounds}" + (" --quick" if ctx.plan.quick else ""))
    runs: list[dict[str, Any]] = []
    for round_no in range(1, ctx.plan.rounds + 1):
        for scraped in (False, True):  # interleaved, like the intake arms
            row = scrape_once(ctx, scraped, f"r{round_no}-{int(scraped)}")
            row["round"] = round_no
            runs.append(row)
            latency = row["latency_us"]
            extra = (
                f"  {row['scrapes']} scrapes, p50 {row['scrape_ms_p50']:.2f} ms, "
                f"max {row['scrape_ms_max']:.2f} ms, {row['scrape_bytes'] / 1024:.1f} KiB"
                if scraped
                else ""
            )
            print(
                f"  round {round_no} c{SCRAPE_CONNECTIONS} {'scraped' if scraped else 'alone':<8} "
                f"{row['receipts_per_s']:8.0f}/s  p50 {ms(latency['p50']):6.2f} ms  "
                f"p99 {ms(latency['p99']):7.2f} ms{extra}",
                flush=True,
            )
    alone = [r for r in runs if not r["scraped"]]
    scraped_runs = [r for r in runs if r["scraped"]]
    ctx.results["scrape"] = {
        "runs": runs,
        "alone_receipts_per_s": median(r["receipts_per_s"] for r in alone),
        "scraped_receipts_per_s": median(r["receipts_per_s"] for r in scraped_runs),
        "alone_p99_ms": median(ms(r["latency_us"]["p99"]) for r in alone),
        "scraped_p99_ms": median(ms(r["latency_us"]["p99"]) for r in scraped_runs),
        "scrape_ms_p50": median(r["scrape_ms_p50"] for r in scraped_runs),
        "scrape_cpu_ms": median(r["scrape_cpu_ms_idle"] for r in runs),
        "scrape_bytes": median(r["scrape_bytes"] for r in scraped_runs),
    }
    result = ctx.results["scrape"]
    result["ratio"] = result["scraped_receipts_per_s"] / result["alone_receipts_per_s"]


# ---- luacount: does counting 2xx in Lua's response() slow wrk? ----


def section_luacount(ctx: Context) -> None:
    reproduce(f"--only luacount --rounds {ctx.plan.rounds}" + (" --quick" if ctx.plan.quick else ""))
    requests = ctx.plan.intake_requests[64]
    runs: list[dict[str, Any]] = []
    with baseline_server(ctx, "bare", ctx.path("unused.db")) as server:
        server.wait_ready()
        url = server.base_url + "/v1/kkt/receipt"
        wrkrun.run(url, 64, ctx.plan.warmup_requests)
        for round_no in range(1, ctx.plan.rounds + 1):
            for counted in (False, True):
                result = wrkrun.run(url, 64, requests, count2xx=counted)
                runs.append({"count2xx_in_lua": counted, **result.as_dict()})
                if counted:
                    ctx.check(
                        result.ok2xx_counted == result.ok2xx_derived,
                        f"luacount: {result.ok2xx_counted} 2xx counted in Lua, "
                        f"{result.ok2xx_derived} derived from wrk's errors.status",
                    )
                print(
                    f"  round {round_no} bare c64, 2xx counted in Lua: {'yes' if counted else 'no ':<3} "
                    f"{result.rate:8.0f}/s  p99 {ms(result.latency_us['p99']):6.2f} ms  wrk cpu "
                    f"{1e6 * result.wrk_cpu_s / result.completed:5.0f} ms/1k",
                    flush=True,
                )
    summary = {}
    for counted in (False, True):
        rows = [r for r in runs if r["count2xx_in_lua"] is counted]
        summary["counted" if counted else "derived"] = {
            "receipts_per_s": median(r["receipts_per_s"] for r in rows),
            "wrk_cpu_ms_per_1000": median(1e6 * r["wrk_cpu_s"] / r["completed"] for r in rows),
        }
    ctx.results["luacount"] = {"runs": runs, "medians": summary}


# ---- prepared databases ----


def prepared(ctx: Context, pending: int, sent: int, contact: bool = False) -> Path:
    path, built_s = dataset.ensure(pending, sent, contact)
    if built_s is not None:
        print(
            f"  prepared {path.name} ({pending} pending, {sent} sent) through kktd.store "
            f"in {built_s:.1f}s (cached for the next run)",
            flush=True,
        )
        ctx.results.setdefault("prepared", {})[path.name] = {"seconds": built_s}
    return path


# ---- report ----


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


@dataclass(frozen=True)
class Target:
    name: str
    section: str
    value: Callable[[dict[str, Any]], float]
    met: Callable[[float], bool]


TARGETS = (
    # issue 15: the HTTP stack's ceiling, a group of one, stalls, the SD card, memory
    Target(
        "intake c64 kktd >= 0.85 x minimal", "intake", lambda r: r["ratios"]["c64"]["kktd/minimal"], lambda x: x >= 0.85
    ),
    Target("intake c1 kktd >= 1.0 x naive", "intake", lambda r: r["ratios"]["c1"]["kktd/naive"], lambda x: x >= 1.0),
    Target(
        "kktd c64 p99 < 20 ms, every round, from READY",
        "intake",
        lambda r: r["kktd_c64_worst_p99_ms"],
        lambda x: x < 20,
    ),
    Target("intake peak RSS of kktd < 60 MB", "intake", lambda r: r["peak_rss_mb"]["kktd"], lambda x: x < 60),
    Target("SD card c16 kktd >= 10 x naive", "sdcard", lambda r: r["ratios"]["c16"], lambda x: x >= 10),
    Target("SD card c1 kktd >= 0.9 x 1/delay", "sdcard", lambda r: r["kktd_c1_of_one_flush"], lambda x: x >= 0.9),
    # earlier issues
    Target("intake c64 kktd >= 0.85 x bare", "intake", lambda r: r["ratios"]["c64"]["kktd/bare"], lambda x: x >= 0.85),
    Target("intake c64 kktd >= 2.5 x naive", "intake", lambda r: r["ratios"]["c64"]["kktd/naive"], lambda x: x >= 2.5),
    Target("kktd p99 < 20 ms at c16", "intake", lambda r: r["medians"]["kktd/c16"]["p99_ms"], lambda x: x < 20),
    Target("drain >= 5,000 receipts/s", "drain", lambda r: r["receipts_per_s"], lambda x: x >= 5000),
    Target("READY <= 1.5 s with 1,000,000 rows", "restart", lambda r: r["median_ready_s"], lambda x: x <= 1.5),
    Target("peak RSS < 80 MB with 1,000,000 rows", "memory", lambda r: r["peak_rss_mb"], lambda x: x < 80),
    Target("intake while draining >= 0.8 x alone", "concurrent", lambda r: r["ratio"], lambda x: x >= 0.8),
    Target("intake scraped every 100 ms >= 0.95 x alone", "scrape", lambda r: r["ratio"], lambda x: x >= 0.95),
    Target("drain through ATOL >= 500 receipts/s", "atol", lambda r: r["receipts_per_s"], lambda x: x >= 500),
    # the till's own register (ATOL driver v10) through its mock, print time 0: kktd never the slower side
    Target("drain to the register >= 200 receipts/s", "register", lambda r: r["receipts_per_s"], lambda x: x >= 200),
    Target(
        "c16 intake draining to the register >= 0.9 x alone",
        "register",
        lambda r: r["intake_ratio"],
        lambda x: x >= 0.9,
    ),
)


def report(ctx: Context) -> None:
    results = ctx.results
    print("\n== results (medians) ==")
    if "intake" in results:
        print_medians(results["intake"]["medians"])
        for conns, r in results["intake"]["ratios"].items():
            print(f"ratio {conns}: " + "  ".join(f"{name} {value:.2f}" for name, value in r.items()))
        print(
            f"kktd c64 worst p99 of any round, warm-up from READY included: "
            f"{results['intake']['kktd_c64_worst_p99_ms']:.2f} ms"
        )
    if "sdcard" in results:
        sd = results["sdcard"]
        print(f"SD card model (every fsync/fdatasync + {sd['delay_ms']:g} ms):")
        print_medians(sd["medians"])
        print(
            "ratio kktd/naive: "
            + "  ".join(f"{c} {v:.2f}" for c, v in sd["ratios"].items())
            + f"; kktd c1 = {sd['kktd_c1_of_one_flush']:.2f} x 1/delay ({sd['one_flush_per_s']:.0f}/s), "
            f"{sd['kktd_c1_of_measured_flush']:.2f} x 1/flush as measured under the shim "
            f"({sd['flush_ms_slowed']:.2f} ms; {sd['flush_ms_plain']:.2f} ms without)"
        )
    if "drain" in results:
        d = results["drain"]
        print(f"drain: {d['pending_at_first_status']} pending in {d['drain_s']:.2f}s = {d['receipts_per_s']:.0f}/s")
    if "atol" in results:
        a = results["atol"]
        print(
            f"drain through ATOL: {a['undelivered_at_first_status']} receipts in {a['drain_s']:.2f}s "
            f"= {a['receipts_per_s']:.0f}/s; kktd cpu {a['kktd_cpu_ms_per_1000']:.0f} ms per 1,000"
        )
    if "register" in results:
        g = results["register"]
        t = g["kktd_cpu_ms_per_1000_by_thread"]
        print(
            f"drain to the register (ATOL driver mock, print time 0): {g['pending']} receipts at "
            f"{g['receipts_per_s']:.0f}/s; kktd cpu {g['kktd_cpu_ms_per_1000']:.0f} ms per 1,000 "
            f"({100 * g['kktd_cpu_share']:.0f} % of a core; event loop {t['loop_user']:.0f} user + "
            f"{t['loop_system']:.0f} system, other threads (aiosqlite) {t['other_threads']:.0f}), "
            f"mock cpu {g['mock_cpu_ms_per_1000']:.0f} ms per 1,000 "
            f"({100 * g['mock_cpu_share']:.0f} %); {g['requests_per_receipt']:.2f} HTTP requests per receipt"
        )
        print(
            f"intake c{REGISTER_CONNECTIONS} while draining to the register: {g['draining_receipts_per_s']:.0f}/s "
            f"(p99 {g['draining_p99_ms']:.2f} ms) vs alone {g['alone_receipts_per_s']:.0f}/s "
            f"(p99 {g['alone_p99_ms']:.2f} ms) = {g['intake_ratio']:.2f}; the register printed "
            f"{g['printed_per_s_during_load']:.0f}/s meanwhile, the drain still running at every load's end: "
            f"{'yes' if g['overlap_every_round'] else 'NO'}"
        )
        p = g["printing"]
        print(
            f"to a register printing {p['print_time_s']:g} s per receipt, {p['receipts']} pending: "
            f"{p['gets_per_receipt']:.1f} GET per receipt, kktd cpu {p['kktd_cpu_ms_per_1000'] / 1000:.1f} ms "
            f"per receipt"
        )
    if "restart" in results:
        r = results["restart"]
        print(
            f"restart: READY=1 after {r['median_ready_s']:.3f}s with {r['rows']} rows after a clean stop, "
            f"{r['median_ready_after_kill_s']:.3f}s after SIGKILL"
        )
    if "memory" in results:
        m = results["memory"]
        print(f"memory: peak RSS {m['peak_rss_mb']:.1f} MB with {m['rows_before']} rows, under c16 load")
    if "concurrent" in results:
        c = results["concurrent"]
        print(
            f"intake while draining: {c['draining_receipts_per_s']:.0f}/s vs alone "
            f"{c['alone_receipts_per_s']:.0f}/s = {c['ratio']:.2f}"
        )
    if "scrape" in results:
        sc = results["scrape"]
        print(
            f"scrape every {SCRAPE_EVERY_S * 1000:.0f} ms at c{SCRAPE_CONNECTIONS}: "
            f"{sc['scraped_receipts_per_s']:.0f}/s (p99 {sc['scraped_p99_ms']:.2f} ms) vs alone "
            f"{sc['alone_receipts_per_s']:.0f}/s (p99 {sc['alone_p99_ms']:.2f} ms) = {sc['ratio']:.2f}; "
            f"one scrape {sc['scrape_ms_p50']:.2f} ms under load, {sc['scrape_cpu_ms']:.2f} ms of kktd CPU, "
            f"{sc['scrape_bytes'] / 1024:.1f} KiB"
        )
    if "luacount" in results:
        lc = results["luacount"]["medians"]
        derived, counted = lc["derived"], lc["counted"]
        print(
            f"wrk 2xx counting: derived {derived['receipts_per_s']:.0f}/s "
            f"({derived['wrk_cpu_ms_per_1000']:.0f} wrk ms/1k), counted in Lua "
            f"{counted['receipts_per_s']:.0f}/s ({counted['wrk_cpu_ms_per_1000']:.0f} wrk ms/1k)"
        )
    print_targets(ctx)


def print_medians(medians: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'arm':<7} {'conns':>5} {'receipts/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'cpu s':>7} "
        f"{'cpu ms/1k':>10} {'wrk ms/1k':>10} {'rss MB':>7}"
    )
    for key, m in medians.items():
        arm, conns = key.split("/")
        print(
            f"{arm:<7} {conns[1:]:>5} {m['receipts_per_s']:>11.0f} {m['p50_ms']:>8.2f} "
            f"{m['p99_ms']:>8.2f} {m['server_cpu_s']:>7.2f} {m['cpu_ms_per_1000']:>10.0f} "
            f"{m['wrk_cpu_ms_per_1000']:>10.0f} {m['peak_rss_mb']:>7.1f}"
        )


def print_targets(ctx: Context) -> None:
    print("\n== targets ==")
    verdicts = []
    for target in TARGETS:
        value: float | None = None
        verdict = "not run"
        if target.section in ctx.results:
            value = target.value(ctx.results[target.section])
            verdict = "MET" if target.met(value) else "MISSED"
        verdicts.append({"target": target.name, "value": value, "verdict": verdict})
        shown = f"{value:.3f}" if value is not None else "-"
        print(f"  {verdict:<8} {target.name:<46} ({shown})")
    if ctx.plan.quick:
        print("  (--quick: smaller databases and counts than the targets are defined for)")
    ctx.results["targets"] = verdicts


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    filesystem = subprocess.run(
        ["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(BENCH_DIR)], capture_output=True, text=True, check=False
    ).stdout.strip()
    wrk = subprocess.run([wrkrun.wrk_binary(), "-v"], capture_output=True, text=True, check=False).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "filesystem": filesystem,
        "python": platform.python_version(),
        "wrk": wrk.split(" Copyright")[0].strip(),
    }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- main ----


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="kktd benchmark (see docs/performance.md)")
    parser.add_argument("--quick", action="store_true", help="one round, small counts and databases: a smoke run")
    parser.add_argument(
        "--rounds", type=int, help="intake, scrape, register intake and luacount rounds (default 5, --quick 1)"
    )
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--requests", type=int, help="receipts per intake run, at every concurrency")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON to this path")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs, databases)")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick_plan() if args.quick else Plan.full()
    if args.rounds is not None:
        plan = replace(plan, rounds=max(1, args.rounds))
    if args.requests is not None:
        count = max(2, args.requests)
        plan = replace(
            plan,
            intake_requests=dict.fromkeys(CONNECTIONS, count),
            warmup_requests=min(plan.warmup_requests, count),
            sd_requests=dict.fromkeys(CONNECTIONS, count),
            sd_warmup_requests=min(plan.sd_warmup_requests, count),
        )
    return plan


SECTION_RUNNERS: dict[str, Callable[[Context], None]] = {
    "intake": section_intake,
    "sdcard": section_sdcard,
    "drain": section_drain,
    "restart": section_restart,
    "memory": section_memory,
    "concurrent": section_concurrent,
    "scrape": section_scrape,
    "atol": section_atol,
    "register": section_register,
    "luacount": section_luacount,
}


def run_sections(ctx: Context, sections: Sequence[str]) -> bool:
    """Run the sections in order; False if one could not run (the rest are skipped)."""
    for section in sections:
        print(f"\n-- {section} (load average {loadavg()}) --", flush=True)
        ctx.results.setdefault("loadavg", {})[section] = loadavg()
        try:
            SECTION_RUNNERS[section](ctx)
        except BenchError as exc:
            print(f"\nbench failed in {section}: {exc}", file=sys.stderr, flush=True)
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    sections = args.only or list(DEFAULT_SECTIONS)
    try:
        info = machine()
    except BenchError as exc:
        print(f"bench cannot run: {exc}", file=sys.stderr)
        return 1
    dataset.RESULTS.mkdir(parents=True, exist_ok=True)
    ctx = Context(plan, Path(tempfile.mkdtemp(prefix="run-", dir=dataset.RESULTS)))
    ctx.results.update(
        machine=info, plan=plan.__dict__, command=" ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    )
    print(
        f"kktd bench: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, {info['filesystem']}, "
        f"{info['wrk']}, Python {info['python']}; load average {loadavg()}",
        flush=True,
    )
    started = time.monotonic()
    try:
        completed = run_sections(ctx, [s for s in SECTIONS if s in sections])
    finally:
        if not args.keep:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    ctx.results.update(elapsed_s=time.monotonic() - started, integrity_failures=ctx.integrity_failures)
    report(ctx)
    print(
        f"\nelapsed {ctx.results['elapsed_s']:.0f}s; load average now {loadavg()}"
        + (f"; work directory kept: {ctx.workdir}" if args.keep else "")
    )
    if args.json is not None:
        args.json.write_text(json.dumps(ctx.results, indent=2, ensure_ascii=False) + "\n")
    if not completed:
        return 1
    if ctx.integrity_failures:
        print(f"INTEGRITY FAILURES: {len(ctx.integrity_failures)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
