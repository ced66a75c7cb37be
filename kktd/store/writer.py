"""The store: the only code that touches SQLite.

One aiosqlite connection, owned by one writer task. Every operation is a job on the writer's queue
(`Store.run`), as aiosqlite's own connection thread and Home Assistant's recorder queue do, so nothing ever
runs in the middle of another job's transaction. Intakes that arrive while a transaction commits are
gathered into the next one (group commit): each caller is answered only after the COMMIT that holds its row
has returned, with WAL + synchronous=FULL, i.e. after fsync.

The writer's helpers are their own small classes: the WAL keeper (checkpoints between transactions, the
WAL's identity stamp: kktd/store/wal.py), the counters it keeps in step with the rows (counters.py), and the
named jobs it runs (jobs.py).
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
from typing import Any, TypeVar

import aiosqlite

from kktd import delivery
from kktd.clock import now_ms
from kktd.errors import BufferFull, CorruptDatabase, ForeignWal, StorageUnavailable
from kktd.receipt import Receipt
from kktd.store import identity, queries, schema
from kktd.store.counters import StoreCounters
from kktd.store.jobs import Call, Job, Move, PruneSent, Read, RecordAttemptFailure, Recount
from kktd.store.rows import Accepted, Conflict, Counts, ReceiptRow, ReceiptStatus
from kktd.store.wal import WalKeeper, name_in_header, read_identity

log = logging.getLogger("kktd.store")

MAX_GROUP = 512  # intakes per transaction; bounds the latency of the first caller in a burst
# Gathering on a slow disk (an SD card's flush takes milliseconds): see Store._gather.
SLOW_COMMIT_S = 0.001  # a group commit slower than this is a slow flush
GATHER_SHARE = 0.2  # wait at most this share of the last commit's duration for more receipts...
GATHER_MAX_S = 0.002  # ...and never longer than this
STORY_CHUNK = 200  # receipts named in one journal entry (two fields each, under journald's field limit)

T = TypeVar("T")


def new_receipt_ids(at_ms: int, count: int) -> list[str]:
    """Time-ordered (48-bit milliseconds) plus 80 random bits: sorts by acceptance, never guessable.
    One read of the system's randomness serves the whole group."""
    prefix = f"{at_ms:012x}"
    noise = secrets.token_hex(10 * count)
    return [prefix + noise[i * 20 : (i + 1) * 20] for i in range(count)]


@dataclass
class _Intake:
    receipt: Receipt
    future: asyncio.Future[Accepted | Conflict]


@dataclass
class _Queued:
    """A job waiting for the writer, and its caller's answer."""

    job: Job[Any]
    future: asyncio.Future[Any]


@dataclass
class _CheckpointRequest:
    """An intake that committed alone found a checkpoint due: the writer runs it between transactions."""


@dataclass
class _Stop:
    """The end of the queue: the writer finishes what is before it and returns."""


_WriterItem = _Intake | _Queued | _CheckpointRequest | _Stop


