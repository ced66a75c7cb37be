"""The slow-flush shim of the benchmark (bench/slowsync.c, built by `make slowsync`) really delays flushes.

The SD-card figures of `make bench` are only as true as this model: every fsync/fdatasync must wait the
configured time, SQLite's commits included (they reach the disk through libc, which the shim interposes), and
nothing else. The bounds are generous: the delay must be there (a sleep is never shorter than asked), and the
upper bound only rules out a runaway (a wrong unit would be 1,000 times off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import require

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "build" / "slowsync.so"
DELAY_MS = 20
CALLS = 20

# Times CALLS calls of each kind in a fresh interpreter (LD_PRELOAD acts at process start) and prints JSON.
PROBE = """
import json, os, sqlite3, sys, time
path, calls = sys.argv[1], int(sys.argv[2])
timings = {}
fd = os.open(path + ".bin", os.O_RDWR | os.O_CREAT)
for name, flush in (("fsync", os.fsync), ("fdatasync", os.fdatasync)):
    started = time.monotonic()
    for i in range(calls):
        os.pwrite(fd, b"x" * 512, i * 512)
        flush(fd)
    timings[name] = time.monotonic() - started
os.close(fd)
db = sqlite3.connect(path + ".db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("CREATE TABLE t (x)")
started = time.monotonic()
for i in range(calls):
    db.execute("INSERT INTO t VALUES (?)", (i,))
timings["sqlite_commit"] = time.monotonic() - started
db.close()
print(json.dumps(timings))
"""


def probe(tmp_path: Path, name: str, env: dict[str, str]) -> dict[str, float]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "KKTD_SLOW_FSYNC_MS")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / name), str(CALLS)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    timings: dict[str, float] = json.loads(result.stdout)
    return timings


@pytest.fixture
def shim() -> Path:
    require(SHIM.exists(), f"{SHIM} is missing (make test builds it; or: make slowsync)")
    return SHIM


def test_shim_delays_every_flush_sqlite_commits_included(tmp_path: Path, shim: Path) -> None:
    plain = probe(tmp_path, "plain", {})
    slowed = probe(tmp_path, "slowed", {"LD_PRELOAD": str(shim), "KKTD_SLOW_FSYNC_MS": str(DELAY_MS)})
    least = CALLS * DELAY_MS / 1000
    for kind in ("fsync", "fdatasync", "sqlite_commit"):
        # Every call waited at least the delay on top of what it costs without the shim...
        assert slowed[kind] >= least, (kind, plain, slowed)
        # ...and not wildly more (e.g. a delay read as microseconds or seconds).
        assert slowed[kind] < 10 * least + plain[kind] + 5.0, (kind, plain, slowed)


def test_shim_passes_every_call_through(tmp_path: Path, shim: Path) -> None:
    probe(tmp_path, "zero", {"LD_PRELOAD": str(shim), "KKTD_SLOW_FSYNC_MS": "0"})
    # The real calls happened (no timing here: with a zero delay there is nothing to bound).
    assert (tmp_path / "zero.bin").stat().st_size == CALLS * 512
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT count(*) FROM t').fetchone()[0])",
            str(tmp_path / "zero.db"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == str(CALLS)
