"""Smoke test of the benchmark harness (`make bench`): it runs end to end and its receipts add up.

No timing is asserted: the machine is shared and a benchmark's figures are not a test's business. What is
asserted is what the harness itself relies on: wrk's fixed request count is exact, every receipt is answered
2xx, and the database of each storing server holds exactly as many rows as it answered 2xx.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, require

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

RUN = REPO / "bench" / "run.py"
SLOWSYNC = REPO / "build" / "slowsync.so"
REQUESTS = 40  # per run; a multiple of wrk's two threads so the fixed count is exact
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def wrk() -> str:
    path = shutil.which("wrk")
    require(path is not None, "wrk is not installed (make test installs it; or: apt-get install wrk)", as_root_too=True)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory, wrk: str) -> Iterator[dict[str, Any]]:
    """Run `bench/run.py --quick --only intake --only sdcard` with tiny counts; yield its JSON results."""
    require(SLOWSYNC.exists(), f"{SLOWSYNC} is missing (make test builds it; or: make slowsync)")
    # One run for both tests below (module scope): the harness is what is tested, not its figures.
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        sys.executable,
        str(RUN),
        "--quick",
        "--only",
        "intake",
        "--only",
        "sdcard",
        "--rounds",
        "1",
        "--requests",
        str(REQUESTS),
        "--json",
        str(out),
    ]
    yield run_bench(argv, out)


def run_bench(argv: list[str], out: Path) -> Any:
    """Run bench/run.py to its end and return its JSON; whatever happens, nothing it started outlives it."""
    # Its own session: the servers and wrk it started go with its process group.
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, output
    return json.loads(out.read_text())


def test_intake_runs_complete_and_rows_match(bench_json: dict[str, Any]) -> None:
    runs = bench_json["intake"]["runs"]
    assert sorted((r["arm"], r["connections"]) for r in runs) == sorted(
        (arm, c) for arm in ("minimal", "bare", "naive", "kktd") for c in (1, 16, 64)
    )
    for run in runs:
        where = f"{run['arm']} c{run['connections']}"
        assert run["finished"], where
        assert run["issued"] == run["completed"] == REQUESTS, where
        assert run["ok2xx"] == REQUESTS, (where, run["errors"])
        if run["arm"] in ("naive", "kktd"):
            assert run["rows_match"] is True, (where, run["db_rows"])
    assert bench_json["integrity_failures"] == []
    verdicts = {t["target"]: t["verdict"] for t in bench_json["targets"]}
    assert verdicts["drain >= 5,000 receipts/s"] == "not run"  # --only intake/sdcard ran nothing else


def test_sdcard_runs_complete_and_rows_match(bench_json: dict[str, Any]) -> None:
    """The SD-card section: both storing arms under the slow-flush shim, every 2xx in the database."""
    sdcard = bench_json["sdcard"]
    assert sorted((r["arm"], r["connections"]) for r in sdcard["runs"]) == sorted(
        (arm, c) for arm in ("naive", "kktd") for c in (1, 16, 64)
    )
    for run in sdcard["runs"]:
        where = f"sdcard {run['arm']} c{run['connections']}"
        assert run["finished"] and run["ok2xx"] == run["completed"] == REQUESTS, (where, run["errors"])
        assert run["rows_match"] is True, (where, run["db_rows"])
    assert sdcard["delay_ms"] == 5.0 and "flush_ms_slowed" in sdcard  # no timing here: tests/test_slowsync.py


def test_scrape_section_runs_and_scrapes(tmp_path: Path, wrk: str) -> None:
    """`bench/run.py --only scrape`: both arms complete with rows = 2xx, and the scraped arm did scrape."""
    out = tmp_path / "scrape.json"
    argv = [sys.executable, str(RUN), "--quick", "--only", "scrape", "--json", str(out)]
    results = run_bench(argv, out)
    assert results["integrity_failures"] == []
    runs = results["scrape"]["runs"]
    assert sorted(r["scraped"] for r in runs) == [False, True]
    scraped = next(r for r in runs if r["scraped"])
    assert scraped["scrapes"] > 0 and scraped["scrape_bytes"] > 0
    assert all(r["ok2xx"] == r["completed"] for r in runs)


def test_register_section_runs_and_prints_each_receipt_once(tmp_path: Path, wrk: str) -> None:
    """`bench/run.py --only register`: every drain fiscalizes each receipt once on the mock register, and both
    intake arms complete with rows = 2xx (the section's own checks, else integrity_failures)."""
    out = tmp_path / "register.json"
    argv = [sys.executable, str(RUN), "--quick", "--only", "register", "--requests", str(REQUESTS), "--json", str(out)]
    results = run_bench(argv, out)
    assert results["integrity_failures"] == []
    register = results["register"]
    for drain in [*register["drains"], register["printing"]]:
        assert drain["register_receipts"] == drain["register_unique_uuids"] == drain["receipts"], drain
    runs = register["intake_runs"]
    assert sorted(r["draining"] for r in runs) == [False, True]
    assert all(r["finished"] and r["ok2xx"] == r["completed"] == REQUESTS for r in runs)