class Store:
    def __init__(
        self,
        path: Path,
        max_pending: int,
        conn: aiosqlite.Connection,
        counters: StoreCounters,
        stamp: identity.Stamp,
        checked_at_open: bool,
    ) -> None:
        self.path = path
        # After a clean shutdown the integrity check is left to verify_in_background(), after READY.
        self.checked_at_open = checked_at_open
        self.damage: str | None = None
        # Why the last commit was refused (disk full, I/O error, read-only filesystem), until one succeeds:
        # health reports it, since reads (and so a ping) still work while every intake fails.
        self.commit_failure: str | None = None
        self.max_pending = max_pending
        self.counters = counters
        self.wal = WalKeeper(path, conn, stamp, self._commit_refused)
        self._conn = conn
        self._queue: asyncio.Queue[_WriterItem] = asyncio.Queue()
        # Held by whoever uses the connection: the writer task for a batch, or an intake committing itself
        # while the writer is idle (accept's fast path).
        self._conn_lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._last_group = 0  # intakes in the last group commit, and how long that commit took
        self._last_commit_s = 0.0
        self._queued_during_commit = 0
        self._gather_target = 0  # while gathering: the queue length that ends the wait
        self._gathered = asyncio.Event()

    @property
    def counts(self) -> Counts:
        return self.counters.counts

    def set_capacity(self, max_pending: int) -> None:
        """A reloaded max_pending: the next intake's capacity check uses it."""
        self.max_pending = max_pending

    # ---- lifecycle ----

    @classmethod
    async def open(cls, path: Path, max_pending: int, *, on_group_commit: Callable[[int], None] | None = None) -> Store:
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
            raise ForeignWal(
                f"database {path}: {wal.detail}; kktd applies neither file to the other and "
                f"changes neither. If {path} is the right database, move "
                f"{identity.wal_path(path)} aside"
            )
        if wal.verdict is identity.WalVerdict.UNSTAMPED:
            log.warning("%s", wal.detail)
        is_new = not path.exists()
        marker = schema.damage_marker(path)
        # Stat calls before the connection exists, once at start: nothing else is running yet to be blocked.
        clean = not is_new and not Path(f"{path}-wal").exists() and not marker.exists()  # noqa: ASYNC240
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
            stamp = await read_identity(conn)
            await name_in_header(conn, stamp)
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
        counters = StoreCounters(counts, oldest, on_group_commit)
        store = cls(path, max_pending, conn, counters, stamp, checked_at_open=not clean)
        # Copy the verified WAL into the database and empty it; the next WAL then begins with a stamp.
        await store.wal.checkpoint("TRUNCATE")
        await store.wal.stamp_if_needed()
        store._writer = asyncio.get_running_loop().create_task(store._write_loop(), name="kktd-db-writer")
        state = "new" if is_new else ("closed cleanly last time" if clean else "recovered after an unclean stop")
        log.info(
            "buffer open: %s (schema v%d, %s, integrity %s): pending=%d submitted=%d failed=%d sent=%d",
            path,
            schema.SCHEMA_VERSION,
            state,
            "checked" if not clean else "check deferred until after start-up",
            counts.pending,
            counts.submitted,
            counts.failed,
            counts.sent,
        )
        return store

    async def close(self, timeout: float | None = None) -> None:
        """Finish every queued job (in-flight commits), then close the connection. A writer that does not
        finish within `timeout` (wedged in the disk) is cancelled: its uncommitted work was never answered."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(_Stop())
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout)
            except TimeoutError:
                log.error("database writer did not finish within %gs; abandoning queued work", timeout)
                self._writer.cancel()
                self._drain_after_stop()
                await asyncio.gather(self._writer, return_exceptions=True)
        try:
            await asyncio.wait_for(self._conn.close(), timeout)
        except TimeoutError:
            log.error("database connection did not close within %gs", timeout)
        self.wal.close()
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
        return (
            self._queue.empty()
            and not self._conn_lock.locked()
            and not self._closing
            and self.writer_alive
            and not self.wal.needs_stamp
            and not self._gathering_pays()
        )

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
                self._submit(_Queued(Recount(), asyncio.get_running_loop().create_future()))
                raise
            if self.wal.checkpoint_due() and not self.wal.checkpoint_queued:
                # The writer runs it between transactions; this caller is answered now.
                self.wal.checkpoint_queued = True
                self._submit(_CheckpointRequest())

    # ---- every other operation is a job, run between transactions ----

    async def run(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]], writes: bool = True) -> T:
        """Run `fn(connection)` on the writer, between transactions (tests and tools; kktd's own operations
        are named jobs). A job that only reads says so (`writes=False`)."""
        return await self.submit(Call(fn, writes))

    async def read(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """`run` for a function that only reads."""
        return await self.submit(Call(fn, writes=False))

    async def submit(self, job: Job[T]) -> T:
        """Run `job` on the writer, between transactions; its result or exception is returned. A caller that
        goes away does not cancel a job already queued (it may hold a transaction)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Queued(job, future))
        return await asyncio.shield(future)

    def _submit(self, item: _WriterItem) -> None:
        if self._closing or not self.writer_alive:
            raise StorageUnavailable("the buffer is closed")
        self._queue.put_nowait(item)
        if self._gather_target and self._queue.qsize() + 1 >= self._gather_target:
            self._gathered.set()

    async def ping(self) -> None:
        """A round trip through the writer and the database: proves neither is wedged."""
        await self.submit(Read(queries.ping))

    async def get(self, receipt_id: str) -> ReceiptRow | None:
        return await self.submit(Read(queries.receipt, (receipt_id,)))

    async def get_by_key(self, idempotency_key: str) -> ReceiptRow | None:
        """The receipt stored under the till's idempotency key (after a timeout the till knows only that)."""
        return await self.submit(Read(queries.receipt_by_key, (idempotency_key,)))

    async def replay(self, receipt: Receipt) -> Accepted | Conflict | None:
        """What accept() would answer for a receipt whose key is stored already (its replay, or the key's
        conflict), without storing anything; None for a key not stored."""
        found = await self.submit(Read(queries.existing_keys, ([receipt.idempotency_key],)))
        stored = found.get(receipt.idempotency_key)
        return _replay(stored, receipt) if stored is not None else None

    async def receipts_accepted_between(
        self, since_ms: int, until_ms: int | None, after_id: str | None, limit: int
    ) -> list[ReceiptRow]:
        return await self.submit(Read(queries.accepted_between, (since_ms, until_ms, after_id, limit)))

    async def oldest_unsent_ms(self) -> int | None:
        """When the oldest receipt not fiscalized yet (pending or submitted) was accepted."""
        return await self.submit(Read(queries.oldest_unsent_ms))

    async def size_bytes(self) -> int:
        def size_of(path: Path) -> int:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return 0

        return sum(size_of(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal", "-shm"))

    async def pending_batch(
        self, limit: int, after_seq: int = 0, exclude: Sequence[str] = ()
    ) -> list[delivery.Outgoing]:
        return await self.submit(Read(queries.pending_batch, (limit, after_seq, exclude)))

    async def submitted_batch(self, limit: int, after_seq: int = 0) -> list[delivery.AwaitingResult]:
        return await self.submit(Read(queries.submitted_batch, (limit, after_seq)))

    async def dead_letters(self, limit: int, after_seq: int = 0) -> list[ReceiptRow]:
        return await self.submit(Read(queries.dead_letters, (limit, after_seq)))

    async def settle(
        self,
        outcomes: Sequence[delivery.SubmitOutcome | delivery.PollOutcome],
        source: ReceiptStatus = ReceiptStatus.PENDING,
    ) -> None:
        """Record the upstream's answers about receipts in status `source` (pending for a submission,
        submitted for a poll): one statement (one transaction, one round trip) per kind of outcome. The
        counters move inside the writer's job, with the rows: a failure or a cancelled caller after one
        statement cannot leave them apart. Outcomes that change nothing (still processing, undelivered) are
        the caller's."""
        stamp = now_ms()
        fiscalized = [o for o in outcomes if isinstance(o, delivery.Fiscalized)]
        refused = [o for o in outcomes if isinstance(o, delivery.Refused)]
        registered = [o for o in outcomes if isinstance(o, delivery.Registered)]
        not_registered = [o for o in outcomes if isinstance(o, delivery.NotRegistered)]
        if registered:
            # First: the upstream's reference must be committed before anything else can go wrong.
            await self.submit(
                Move(ReceiptStatus.PENDING, ReceiptStatus.SUBMITTED, queries.mark_submitted, (stamp, registered))
            )
        if fiscalized:
            await self.submit(Move(source, ReceiptStatus.SENT, queries.mark_sent, (stamp, source, fiscalized)))
        if refused:
            await self.submit(Move(source, ReceiptStatus.FAILED, queries.mark_refused, (stamp, source, refused)))
        if not_registered:
            await self.submit(
                Move(
                    ReceiptStatus.SUBMITTED, ReceiptStatus.PENDING, queries.mark_not_registered, (stamp, not_registered)
                )
            )

    async def record_attempt_failure(
        self, receipt_ids: Sequence[str], reason: str, max_attempts: int, strike: bool
    ) -> list[str]:
        """Note a failed delivery; with `strike`, count it and dead-letter those past max_attempts."""
        if not receipt_ids:
            return []
        return await self.submit(RecordAttemptFailure(receipt_ids, reason, max_attempts, strike))

    async def requeue(self, receipt_id: str) -> bool:
        """Put a dead letter back to pending with a fresh attempt count. False if it is not a dead letter.
        (It stays undelivered either way, so capacity does not change.)"""
        return bool(
            await self.submit(
                Move(ReceiptStatus.FAILED, ReceiptStatus.PENDING, queries.requeue, (now_ms(), receipt_id))
            )
        )

    async def resolve(self, receipt_id: str, reason: str) -> bool:
        """Close a dead letter for good with the operator's reason (kept for audit and the export; no longer
        undelivered, so it frees its place under max_pending). False if it is not a dead letter."""
        return bool(
            await self.submit(
                Move(ReceiptStatus.FAILED, ReceiptStatus.RESOLVED, queries.resolve, (now_ms(), receipt_id, reason))
            )
        )

    async def prune_sent(self, older_than_ms: int, limit: int) -> int:
        """Delete up to `limit` sent receipts acknowledged before `older_than_ms` (retention)."""
        return await self.submit(PruneSent(older_than_ms, limit))

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
                await asyncio.wait_for(self._gathered.wait(), min(GATHER_MAX_S, GATHER_SHARE * self._last_commit_s))
            except TimeoutError:
                pass
        self._gather_target = 0

    async def _write_batch(self, first: _WriterItem) -> bool:
        """`first` and everything queued behind it: one group commit for the intakes, then the jobs. True
        once the stop marker was seen."""
        batch = [first]
        while len(batch) < MAX_GROUP and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        stop = any(isinstance(item, _Stop) for item in batch)
        intakes = [item for item in batch if isinstance(item, _Intake)]
        jobs = [item for item in batch if isinstance(item, _Queued)]
        asked_for_checkpoint = any(isinstance(item, _CheckpointRequest) for item in batch)
        if intakes:
            started = time.monotonic()
            await self._commit_intakes(intakes, carry_stamp=self.wal.needs_stamp)
            self._last_commit_s, self._last_group = time.monotonic() - started, len(intakes)
            self._queued_during_commit = self._queue.qsize()
        if any(queued.job.writes for queued in jobs):
            # No intake carried the stamp: a job's write must not start the WAL unstamped.
            await self.wal.stamp_if_needed()
        for queued in jobs:
            await self._run_job(queued)
        if asked_for_checkpoint:
            self.wal.checkpoint_queued = False
        # Asked for by an intake that committed alone: due whatever waits (it was due when asked).
        await self.wal.checkpoint_if_due(intakes_waiting=not asked_for_checkpoint and not self._queue.empty())
        if stop:
            self._drain_after_stop()
            return True
        return False

    def _drain_after_stop(self) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, (_Intake, _Queued)) and not item.future.done():
                item.future.set_exception(StorageUnavailable("the buffer is closing"))

    async def _run_job(self, queued: _Queued) -> None:
        try:
            result = await queued.job.run(self._conn, self.counters)
        except sqlite3.Error as exc:
            log.error("database operation %s failed: %s", queued.job.name, exc)
            if schema.refuses_writes(exc):
                self._commit_refused(schema.describe_error(exc))
            _resolve_exception(queued.future, StorageUnavailable(schema.describe_error(exc)))
        except Exception as exc:
            log.exception("database job %s crashed", queued.job.name)
            _resolve_exception(queued.future, exc)
        else:
            if not queued.future.done():
                queued.future.set_result(result)

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

    def _commit_refused(self, reason: str) -> None:
        self.commit_failure = reason

    async def _insert_group(
        self, intakes: list[_Intake], carry_stamp: bool = False
    ) -> list[Accepted | Conflict | Exception]:
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
            rows = [
                (
                    ids[id(i)],
                    i.receipt.idempotency_key,
                    i.receipt.body_hash,
                    i.receipt.canonical_json,
                    i.receipt.pos_id,
                    i.receipt.total,
                    stamp,
                    stamp,
                )
                for i in candidates
            ]
            if carry_stamp:
                inserted = await self.wal.insert_stamped(rows)
            else:
                inserted = await queries.insert_receipts(self._conn, rows)
            self.counters.group_committed(len(inserted), stamp)
            if inserted:
                _log_accepted_chunks(
                    [(ids[id(i)], i.receipt.idempotency_key) for i in candidates if ids[id(i)] in inserted]
                )
        missing = [
            i.receipt.idempotency_key
            for i in intakes
            if ids.get(id(i)) not in inserted and i.receipt.idempotency_key not in existing
        ]
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


def _log_accepted_chunks(accepted: list[tuple[str, str]]) -> None:
    """One journal entry per group commit (in chunks of STORY_CHUNK), carrying every receipt id and key
    of the group (journald fields may repeat): `journalctl RECEIPT_ID=<id>` finds it, at a cost per commit
    rather than per receipt."""
    for start in range(0, len(accepted), STORY_CHUNK):
        chunk = accepted[start : start + STORY_CHUNK]
        first, last = chunk[0][0], chunk[-1][0]
        what = (
            first
            if len(accepted) == 1
            else (
                f"{len(chunk)} receipts in one commit: {first} .. {last}"
                if len(chunk) == len(accepted)
                else f"{len(chunk)} of {len(accepted)} receipts in one commit: {first} .. {last}"
            )
        )
        log.info(
            "accepted %s",
            what,
            extra={"receipt_id": [receipt_id for receipt_id, _ in chunk], "idempotency_key": [key for _, key in chunk]},
        )


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
