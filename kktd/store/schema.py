"""The database file: PRAGMAs, the schema and its migrations, the integrity checks and the damage marker.

Opening replays the WAL (SQLite does that on connect), sets the PRAGMAs and reads each back (a filesystem
that refuses WAL is a start-up error), migrates `user_version` step by step, and runs `PRAGMA quick_check`
whenever the last run did not close cleanly. A corrupt database is never replaced.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from kktd.errors import CorruptDatabase, StorageUnavailable

log = logging.getLogger("kktd.store")

SCHEMA_VERSION = 4

PRAGMAS: tuple[tuple[str, str, Any], ...] = (
    # (pragma, value set, value expected when read back)
    ("journal_mode", "WAL", "wal"),
    ("synchronous", "FULL", 2),
    # kktd checkpoints itself and stamps each new WAL (kktd/store/identity.py): SQLite must not on its own.
    # (Its automatic checkpoint would also run inside the COMMIT that crosses the threshold, so that commit
    # and every intake waiting on it paid for copying the WAL into the database and fsyncing it.)
    ("wal_autocheckpoint", "0", 0),
    ("foreign_keys", "ON", 1),
    ("busy_timeout", "5000", 5000),
)

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE receipts (
            seq INTEGER PRIMARY KEY,
            receipt_id TEXT NOT NULL UNIQUE,
            idempotency_key TEXT NOT NULL UNIQUE,
            body_hash TEXT NOT NULL,
            body TEXT NOT NULL,
            pos_id TEXT NOT NULL,
            total INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            accepted_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            sent_ms INTEGER,
            fiscal_document_number INTEGER,
            fiscal_sign TEXT,
            ofd_received_at TEXT
        )""",
        "CREATE INDEX receipts_pending ON receipts(seq) WHERE status = 'pending'",
        "CREATE INDEX receipts_failed ON receipts(seq) WHERE status = 'failed'",
        "CREATE INDEX receipts_sent_age ON receipts(sent_ms) WHERE status = 'sent'",
    ),
    # Two-phase upstreams (registered first, their result polled): a `submitted` state, the upstream's own
    # reference, the external id a registration was sent under, and the fiscal register's full answer.
    # SQLite cannot change a CHECK constraint in place, so the table is rebuilt inside the migration's
    # transaction.
    2: (
        """CREATE TABLE receipts_v2 (
            seq INTEGER PRIMARY KEY,
            receipt_id TEXT NOT NULL UNIQUE,
            idempotency_key TEXT NOT NULL UNIQUE,
            body_hash TEXT NOT NULL,
            body TEXT NOT NULL,
            pos_id TEXT NOT NULL,
            total INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'submitted', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            accepted_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            sent_ms INTEGER,
            fiscal_document_number INTEGER,
            fiscal_sign TEXT,
            ofd_received_at TEXT,
            external_id TEXT,
            registrations INTEGER NOT NULL DEFAULT 0,
            upstream_ref TEXT,
            submitted_ms INTEGER,
            fn_number TEXT,
            shift_number INTEGER,
            receipt_number INTEGER,
            kkt_registration_number TEXT,
            ofd_receipt_url TEXT
        )""",
        """INSERT INTO receipts_v2 (seq, receipt_id, idempotency_key, body_hash, body, pos_id, total, status,
            attempts, last_error, accepted_ms, updated_ms, sent_ms, fiscal_document_number, fiscal_sign,
            ofd_received_at)
           SELECT seq, receipt_id, idempotency_key, body_hash, body, pos_id, total, status, attempts,
            last_error, accepted_ms, updated_ms, sent_ms, fiscal_document_number, fiscal_sign, ofd_received_at
           FROM receipts""",
        "DROP TABLE receipts",
        "ALTER TABLE receipts_v2 RENAME TO receipts",
        "CREATE INDEX receipts_pending ON receipts(seq) WHERE status = 'pending'",
        "CREATE INDEX receipts_submitted ON receipts(seq) WHERE status = 'submitted'",
        "CREATE INDEX receipts_failed ON receipts(seq) WHERE status = 'failed'",
        "CREATE INDEX receipts_sent_age ON receipts(sent_ms) WHERE status = 'sent'",
    ),
    # The database's identity and WAL generation: the stamp that binds a -wal file to it.
    3: (
        """CREATE TABLE kktd_identity (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            db_id BLOB NOT NULL,
            generation INTEGER NOT NULL,
            stamp BLOB NOT NULL
        )""",
        "INSERT INTO kktd_identity (id, db_id, generation, stamp) VALUES (1, randomblob(16), 0, zeroblob(32))",
    ),
    # What the register says a buyer checks the receipt with (the FNS site and the OFD's INN, tags 1060 and
    # 1017), and a dead letter the operator resolved (status 'resolved' and the reason): the CHECK changes, so
    # the table is rebuilt as in v2.
    4: (
        """CREATE TABLE receipts_v4 (
            seq INTEGER PRIMARY KEY,
            receipt_id TEXT NOT NULL UNIQUE,
            idempotency_key TEXT NOT NULL UNIQUE,
            body_hash TEXT NOT NULL,
            body TEXT NOT NULL,
            pos_id TEXT NOT NULL,
            total INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'submitted', 'sent', 'failed', 'resolved')),
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            accepted_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            sent_ms INTEGER,
            fiscal_document_number INTEGER,
            fiscal_sign TEXT,
            ofd_received_at TEXT,
            external_id TEXT,
            registrations INTEGER NOT NULL DEFAULT 0,
            upstream_ref TEXT,
            submitted_ms INTEGER,
            fn_number TEXT,
            shift_number INTEGER,
            receipt_number INTEGER,
            kkt_registration_number TEXT,
            ofd_receipt_url TEXT,
            fns_url TEXT,
            ofd_inn TEXT,
            resolution TEXT
        )""",
        """INSERT INTO receipts_v4 (seq, receipt_id, idempotency_key, body_hash, body, pos_id, total, status,
            attempts, last_error, accepted_ms, updated_ms, sent_ms, fiscal_document_number, fiscal_sign,
            ofd_received_at, external_id, registrations, upstream_ref, submitted_ms, fn_number, shift_number,
            receipt_number, kkt_registration_number, ofd_receipt_url)
           SELECT seq, receipt_id, idempotency_key, body_hash, body, pos_id, total, status, attempts,
            last_error, accepted_ms, updated_ms, sent_ms, fiscal_document_number, fiscal_sign, ofd_received_at,
            external_id, registrations, upstream_ref, submitted_ms, fn_number, shift_number, receipt_number,
            kkt_registration_number, ofd_receipt_url
           FROM receipts""",
        "DROP TABLE receipts",
        "ALTER TABLE receipts_v4 RENAME TO receipts",
        "CREATE INDEX receipts_pending ON receipts(seq) WHERE status = 'pending'",
        "CREATE INDEX receipts_submitted ON receipts(seq) WHERE status = 'submitted'",
        "CREATE INDEX receipts_failed ON receipts(seq) WHERE status = 'failed'",
        "CREATE INDEX receipts_sent_age ON receipts(sent_ms) WHERE status = 'sent'",
        "CREATE INDEX receipts_resolved ON receipts(seq) WHERE status = 'resolved'",
    ),
}


