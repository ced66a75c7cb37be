"""kktd as a real process (no systemd): crash recovery, graceful stop, the notify protocol, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import KKTD_BIN, KktdProcess, Posted, child_env, http, http_async, post_many, receipts, wait_until

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process


def start(kktds: list[KktdProcess], db: Path, **kwargs: object) -> KktdProcess:
    proc = KktdProcess(db=db, **kwargs)  # type: ignore[arg-type]
    kktds.append(proc)
    return proc.start()


def health_status(proc: KktdProcess) -> int:
    status, _ = http("GET", f"{proc.url}/v1/health")
    return status


def stored_rows(db: Path) -> Counter[str]:
    conn = sqlite3.connect(db)
    try:
        return Counter(key for (key,) in conn.execute("SELECT idempotency_key FROM receipts"))
    finally:
        conn.close()


def acknowledged(answers: list[Posted]) -> set[str]:
    return {answer.key for answer in answers if answer.status in (200, 201)}


async def load_until_signalled(proc: KktdProcess, count: int, signum: int, after: int) -> list[Posted]:
    """Post `count` receipts with 16 clients and send `signum` once `after` have been acknowledged."""
    answers: list[Posted] = []
    task = asyncio.create_task(post_many(proc.url, receipts("load", count), concurrency=16, stop_on_error=True))

    async def signal_when_due() -> None:
        while True:
            status = await _status_or_none(proc)
            if status is not None and status["counts"]["pending"] >= after:
                proc.signal(signum)
                return
            await asyncio.sleep(0.005)

    await asyncio.wait_for(signal_when_due(), 60)
    answers = await asyncio.wait_for(task, 60)
    return answers


async def _status_or_none(proc: KktdProcess) -> dict[str, Any] | None:
    try:
        status, body = await http_async("GET", f"{proc.url}/v1/kkt/buffer/status")
    except aiohttp.ClientError:
        return None
    return body if status == 200 else None


def test_sigkill_mid_load_loses_no_acknowledged_receipt(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    proc = start(kktds, db)
    answers = asyncio.run(load_until_signalled(proc, 3000, signal.SIGKILL, after=500))
    assert proc.wait(10) == -signal.SIGKILL
    acked = acknowledged(answers)
    assert len(acked) >= 500
    restarted = start(kktds, db)
    rows = stored_rows(db)
    missing = acked - set(rows)
    assert not missing, f"{len(missing)} acknowledged receipts lost, e.g. {sorted(missing)[:3]}"
    assert all(count == 1 for count in rows.values()), "a receipt was stored twice"
    # Clients retry what was not answered: the same keys now replay or are created, never duplicated.
    retry = asyncio.run(post_many(restarted.url, receipts("load", 3000), concurrency=16))
    assert all(answer.status in (200, 201) for answer in retry)
    assert {a.key for a in retry if a.status == 200} >= acked
    rows = stored_rows(db)
    assert len(rows) == 3000 and set(rows.values()) == {1}


def test_sigterm_during_load_stops_cleanly(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    proc = start(kktds, db)
    answers = asyncio.run(load_until_signalled(proc, 3000, signal.SIGTERM, after=300))
    assert proc.wait(30) == 0, proc.log()
    acked = acknowledged(answers)
    assert len(acked) >= 300
    assert acked <= set(stored_rows(db))
    refused = [a for a in answers if a.status not in (200, 201)]
    assert all(a.status == 503 and a.body["error"]["code"] == "shutting_down" for a in refused)
    assert proc.notify is not None
    messages = proc.notify.collect()
    assert "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    log = proc.log()
    assert "stopped cleanly" in log


def test_notify_protocol_order_and_watchdog(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    proc = start(kktds, tmp_path / "buffer.db", watchdog_usec=400_000)
    assert proc.notify is not None
    wait_until(lambda: proc.notify.collect().count("WATCHDOG=1") >= 3, 10, "three watchdog pings")  # type: ignore[union-attr]
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    lines = proc.notify.collect()
    ready = lines.index("READY=1")
    status = next(i for i, line in enumerate(lines) if line.startswith("STATUS=pending="))
    first_ping = lines.index("WATCHDOG=1")
    stopping = lines.index("STOPPING=1")
    assert ready < first_ping < stopping
    assert status <= ready + 1
    assert all(line.isascii() for line in lines)


def test_wedged_writer_stops_watchdog_pings(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    proc = start(kktds, tmp_path / "buffer.db", watchdog_usec=400_000, faults=True)
    notify = proc.notify
    assert notify is not None
    wait_until(lambda: notify.collect().count("WATCHDOG=1") >= 2, 10, "watchdog pings before the fault")

    assert http("POST", f"{proc.url}/v1/test/fault", {"fault": "wedge_writer"})[0] == 202
    wait_until(lambda: health_status(proc) == 503, 10, "health to see the writer does not answer")
    notify.collect()
    pings_at_wedge = len([m for m in notify.messages if m[1] == "WATCHDOG=1"])
    # Three full intervals with no ping: systemd (WatchdogSec=0.4s) would have killed it by now.
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        assert len([m for m in notify.collect() if m == "WATCHDOG=1"]) == pings_at_wedge, "ping while wedged"
        time.sleep(0.05)
    assert proc.proc is not None and proc.proc.poll() is None
    proc.kill()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KKTD_")}
    full_env.update(env or {})
    return subprocess.run([str(KKTD_BIN), *args], capture_output=True, text=True, timeout=30, env=full_env)


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        (["--max-pending", "-1"], {}, "max_pending"),
        (["--max-pending", "lots"], {}, "max_pending"),
        (["--listen", "localhost"], {}, "listen"),
        (["--listen", "127.0.0.1:70000"], {}, "listen"),
        (["--ofd-url", "ftp://ofd.example"], {}, "ofd_url"),
        (["--log-level", "chatty"], {}, "log_level"),
        (["--sync-interval", "soon"], {}, "sync_interval"),
        ([], {"KKTD_BATCH_SIZE": "1000"}, "batch_size"),
        ([], {"KKTD_PENDING_WARN_AGE": "30d", "KKTD_PENDING_CRITICAL_AGE": "3d"}, "pending_critical_age"),
    ],
)
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, args: list[str], env: dict[str, str], key: str) -> None:
    result = run_cli("serve", "--config", os.devnull, "--db", str(tmp_path / "b.db"), *args, env=env)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert not (tmp_path / "b.db").exists()


def test_config_file_env_and_flags_precedence(tmp_path: Path) -> None:
    config = tmp_path / "kktd.toml"
    config.write_text('max_pending = 10\nbatch_size = 20\nsync_interval = "2s"\nlog_level = "debug"\n')
    result = run_cli(
        "check-config",
        "--config",
        str(config),
        "--batch-size",
        "30",
        env={"KKTD_MAX_PENDING": "11", "KKTD_BATCH_SIZE": "25"},
    )
    assert result.returncode == 0, result.stderr
    assert '"max_pending": 11' in result.stdout  # env beats file
    assert '"batch_size": 30' in result.stdout  # flag beats env
    assert '"sync_interval": 2.0' in result.stdout  # file beats default
    config.write_text("max_pendign = 10\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78 and "max_pendign" in result.stderr and "unknown key" in result.stderr
    config.write_text("max_pending = [1\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 78 and "not valid TOML" in result.stderr


def test_credentials_in_ofd_url_are_masked(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", os.devnull, "--ofd-url", "https://user:s3cret@ofd.example/api")
    assert result.returncode == 0
    assert "s3cret" not in result.stdout and "***" in result.stdout


def test_corrupt_database_exits_65_and_is_left_alone(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    db.write_bytes(b"garbage" * 2000)
    proc = KktdProcess(db=db)
    kktds.append(proc)
    proc.start(wait_ready=False)
    assert proc.wait(20) == 65
    assert "check-db" in proc.log()
    assert db.read_bytes() == b"garbage" * 2000
    assert proc.notify is not None and "READY=1" not in proc.notify.collect()


def test_port_in_use_exits_nonzero_before_ready(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    first = start(kktds, tmp_path / "a.db")
    second = KktdProcess(db=tmp_path / "b.db", port=first.port)
    kktds.append(second)
    second.start(wait_ready=False)
    assert second.wait(20) == 69
    assert "cannot listen" in second.log()


def test_the_welcome_of_make_run_comes_only_once_the_port_is_bound(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    """`make run`'s sample curl must not be printed by a kktd that then fails to bind (it would post elsewhere)."""
    first = start(kktds, tmp_path / "a.db")
    second = KktdProcess(db=tmp_path / "b.db", port=first.port, ofd_url="", extra_args=["--embedded-mock"])
    kktds.append(second)
    second.start(wait_ready=False)
    assert second.wait(20) == 69
    assert "cannot listen" in second.log() and "Listening on" not in second.log()


