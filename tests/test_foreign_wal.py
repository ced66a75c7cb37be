"""A -wal file that is not its database's own is never applied: kktd refuses to start (exit 65, both files
named), changes neither file, and `kktd check-db` reports it. Its own WAL after a crash, and a restored
backup without a WAL, are taken as before."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from kktd.receipt import parse_receipt, sample_receipt
from kktd.store import Store, wal
from kktd.store.identity import (
    Stamp,
    WalVerdict,
    check_wal,
    committed_transactions,
    parse_wal_header,
    read_db_header,
    wal_checksum,
    wal_path,
)
from tests.support import KKTD_BIN, KktdProcess, post_many, receipts

EX_DATAERR = 65


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def keys_in(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {key for (key,) in conn.execute("SELECT idempotency_key FROM receipts")}
    finally:
        conn.close()


def crashed_with_receipts(kktds: list[KktdProcess], db: Path, prefix: str, count: int) -> set[str]:
    """A kktd that acknowledged `count` receipts and was killed: its WAL is left beside its database."""
    db.parent.mkdir(parents=True, exist_ok=True)
    proc = KktdProcess(db).start()
    kktds.append(proc)
    answers = asyncio.run(post_many(proc.url, receipts(prefix, count)))
    assert all(answer.status == 201 for answer in answers)
    proc.kill()
    assert wal_path(db).exists() and wal_path(db).stat().st_size > 0
    return {answer.key for answer in answers}


def clean_run(kktds: list[KktdProcess], db: Path, prefix: str, count: int) -> None:
    proc = KktdProcess(db).start()
    kktds.append(proc)
    asyncio.run(post_many(proc.url, receipts(prefix, count)))
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def refused_start(db: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(KKTD_BIN),
            "serve",
            "--db",
            str(db),
            "--listen",
            "127.0.0.1:0",
            "--config",
            "/dev/null",
            "--ofd-url",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_another_databases_wal_beside_buffer_db_is_refused_and_nothing_changes(
    kktds: list[KktdProcess], tmp_path: Path
) -> None:
    ours, theirs = tmp_path / "ours" / "buffer.db", tmp_path / "theirs" / "buffer.db"
    our_keys = crashed_with_receipts(kktds, ours, "ours", 40)
    crashed_with_receipts(kktds, theirs, "theirs", 60)
    # The operator's slip: a copied directory brings the other till's -wal beside our database.
    shutil.copy(wal_path(theirs), wal_path(ours))
    # The -shm the killed kktd left is in the comparison too: an SQLite open would rebuild it.
    before = {path: digest(path) for path in (ours, wal_path(ours), Path(f"{ours}-shm"))}

    result = refused_start(ours, tmp_path)
    assert result.returncode == EX_DATAERR, result.stderr
    assert str(ours) in result.stderr and str(wal_path(ours)) in result.stderr
    assert "belongs to another database" in result.stderr
    assert {path: digest(path) for path in before} == before, "neither file may change"

    report = subprocess.run([str(KKTD_BIN), "check-db", str(ours)], capture_output=True, text=True, timeout=60)
    assert report.returncode == EX_DATAERR
    assert "foreign WAL" in report.stderr and str(wal_path(ours)) in report.stderr
    assert {path: digest(path) for path in before} == before

    # Moving the stray file aside (what the message says) brings back exactly our acknowledged receipts:
    # those of our WAL are gone with it (it was replaced), but none of theirs slipped in.
    wal_path(ours).rename(tmp_path / "stray-wal")
    proc = KktdProcess(ours).start()
    kktds.append(proc)
    proc.stop()
    assert keys_in(ours) <= our_keys and not any(key.startswith("theirs") for key in keys_in(ours))


def test_own_wal_after_a_crash_is_applied(kktds: list[KktdProcess], tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    acknowledged = crashed_with_receipts(kktds, db, "own", 50)
    assert check_wal(db).verdict is WalVerdict.OWN
    proc = KktdProcess(db).start()
    kktds.append(proc)
    proc.stop()
    assert keys_in(db) == acknowledged


def test_restored_older_backup_beside_the_newer_wal_is_refused(kktds: list[KktdProcess], tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    clean_run(kktds, db, "first", 10)
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)  # a backup taken after a clean stop: no WAL
    clean_run(kktds, db, "second", 10)
    crashed_with_receipts(kktds, db, "third", 10)
    shutil.copy(backup, db)  # restored by hand; the -wal of the database's later life stays
    before = (digest(db), digest(wal_path(db)))
    result = refused_start(db, tmp_path)
    assert result.returncode == EX_DATAERR, result.stderr
    assert "restored backup" in result.stderr and str(wal_path(db)) in result.stderr
    assert (digest(db), digest(wal_path(db))) == before


def test_restored_backup_without_a_wal_is_accepted(kktds: list[KktdProcess], tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    clean_run(kktds, db, "kept", 20)
    backup = tmp_path / "backup.db"
    shutil.copy(db, backup)
    clean_run(kktds, db, "later", 20)
    shutil.copy(backup, db)
    assert not wal_path(db).exists()
    proc = KktdProcess(db).start()
    kktds.append(proc)
    proc.stop()
    assert keys_in(db) == {f"kept-{i}" for i in range(20)}


def test_a_wal_without_its_database_is_refused(kktds: list[KktdProcess], tmp_path: Path) -> None:
    other = tmp_path / "other" / "buffer.db"
    crashed_with_receipts(kktds, other, "orphan", 5)
    db = tmp_path / "buffer.db"
    shutil.copy(wal_path(other), wal_path(db))
    result = refused_start(db, tmp_path)
    assert result.returncode == EX_DATAERR, result.stderr
    assert not db.exists()


async def test_every_wal_begins_with_a_stamp_across_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints during a run start new WALs: each copy of the files taken mid-run (a crash at that
    moment) is recognised as the database's own, and the generation moves on."""
    monkeypatch.setattr(wal, "CHECKPOINT_FRAMES", 20)
    db = tmp_path / "buffer.db"
    store = await Store.open(db, 100_000)
    generations: list[int] = []
    try:
        for batch in range(30):
            await asyncio.gather(
                *(
                    store.accept(parse_receipt(json.dumps(sample_receipt(f"s-{batch}-{i}")).encode(), None))
                    for i in range(20)
                )
            )
            snapshot = tmp_path / f"crash-{batch}"
            snapshot.mkdir()
            shutil.copy(db, snapshot / "buffer.db")
            if wal_path(db).exists():
                shutil.copy(wal_path(db), wal_path(snapshot / "buffer.db"))
            verdict = check_wal(snapshot / "buffer.db")
            assert verdict.verdict in (WalVerdict.OWN, WalVerdict.NOTHING_COMMITTED), verdict.detail
            assert store.wal.stamp is not None
            generations.append(store.wal.stamp.generation)
    finally:
        await store.close()
    assert generations[-1] > generations[0] + 3, "the run checkpointed and stamped several times"


