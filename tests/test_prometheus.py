"""A real Prometheus (Debian's prometheus, started here on loopback with its own storage, scraping every
second) scrapes loaded kktds: every dashboard expression and every alert expression returns data through
its query API, and Prometheus loads the shipped rules and evaluates them.

Five targets make every alert's condition true somewhere: `healthy` delivers to a mock OFD that refuses
one till's receipts (dead letters), `stuck` has its upstream down (breaker open, pending past tiny alarm
ages, a full buffer) and its database on a nearly full tmpfs, `gone` is a port nobody listens on, and two
tills on a simulated local register: `worn` (its register's clock 26 days back, its OFD unreachable, its FN
expired, no paper, the shift past 24 hours with auto shift off) and `aging` (its FN expiring in 10 days).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.register_support import MockRegisterProcess
from tests.support import (
    KktdProcess,
    MockOfdProcess,
    free_port,
    post_many,
    receipts,
    require,
    sample_receipt,
    wait_until,
)
from tests.test_monitoring import (
    ALERTS,
    CORE_ALERTS,
    GRAFANA_VARIABLES,
    alert_expressions,
    alert_names,
    dashboard_expressions,
)

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

PROMETHEUS = "/usr/bin/prometheus"
RATE_WINDOW = "15s"  # what Grafana's $__rate_interval would be at a 1 s scrape interval, with margin


def query_expr(expr: str) -> str:
    values = {**GRAFANA_VARIABLES, "$__rate_interval": RATE_WINDOW, "$job": "kktd"}
    for variable, value in values.items():
        expr = expr.replace(variable, value)
    return expr


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.workdir = workdir
        config = workdir / "prometheus.yml"
        shutil.copy(ALERTS, workdir / ALERTS.name)
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
                    "rule_files": [ALERTS.name],
                    "scrape_configs": [{"job_name": "kktd", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def nearly_full_disk(tmp_path: Path) -> Iterator[Path]:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(mount_point: Path, leave_bytes: int) -> None:
    stats = os.statvfs(mount_point)
    free = stats.f_bavail * stats.f_frsize
    with open(mount_point / "ballast", "wb") as ballast:
        ballast.write(b"\0" * max(0, free - leave_bytes))


@pytest.fixture
def registers(tmp_path: Path) -> Iterator[list[MockRegisterProcess]]:
    started: list[MockRegisterProcess] = []
    try:
        yield started
    finally:
        for register in started:
            register.stop()


def register_targets(
    tmp_path: Path, kktds: list[KktdProcess], registers: list[MockRegisterProcess]
) -> tuple[KktdProcess, KktdProcess]:
    """Two kktds on simulated registers whose reports make every register alert's condition true."""
    day = 86400.0
    worn_register = MockRegisterProcess(tmp_path / "worn-register")
    aging_register = MockRegisterProcess(tmp_path / "aging-register")
    for register in (worn_register, aging_register):
        register.workdir.mkdir()
        registers.append(register)
    expired = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 40 * day))
    soon = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 10 * day))
    worn_register.start(clock_offset=-26 * day, ofd_online=False, fn_validity_date=expired)
    aging_register.start(fn_validity_date=soon)
    worn = KktdProcess(
        tmp_path / "worn.db",
        env={"KKTD_LOG_LEVEL": "info"},
        extra_args=worn_register.kktd_args("--no-atol-driver-auto-shift", "--sync-interval", "0.2"),
    )
    aging = KktdProcess(tmp_path / "aging.db", env={"KKTD_LOG_LEVEL": "info"}, extra_args=aging_register.kktd_args())
    kktds.extend([worn, aging])
    worn.start()
    aging.start()
    asyncio.run(post_many(worn.url, receipts("worn-day1", 2)))
    wait_until(lambda: len(worn_register.receipts()) == 2, 30, "the worn register's first receipts printed")
    worn_register.advance_clock(25 * 3600)  # its shift is now over 24 hours old: receipts wait
    worn_register.set_behaviour(paper_present=False)
    asyncio.run(post_many(worn.url, receipts("worn-day2", 2)))
    for kktd in (worn, aging):  # the register's report read now (else every minute)
        sync = urllib.request.Request(f"{kktd.url}/v1/kkt/buffer/sync", data=b"{}", method="POST")
        with urllib.request.urlopen(sync, timeout=30):
            pass
    return worn, aging


