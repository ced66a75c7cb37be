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

RECEIPT_COLUMN_NAMES = (
    "receipt_id", "idempotency_key", "body", "total", "status", "attempts", "last_error", "accepted_ms",
    "updated_ms", "sent_ms", "fiscal_document_number", "fiscal_sign", "ofd_received_at",
)
RECEIPT_COLUMNS = ", ".join(RECEIPT_COLUMN_NAMES)

T = TypeVar("T")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339(ms: int) -> str:
    """A stored millisecond timestamp as UTC RFC 3339, e.g. 2026-11-24T03:22:32.410Z (on every intake
    answer: kept cheap)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def new_receipt_ids(at_ms: int, count: int) -> list[str]:
    """Time-ordered (48-bit milliseconds) plus 80 random bits: sorts by acceptance, never guessable.
    One read of the system's randomness serves the whole group."""
    prefix = f"{at_ms:012x}"
    noise = secrets.token_hex(10 * count)
    return [prefix + noise[i * 20:(i + 1) * 20] for i in range(count)]


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

    def move(self, source: str, target: str, count: int) -> None:
        setattr(self, source, getattr(self, source) - count)
        setattr(self, target, getattr(self, target) + count)


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
    def __init__(self, path: Path, max_pending: int, conn: aiosqlite.Connection, counts: Counts,
                 checked_at_open: bool) -> None:
        self.path = path
        # After a clean shutdown the integrity check is left to verify_in_background(), after READY.
        self.checked_at_open = checked_at_open
        self.damage: str | None = None
        self.max_pending = max_pending
        self.counts = counts
        self._conn = conn
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._wedged = asyncio.Event()
        self.commits = 0
        self.committed_rows = 0
        self.last_intake_monotonic = 0.0  # when the last receipt was committed: the sync loop yields to intake

    # ---- lifecycle ----

    @classmethod
    async def open(cls, path: Path, max_pending: int) -> Buffer:
        """Open (creating if new), verify PRAGMAs, migrate, count, start the writer. The integrity check
        runs here, before the caller may announce readiness, unless the last run closed the database
        cleanly: then verify_in_background() runs it without holding up start-up.

        SQLite deletes the -wal file when the last connection closes cleanly (and fsyncs its directory when
        it creates it), so a -wal file found before connecting means a crash, a kill, a power cut or a
        failed final checkpoint: exactly when damage is plausible, so the check comes first."""
        path = Path(path)
        is_new = not path.exists()
        marker = damage_marker(path)
        clean = not is_new and not Path(f"{path}-wal").exists() and not marker.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(f"cannot open database {path}: {exc}") from exc
        try:
            await _configure(conn, path)
            await _migrate(conn, path)
            if not clean:
                await _quick_check(conn, path)
                _clear_damage_marker(marker)
            counts = await _count(conn)
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise _classify_open_error(exc, path) from exc
        except BaseException:
            await conn.close()
            raise
        if is_new:
            # SQLite fsyncs its journals' directory, not the main file's: make the new file's entry durable.
            _fsync(path.parent, os.O_DIRECTORY)
        buffer = cls(path, max_pending, conn, counts, checked_at_open=not clean)
        buffer._writer = asyncio.get_running_loop().create_task(buffer._write_loop(), name="kktd-db-writer")
        state = "new" if is_new else ("closed cleanly last time" if clean else "recovered after an unclean stop")
        log.info(
            "buffer open: %s (schema v%d, %s, integrity %s): pending=%d failed=%d sent=%d",
            path, SCHEMA_VERSION, state, "checked" if not clean else "check deferred until after start-up",
            counts.pending, counts.failed, counts.sent,
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

    async def verify_in_background(self) -> str | None:
        """The integrity check deferred by open(), on a read-only connection of its own: WAL readers never
        block the writer, so intake goes on meanwhile. Returns the damage found, None if sound."""
        if self.checked_at_open:
            return None
        started = time.monotonic()
        try:
            conn = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            return f"cannot open database {self.path} for its integrity check: {exc}"
        try:
            await _quick_check(conn, self.path)
        except asyncio.CancelledError:
            # Stopping: abort the scan now rather than read the rest of a large file first.
            await conn.interrupt()
            raise
        except CorruptDatabase as exc:
            self.damage = str(exc)
            _write_damage_marker(damage_marker(self.path), self.damage)
            return self.damage
        finally:
            await conn.close()
        log.info("integrity check of %s: ok (%.2fs, after start-up)", self.path, time.monotonic() - started)
        return None

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
        # Not shielded: if the caller goes away the receipt is still committed, only the answer is dropped.
        return await future

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
        sql = ("SELECT seq, receipt_id, idempotency_key, accepted_ms, body FROM receipts "
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
        """Record the OFD's answers for a batch: one statement (one transaction, one round trip) per outcome.
        The counters move inside the writer's job, with the rows: a failure or a cancelled caller after one
        statement cannot leave them apart."""
        stamp = now_ms()
        if delivered:
            rows = [(d.receipt_id, d.fiscal_document_number, d.fiscal_sign, d.ofd_received_at) for d in delivered]

            async def mark_sent(conn: aiosqlite.Connection) -> None:
                sent = await _update_from_values(
                    conn, "status = 'sent', last_error = NULL, sent_ms = ?1, updated_ms = ?1, "
                          "fiscal_document_number = v.column2, fiscal_sign = v.column3, ofd_received_at = v.column4",
                    stamp, rows)
                self.counts.move("pending", "sent", sent)

            await self._call(mark_sent)
        if rejected:
            reasons = [(r.receipt_id, r.reason) for r in rejected]

            async def mark_failed(conn: aiosqlite.Connection) -> None:
                failed = await _update_from_values(
                    conn, "status = 'failed', last_error = v.column2, updated_ms = ?1", stamp, reasons)
                self.counts.move("pending", "failed", failed)

            await self._call(mark_failed)

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
            self.counts.move("pending", "failed", len(moved))
            return moved

        return await self._call(run)

    async def dead_letters(self, limit: int, after_seq: int = 0) -> list[dict[str, Any]]:
        rows = await self._call(lambda conn: _fetch_all(
            conn, f"SELECT {RECEIPT_COLUMNS} FROM receipts WHERE status = 'failed' AND seq > ? "
                  f"ORDER BY seq LIMIT ?", (after_seq, limit)))
        return [_receipt_row(row) for row in rows]

    async def requeue(self, receipt_id: str) -> bool:
        """Put a dead letter back to pending with a fresh attempt count. False if it is not a dead letter.
        (It stays undelivered either way, so capacity does not change.)"""
        stamp = now_ms()

        async def run(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE receipts SET status = 'pending', attempts = 0, updated_ms = ? "
                "WHERE receipt_id = ? AND status = 'failed'", (stamp, receipt_id))
            self.counts.move("failed", "pending", cursor.rowcount)
            return cursor.rowcount

        return bool(await self._call(run))

    async def prune_sent(self, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` sent receipts acknowledged before `older_than_ms` (retention)."""
        async def run(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM receipts WHERE seq IN (SELECT seq FROM receipts WHERE status = 'sent' "
                "AND sent_ms < ? ORDER BY sent_ms LIMIT ?)", (older_than_ms, limit))
            self.counts.sent -= cursor.rowcount
            return cursor.rowcount

        return await self._call(run)

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
        """One multi-row INSERT for the whole group: in autocommit it is its own transaction, so the rows
        are committed (fsynced) before the statement returns, in a single round trip to the SQLite thread.
        Keys that already exist (replays) and a group larger than the free capacity take extra queries."""
        stamp = now_ms()
        free = self.max_pending - self.counts.undelivered
        existing: dict[str, tuple[Any, ...]] = {}
        candidates = intakes
        if len(intakes) > free:
            existing = await self._existing([i.receipt.idempotency_key for i in intakes])
            candidates = _within_capacity(intakes, existing, free)
        ids = dict(zip(map(id, candidates), new_receipt_ids(stamp, len(candidates))))
        inserted: set[str] = set()
        if candidates:
            inserted = await self._insert_rows(
                [(ids[id(i)], i.receipt.idempotency_key, i.receipt.body_hash, i.receipt.canonical_json,
                  i.receipt.pos_id, i.receipt.total, stamp, stamp) for i in candidates])
            self.counts.pending += len(inserted)
            self.commits += 1
            self.committed_rows += len(inserted)
            self.last_intake_monotonic = time.monotonic()
        missing = [i.receipt.idempotency_key for i in intakes
                   if ids.get(id(i)) not in inserted and i.receipt.idempotency_key not in existing]
        lookup_failed: StorageUnavailable | None = None
        if missing:
            try:
                existing.update(await self._existing(missing))
            except sqlite3.Error as exc:
                # The rows inserted above are committed: they are answered as such all the same.
                lookup_failed = StorageUnavailable(_describe(exc))
                log.error("looking up %d existing idempotency keys failed: %s", len(missing), lookup_failed)
        results: list[Accepted | Conflict | Exception] = []
        for intake in intakes:
            receipt_id = ids.get(id(intake))
            if receipt_id in inserted:
                results.append(Accepted(receipt_id, True, intake.receipt.total, stamp, "pending"))
            elif intake.receipt.idempotency_key in existing:
                results.append(_replay(existing[intake.receipt.idempotency_key], intake.receipt))
            else:
                results.append(lookup_failed or BufferFull(self.max_pending))
        return results

    async def _insert_rows(self, rows: list[tuple[Any, ...]]) -> set[str]:
        values = ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
        returned = await self._conn.execute_fetchall(
            "INSERT INTO receipts (receipt_id, idempotency_key, body_hash, body, pos_id, total, accepted_ms, "
            f"updated_ms) VALUES {values} ON CONFLICT (idempotency_key) DO NOTHING RETURNING receipt_id",
            [value for row in rows for value in row])
        return {row[0] for row in returned}

    async def _existing(self, keys: list[str]) -> dict[str, tuple[Any, ...]]:
        found: dict[str, tuple[Any, ...]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), SQL_PARAM_CHUNK):
            chunk = unique[start:start + SQL_PARAM_CHUNK]
            rows = await _fetch_all(
                self._conn,
                f"SELECT idempotency_key, receipt_id, body_hash, total, accepted_ms, status FROM receipts "
                f"WHERE idempotency_key IN ({','.join('?' * len(chunk))})", chunk)
            for key, receipt_id, body_hash, total, accepted_ms, status in rows:
                found[key] = (receipt_id, body_hash, total, accepted_ms, status)
        return found


def _within_capacity(intakes: list[_Intake], existing: dict[str, tuple[Any, ...]], free: int) -> list[_Intake]:
    """The intakes that may be inserted: new keys, first occurrence only, no more than `free` of them."""
    chosen: list[_Intake] = []
    seen: set[str] = set()
    for intake in intakes:
        key = intake.receipt.idempotency_key
        if key in existing or key in seen:
            continue
        seen.add(key)
        if len(chosen) < free:
            chosen.append(intake)
    return chosen


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
    return dict(zip(RECEIPT_COLUMN_NAMES, row))


# execute_fetchall is one round trip to the SQLite thread; execute + fetch + close would be three.
async def _fetch_one(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> Any:
    rows = await _fetch_all(conn, sql, params)
    return rows[0] if rows else None


async def _fetch_all(conn: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    return list(await conn.execute_fetchall(sql, tuple(params)))


async def _update_from_values(conn: aiosqlite.Connection, assignments: str, stamp: int,
                              rows: list[tuple[Any, ...]]) -> int:
    """UPDATE pending receipts from a VALUES list whose first column is the receipt_id; returns rows changed."""
    width = len(rows[0])
    placeholders = ",".join(["(" + ",".join(["?"] * width) + ")"] * len(rows))
    # ?1 is the timestamp; the VALUES placeholders are numbered after it.
    numbered = _number_placeholders(placeholders, start=2)
    cursor = await conn.execute(
        f"UPDATE receipts SET {assignments} FROM (VALUES {numbered}) AS v "
        f"WHERE receipts.receipt_id = v.column1 AND receipts.status = 'pending'",
        [stamp, *(value for row in rows for value in row)])
    return cursor.rowcount


def _number_placeholders(text: str, start: int) -> str:
    parts = text.split("?")
    return "".join(f"{part}?{start + i}" if i < len(parts) - 1 else part for i, part in enumerate(parts))


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


def damage_marker(path: Path) -> Path:
    """Beside the database: written when damage is found after start-up, so that every later start checks
    first (a clean stop would otherwise let the next start defer the check again)."""
    return Path(f"{path}.damaged")


def _write_damage_marker(marker: Path, reason: str) -> None:
    try:
        marker.write_text(reason + "\n")
        _fsync(marker)
        _fsync(marker.parent, os.O_DIRECTORY)
    except OSError as exc:
        log.error("could not write %s (%s); the damage is in the log", marker, exc.strerror)


def _clear_damage_marker(marker: Path) -> None:
    if marker.exists():
        marker.unlink()
        log.warning("database passes its integrity check again; removed %s", marker)


def _fsync(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
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
