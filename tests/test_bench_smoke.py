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
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import REPO, require

RUN = REPO / "bench" / "run.py"
REQUESTS = 40  # per run; a multiple of wrk's two threads so the fixed count is exact
TIMEOUT_S = 300


@pytest.fixture
def wrk() -> str:
    path = shutil.which("wrk")
    require(path is not None, "wrk is not installed (make test installs it; or: apt-get install wrk)",
            as_root_too=True)
    assert path is not None
    return path


@pytest.fixture
def bench_json(tmp_path: Path, wrk: str) -> Iterator[dict[str, Any]]:
    """Run `bench/run.py --quick --only intake` with tiny counts; yield its JSON results."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(RUN), "--quick", "--only", "intake", "--rounds", "1",
            "--requests", str(REQUESTS), "--json", str(out)]
    # Its own session: whatever happens here, the servers and wrk it started go with its process group.
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, output
    yield json.loads(out.read_text())


def test_intake_runs_complete_and_rows_match(bench_json: dict[str, Any]) -> None:
    runs = bench_json["intake"]["runs"]
    assert sorted((r["arm"], r["connections"]) for r in runs) == sorted(
        (arm, c) for arm in ("bare", "naive", "kktd") for c in (1, 16, 64))
    for run in runs:
        where = f"{run['arm']} c{run['connections']}"
        assert run["finished"], where
        assert run["issued"] == run["completed"] == REQUESTS, where
        assert run["ok2xx"] == REQUESTS, (where, run["errors"])
        if run["arm"] != "bare":
            assert run["rows_match"] is True, (where, run["db_rows"])
    assert bench_json["integrity_failures"] == []
    verdicts = {t["target"]: t["verdict"] for t in bench_json["targets"]}
    assert verdicts["drain >= 5,000 receipts/s"] == "not run"  # --only intake ran nothing else


def test_scrape_section_runs_and_scrapes(tmp_path: Path, wrk: str) -> None:
    """`bench/run.py --only scrape`: both arms complete with rows = 2xx, and the scraped arm did scrape."""
    out = tmp_path / "scrape.json"
    argv = [sys.executable, str(RUN), "--quick", "--only", "scrape", "--json", str(out)]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, output
    results = json.loads(out.read_text())
    assert results["integrity_failures"] == []
    runs = results["scrape"]["runs"]
    assert sorted(r["scraped"] for r in runs) == [False, True]
    scraped = next(r for r in runs if r["scraped"])
    assert scraped["scrapes"] > 0 and scraped["scrape_bytes"] > 0
    assert all(r["ok2xx"] == r["completed"] for r in runs)
