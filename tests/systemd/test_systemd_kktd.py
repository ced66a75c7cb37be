"""kktd.service as shipped, driven through systemctl and journalctl inside a disposable systemd."""

from __future__ import annotations

import re
import time

import pytest

from tests.support import http, wait_until

from .conftest import SUMMARY
from .kktd_unit import KktdUnit, Load, LoadResult
from .systemd_sandbox import SandboxError

pytestmark = pytest.mark.systemd

# Bounded load: enough concurrent receipts to have commits in flight when systemd acts, small enough for
# a shared 2-core machine.
LOAD_WORKERS = 4
LOAD_MAX = 1500
ACKED_BEFORE_ACTION = 150


def record(test: str, result: LoadResult, extra: str = "") -> None:
    statuses = " ".join(f"{code}x{n}" for code, n in sorted(result.statuses.items()))
    SUMMARY.append(
        f"{test}: acknowledged={len(result.acked)} answers=[{statuses}] "
        f"connection_errors={result.connection_errors} unfinished={len(result.unfinished)} "
        f"{extra}"
    )


def assert_all_stored(kktd: KktdUnit, acked: dict[str, str], status: str | None = None) -> None:
    """Every acknowledged receipt is there under its receipt_id, and nothing else (no duplicates)."""
    for key, receipt_id in acked.items():
        code, body = kktd.get_receipt(receipt_id)
        assert code == 200, (key, receipt_id, body)
        assert body["idempotency_key"] == key
        if status is not None:
            assert body["status"] == status, (key, body["status"])
    counts = kktd.buffer_counts()
    assert sum(counts.values()) == len(acked), (counts, len(acked))


def deliver_everything(kktd: KktdUnit, expected: int) -> None:
    """OFD back online: everything ends `sent`, and the OFD holds each receipt exactly once."""
    kktd.set_ofd_mode("online")
    wait_until(
        lambda: kktd.buffer_counts() == {"pending": 0, "submitted": 0, "sent": expected, "failed": 0, "resolved": 0},
        60,
        f"{expected} receipts sent to the OFD",
        interval=0.1,
        error=SandboxError,
    )
    assert kktd.ofd_stats()["unique"] == expected


def test_start_returns_after_ready_with_status_and_leveled_journal(kktd: KktdUnit) -> None:
    kktd.systemctl("start", "kktd")
    # No polling here: `systemctl start` of a Type=notify unit returns only after READY=1, and kktd sends
    # READY=1 only once the database is open and the socket bound, so the very first request must work.
    assert kktd.systemctl("is-active", "kktd").stdout.strip() == "active"
    status, body = http("GET", f"{kktd.url}/v1/health")
    assert status == 200 and body["status"] in ("ok", "warning"), body
    shown = kktd.show("StatusText", "Type", "NotifyAccess", "WatchdogUSec", "User", "NRestarts")
    assert re.fullmatch(r"pending=0 failed=0 sent=0 ofd=\S+", shown["StatusText"]), shown
    assert (shown["Type"], shown["NotifyAccess"], shown["WatchdogUSec"], shown["User"]) == (
        "notify",
        "main",
        "30s",
        "kktd",
    )
    assert 'Status: "pending=0' in kktd.systemctl("status", "kktd", check=False).stdout
    main_pid = str(kktd.main_pid())
    entries = [e for e in kktd.journal() if e.get("_PID") == main_pid]
    ready = [e for e in entries if "ready: listening on" in str(e.get("MESSAGE"))]
    assert len(ready) == 1 and ready[0]["PRIORITY"] == "6", entries
    # Native journal protocol: the logger is a field of its own, the message is the event alone.
    opened = [e for e in entries if str(e.get("MESSAGE", "")).startswith("buffer open")]
    assert opened and opened[0]["PRIORITY"] == "6" and opened[0]["LOGGER"] == "kktd.store", entries
    # journald consumed the <N> prefixes as priorities instead of showing them.
    assert not [e for e in entries if re.match(r"<\d>", str(e.get("MESSAGE")))]


def test_warning_lines_reach_the_journal_as_warnings(kktd: KktdUnit) -> None:
    kktd.dropin("50-faults", kktd.faults_dropin())
    kktd.systemctl("start", "kktd")
    main_pid = str(kktd.main_pid())
    warnings = [e for e in kktd.journal() if e.get("_PID") == main_pid and "test fault hooks" in str(e["MESSAGE"])]
    assert [e["PRIORITY"] for e in warnings] == ["4"]


def test_bad_config_fails_with_78_and_no_restart_loop(kktd: KktdUnit) -> None:
    kktd.sandbox.write_file("/etc/kktd/kktd.toml", "max_pending = -1\n")
    started = kktd.systemctl("start", "kktd", check=False)
    assert started.returncode != 0
    # RestartPreventExitStatus=78: the unit stays failed instead of restarting into the same error.
    wait_until(
        lambda: kktd.show("ActiveState")["ActiveState"] == "failed",
        20,
        "kktd to settle as failed",
        interval=0.1,
        error=SandboxError,
    )
    shown = kktd.show("ExecMainStatus", "Result", "NRestarts", "ActiveState")
    assert shown == {"ExecMainStatus": "78", "Result": "exit-code", "NRestarts": "0", "ActiveState": "failed"}
    assert kktd.exits() == ["exit-code exited 78"]
    assert "max_pending (from /etc/kktd/kktd.toml) = -1" in kktd.journal_text()