def test_prometheus_scrapes_kktd_and_every_expression_returns_data(
    tmp_path: Path,
    kktds: list[KktdProcess],
    nearly_full_disk: Path,
    ofd_process: MockOfdProcess,
    registers: list[MockRegisterProcess],
) -> None:
    require(os.path.exists(PROMETHEUS), "Debian's prometheus is missing (`make test` installs it)")
    prometheus: Prometheus | None = None
    try:
        ofd_process.reject_pos_ids(["POS-REFUSED"])
        healthy = KktdProcess(tmp_path / "healthy.db", ofd_url=ofd_process.url, env={"KKTD_LOG_LEVEL": "info"})
        stuck = KktdProcess(
            nearly_full_disk / "stuck.db",
            env={"KKTD_LOG_LEVEL": "info"},
            log_dir=tmp_path,
            extra_args=[
                "--breaker-threshold",
                "1",
                "--pending-warn-age",
                "1",
                "--pending-critical-age",
                "2",
                "--max-pending",
                "10",
            ],
        )
        kktds.extend([healthy, stuck])
        healthy.start()
        stuck.start()
        fill(nearly_full_disk, leave_bytes=512 * 1024)  # under 3% of 32 MiB free
        gone = f"127.0.0.1:{free_port()}"
        worn, aging = register_targets(tmp_path, kktds, registers)
        targets = [f"127.0.0.1:{k.port}" for k in (healthy, stuck, worn, aging)] + [gone]
        prometheus = Prometheus(tmp_path, targets)

        async def load() -> None:
            refused = [{**sample_receipt(f"refused-{i}"), "pos_id": "POS-REFUSED"} for i in range(3)]
            await post_many(healthy.url, refused)
            await post_many(stuck.url, receipts("stuck", 12))  # 10 fit, then 503 buffer_full
            deadline = time.monotonic() + 60
            batch = 0
            while time.monotonic() < deadline and not all_answered():
                await post_many(healthy.url, receipts(f"load-{batch}", 40), concurrency=4)
                batch += 1
                await asyncio.sleep(0.2)  # a till's pace; the data is polled for, not waited for

        unanswered: dict[str, str] = {}

        def all_answered() -> bool:
            assert prometheus is not None
            unanswered.clear()
            for expr in dashboard_expressions() + alert_expressions():
                if not prometheus.query(query_expr(expr)):
                    unanswered[expr] = query_expr(expr)
            return not unanswered

        assert len(dashboard_expressions()) >= 30 and len(alert_expressions()) == len(alert_names())
        asyncio.run(load())
        assert not unanswered, "expressions without data:\n" + "\n".join(unanswered.values())

        # The shipped rules are loaded and healthy, and their alerts become active against the targets.
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(alert_names())
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

        def active() -> set[str]:
            assert prometheus is not None
            return {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}

        wait_until(lambda: CORE_ALERTS <= active(), 30, "every alert pending or firing")
        by_instance = {
            (a["labels"]["alertname"], a["labels"].get("instance")) for a in prometheus.api("alerts")["alerts"]
        }
        assert ("KktdDown", gone) in by_instance
        assert ("KktdDeadLetters", f"127.0.0.1:{healthy.port}") in by_instance
        assert ("KktdPendingOldCritical", f"127.0.0.1:{stuck.port}") in by_instance
        assert not {name for name, instance in by_instance if instance == f"127.0.0.1:{healthy.port}"} - {
            "KktdDeadLetters"
        }
        worn_alerts = {name for name, instance in by_instance if instance == f"127.0.0.1:{worn.port}"}
        assert {"KktdRegisterOfdBacklogCritical", "KktdRegisterNoPaper", "KktdRegisterShiftExpired"} <= worn_alerts
        assert ("KktdRegisterFnExpiring", f"127.0.0.1:{aging.port}") in by_instance
    finally:
        if prometheus is not None:
            prometheus.stop()
