"""The receipt buffer: the only code that touches SQLite.

One aiosqlite connection, owned by one writer task. Every operation (intake, reads, sync updates) is a job on
the writer's queue, so nothing ever runs in the middle of another job's transaction. Intakes that arrive while
a transaction commits are gathered into the next one (group commit): each caller is answered only after the
COMMIT that holds its row has returned, with WAL + synchronous=FULL, i.e. after fsync.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import aiosqlite

from kktd.errors import BufferFull, CorruptDatabase, StorageUnavailable
from kktd.receipt import Receipt

log = logging.getLogger("kktd.buffer")

SCHEMA_VERSION = 1
MAX_GROUP = 512  # intakes per transaction; bounds the latency of the first caller in a burst
SQL_PARAM_CHUNK = 500  # stays well under SQLite's bound-parameter limit

PRAGMAS: tuple[tuple[str, str, Any], ...] = (
    # (pragma, value set, value expected when read back)
    ("journal_mode", "WAL", "wal"),
    ("synchronous", "FULL", 2),
    ("wal_autocheckpoint", "100", 100),
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
}

RECEIPT_COLUMNS = (
    "receipt_id, idempotency_key, body, total, status, attempts, last_error, accepted_ms, updated_ms, "
    "sent_ms, fiscal_document_number, fiscal_sign, ofd_received_at"
)

T = TypeVar("T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_receipt_id(at_ms: int) -> str:
    """Time-ordered (48-bit milliseconds) plus 80 random bits: sorts by acceptance, never guessable."""
    return f"{at_ms:012x}{secrets.randbits(80):020x}"


@dataclass(frozen=True, slots=True)
class Accepted:
    receipt_id: str
    created: bool
    total: int
    accepted_ms: int
    status: str


@dataclass(frozen=True, slots=True)
class Conflict:
    """The idempotency key is taken by a receipt with a different body."""

    receipt_id: str


@dataclass(frozen=True, slots=True)
class PendingReceipt:
    seq: int
    receipt_id: str
    idempotency_key: str
    accepted_ms: int
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivered:
    receipt_id: str
    fiscal_document_number: int
    fiscal_sign: str
    ofd_received_at: str


@dataclass(frozen=True, slots=True)
class Rejected:
    receipt_id: str
    reason: str


@dataclass
class Counts:
    pending: int = 0
    sent: int = 0
    failed: int = 0

    @property
    def undelivered(self) -> int:
        return self.pending + self.failed


@dataclass
class _Intake:
    receipt: Receipt
    future: asyncio.Future[Accepted | Conflict]


@dataclass
class _Job:
    fn: Callable[[aiosqlite.Connection], Awaitable[Any]]
    future: asyncio.Future[Any]


_STOP = object()


class Buffer:
    def __init__(self, path: Path, max_pending: int, conn: aiosqlite.Connection, counts: Counts) -> None:
        self.path = path
        self.max_pending = max_pending
        self.counts = counts
        self._conn = conn
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._wedged = asyncio.Event()
        self.commits = 0
        self.committed_rows = 0

    # ---- lifecycle ----

    @classmethod
    async def open(cls, path: Path, max_pending: int) -> Buffer:
        """Open (creating if new), verify PRAGMAs, migrate, check integrity, count, start the writer."""
        path = Path(path)
        is_new = not path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(f"cannot open database {path}: {exc}") from exc
        try:
            await _configure(conn, path)
            await _migrate(conn, path)
            await _quick_check(conn, path)
            counts = await _count(conn)
        except BaseException:
            await conn.close()
            raise
        if is_new:
            _fsync_directory(path.parent)
        buffer = cls(path, max_pending, conn, counts)
        buffer._writer = asyncio.get_running_loop().create_task(buffer._write_loop(), name="kktd-db-writer")
        log.info(
            "buffer open: %s (schema v%d, %s): pending=%d failed=%d sent=%d",
            path, SCHEMA_VERSION, "new" if is_new else "recovered", counts.pending, counts.failed, counts.sent,
        )
        return buffer

    async def close(self, timeout: float | None = None) -> None:
        """Finish every queued job (in-flight commits), then close the connection. A writer that does not
        finish within `timeout` (wedged in the disk) is cancelled: its uncommitted work was never answered."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(_STOP)
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout)
            except asyncio.TimeoutError:
                log.error("database writer did not finish within %gs; abandoning queued work", timeout)
                self._writer.cancel()
                self._drain_after_stop()
                await asyncio.gather(self._writer, return_exceptions=True)
        try:
            await asyncio.wait_for(self._conn.close(), timeout)
        except asyncio.TimeoutError:
            log.error("database connection did not close within %gs", timeout)
        log.info("buffer closed: %s", self.path)

    @property
    def writer_alive(self) -> bool:
        return self._writer is not None and not self._writer.done()

    def wedge_writer(self) -> None:
        """Test-only fault: the writer stops taking jobs, as if stuck in the disk."""
        self._wedged.set()

    # ---- intake ----

    async def accept(self, receipt: Receipt) -> Accepted | Conflict:
        """Store a receipt (or find it by its idempotency key); returns after the COMMIT that holds it."""
        future: asyncio.Future[Accepted | Conflict] = asyncio.get_running_loop().create_future()
        self._submit(_Intake(receipt, future))
        return await asyncio.shield(future)

    # ---- everything else runs as a job between transactions ----

    async def _call(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Job(fn, future))
        return await asyncio.shield(future)

    def _submit(self, item: _Intake | _Job) -> None:
        if self._closing or not self.writer_alive:
            raise StorageUnavailable("the buffer is closed")
        self._queue.put_nowait(item)

    async def ping(self) -> None:
        """A round trip through the writer and the database: proves neither is wedged."""
        await self._call(lambda conn: _fetch_one(conn, "SELECT 1"))

    async def get(self, receipt_id: str) -> dict[str, Any] | None:
        row = await self._call(
            lambda conn: _fetch_one(conn, f"SELECT {RECEIPT_COLUMNS} FROM receipts WHERE receipt_id = ?",
                                    (receipt_id,))
        )
        return _receipt_row(row) if row is not None else None

    async def oldest_pending_ms(self) -> int | None:
        row = await self._call(lambda conn: _fetch_one(
            conn, "SELECT accepted_ms FROM receipts WHERE status = 'pending' ORDER BY seq LIMIT 1"))
        return row[0] if row is not None else None

    async def size_bytes(self) -> int:
        def size_of(path: Path) -> int:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return 0
        return sum(size_of(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal", "-shm"))

    async def pending_batch(self, limit: int, after_seq: int = 0, exclude: Sequence[str] = ()) -> list[
            PendingReceipt]:
        """The oldest pending receipts after `after_seq`, skipping `exclude` (receipts held back by the loop)."""
        sql = ("SELECT seq, receipt_id, idempotency_key, accepted_ms, body, attempts FROM receipts "
               "WHERE status = 'pending' AND seq > ?")
        params: list[Any] = [after_seq]
        if exclude:
            sql += f" AND receipt_id NOT IN ({','.join('?' * len(exclude))})"
            params.extend(exclude)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        rows = await self._call(lambda conn: _fetch_all(conn, sql, params))
        return [PendingReceipt(*row) for row in rows]

    async def settle(self, delivered: Sequence[Delivered], rejected: Sequence[Rejected]) -> None:
        """Record the OFD's answers for a batch in one transaction."""
        if not delivered and not rejected:
            return
        stamp = now_ms()

        async def run(conn: aiosqlite.Connection) -> tuple[int, int]:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                sent = await _executemany_count(
                    conn,
                    "UPDATE receipts SET status = 'sent', last_error = NULL, "
                    "sent_ms = ?, updated_ms = ?, fiscal_document_number = ?, fiscal_sign = ?, "
                    "ofd_received_at = ? WHERE receipt_id = ? AND status = 'pending'",
                    [(stamp, stamp, d.fiscal_document_number, d.fiscal_sign, d.ofd_received_at, d.receipt_id)
                     for d in delivered],
                )
                failed = await _executemany_count(
                    conn,
                    "UPDATE receipts SET status = 'failed', last_error = ?, "
                    "updated_ms = ? WHERE receipt_id = ? AND status = 'pending'",
                    [(r.reason, stamp, r.receipt_id) for r in rejected],
                )
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
            return sent, failed

        sent, failed = await self._call(run)
        self.counts.pending -= sent + failed
        self.counts.sent += sent
        self.counts.failed += failed

    async def record_attempt_failure(self, receipt_ids: Sequence[str], reason: str, max_attempts: int,
                                     strike: bool) -> list[str]:
        """Note a failed delivery of these receipts. With `strike` (the failure is the receipts' own), count
        it in `attempts` and move those past max_attempts to failed. Returns the ids dead-lettered."""
        if not receipt_ids:
            return []
        stamp = now_ms()
        marks = ",".join("?" * len(receipt_ids))

        async def run(conn: aiosqlite.Connection) -> list[str]:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.execute(
                    f"UPDATE receipts SET attempts = attempts + ?, last_error = ?, updated_ms = ? "
                    f"WHERE status = 'pending' AND receipt_id IN ({marks})",
                    (int(strike), reason, stamp, *receipt_ids))
                moved: list[str] = []
                if strike:
                    rows = await _fetch_all(
                        conn, f"SELECT receipt_id FROM receipts WHERE status = 'pending' AND attempts > ? "
                              f"AND receipt_id IN ({marks})", (max_attempts, *receipt_ids))
                    moved = [row[0] for row in rows]
                    if moved:
                        await conn.execute(
                            f"UPDATE receipts SET status = 'failed', last_error = ? "
                            f"WHERE receipt_id IN ({','.join('?' * len(moved))})",
                            (f"gave up after {max_attempts} failed deliveries: {reason}", *moved))
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise
            return moved

        moved = await self._call(run)
        self.counts.pending -= len(moved)
        self.counts.failed += len(moved)
        return moved

    async def dead_letters(self, limit: int, after_seq: int = 0) -> list[dict[str, Any]]:
        rows = await self._call(lambda conn: _fetch_all(
            conn, f"SELECT {RECEIPT_COLUMNS} FROM receipts WHERE status = 'failed' AND seq > ? "
                  f"ORDER BY seq LIMIT ?", (after_seq, limit)))
        return [_receipt_row(row) for row in rows]

    async def requeue(self, receipt_id: str) -> bool:
        """Put a dead letter back to pending with a fresh attempt count. False if it is not a dead letter."""
        if self.counts.pending + self.counts.failed > self.max_pending:
            raise BufferFull(self.max_pending)
        stamp = now_ms()

        async def run(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE receipts SET status = 'pending', attempts = 0, updated_ms = ? "
                "WHERE receipt_id = ? AND status = 'failed'", (stamp, receipt_id))
            return cursor.rowcount

        changed = await self._call(run)
        if changed:
            self.counts.failed -= 1
            self.counts.pending += 1
        return bool(changed)

    async def prune_sent(self, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` sent receipts acknowledged before `older_than_ms` (retention)."""
        async def run(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM receipts WHERE seq IN (SELECT seq FROM receipts WHERE status = 'sent' "
                "AND sent_ms < ? ORDER BY sent_ms LIMIT ?)", (older_than_ms, limit))
            return cursor.rowcount

        deleted = await self._call(run)
        self.counts.sent -= deleted
        return deleted

    # ---- the writer ----

    async def _write_loop(self) -> None:
        while True:
            if self._wedged.is_set():
                log.warning("test fault: database writer wedged")
                await asyncio.Event().wait()
            first = await self._queue.get()
            batch = [first]
            while len(batch) < MAX_GROUP and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = any(item is _STOP for item in batch)
            intakes = [item for item in batch if isinstance(item, _Intake)]
            jobs = [item for item in batch if isinstance(item, _Job)]
            if intakes:
                await self._commit_intakes(intakes)
            for job in jobs:
                await self._run_job(job)
            if stop:
                self._drain_after_stop()
                return

    def _drain_after_stop(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, (_Intake, _Job)) and not item.future.done():
                item.future.set_exception(StorageUnavailable("the buffer is closing"))

    async def _run_job(self, job: _Job) -> None:
        try:
            result = await job.fn(self._conn)
        except sqlite3.Error as exc:
            log.error("database operation failed: %s", exc)
            _resolve_exception(job.future, StorageUnavailable(_describe(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not kill the writer
            log.exception("database job crashed")
            _resolve_exception(job.future, exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _commit_intakes(self, intakes: list[_Intake]) -> None:
        try:
            results = await self._insert_group(intakes)
        except sqlite3.Error as exc:
            await _rollback(self._conn)
            reason = _describe(exc)
            log.error("intake commit of %d receipts failed, none acknowledged: %s", len(intakes), reason)
            for intake in intakes:
                _resolve_exception(intake.future, StorageUnavailable(reason))
            return
        for intake, result in zip(intakes, results):
            if intake.future.done():
                continue
            if isinstance(result, Exception):
                intake.future.set_exception(result)
            else:
                intake.future.set_result(result)

    async def _insert_group(self, intakes: list[_Intake]) -> list[Accepted | Conflict | Exception]:
        keys = list({intake.receipt.idempotency_key for intake in intakes})
        existing = await self._existing(keys)
        stamp = now_ms()
        results: list[Accepted | Conflict | Exception] = []
        rows: list[tuple[Any, ...]] = []
        for intake in intakes:
            receipt = intake.receipt
            found = existing.get(receipt.idempotency_key)
            if found is not None:
                results.append(_replay(found, receipt))
                continue
            if self.counts.undelivered + len(rows) >= self.max_pending:
                results.append(BufferFull(self.max_pending))
                continue
            receipt_id = new_receipt_id(stamp)
            rows.append((receipt_id, receipt.idempotency_key, receipt.body_hash, receipt.canonical_json,
                         receipt.pos_id, receipt.total, stamp, stamp))
            accepted = Accepted(receipt_id, True, receipt.total, stamp, "pending")
            # A later duplicate in the same group finds this one, exactly as it would after the commit.
            existing[receipt.idempotency_key] = (receipt_id, receipt.body_hash, receipt.total, stamp, "pending")
            results.append(accepted)
        if rows:
            await self._conn.execute("BEGIN IMMEDIATE")
            await self._conn.executemany(
                "INSERT INTO receipts (receipt_id, idempotency_key, body_hash, body, pos_id, total, "
                "accepted_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            await self._conn.execute("COMMIT")
            self.counts.pending += len(rows)
            self.commits += 1
            self.committed_rows += len(rows)
        return results

    async def _existing(self, keys: list[str]) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        for start in range(0, len(keys), SQL_PARAM_CHUNK):
            chunk = keys[start:start + SQL_PARAM_CHUNK]
            rows = await _fetch_all(
                self._conn,
                f"SELECT idempotency_key, receipt_id, body_hash, total, accepted_ms, status FROM receipts "
                f"WHERE idempotency_key IN ({','.join('?' * len(chunk))})", chunk)
            for key, receipt_id, body_hash, total, accepted_ms, status in rows:
                found[key] = (receipt_id, body_hash, total, accepted_ms, status)
        return found


def _replay(found: tuple[Any, ...], receipt: Receipt) -> Accepted | Conflict:
    receipt_id, body_hash, total, accepted_ms, status = found
    if body_hash != receipt.body_hash:
        return Conflict(receipt_id)
    return Accepted(receipt_id, False, total, accepted_ms, status)


def _resolve_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "full" in text:
        return f"disk full: {text}"
    return text


def _receipt_row(row: Sequence[Any]) -> dict[str, Any]:
    names = [name.strip() for name in RECEIPT_COLUMNS.split(",")]
    return dict(zip(names, row))


async def _fetch_one(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> Any:
    async with conn.execute(sql, tuple(params)) as cursor:
        return await cursor.fetchone()


async def _fetch_all(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    async with conn.execute(sql, tuple(params)) as cursor:
        return list(await cursor.fetchall())


async def _executemany_count(conn: aiosqlite.Connection, sql: str, rows: list[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    cursor = await conn.executemany(sql, rows)
    return cursor.rowcount


async def _rollback(conn: aiosqlite.Connection) -> None:
    try:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("rollback failed: %s", exc)


async def _configure(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        for name, value, expected in PRAGMAS:
            await conn.execute(f"PRAGMA {name} = {value}")
            row = await _fetch_one(conn, f"PRAGMA {name}")
            actual = row[0] if row else None
            if actual != expected:
                raise StorageUnavailable(
                    f"database {path}: PRAGMA {name} is {actual!r} after setting {value} "
                    f"(the filesystem may not support it); refusing to run without it")
    except sqlite3.DatabaseError as exc:
        raise _classify_open_error(exc, path) from exc


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        row = await _fetch_one(conn, "PRAGMA user_version")
        version = row[0]
        if version > SCHEMA_VERSION:
            raise StorageUnavailable(
                f"database {path} has schema v{version}, newer than this kktd (v{SCHEMA_VERSION}); "
                f"refusing to touch it")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[target]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {target}")
            await conn.execute("COMMIT")
            log.info("database %s migrated to schema v%d", path, target)
    except sqlite3.DatabaseError as exc:
        await _rollback(conn)
        raise _classify_open_error(exc, path) from exc


async def _quick_check(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        rows = await _fetch_all(conn, "PRAGMA quick_check")
    except sqlite3.DatabaseError as exc:
        raise _classify_open_error(exc, path) from exc
    problems = [row[0] for row in rows if row[0] != "ok"]
    if problems:
        raise CorruptDatabase(f"database {path} failed its integrity check: {'; '.join(problems[:5])}")


async def _count(conn: aiosqlite.Connection) -> Counts:
    counts = Counts()
    for status in ("pending", "failed", "sent"):
        # The partial indexes make these index-only counts.
        row = await _fetch_one(conn, f"SELECT count(*) FROM receipts WHERE status = '{status}'")
        setattr(counts, status, row[0])
    return counts


def _classify_open_error(exc: sqlite3.DatabaseError, path: Path) -> Exception:
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and not _looks_corrupt(text):
        return StorageUnavailable(f"database {path}: {_describe(exc)}")
    return CorruptDatabase(f"database {path} is damaged: {text}")


def _looks_corrupt(text: str) -> bool:
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _fsync_directory(directory: Path) -> None:
    """SQLite fsyncs its journals' directory, not the main file's: make the new file's entry durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_database(path: Path) -> list[str]:
    """Synchronous integrity report for `kktd check-db`: an empty list means the database is sound."""
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