# execute_fetchall is one round trip to the SQLite thread; execute + fetch + close would be three.
async def fetch_one(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> Any:
    rows = await fetch_all(conn, sql, params)
    return rows[0] if rows else None


async def fetch_all(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    return list(await conn.execute_fetchall(sql, tuple(params)))


async def rollback(conn: aiosqlite.Connection) -> None:
    try:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("rollback failed: %s", exc)


def describe_error(exc: sqlite3.Error) -> str:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "full" in text:
        return f"disk full: {text}"
    return text


def refuses_writes(exc: sqlite3.Error) -> bool:
    """The disk (or filesystem) refuses to take writes: full, failing, or remounted read-only."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    return (
        primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN)
        or "full" in str(exc)
        or "readonly" in str(exc)
        or "disk I/O" in str(exc)
    )


async def configure(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        for name, value, expected in PRAGMAS:
            await conn.execute(f"PRAGMA {name} = {value}")
            row = await fetch_one(conn, f"PRAGMA {name}")
            actual = row[0] if row else None
            if actual != expected:
                raise StorageUnavailable(
                    f"database {path}: PRAGMA {name} is {actual!r} after setting {value} "
                    f"(the filesystem may not support it); refusing to run without it"
                )
    except sqlite3.DatabaseError as exc:
        raise classify_open_error(exc, path) from exc


async def migrate(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        row = await fetch_one(conn, "PRAGMA user_version")
        version = row[0]
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"database {path} has schema v{version}, newer than this kktd (v{SCHEMA_VERSION}); refusing to touch it"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[target]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {target}")
            await conn.execute("COMMIT")
            log.info("database %s migrated to schema v%d", path, target)
    except sqlite3.DatabaseError as exc:
        await rollback(conn)
        raise classify_open_error(exc, path) from exc


async def quick_check(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        rows = await fetch_all(conn, "PRAGMA quick_check")
    except sqlite3.DatabaseError as exc:
        raise classify_open_error(exc, path) from exc
    problems = [row[0] for row in rows if row[0] != "ok"]
    if problems:
        raise CorruptDatabase(f"database {path} failed its integrity check: {'; '.join(problems[:5])}")


def classify_open_error(exc: sqlite3.DatabaseError, path: Path) -> Exception:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and not _looks_corrupt(text):
        return StorageUnavailable(f"database {path}: {describe_error(exc)}")
    return CorruptDatabase(f"database {path} is damaged: {text}")


def _looks_corrupt(text: str) -> bool:
    return "malformed" in text or "not a database" in text or "corrupt" in text


def damage_marker(path: Path) -> Path:
    """Beside the database: written when damage is found after start-up, so that every later start checks
    first (a clean stop would otherwise let the next start defer the check again)."""
    return Path(f"{path}.damaged")


def write_damage_marker(marker: Path, reason: str) -> None:
    try:
        marker.write_text(reason + "\n")
        fsync(marker)
        fsync(marker.parent, os.O_DIRECTORY)
    except OSError as exc:
        log.error("could not write %s (%s); the damage is in the log", marker, exc.strerror)


def clear_damage_marker(marker: Path) -> None:
    if marker.exists():
        marker.unlink()
        log.warning("database passes its integrity check again; removed %s", marker)


def fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_database(path: Path) -> list[str]:
    """Synchronous integrity report for `kktd check-db`: an empty list means the database is sound. A WAL
    that is not the database's own is reported without opening anything (opening would apply it)."""
    from kktd.store.identity import check_wal

    wal = check_wal(path)
    if wal.refused:
        return [f"{path}: foreign WAL: {wal.detail}"]
    if not path.exists():
        return [f"{path}: no such file"]
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return [f"{path}: cannot open: {exc}"]
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check") if row[0] != "ok"]
        if not problems:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                problems.append(f"{path}: schema v{version}, this kktd expects v{SCHEMA_VERSION}")
        return problems
    except sqlite3.DatabaseError as exc:
        return [f"{path}: {exc}"]
    finally:
        conn.close()