def test_wal_reader_matches_sqlite_on_a_real_wal(tmp_path: Path) -> None:
    db = tmp_path / "plain.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t (x)")
    for i in range(5):
        conn.execute("INSERT INTO t VALUES (?)", (i,))
    wal = wal_path(db).read_bytes()
    header = parse_wal_header(wal)
    assert header is not None and header.page_size == 4096
    assert wal_checksum(wal[:24], 0, 0, header.big_endian) == (header.checksum1, header.checksum2)
    transactions = committed_transactions(wal)
    assert transactions is not None and len(transactions) == 6  # CREATE + 5 INSERTs
    torn = wal[:-100]  # the last frame cut: SQLite drops that transaction, and so does the reader
    assert len(committed_transactions(torn) or []) == 5
    db_header = read_db_header(db)
    assert db_header is not None and db_header.page_size == 4096
    conn.close()


def test_stamp_round_trip() -> None:
    stamp = Stamp(bytes(range(16)), 7)
    assert Stamp.decode(stamp.encode()) == stamp
    assert Stamp.decode(b"x" * 32) is None


def test_a_database_file_caught_mid_checkpoint_is_named_by_its_header(kktds: list[KktdProcess], tmp_path: Path) -> None:
    """When the file alone does not read as a database (a checkpoint was copying the WAL into it), the id's
    prefix in the header's application_id still tells our WAL from another's."""
    ours, theirs = tmp_path / "ours" / "buffer.db", tmp_path / "theirs" / "buffer.db"
    crashed_with_receipts(kktds, ours, "ours", 10)
    crashed_with_receipts(kktds, theirs, "theirs", 10)
    conn = sqlite3.connect(f"file:{ours}?immutable=1", uri=True)
    root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'kktd_identity'").fetchone()[0]
    conn.close()
    header = read_db_header(ours)
    assert header is not None and header.application_id != 0
    with open(ours, "r+b") as handle:  # the identity's page half-copied: unreadable on its own
        handle.seek((root - 1) * header.page_size)
        handle.write(b"\xff" * header.page_size)
    assert check_wal(ours).verdict is WalVerdict.OWN, check_wal(ours).detail
    shutil.copy(wal_path(theirs), wal_path(ours))
    assert check_wal(ours).verdict is WalVerdict.FOREIGN, check_wal(ours).detail
