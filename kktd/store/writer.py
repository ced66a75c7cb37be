"""The store: the only code that touches SQLite.

One aiosqlite connection, owned by one writer task. Every operation is a job on the writer's queue
(`Store.run`), as aiosqlite's own connection thread and Home Assistant's recorder queue do, so nothing ever
runs in the middle of another job's transaction. Intakes that arrive while a transaction commits are
gathered into the next one (group commit): each caller is answered only after the COMMIT that holds its row
has returned, with WAL + synchronous=FULL, i.e. after fsync.

Checkpoints (copying the WAL into the database file and fsyncing it) are kept out of the commits: SQLite's
automatic checkpoint is off (it would run inside the COMMIT that crosses its threshold), and the writer runs a
PASSIVE checkpoint between two transactions once the WAL holds CHECKPOINT_FRAMES frames not yet copied, at a
moment no intake is waiting (or, past CHECKPOINT_FORCE_FRAMES, at once). The new WAL's stamp
(kktd/store/identity.py) rides in the first transaction after it, which SQLite starts the new WAL with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from kktd.clock import now_ms
from kktd.errors import BufferFull, CorruptDatabase, ForeignWal, StorageUnavailable
from kktd.receipt import Receipt
from kktd.store import identity, queries, schema
from kktd.store.rows import (Accepted, Conflict, Counts, PendingReceipt, ReceiptRow, ReceiptStatus,
                             SubmittedReceipt)
from kktd.delivery import Fiscalized, NotRegistered, PollOutcome, Refused, Registered, SubmitOutcome

if TYPE_CHECKING:
    from kktd.metrics import Metrics

log = logging.getLogger("kktd.store")

MAX_GROUP = 512  # intakes per transaction; bounds the latency of the first caller in a burst
# A checkpoint is due once the WAL holds this many frames (pages) no checkpoint has copied yet: SQLite's own
# default (wal_autocheckpoint=1000, what `naive` runs with). Each checkpoint costs two flushes and the restart
# of the WAL a third, whatever it copies, so a trigger by rows (256 rows, issue 13) checkpointed eight times as
# often at 64 connections, where a row costs half a frame, as at one, where it costs four and a half.
CHECKPOINT_FRAMES = 1000
CHECKPOINT_FORCE_FRAMES = 4 * CHECKPOINT_FRAMES  # ...and past this it runs even while intakes are waiting
# Gathering on a slow disk (an SD card's flush takes milliseconds): see Store._gather.
SLOW_COMMIT_S = 0.001  # a group commit slower than this is a slow flush
GATHER_SHARE = 0.2  # wait at most this share of the last commit's duration for more receipts...
GATHER_MAX_S = 0.002  # ...and never longer than this
UNSENT = frozenset({ReceiptStatus.PENDING, ReceiptStatus.SUBMITTED})  # accepted, not fiscalized yet
STORY_CHUNK = 200  # receipts named in one journal entry (two fields each, under journald's field limit)

T = TypeVar("T")
Job = Callable[[aiosqlite.Connection], Awaitable[T]]


def new_receipt_ids(at_ms: int, count: int) -> list[str]:
    """Time-ordered (48-bit milliseconds) plus 80 random bits: sorts by acceptance, never guessable.
    One read of the system's randomness serves the whole group."""
    prefix = f"{at_ms:012x}"
    noise = secrets.token_hex(10 * count)
    return [prefix + noise[i * 20:(i + 1) * 20] for i in range(count)]


@dataclass
class _Intake:
    receipt: Receipt
    future: asyncio.Future[Accepted | Conflict]


@dataclass
class _Job:
    fn: Job[Any]
    future: asyncio.Future[Any]
    writes: bool = True  # False: it only reads, and may run before the WAL's stamp


_STOP = object()