def test_the_welcome_says_how_to_call_the_cli(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    kktd = KktdProcess(db=tmp_path / "a.db", ofd_url="", extra_args=["--embedded-mock"])
    kktds.append(kktd)
    kktd.start()
    wait_until(lambda: "The CLI" in kktd.log(), 10, "the welcome")
    line = next(line for line in kktd.log().splitlines() if line.startswith("The CLI"))
    command = line.split(": ", 1)[1].split("    ", 1)[0]  # ".../.venv/bin/kktd --listen 127.0.0.1:PORT status"
    assert command.startswith(f"{KKTD_BIN} --listen 127.0.0.1:{kktd.port}"), line
    assert f"Listening on {kktd.url}" in kktd.log()
    result = subprocess.run(command.split(), capture_output=True, text=True, timeout=30, env=child_env())
    assert result.stdout.startswith("KKTD OK"), result.stdout + result.stderr


# ---- the integrity check: before READY after an unclean stop, right after it after a clean one ----


def fill(kktds: list[KktdProcess], db: Path, count: int) -> KktdProcess:
    proc = start(kktds, db)
    answers = asyncio.run(post_many(proc.url, receipts("fill", count), concurrency=16))
    assert all(a.status == 201 for a in answers)
    return proc


def table_leaf_page(db: Path) -> tuple[int, int]:
    """A leaf page of the receipts table, which opening the database and counting never read."""
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [
            p
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'receipts' AND pagetype = 'leaf' ORDER BY pageno"
            )
        ]
    finally:
        conn.close()
    return pages[len(pages) // 2], page_size


def test_clean_restart_checks_integrity_after_ready(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    first = fill(kktds, db, 200)
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    assert not Path(f"{db}-wal").exists(), "a clean stop leaves no WAL behind"
    second = start(kktds, db, faults=True)  # tests.faulty_kktd: GET /v1/test/integrity
    assert "integrity check deferred until after start-up" in second.log()
    wait_until(
        lambda: http("GET", f"{second.url}/v1/test/integrity")[1]["finished"], 20, "the deferred integrity check"
    )
    assert http("GET", f"{second.url}/v1/test/integrity")[1]["damage"] is None
    assert "integrity check of" in second.log() and ": ok (" in second.log()


def test_unclean_stop_checks_integrity_before_ready(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    fill(kktds, db, 50).kill()
    assert Path(f"{db}-wal").exists()
    second = start(kktds, db)
    assert "recovered after an unclean stop, integrity checked" in second.log()


def test_damage_found_after_ready_stops_intake_and_exits_65(tmp_path: Path, kktds: list[KktdProcess]) -> None:
    db = tmp_path / "buffer.db"
    first = fill(kktds, db, 1500)
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    page, page_size = table_leaf_page(db)
    with open(db, "r+b") as handle:
        handle.seek((page - 1) * page_size + 200)
        handle.write(b"\xff" * (page_size - 400))
    second = KktdProcess(db=db)
    kktds.append(second)
    second.start(wait_ready=True)
    assert second.wait(30) == 65
    log = second.log()
    assert "integrity check" in log and "kktd stops taking receipts" in log
    assert second.notify is not None and "STOPPING=1" in second.notify.collect()
    # The damage is now in front of every start: refused before READY, the file left as it is.
    third = KktdProcess(db=db)
    kktds.append(third)
    third.start(wait_ready=False)
    assert third.wait(30) == 65
    assert third.notify is not None and "READY=1" not in third.notify.collect()
    assert Path(f"{db}.damaged").read_text().startswith("database")
