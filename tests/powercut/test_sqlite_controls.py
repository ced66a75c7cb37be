"""Control runs: the harness must catch SQLite configurations that acknowledge commits they lose.

A writer thread commits one row per transaction and records every commit that returned; the power
is cut once a seeded number of commits has been acknowledged (the writer is then in the middle of
the next one). The image is opened afterwards with plain sqlite3.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import wait_until

from .harness import PowerCutLab, report

pytestmark = pytest.mark.powercut


@dataclass
class ControlRun:
    acked: list[int] = field(default_factory=list)
    present: set[int] = field(default_factory=set)
    integrity: str = ""
    writer_error: str | None = None

    @property
    def lost(self) -> int:
        return len(set(self.acked) - self.present)


def create_database(path: Path, journal_mode: str) -> None:
    """Created before mounting: what is on disk at mount time is durable."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(f"PRAGMA journal_mode={journal_mode}")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        conn.commit()
    finally:
        conn.close()


def writer(db: Path, synchronous: str, seed: int, run: ControlRun) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for row_id in range(1_000_000):
            # Rows of 0.1-3 KiB: some commits touch one page, some several.
            payload = rng.randbytes(rng.randint(100, 3000))
            conn.execute("INSERT INTO t (id, payload) VALUES (?, ?)", (row_id, payload))
            run.acked.append(row_id)
    except sqlite3.Error as exc:  # the frozen filesystem answers EIO: the "machine" is off
        run.writer_error = str(exc)
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def read_image(db: Path, run: ControlRun) -> None:
    try:
        conn = sqlite3.connect(db)
        try:
            run.integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            run.present = {row[0] for row in conn.execute("SELECT id FROM t")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        run.integrity = f"unreadable: {exc}"


def control_run(lab: PowerCutLab, journal_mode: str, synchronous: str, mode: str, seed: int) -> ControlRun:
    create_database(lab.backing_dir() / "db.sqlite", journal_mode)
    lab.mount()
    run = ControlRun()
    target = random.Random(seed).randint(30, 150)
    db = lab.mountpoint / "db.sqlite"
    thread = threading.Thread(target=writer, args=(db, synchronous, seed, run))
    thread.start()
    try:
        wait_until(
            lambda: len(run.acked) >= target or not thread.is_alive(), 60, f"{target} commits", error=TimeoutError
        )
        assert run.writer_error is None, f"writer failed before the cut: {run.writer_error}"
        lab.cut(mode, seed)
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive(), "the writer did not stop after the cut"
    assert lab.last_image is not None
    read_image(lab.last_image / "db.sqlite", run)
    return run


@pytest.mark.parametrize(
    "journal_mode,synchronous",
    [("DELETE", "OFF"), ("WAL", "NORMAL")],
    ids=["rollback-sync-off", "wal-sync-normal"],
)
def test_unsafe_settings_lose_acknowledged_commits(
    lab: PowerCutLab, journal_mode: str, synchronous: str, request: pytest.FixtureRequest
) -> None:
    losses = []
    for seed in (11, 12, 13):
        run = control_run(lab, journal_mode, synchronous, "clean", seed)
        losses.append(run.lost)
        lab.generation += 1  # the next run starts on a fresh disk
    report(f"control {request.node.callspec.id}: clean cuts lost {losses} of the acknowledged commits (seeds 11-13)")
    assert all(lost > 0 for lost in losses), f"the harness failed to catch unsafe SQLite settings: {losses}"


@pytest.mark.parametrize("mode,seed", [("clean", 21), ("clean", 22), ("torn", 23), ("torn", 24), ("torn", 25)])
def test_wal_with_synchronous_full_loses_nothing(lab: PowerCutLab, mode: str, seed: int) -> None:
    run = control_run(lab, "WAL", "FULL", mode, seed)
    report(
        f"control wal-sync-full {mode} seed={seed}: acknowledged={len(run.acked)} lost={run.lost} "
        f"integrity={run.integrity}"
    )
    assert run.integrity == "ok"
    assert run.lost == 0
    assert len(run.acked) > 0


@pytest.mark.parametrize("synchronous,expected_lost", [("FULL", 1), ("EXTRA", 0)])
def test_rollback_journal_delete_needs_a_directory_fsync(
    lab: PowerCutLab, synchronous: str, expected_lost: int
) -> None:
    """SQLite's commit point in journal_mode=DELETE is the unlink of the journal; only
    synchronous=EXTRA fsyncs the directory after it. Under FULL the journal of the last commit comes
    back after the cut and rolls that acknowledged commit back; the model must show exactly that."""
    create_database(lab.backing_dir() / "db.sqlite", "DELETE")
    lab.mount()
    conn = sqlite3.connect(lab.mountpoint / "db.sqlite", isolation_level=None)

    def close() -> None:  # the mount cannot go while the database is open
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    try:
        conn.execute(f"PRAGMA synchronous={synchronous}")
        for row_id in range(20):
            conn.execute("INSERT INTO t (id, payload) VALUES (?, ?)", (row_id, b"x" * 100))
        lab.cut("clean", 0, before_unmount=close)
    finally:
        close()
    assert lab.last_image is not None
    run = ControlRun(acked=list(range(20)))
    read_image(lab.last_image / "db.sqlite", run)
    report(
        f"control rollback-journal sync-{synchronous.lower()}: acknowledged=20 lost={run.lost} "
        f"integrity={run.integrity}"
    )
    assert run.integrity == "ok"
    assert run.lost == expected_lost