def test_service_runs_unprivileged_and_cannot_write_outside_its_state(kktd: KktdUnit) -> None:
    kktd.systemctl("start", "kktd")
    pid = kktd.main_pid()
    status = dict(line.split(":", 1) for line in kktd.sandbox.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines())
    uid = kktd.sandbox.run(["id", "-u", "kktd"]).stdout.strip()
    assert status["Uid"].split() == [uid] * 4 and uid != "0"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # SystemCallFilter= is a seccomp filter
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capability_set], 16) == 0, (capability_set, status[capability_set])
    # The service's own mount namespace, as the kktd user: only the state dir (and private tmp) writable.
    outcomes = {}
    for directory in ("/etc", "/opt", "/usr", "/var/lib", "/root", "/home", str(kktd.venv), "/var/lib/kktd"):
        done = kktd.sandbox.run(
            [
                "nsenter",
                f"--target={pid}",
                "--mount",
                "--",
                "setpriv",
                "--reuid=kktd",
                "--regid=kktd",
                "--clear-groups",
                "--",
                "sh",
                "-c",
                f'f="{directory}/.kktd-write-probe" && : > "$f" && rm "$f"',
            ],
            check=False,
        )
        outcomes[directory] = done.returncode == 0
    assert outcomes == {d: d == "/var/lib/kktd" for d in outcomes}, outcomes
    db_mode = kktd.sandbox.run(["stat", "-c", "%a %U", "/var/lib/kktd/buffer.db"]).stdout.split()
    assert db_mode == ["600", "kktd"]


def test_stop_during_load_exits_cleanly_and_keeps_every_acknowledged_receipt(kktd: KktdUnit) -> None:
    kktd.start_mock_ofd("offline")
    kktd.systemctl("start", "kktd")
    with Load(kktd.url, "stop", LOAD_WORKERS, LOAD_MAX) as load:
        load.wait_acked(ACKED_BEFORE_ACTION)
        began = time.monotonic()
        kktd.systemctl("stop", "kktd")
        took = time.monotonic() - began
        result = load.stop(finish_within=0)
    record("stop during load", result, f"stop took {took:.2f}s")
    # success (not timeout) with exit status 0: kktd drained and exited by itself within TimeoutStopSec.
    assert kktd.exits() == ["success exited 0"]
    assert kktd.show("ActiveState", "TimeoutStopUSec") == {"ActiveState": "inactive", "TimeoutStopUSec": "30s"}
    assert took < 30
    kktd.systemctl("start", "kktd")
    assert_all_stored(kktd, result.acked, status="pending")
    assert len(result.acked) >= ACKED_BEFORE_ACTION


def test_sigkill_then_restart_recovers_every_acknowledged_receipt(kktd: KktdUnit) -> None:
    kktd.start_mock_ofd("offline")
    kktd.systemctl("start", "kktd")
    with Load(kktd.url, "kill", LOAD_WORKERS, LOAD_MAX) as load:
        load.wait_acked(ACKED_BEFORE_ACTION)
        kktd.systemctl("kill", "--signal=SIGKILL", "kktd")
        kktd.systemctl("restart", "kktd")
        result = load.stop(finish_within=30)
    record("SIGKILL + restart during load", result)
    assert result.unfinished == []
    assert result.connection_errors > 0, "the load never saw kktd go away"
    assert_all_stored(kktd, result.acked, status="pending")
    deliver_everything(kktd, len(result.acked))
    assert_all_stored(kktd, result.acked, status="sent")


def test_restart_during_load_keeps_every_acknowledged_receipt(kktd: KktdUnit) -> None:
    kktd.start_mock_ofd("offline")
    kktd.systemctl("start", "kktd")
    with Load(kktd.url, "restart", LOAD_WORKERS, LOAD_MAX) as load:
        load.wait_acked(ACKED_BEFORE_ACTION)
        kktd.systemctl("restart", "kktd")
        restarted_at = load.acked_count()
        load.wait_acked(restarted_at + ACKED_BEFORE_ACTION)
        result = load.stop(finish_within=30)
    record("restart during load", result)
    assert result.unfinished == []
    assert_all_stored(kktd, result.acked, status="pending")
    deliver_everything(kktd, len(result.acked))


@pytest.mark.parametrize("fault", ["block_loop", "wedge_writer"])
def test_watchdog_restarts_a_hung_kktd_without_losing_receipts(kktd: KktdUnit, fault: str) -> None:
    kktd.dropin("50-watchdog", kktd.faults_dropin() + "\nWatchdogSec=3s")
    kktd.start_mock_ofd("offline")
    kktd.systemctl("start", "kktd")
    acked = {}
    for n in range(20):
        code, body = kktd.post_receipt(f"wd-{fault}-{n}")
        assert code == 201, body
        acked[f"wd-{fault}-{n}"] = body["receipt_id"]
    hung_pid = kktd.main_pid()
    code, body = http("POST", f"{kktd.url}/v1/test/fault", {"fault": fault})
    assert code == 202, body
    # WatchdogSec=3s: systemd sends SIGABRT on timeout, then Restart=on-failure starts a new process.
    wait_until(
        lambda: kktd.show("NRestarts")["NRestarts"] == "1" and kktd.main_pid() not in (0, hung_pid),
        30,
        "systemd to restart kktd after a watchdog timeout",
        interval=0.1,
        error=SandboxError,
    )
    kktd.wait_active_and_answering()
    journal = kktd.journal_text()
    assert "Watchdog timeout" in journal, journal[-2000:]
    assert kktd.exits() == ["watchdog killed ABRT"]
    assert kktd.show("ActiveState")["ActiveState"] == "active"
    assert_all_stored(kktd, acked, status="pending")
