"""The background loop that forwards buffered receipts to the OFD.

Exactly once in effect: every delivery carries the receipt's idempotency key and a receipt is marked sent only
from the OFD's own acknowledgement, so after a crash, a lost answer or a timeout the receipt is simply sent
again and the OFD's deduplication settles it.

An OFD that is down must never cost receipts, so a failed delivery counts against a receipt (its `attempts`)
only when the receipt itself is shown to be the problem (a "poison" receipt): it failed in a batch of its own,
and the OFD acknowledged other receipts since its previous lone failure. To get there, the batch size halves
on every failure that reached the OFD, and a receipt that fails alone is held back for a while so the
receipts behind it keep flowing. Failures to connect change nothing but the backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from kktd.buffer import Buffer, Delivered, PendingReceipt, Rejected, now_ms, rfc3339
from kktd.errors import StorageUnavailable
from kktd.ofd import CircuitBreaker, OfdAck, OfdClient, OfdItem, OfdUnavailable

if TYPE_CHECKING:
    from kktd.config import Config

log = logging.getLogger("kktd.sync")

PIPELINE_DEPTH = 2  # batches on the wire at once while the breaker is closed
TRANSPORT_REASONS = frozenset({"connect_error"})  # nothing reached the OFD: not a failed delivery
INTAKE_BUSY_WINDOW_S = 0.25  # an intake this recent means the till is busy
INTAKE_BUSY_DRAIN_SHARE = 0.2  # while it is, the drain takes at most this share of wall time
RETENTION_EVERY_S = 3600.0
RETENTION_BATCH = 500
ALARM_EVERY_S = 60.0
MAX_HELD = 1000  # receipts held back at once; keeps the exclusion list far below SQLite's parameter limit


class CircuitOpen(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"circuit breaker open; next trial in {retry_after:.1f}s")
        self.retry_after = retry_after


class Stopping(Exception):
    """Raised out of a retry wait when the daemon stops."""


@dataclass
class CycleResult:
    delivered: int = 0
    rejected: int = 0
    batches: int = 0

    def add(self, other: CycleResult) -> None:
        self.delivered += other.delivered
        self.rejected += other.rejected
        self.batches += other.batches


@dataclass
class SyncStats:
    cycles: int = 0
    delivered_total: int = 0
    rejected_total: int = 0
    dead_lettered_total: int = 0
    last_success_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None
    retry_at_monotonic: float | None = None
    held: dict[str, float] = field(default_factory=dict)  # receipt_id -> monotonic time it may be sent again


class SyncLoop:
    def __init__(self, buffer: Buffer, client: OfdClient, breaker: CircuitBreaker, config: Config) -> None:
        self.buffer = buffer
        self.client = client
        self.breaker = breaker
        self.config = config
        self.stats = SyncStats()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        self._batch_limit = config.batch_size
        self._failure_generation = 0  # bumped by every failure that shrinks the batch limit
        self._last_ack_monotonic: float | None = None
        self._lone_failures: dict[str, float] = {}  # receipt_id -> monotonic time of its last lone failure
        self._suspects: set[str] = set()  # held receipts whose last lone failure counted against them
        self._next_retention = 0.0
        self._next_alarm = 0.0
        self._alarm_level = "ok"

    # ---- control ----

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        stats = self.stats
        retry_in = None
        if stats.retry_at_monotonic is not None:
            retry_in = round(max(0.0, stats.retry_at_monotonic - time.monotonic()), 3)
        return {
            "breaker": str(self.breaker.state),
            "consecutive_failures": self.breaker.consecutive_failures,
            "cycles": stats.cycles,
            "delivered_total": stats.delivered_total,
            "rejected_total": stats.rejected_total,
            "dead_lettered_total": stats.dead_lettered_total,
            "last_success_at": rfc3339(stats.last_success_ms) if stats.last_success_ms else None,
            "last_error": stats.last_error,
            "last_error_at": rfc3339(stats.last_error_ms) if stats.last_error_ms else None,
            "retry_in_s": retry_in,
            "held_back": len(stats.held),
        }

    async def run_once_now(self) -> dict[str, Any]:
        """One delivery cycle on request (`POST /v1/kkt/buffer/sync`), no retries: report what it did."""
        result = CycleResult()
        error: str | None = None
        # Dead-lettering happens on the failure path, which raises: count it from the running total.
        dead_lettered_before = self.stats.dead_lettered_total
        async with self._cycle_lock:
            try:
                result = await self._drain()
            except CircuitOpen as exc:
                error = str(exc)
            except OfdUnavailable as exc:
                error = f"OFD unavailable: {exc}"
                self._note_error(error)
            except StorageUnavailable as exc:
                error = f"storage unavailable: {exc}"
                self._note_error(error)
        return {"delivered": result.delivered, "rejected": result.rejected,
                "dead_lettered": self.stats.dead_lettered_total - dead_lettered_before,
                "batches": result.batches,
                "pending": self.buffer.counts.pending, "error": error, "breaker": str(self.breaker.state)}

    # ---- the loop ----

    async def run(self) -> None:
        log.info("sync loop started: OFD batches of %d, idle interval %gs", self.config.batch_size,
                 self.config.sync_interval)
        while not self._stop.is_set():
            await self._housekeeping()
            try:
                await self._cycle_with_retries()
            except Stopping:
                break
            await self._idle()
        log.info("sync loop stopped")

    async def _idle(self) -> None:
        if self.buffer.counts.pending and not self._only_held_pending():
            return
        try:
            await asyncio.wait_for(self._wake.wait(), self._idle_timeout())
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def _idle_timeout(self) -> float:
        timeout = self.config.sync_interval
        if self.stats.held:
            timeout = min(timeout, max(0.01, min(self.stats.held.values()) - time.monotonic()))
        return timeout

    def _only_held_pending(self) -> bool:
        self._expire_holds()
        return 0 < self.buffer.counts.pending <= len(self._suspects)

    async def _cycle_with_retries(self) -> None:
        # A storage failure (disk full, I/O error) is retried like an OFD failure: the receipts stay pending
        # and the loop must outlive it, whatever it was doing.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((OfdUnavailable, CircuitOpen, StorageUnavailable)),
            wait=self._wait,
            sleep=self._interruptible_sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                async with self._cycle_lock:
                    self._wake.clear()
                    result = await self._drain()
                self.stats.retry_at_monotonic = None
                if result.batches:
                    log.debug("sync cycle: %d delivered, %d rejected in %d batches", result.delivered,
                              result.rejected, result.batches)

    def _wait(self, state: RetryCallState) -> float:
        # While the breaker is open its reset timer sets the pace of trials; the exponential backoff
        # (capped) spaces the retries before it opens.
        if str(self.breaker.state) == "open":
            return max(self.breaker.retry_after(), 0.01)
        backoff = wait_exponential_jitter(multiplier=0.5, max=self.config.backoff_max, jitter=1.0)(state)
        return float(min(backoff, self.config.backoff_max))

    def _before_sleep(self, state: RetryCallState) -> None:
        seconds = state.next_action.sleep if state.next_action else 0.0
        self.stats.retry_at_monotonic = time.monotonic() + seconds
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, StorageUnavailable):
            self._note_error(f"storage unavailable: {exc}")
        log.debug("OFD delivery failed (%s); retry %d in %.2fs", exc, state.attempt_number, seconds)

    async def _interruptible_sleep(self, seconds: float) -> None:
        await self._pause(seconds)
        if self._stop.is_set():
            raise Stopping()

    # ---- one cycle ----

    async def _drain(self) -> CycleResult:
        """Send every pending receipt once, batch after batch, a few batches on the wire at a time. While
        the till is posting receipts the drain gives way: one batch at a time, and pauses that keep its
        share of the event loop small, so a long backlog never slows intake."""
        self.stats.cycles += 1
        total = CycleResult()
        in_flight: set[asyncio.Task[CycleResult]] = set()
        after_seq = 0
        try:
            while not self._stop.is_set():
                self._expire_holds()
                batch = await self._next_batch(after_seq)
                if not batch:
                    break
                after_seq = batch[-1].seq
                started = time.monotonic()
                in_flight.add(asyncio.create_task(self._deliver(batch, self._failure_generation)))
                giving_way = self._intake_busy()
                depth = PIPELINE_DEPTH if self._at_full_speed() and not giving_way else 1
                while len(in_flight) >= depth:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    _collect(done, total)
                if giving_way:
                    await self._pause((time.monotonic() - started) * (1 - INTAKE_BUSY_DRAIN_SHARE)
                                      / INTAKE_BUSY_DRAIN_SHARE)
            while in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                _collect(done, total)
        finally:
            if in_flight:
                # Batches still on the wire: their acknowledgements must be recorded before we go on.
                await asyncio.gather(*in_flight, return_exceptions=True)
        return total

    def _intake_busy(self) -> bool:
        return time.monotonic() - self.buffer.last_intake_monotonic < INTAKE_BUSY_WINDOW_S

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the daemon stops meanwhile."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _next_batch(self, after_seq: int) -> list[PendingReceipt]:
        batch = await self.buffer.pending_batch(self._batch_limit, after_seq, tuple(self.stats.held))
        if not batch and after_seq == 0 and len(self._suspects) < len(self.stats.held):
            # Only held receipts are left: the ones nothing points at are the best probe there is.
            batch = await self.buffer.pending_batch(self._batch_limit, 0, tuple(self._suspects))
        return batch

    def _at_full_speed(self) -> bool:
        """Pipelining only when all is well: while probing for a poison receipt or trying a half-open breaker,
        one batch at a time, so a sibling's success cannot undo what a failure taught."""
        return str(self.breaker.state) == "closed" and self._batch_limit == self.config.batch_size

    async def _deliver(self, batch: list[PendingReceipt], generation: int) -> CycleResult:
        if not self.breaker.allow():
            raise CircuitOpen(self.breaker.retry_after())
        items = [OfdItem(r.receipt_id, r.idempotency_key, rfc3339(r.accepted_ms), receipt_json=r.body)
                 for r in batch]
        try:
            results = await self.client.send_batch(items)
        except OfdUnavailable as exc:
            self.breaker.record_failure()
            self._note_error(f"OFD unavailable: {exc}")
            await self._count_failure(batch, exc)
            raise
        self.breaker.record_success()
        if generation == self._failure_generation:
            # Only a batch sent after the last failure may grow the limit again: a sibling that was already
            # on the wire says nothing about the receipts that failed.
            self._batch_limit = min(self.config.batch_size, self._batch_limit * 2)
        return await self._record(results)

    async def _record(self, results: list[Any]) -> CycleResult:
        delivered = [Delivered(r.receipt_id, r.fiscal_document_number, r.fiscal_sign, r.ofd_received_at)
                     for r in results if isinstance(r, OfdAck)]
        rejected = [Rejected(r.receipt_id, f"{r.code}: {r.message}") for r in results if not isinstance(r, OfdAck)]
        await self.buffer.settle(delivered, rejected)
        for rejection in rejected:
            log.warning("receipt %s rejected by the OFD, moved to dead letters: %s", rejection.receipt_id,
                        rejection.reason)
        self._last_ack_monotonic = time.monotonic()
        for result in results:
            self._lone_failures.pop(result.receipt_id, None)
        self._release_unsuspected()
        self.stats.last_success_ms = now_ms()
        self.stats.delivered_total += len(delivered)
        self.stats.rejected_total += len(rejected)
        return CycleResult(len(delivered), len(rejected), 1)

    async def _count_failure(self, batch: list[PendingReceipt], exc: OfdUnavailable) -> None:
        if exc.reason in TRANSPORT_REASONS:
            return
        self._batch_limit = max(1, self._batch_limit // 2)
        self._failure_generation += 1
        ids = [r.receipt_id for r in batch]
        strike = False
        if len(batch) == 1:
            now = time.monotonic()
            previous = self._lone_failures.get(ids[0])
            strike = previous is not None and self._last_ack_monotonic is not None \
                and self._last_ack_monotonic > previous
            self._lone_failures[ids[0]] = now
            # Outlasts the retry wait (at most backoff_max), so the receipts behind it get their turn.
            self._hold(ids[0], now + 2 * self.config.backoff_max)
            if strike:
                self._suspects.add(ids[0])
            else:
                self._suspects.discard(ids[0])
        moved = await self.buffer.record_attempt_failure(ids, exc.reason, self.config.max_attempts, strike)
        for receipt_id in moved:
            self.stats.held.pop(receipt_id, None)
            self._lone_failures.pop(receipt_id, None)
            self._suspects.discard(receipt_id)
            log.error("receipt %s moved to dead letters after more than %d failed deliveries (%s)",
                      receipt_id, self.config.max_attempts, exc.reason)
        self.stats.dead_lettered_total += len(moved)

    def _expire_holds(self) -> None:
        now = time.monotonic()
        for receipt_id in [r for r, until in self.stats.held.items() if until <= now]:
            del self.stats.held[receipt_id]
            self._suspects.discard(receipt_id)

    def _hold(self, receipt_id: str, until: float) -> None:
        if receipt_id not in self.stats.held and len(self.stats.held) >= MAX_HELD:
            soonest = min(self.stats.held, key=self.stats.held.__getitem__)
            del self.stats.held[soonest]
            self._suspects.discard(soonest)
        self.stats.held[receipt_id] = until

    def _release_unsuspected(self) -> None:
        """The OFD acknowledges again: receipts held during a failure that nothing showed to be theirs
        (the OFD was failing everyone) go back in line at once instead of waiting out their hold."""
        for receipt_id in [r for r in self.stats.held if r not in self._suspects]:
            del self.stats.held[receipt_id]

    def _note_error(self, error: str) -> None:
        if self.stats.last_error != error:
            log.warning("%s", error)
        self.stats.last_error = error
        self.stats.last_error_ms = now_ms()

    # ---- housekeeping: pending-age alarm and retention ----

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        try:
            if now >= self._next_alarm:
                self._next_alarm = now + ALARM_EVERY_S
                await self.check_pending_age()
            if now >= self._next_retention:
                self._next_retention = now + RETENTION_EVERY_S
                await self.prune()
        except StorageUnavailable as exc:
            log.warning("housekeeping skipped, storage unavailable: %s", exc)

    async def check_pending_age(self) -> str:
        oldest_ms = await self.buffer.oldest_pending_ms()
        age = None if oldest_ms is None else max(0.0, time.time() - oldest_ms / 1000)
        level = self.config.pending_alarm(age)
        if level != "ok" and age is not None:
            text = (f"oldest pending receipt is {age / 86400:.1f} days old "
                    f"(pending={self.buffer.counts.pending}); the fiscal storage holds unsent documents "
                    f"for at most 30 days")
            log.log(logging.ERROR if level == "critical" else logging.WARNING, "%s", text)
        elif self._alarm_level != "ok":
            log.info("oldest pending receipt age back under the warning threshold")
        self._alarm_level = level
        return level

    async def prune(self) -> int:
        cutoff = now_ms() - self.config.retention_days * 86_400_000
        deleted = 0
        while not self._stop.is_set():
            count = await self.buffer.prune_sent(cutoff, RETENTION_BATCH)
            deleted += count
            if count < RETENTION_BATCH:
                break
            await asyncio.sleep(0)  # let intake in between batches
        if deleted:
            log.info("retention: pruned %d sent receipts older than %d days", deleted, self.config.retention_days)
        return deleted


def _collect(done: set[asyncio.Task[CycleResult]], total: CycleResult) -> None:
    """Add up finished batches; every task's outcome is retrieved, then the first failure is raised."""
    errors: list[BaseException] = []
    for task in done:
        exc = task.exception()
        if exc is None:
            total.add(task.result())
        else:
            errors.append(exc)
    if errors:
        raise errors[0]