class Store:
    def __init__(self, path: Path, max_pending: int, conn: aiosqlite.Connection, counts: Counts,
                 checked_at_open: bool, oldest_unsent_ms: int | None = None) -> None:
        self.path = path
        # After a clean shutdown the integrity check is left to verify_in_background(), after READY.
        self.checked_at_open = checked_at_open
        self.damage: str | None = None
        # Why the last commit was refused (disk full, I/O error, read-only filesystem), until one succeeds:
        # health reports it, since reads (and so a ping) still work while every intake fails.
        self.commit_failure: str | None = None
        self.max_pending = max_pending
        self.counts = counts
        self._conn = conn
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        # Held by whoever uses the connection: the writer task for a batch, or an intake committing itself
        # while the writer is idle (accept's fast path).
        self._conn_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._stamp: identity.Stamp | None = None
        self._needs_stamp = False  # a checkpoint ran: the next write must carry the stamp
        self._shm: int | None = None  # the -shm file, read for the WAL's frame count (identity.py)
        self.commits = 0
        self.committed_rows = 0
        self.last_intake_monotonic = 0.0  # when the last receipt was committed: the sync loop yields to intake
        self._last_group = 0  # intakes in the last group commit, and how long that commit took
        self._last_commit_s = 0.0
        self._queued_during_commit = 0
        self._gather_target = 0  # while gathering: the queue length that ends the wait
        self._gathered = asyncio.Event()
        self._checkpoint_queued = False
        # Frames the last checkpoint could not copy (a reader's snapshot, the integrity check's, still needed
        # them): the next one is due CHECKPOINT_FRAMES later, not after every batch until the reader is gone.
        self._uncopied_after_checkpoint = 0
        self.checkpoints = 0
        # accepted_ms of the oldest receipt not fiscalized yet (pending or submitted), kept by the writer as
        # rows move (like `counts`), so that a metrics scrape reads memory, never the database.
        self.oldest_unsent_known_ms = oldest_unsent_ms
        self.metrics: Metrics | None = None  # set by kktd.app.assemble

    # ---- lifecycle ----

    @classmethod
    async def open(cls, path: Path, max_pending: int) -> Store:
        """Open (creating if new), verify PRAGMAs, migrate, count, start the writer. The integrity check
        runs here, before the caller may announce readiness, unless the last run closed the database
        cleanly: then verify_in_background() runs it without holding up start-up.

        SQLite deletes the -wal file when the last connection closes cleanly (and fsyncs its directory when
        it creates it), so a -wal file found before connecting means a crash, a kill, a power cut or a
        failed final checkpoint: exactly when damage is plausible, so the check comes first."""
        path = Path(path)
        # Before SQLite sees the files: connecting would apply whatever -wal lies beside the database.
        wal = identity.check_wal(path)
        if wal.refused:
            raise ForeignWal(f"database {path}: {wal.detail}; kktd applies neither file to the other and "
                             f"changes neither. If {path} is the right database, move "
                             f"{identity.wal_path(path)} aside")
        if wal.verdict is identity.WalVerdict.UNSTAMPED:
            log.warning("%s", wal.detail)
        is_new = not path.exists()
        marker = schema.damage_marker(path)
        clean = not is_new and not Path(f"{path}-wal").exists() and not marker.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StorageUnavailable(f"cannot open database {path}: {exc}") from exc
        try:
            await schema.configure(conn, path)
            await schema.migrate(conn, path)
            if not clean:
                await schema.quick_check(conn, path)
                schema.clear_damage_marker(marker)
            counts = await queries.count_by_status(conn)
            stamp = await _read_identity(conn)
            await _name_in_header(conn, stamp)
            oldest = await queries.oldest_unsent_ms(conn)
        except sqlite3.DatabaseError as exc:
            await conn.close()
            raise schema.classify_open_error(exc, path) from exc
        except BaseException:
            await conn.close()
            raise
        if is_new:
            # SQLite fsyncs its journals' directory, not the main file's: make the new file's entry durable.
            schema.fsync(path.parent, os.O_DIRECTORY)
        store = cls(path, max_pending, conn, counts, checked_at_open=not clean, oldest_unsent_ms=oldest)
        store._stamp = stamp
        # Copy the verified WAL into the database and empty it; the next WAL then begins with a stamp.
        await store._checkpoint("TRUNCATE")
        await store._stamp_if_needed()
        store._writer = asyncio.get_running_loop().create_task(store._write_loop(), name="kktd-db-writer")
        state = "new" if is_new else ("closed cleanly last time" if clean else "recovered after an unclean stop")
        log.info(
            "buffer open: %s (schema v%d, %s, integrity %s): pending=%d submitted=%d failed=%d sent=%d",
            path, schema.SCHEMA_VERSION, state, "checked" if not clean else "check deferred until after start-up",
            counts.pending, counts.submitted, counts.failed, counts.sent,
        )
        return store

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
        self._close_shm()
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
            await schema.quick_check(conn, self.path)
        except asyncio.CancelledError:
            # Stopping: abort the scan now rather than read the rest of a large file first.
            await conn.interrupt()
            raise
        except CorruptDatabase as exc:
            self.damage = str(exc)
            schema.write_damage_marker(schema.damage_marker(self.path), self.damage)
            return self.damage
        finally:
            await conn.close()
        log.info("integrity check of %s: ok (%.2fs, after start-up)", self.path, time.monotonic() - started)
        return None

    @property
    def writer_alive(self) -> bool:
        return self._writer is not None and not self._writer.done()

    # ---- intake ----

    async def accept(self, receipt: Receipt) -> Accepted | Conflict:
        """Store a receipt (or find it by its idempotency key); returns after the COMMIT that holds it."""
        future: asyncio.Future[Accepted | Conflict] = asyncio.get_running_loop().create_future()
        intake = _Intake(receipt, future)
        if self._writer_idle():
            await self._commit_alone(intake)
        else:
            self._submit(intake)
        # Not shielded: if the caller goes away the receipt is still committed, only the answer is dropped.
        return await future

    def _writer_idle(self) -> bool:
        """Nothing queued and nobody on the connection: the writer task is parked on its empty queue (it
        takes the lock, without yielding, as soon as it takes an item). A WAL due for the writer's own
        checkpoint goes through the writer, which runs it."""
        return (self._queue.empty() and not self._conn_lock.locked() and not self._closing
                and self.writer_alive and not self._needs_stamp and not self._gathering_pays())

    def _gathering_pays(self) -> bool:
        """The last commit was slow and shared by several tills: the next one should gather them again."""
        return self._last_commit_s >= SLOW_COMMIT_S and self._last_group >= 2

    async def _commit_alone(self, intake: _Intake) -> None:
        """A group of one committed by the caller itself: the same statement and bookkeeping as the writer's,
        without the two hand-overs through the writer task (queue, then the answer's future). Intakes and
        jobs arriving meanwhile queue up for the writer, which waits for the lock."""
        async with self._conn_lock:
            try:
                await self._commit_intakes([intake])
            except asyncio.CancelledError:
                # The statement may still commit in aiosqlite's thread after this: recount behind it.
                self._submit(_Job(self._recount, asyncio.get_running_loop().create_future(), writes=False))
                raise
            if self._checkpoint_due() and not self._checkpoint_queued:
                # The writer runs it between transactions; this caller is answered now.
                self._checkpoint_queued = True
                self._submit(_Job(self._queued_checkpoint, asyncio.get_running_loop().create_future(),
                                  writes=False))

    async def _recount(self, conn: aiosqlite.Connection) -> None:
        self.counts = await queries.count_by_status(conn)
        self.oldest_unsent_known_ms = await queries.oldest_unsent_ms(conn)

    # ---- every other operation is a job, run between transactions ----

    async def run(self, job: Job[T], writes: bool = True) -> T:
        """Run `job(connection)` on the writer, between transactions; its result or exception is returned.
        A caller that goes away does not cancel a job already queued (it may hold a transaction). A job that
        only reads says so (`writes=False`): after a checkpoint it need not wait for the WAL's stamp."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Job(job, future, writes))
        return await asyncio.shield(future)

    async def read(self, job: Job[T]) -> T:
        """`run` for a job that only reads."""
        return await self.run(job, writes=False)

    def _submit(self, item: _Intake | _Job) -> None:
        if self._closing or not self.writer_alive:
            raise StorageUnavailable("the buffer is closed")
        self._queue.put_nowait(item)
        if self._gather_target and self._queue.qsize() + 1 >= self._gather_target:
            self._gathered.set()

    async def ping(self) -> None:
        """A round trip through the writer and the database: proves neither is wedged."""
        await self.read(lambda conn: schema.fetch_one(conn, "SELECT 1"))

    async def get(self, receipt_id: str) -> ReceiptRow | None:
        return await self.read(lambda conn: queries.receipt(conn, receipt_id))

    async def receipts_accepted_between(self, since_ms: int, until_ms: int | None, after_id: str | None,
                                        limit: int) -> list[ReceiptRow]:
        return await self.read(lambda conn: queries.accepted_between(conn, since_ms, until_ms, after_id, limit))

    async def oldest_unsent_ms(self) -> int | None:
        """When the oldest receipt not fiscalized yet (pending or submitted) was accepted."""
        return await self.read(queries.oldest_unsent_ms)

    async def size_bytes(self) -> int:
        def size_of(path: Path) -> int:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return 0
        return sum(size_of(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal", "-shm"))

    async def pending_batch(self, limit: int, after_seq: int = 0,
                            exclude: Sequence[str] = ()) -> list[PendingReceipt]:
        return await self.read(lambda conn: queries.pending_batch(conn, limit, after_seq, exclude))

    async def submitted_batch(self, limit: int, after_seq: int = 0) -> list[SubmittedReceipt]:
        return await self.read(lambda conn: queries.submitted_batch(conn, limit, after_seq))

    async def dead_letters(self, limit: int, after_seq: int = 0) -> list[ReceiptRow]:
        return await self.read(lambda conn: queries.dead_letters(conn, limit, after_seq))

    async def settle(self, outcomes: Sequence[SubmitOutcome | PollOutcome],
                     source: ReceiptStatus = ReceiptStatus.PENDING) -> None:
        """Record the upstream's answers about receipts in status `source` (pending for a submission,
        submitted for a poll): one statement (one transaction, one round trip) per kind of outcome. The
        counters move inside the writer's job, with the rows: a failure or a cancelled caller after one
        statement cannot leave them apart. Outcomes that change nothing (still processing, undelivered) are
        the caller's."""
        stamp = now_ms()
        fiscalized = [o for o in outcomes if isinstance(o, Fiscalized)]
        refused = [o for o in outcomes if isinstance(o, Refused)]
        registered = [o for o in outcomes if isinstance(o, Registered)]
        not_registered = [o for o in outcomes if isinstance(o, NotRegistered)]
        if registered:
            # First: the upstream's reference must be committed before anything else can go wrong.
            await self._moving(ReceiptStatus.PENDING, ReceiptStatus.SUBMITTED,
                               lambda conn: queries.mark_submitted(conn, stamp, registered))
        if fiscalized:
            await self._moving(source, ReceiptStatus.SENT,
                               lambda conn: queries.mark_sent(conn, stamp, source, fiscalized))
        if refused:
            await self._moving(source, ReceiptStatus.FAILED,
                               lambda conn: queries.mark_refused(conn, stamp, source, refused))
        if not_registered:
            await self._moving(ReceiptStatus.SUBMITTED, ReceiptStatus.PENDING,
                               lambda conn: queries.mark_not_registered(conn, stamp, not_registered))

    async def record_attempt_failure(self, receipt_ids: Sequence[str], reason: str, max_attempts: int,
                                     strike: bool) -> list[str]:
        """Note a failed delivery; with `strike`, count it and dead-letter those past max_attempts."""
        if not receipt_ids:
            return []

        async def job(conn: aiosqlite.Connection) -> list[str]:
            moved = await queries.record_attempt_failure(conn, now_ms(), receipt_ids, reason, max_attempts, strike)
            self.counts.move(ReceiptStatus.PENDING, ReceiptStatus.FAILED, len(moved))
            if moved:
                await self._refresh_oldest(conn)
            return moved

        return await self.run(job)

    async def requeue(self, receipt_id: str) -> bool:
        """Put a dead letter back to pending with a fresh attempt count. False if it is not a dead letter.
        (It stays undelivered either way, so capacity does not change.)"""
        stamp = now_ms()
        return bool(await self._moving(ReceiptStatus.FAILED, ReceiptStatus.PENDING,
                                       lambda conn: queries.requeue(conn, stamp, receipt_id)))

    async def prune_sent(self, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` sent receipts acknowledged before `older_than_ms` (retention)."""
        async def job(conn: aiosqlite.Connection) -> int:
            deleted = await queries.prune_sent(conn, older_than_ms, limit)
            self.counts.sent -= deleted
            return deleted

        return await self.run(job)

    async def _moving(self, source: ReceiptStatus, target: ReceiptStatus, update: Job[int]) -> int:
        async def job(conn: aiosqlite.Connection) -> int:
            changed = await update(conn)
            self.counts.move(source, target, changed)
            if changed and (source in UNSENT) != (target in UNSENT):
                await self._refresh_oldest(conn)
            return changed

        return await self.run(job)

    async def _refresh_oldest(self, conn: aiosqlite.Connection) -> None:
        """After rows left or joined the unsent ones: lookups on the partial indexes, inside the job that
        moved them."""
        self.oldest_unsent_known_ms = await queries.oldest_unsent_ms(conn)

    # ---- the writer ----

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if isinstance(first, _Intake) and self._gathering_pays():
                await self._gather()
            # No await between taking the item and holding the lock unless an intake's own commit holds it.
            async with self._conn_lock:
                if await self._write_batch(first):
                    return

    async def _gather(self) -> None:
        """On a slow disk, wait a moment for the tills the last commit answered to send their next receipt.
        Without it, group commit splits into cohorts: the first receipt to arrive after a commit starts the
        next one at once, everyone arriving a few hundred microseconds later waits a whole flush for the one
        after, and the groups settle at half the tills each (measured at 16 connections on a 5 ms flush:
        groups of 8). The wait ends as soon as as many receipts are queued as the last group held, and never
        lasts longer than GATHER_SHARE of the last commit (GATHER_MAX_S at most). A fast disk (commits under
        SLOW_COMMIT_S) or a single till (groups of one) never waits."""
        # The tills the last commit answered, and those that queued up while it ran.
        self._gather_target = self._last_group + self._queued_during_commit
        self._gathered.clear()
        if self._queue.qsize() + 1 < self._gather_target:  # the item the loop took counts too
            try:
                await asyncio.wait_for(self._gathered.wait(),
                                       min(GATHER_MAX_S, GATHER_SHARE * self._last_commit_s))
            except asyncio.TimeoutError:
                pass
        self._gather_target = 0

    async def _write_batch(self, first: Any) -> bool:
        """`first` and everything queued behind it: one group commit for the intakes, then the jobs. True
        once the stop marker was seen."""
        batch = [first]
        while len(batch) < MAX_GROUP and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        stop = any(item is _STOP for item in batch)
        intakes = [item for item in batch if isinstance(item, _Intake)]
        jobs = [item for item in batch if isinstance(item, _Job)]
        if intakes:
            started = time.monotonic()
            await self._commit_intakes(intakes, carry_stamp=self._needs_stamp)
            self._last_commit_s, self._last_group = time.monotonic() - started, len(intakes)
            self._queued_during_commit = self._queue.qsize()
        if any(job.writes for job in jobs):
            # No intake carried the stamp: a job's write must not start the WAL unstamped.
            await self._stamp_if_needed()
        for job in jobs:
            await self._run_job(job)
        await self._checkpoint_if_due()
        if stop:
            self._drain_after_stop()
            return True
        return False


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
            if schema.refuses_writes(exc):
                self._commit_refused(schema.describe_error(exc))
            _resolve_exception(job.future, StorageUnavailable(schema.describe_error(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not kill the writer
            log.exception("database job crashed")
            _resolve_exception(job.future, exc)
        else:
            if not job.future.done():
                job.future.set_result(result)

    async def _commit_intakes(self, intakes: list[_Intake], carry_stamp: bool = False) -> None:
        """Commit a group and answer it. With `carry_stamp` (the writer's, after a checkpoint) the group's
        INSERT and the WAL's stamp are one transaction: the stamp costs no flush of its own."""
        try:
            results = await self._insert_group(intakes, carry_stamp)
        except sqlite3.Error as exc:
            await schema.rollback(self._conn)
            reason = schema.describe_error(exc)
            log.error("intake commit of %d receipts failed, none acknowledged: %s", len(intakes), reason)
            self._commit_refused(reason)
            for intake in intakes:
                _resolve_exception(intake.future, StorageUnavailable(reason))
            return
        if self.commit_failure is not None:
            log.info("the database takes commits again (after: %s)", self.commit_failure)
            self.commit_failure = None
        for intake, result in zip(intakes, results):
            if intake.future.done():
                continue
            if isinstance(result, Exception):
                intake.future.set_exception(result)
            else:
                intake.future.set_result(result)

    def _frames_to_checkpoint(self) -> int | None:
        """The WAL's frames no checkpoint has copied yet, read from the WAL-index header in the -shm file
        (a read of 100 bytes from the page cache, between transactions: nothing is changing it). None if it
        cannot be read, which does not happen while SQLite uses the file."""
        try:
            if self._shm is None:
                self._shm = os.open(identity.shm_path(self.path), os.O_RDONLY | os.O_CLOEXEC)
            frames = identity.frames_to_checkpoint(os.pread(self._shm, identity.WAL_INDEX_READ, 0))
        except OSError:
            frames = None
        if frames is None:
            self._close_shm()
        return frames

    def _close_shm(self) -> None:
        if self._shm is not None:
            os.close(self._shm)
            self._shm = None

    def _new_frames(self) -> int:
        """Frames written since the last checkpoint, beyond those it could not copy. Unknown: as many as
        force one (checkpointing too often is slow; a WAL that grows without bound is worse)."""
        frames = self._frames_to_checkpoint()
        if frames is None:
            return CHECKPOINT_FORCE_FRAMES
        return frames - self._uncopied_after_checkpoint

    def _checkpoint_due(self) -> bool:
        return self._new_frames() >= CHECKPOINT_FRAMES

    async def _queued_checkpoint(self, _conn: aiosqlite.Connection) -> None:
        self._checkpoint_queued = False
        await self._checkpoint_if_due(waiting_ok=True)

    async def _checkpoint_if_due(self, waiting_ok: bool = False) -> None:
        """Between transactions, once the WAL holds CHECKPOINT_FRAMES frames not yet copied: PASSIVE (it never
        waits for the background integrity check's reader). Not while intakes are waiting for the writer,
        unless the WAL has reached CHECKPOINT_FORCE_FRAMES."""
        if self._stamp is None:
            return
        frames = self._new_frames()
        if frames < CHECKPOINT_FRAMES:
            return
        if not waiting_ok and not self._queue.empty() and frames < CHECKPOINT_FORCE_FRAMES:
            return
        await self._checkpoint("PASSIVE")
        self._uncopied_after_checkpoint = self._frames_to_checkpoint() or 0
        self.checkpoints += 1

    async def _checkpoint(self, mode: str) -> None:
        """SQLite restarts the WAL at the first write after a checkpoint that copied everything: from here
        on that write must carry the stamp (the next intake group does; a job first stamps alone), so every
        WAL kktd writes begins with one (kktd/store/identity.py)."""
        try:
            await self._conn.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as exc:
            log.error("checkpoint of %s failed: %s", self.path, schema.describe_error(exc))
            if schema.refuses_writes(exc):
                self._commit_refused(schema.describe_error(exc))
        self._needs_stamp = True

    async def _stamp_if_needed(self) -> None:
        """The stamp alone, when a checkpoint ran and no intake group carried it yet. If it cannot be written
        (a full disk, an I/O error) it stays due: the next group carries it or the next writing job tries
        again, and that job's own write meets the same refusal."""
        if not self._needs_stamp or self._stamp is None:
            return
        try:
            self._stamp = await _write_stamp(self._conn, self._stamp)
        except sqlite3.Error as exc:
            reason = schema.describe_error(exc)
            log.error("cannot stamp the WAL of %s: %s", self.path, reason)
            if schema.refuses_writes(exc):
                self._commit_refused(reason)
            return
        self._needs_stamp = False

    def _commit_refused(self, reason: str) -> None:
        self.commit_failure = reason

    async def _insert_stamped(self, rows: list[tuple[Any, ...]]) -> set[str]:
        """The first write after a checkpoint: the stamp and the group in one transaction (four round trips
        to SQLite's thread instead of one, but a single flush instead of two commits' worth). Run by the
        writer task only, which nobody cancels mid-transaction; a failure is rolled back by the caller."""
        assert self._stamp is not None
        await self._conn.execute("BEGIN IMMEDIATE")
        stamp = await _write_stamp(self._conn, self._stamp)
        inserted = await queries.insert_receipts(self._conn, rows)
        await self._conn.execute("COMMIT")
        self._stamp, self._needs_stamp = stamp, False
        return inserted

    async def _insert_group(self, intakes: list[_Intake],
                            carry_stamp: bool = False) -> list[Accepted | Conflict | Exception]:
        """One multi-row INSERT for the whole group (queries.insert_receipts). Keys that already exist
        (replays) and a group larger than the free capacity take extra queries."""
        stamp = now_ms()
        free = self.max_pending - self.counts.undelivered
        existing: dict[str, tuple[Any, ...]] = {}
        candidates = intakes
        if len(intakes) > free:
            existing = await queries.existing_keys(self._conn, [i.receipt.idempotency_key for i in intakes])
            candidates = _within_capacity(intakes, existing, free)
        ids = dict(zip(map(id, candidates), new_receipt_ids(stamp, len(candidates))))
        inserted: set[str] = set()
        if candidates:
            rows = [(ids[id(i)], i.receipt.idempotency_key, i.receipt.body_hash, i.receipt.canonical_json,
                     i.receipt.pos_id, i.receipt.total, stamp, stamp) for i in candidates]
            if carry_stamp:
                inserted = await self._insert_stamped(rows)
            else:
                inserted = await queries.insert_receipts(self._conn, rows)
            self.counts.pending += len(inserted)
            self.commits += 1
            self.committed_rows += len(inserted)
            self.last_intake_monotonic = time.monotonic()
            if self.oldest_unsent_known_ms is None and inserted:
                self.oldest_unsent_known_ms = stamp
            if self.metrics is not None:
                self.metrics.group_committed(len(inserted))
            if inserted:
                _log_accepted_chunks([(ids[id(i)], i.receipt.idempotency_key) for i in candidates
                                    if ids[id(i)] in inserted])
        missing = [i.receipt.idempotency_key for i in intakes
                   if ids.get(id(i)) not in inserted and i.receipt.idempotency_key not in existing]
        lookup_failed: StorageUnavailable | None = None
        if missing:
            try:
                existing.update(await queries.existing_keys(self._conn, missing))
            except sqlite3.Error as exc:
                # The rows inserted above are committed: they are answered as such all the same.
                lookup_failed = StorageUnavailable(schema.describe_error(exc))
                log.error("looking up %d existing idempotency keys failed: %s", len(missing), lookup_failed)
        results: list[Accepted | Conflict | Exception] = []
        for intake in intakes:
            receipt_id = ids.get(id(intake))
            if receipt_id in inserted:
                results.append(Accepted(receipt_id, True, intake.receipt.total, stamp, ReceiptStatus.PENDING))
            elif intake.receipt.idempotency_key in existing:
                results.append(_replay(existing[intake.receipt.idempotency_key], intake.receipt))
            else:
                results.append(lookup_failed or BufferFull(self.max_pending))
        return results


async def _read_identity(conn: aiosqlite.Connection) -> identity.Stamp:
    row = await schema.fetch_one(conn, "SELECT db_id, generation FROM kktd_identity WHERE id = 1")
    return identity.Stamp(bytes(row[0]), int(row[1]))


async def _name_in_header(conn: aiosqlite.Connection, stamp: identity.Stamp) -> None:
    """The id's first 4 bytes in the file header (once per database): readable mid-checkpoint too."""
    expected = identity.id_prefix(stamp.db_id)
    row = await schema.fetch_one(conn, "PRAGMA application_id")
    if row[0] != expected:
        await conn.execute(f"PRAGMA application_id = {expected}")


async def _write_stamp(conn: aiosqlite.Connection, previous: identity.Stamp) -> identity.Stamp:
    stamp = identity.Stamp(previous.db_id, previous.generation + 1)
    await conn.execute("UPDATE kktd_identity SET generation = ?, stamp = ? WHERE id = 1",
                       (stamp.generation, stamp.encode()))
    return stamp


def _log_accepted_chunks(accepted: list[tuple[str, str]]) -> None:
    """One journal entry per group commit (in chunks of STORY_CHUNK), carrying every receipt id and key
    of the group (journald fields may repeat): `journalctl RECEIPT_ID=<id>` finds it, at a cost per commit
    rather than per receipt."""
    for start in range(0, len(accepted), STORY_CHUNK):
        chunk = accepted[start:start + STORY_CHUNK]
        first, last = chunk[0][0], chunk[-1][0]
        what = first if len(accepted) == 1 else (
            f"{len(chunk)} receipts in one commit: {first} .. {last}" if len(chunk) == len(accepted) else
            f"{len(chunk)} of {len(accepted)} receipts in one commit: {first} .. {last}")
        log.info("accepted %s", what, extra={"receipt_id": [receipt_id for receipt_id, _ in chunk],
                                            "idempotency_key": [key for _, key in chunk]})


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
    return Accepted(receipt_id, False, total, accepted_ms, ReceiptStatus(status))


def _resolve_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
