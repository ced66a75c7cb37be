"""The background loop that forwards buffered receipts upstream.

Exactly once in effect: every submission carries the receipt's external id (its idempotency key) and a
receipt is marked sent only from the upstream's own acknowledgement, so after a crash, a lost answer or a
timeout the receipt is simply submitted again and the upstream's deduplication settles it.

Which receipts go out and when a failure counts against one is the delivery policy's (policy.py); the loop
drives it: batches oldest first, a few on the wire while all is well, tenacity backoff between failed
cycles, the circuit breaker in front of every call, and the outcome of every call recorded in the store
before the next is decided. The loop takes a clock and a sleep, so its retry tests run in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from kktd import delivery
from kktd.clock import Clock, Sleep, now_ms, rfc3339
from kktd.delivery import (
    DEFAULT_TRAITS,
    DeliveryTraits,
    FailureKind,
    PollOutcome,
    SubmitOutcome,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.errors import StorageUnavailable
from kktd.metrics import Metrics, RequestOutcome
from kktd.states import BreakerState
from kktd.store import ReceiptStatus, Store
from kktd.sync.breaker import CircuitBreaker
from kktd.sync.housekeeping import Housekeeping
from kktd.sync.policy import DeliveryPolicy, PollSchedule
from kktd.upstreams.base import Upstream

if TYPE_CHECKING:
    from kktd.config import Config

log = logging.getLogger("kktd.sync")
OutcomeT = TypeVar("OutcomeT", SubmitOutcome, PollOutcome)

INTAKE_BUSY_WINDOW_S = 0.25  # an intake this recent means the till is busy
INTAKE_BUSY_DRAIN_SHARE = 0.2  # while it is, the drain takes at most this share of wall time


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
    submitted: int = 0  # registered by a two-phase upstream, result to be polled

    def add(self, other: CycleResult) -> None:
        self.delivered += other.delivered
        self.rejected += other.rejected
        self.batches += other.batches
        self.submitted += other.submitted


@dataclass
class SyncStats:
    """What the loop has done since start, for status (the counters proper live in Metrics)."""

    last_success_ms: int | None = None
    cycles: int = 0
    delivered_total: int = 0
    rejected_total: int = 0
    dead_lettered_total: int = 0
    last_error: str | None = None
    last_error_ms: int | None = None
    retry_at_monotonic: float | None = None
    # Set while the upstream refuses kktd itself (wrong password, blocked account): what a person must fix.
    operator_action: str | None = None


@dataclass(frozen=True)
class SyncStatus:
    """The loop as `GET /v1/kkt/buffer/status` and health show it."""

    breaker: BreakerState
    consecutive_failures: int
    cycles: int
    delivered_total: int
    rejected_total: int
    dead_lettered_total: int
    last_success_at: str | None
    last_error: str | None
    last_error_at: str | None
    retry_in_s: float | None
    held_back: int
    upstream: str
    operator_action: str | None


@dataclass(frozen=True)
class ManualCycle:
    """What `POST /v1/kkt/buffer/sync` did."""

    delivered: int
    rejected: int
    dead_lettered: int
    batches: int
    pending: int
    error: str | None
    breaker: BreakerState


class SyncLoop:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        breaker: CircuitBreaker,
        config: Config,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        metrics: Metrics | None = None,
        traits: DeliveryTraits = DEFAULT_TRAITS,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        self.metrics.prepare_upstream(upstream.name)
        self.breaker = breaker
        self.config = config
        self.stats = SyncStats()
        batch_size = min(config.batch_size, upstream.max_batch)
        self.policy = DeliveryPolicy(batch_size, hold_s=2 * config.backoff_max, clock=clock)
        self.traits = traits
        self.polls = PollSchedule(clock, traits.poll_interval_s)
        self._clock = clock
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()  # cuts a retry's wait short: the upstream was replaced
        self._stop = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        self._intake_commits_seen = store.counters.commits
        self._intake_seen_at = float("-inf")
        self.housekeeping = Housekeeping(store, lambda: self.config, clock, self._stop, lambda: self.upstream)

    # ---- control ----

    def wake(self) -> None:
        self._wake.set()

    def replace_upstream(self, upstream: Upstream) -> Upstream:
        """Deliver through `upstream` from the next batch on (a reload changed its URL or credentials).
        Returns the previous one, which batches already on the wire may still use: close it only after
        `idle()`."""
        previous, self.upstream = self.upstream, upstream
        self.metrics.prepare_upstream(upstream.name)
        # New settings (a fixed password, another URL): the old failures and refusal no longer tell anything,
        # and the retry waiting out the breaker goes now rather than in up to breaker_reset seconds.
        self.breaker.reset()
        self.stats.last_error = None
        self.stats.last_error_ms = None
        self.stats.retry_at_monotonic = None
        self._clear_operator_action()
        self._retry_now.set()
        return previous

    async def idle(self) -> None:
        """Wait until no delivery cycle runs (the cycle lock is free), then return at once."""
        async with self._cycle_lock:
            pass

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.housekeeping.nudge()

    def status(self) -> SyncStatus:
        stats = self.stats
        retry_in = None
        if stats.retry_at_monotonic is not None:
            retry_in = round(max(0.0, stats.retry_at_monotonic - self._clock()), 3)
        return SyncStatus(
            breaker=self.breaker.state,
            consecutive_failures=self.breaker.consecutive_failures,
            cycles=stats.cycles,
            delivered_total=stats.delivered_total,
            rejected_total=stats.rejected_total,
            dead_lettered_total=stats.dead_lettered_total,
            last_success_at=rfc3339(stats.last_success_ms) if stats.last_success_ms else None,
            last_error=stats.last_error,
            last_error_at=rfc3339(stats.last_error_ms) if stats.last_error_ms else None,
            retry_in_s=retry_in,
            held_back=len(self.policy.held),
            upstream=self.upstream.name,
            operator_action=stats.operator_action,
        )

    async def run_once_now(self) -> ManualCycle:
        """One delivery cycle on request (`POST /v1/kkt/buffer/sync`), no retries: report what it did. A
        register's report is read again after it."""
        result = CycleResult()
        error: str | None = None
        # Dead-lettering happens on the failure path, which raises: count it from the running total.
        dead_lettered_before = self.stats.dead_lettered_total
        async with self._cycle_lock:
            # The operator's explicit request is the half-open trial, now, not after the breaker's timer.
            self.breaker.trial_now()
            try:
                result = await self._drain()
            except CircuitOpen as exc:
                error = str(exc)
            except UpstreamUnavailable as exc:
                error = f"{self.upstream.name} unavailable: {exc}"
                self._note_error(error)
            except StorageUnavailable as exc:
                error = f"storage unavailable: {exc}"
                self._note_error(error)
        # A register upstream's own report is read again too: the operator asked for the state of things now.
        await self.housekeeping.check_register()
        return ManualCycle(
            delivered=result.delivered,
            rejected=result.rejected,
            dead_lettered=self.stats.dead_lettered_total - dead_lettered_before,
            batches=result.batches,
            pending=self.store.counts.pending,
            error=error,
            breaker=self.breaker.state,
        )

    # ---- the loop ----

    async def run(self) -> None:
        """Deliver until request_stop(); the housekeeping (the pending-age alarm, retention) runs beside it as
        a task of its own, so that a long prune never holds up a delivery."""
        log.info(
            "sync loop started: %s, batches of %d, idle interval %gs",
            self.upstream.name,
            self.policy.batch_size,
            self.config.sync_interval,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.housekeeping.run(), name="kktd-housekeeping")
            try:
                await self._deliver_until_stopped()
            finally:
                self.request_stop()
        log.info("sync loop stopped")

    async def _deliver_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.housekeeping.nudge()
            try:
                await self._cycle_with_retries()
            except Stopping:
                break
            await self._idle()

    async def _idle(self) -> None:
        if self.store.counts.pending and not self.policy.only_held_pending(self.store.counts.pending):
            return
        timeout = self.policy.idle_timeout(self.config.sync_interval)
        if self.store.counts.submitted:
            timeout = min(timeout, max(0.01, self.polls.seconds_until_next()))
        await self._pause(timeout, self._wake)
        self._wake.clear()

    async def _cycle_with_retries(self) -> None:
        # A storage failure (disk full, I/O error) is retried like an upstream failure: the receipts stay
        # pending and the loop must outlive it, whatever it was doing.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((UpstreamUnavailable, CircuitOpen, StorageUnavailable)),
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
                    log.debug(
                        "sync cycle: %d delivered, %d rejected in %d batches",
                        result.delivered,
                        result.rejected,
                        result.batches,
                    )

    def _wait(self, state: RetryCallState) -> float:
        # While the breaker is open its reset timer sets the pace of trials; the exponential backoff
        # (capped) spaces the retries before it opens.
        if self.breaker.state is BreakerState.OPEN:
            return max(self.breaker.retry_after(), 0.01)
        backoff = wait_exponential_jitter(multiplier=0.5, max=self.config.backoff_max, jitter=1.0)(state)
        return float(min(backoff, self.config.backoff_max))

    def _before_sleep(self, state: RetryCallState) -> None:
        seconds = state.next_action.sleep if state.next_action else 0.0
        self.stats.retry_at_monotonic = self._clock() + seconds
        exc = state.outcome.exception() if state.outcome else None
        self.metrics.upstream_retry(self.upstream.name)
        if isinstance(exc, StorageUnavailable):
            self._note_error(f"storage unavailable: {exc}")
        log.debug("delivery failed (%s); retry %d in %.2fs", exc, state.attempt_number, seconds)

    async def _interruptible_sleep(self, seconds: float) -> None:
        # Between retries too: an upstream that fails for hours must not freeze the age alarm or a
        # register's report (its paper and backlog are what the operator needs then).
        self.housekeeping.nudge()
        await self._pause(seconds, self._retry_now)
        self._retry_now.clear()
        if self._stop.is_set():
            raise Stopping()

    async def _pause(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        """Sleep `seconds` on the injected sleep, or less if the daemon stops (or `wake` is set) meanwhile."""
        if self._stop.is_set() or (wake is not None and wake.is_set()):
            return
        waiters = [asyncio.ensure_future(self._sleep(seconds)), asyncio.ensure_future(self._stop.wait())]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # ---- one cycle ----

    async def _drain(self) -> CycleResult:
        """Send every pending receipt once, batch after batch, a few batches on the wire at a time. While
        the till is posting receipts the drain gives way: one batch at a time, and pauses that keep its
        share of the event loop small, so a long backlog never slows intake."""
        self.stats.cycles += 1
        total = CycleResult()
        in_flight: set[asyncio.Task[CycleResult]] = set()
        after_seq = 0
        next_poll = self._clock() + self.traits.poll_interval_s
        try:
            while not self._stop.is_set():
                batch = await self._next_batch(after_seq)
                if not batch:
                    break
                after_seq = batch[-1].seq
                started = self._clock()
                in_flight.add(asyncio.create_task(self._deliver(batch, self.policy.generation)))
                giving_way = self._intake_busy()
                full_speed = self.breaker.state is BreakerState.CLOSED and self.policy.at_full_speed()
                depth = self.traits.max_in_flight if full_speed and not giving_way else 1
                while len(in_flight) >= depth:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    _collect(done, total)
                if self.upstream.two_phase and not in_flight and self._clock() >= next_poll:
                    # A long backlog must not hold back the results of what is registered already (a till
                    # waits for its receipt's fiscal data to print the QR code): ask between batches too.
                    total.add(await self._poll_due())
                    next_poll = self._clock() + self.traits.poll_interval_s
                if giving_way:
                    await self._pause(
                        (self._clock() - started) * (1 - INTAKE_BUSY_DRAIN_SHARE) / INTAKE_BUSY_DRAIN_SHARE
                    )
            while in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                _collect(done, total)
        finally:
            if in_flight:
                # Batches still on the wire: their acknowledgements must be recorded before we go on.
                await asyncio.gather(*in_flight, return_exceptions=True)
        if self.upstream.two_phase:
            total.add(await self._poll_due())
        return total

    def _intake_busy(self) -> bool:
        """A receipt was committed within INTAKE_BUSY_WINDOW_S (by the loop's clock: it notes the moment it
        sees the store's intake commits move, at most a batch after the commit)."""
        commits = self.store.counters.commits
        if commits != self._intake_commits_seen:
            self._intake_commits_seen, self._intake_seen_at = commits, self._clock()
        return self._clock() - self._intake_seen_at < INTAKE_BUSY_WINDOW_S

    async def _next_batch(self, after_seq: int) -> list[delivery.Outgoing]:
        limit = self.policy.batch_limit
        batch = await self.store.pending_batch(limit, after_seq, self.policy.exclusions())
        if not batch and after_seq == 0:
            probe = self.policy.probe_exclusions()
            if probe is not None:
                batch = await self.store.pending_batch(limit, 0, probe)
        return batch

    async def _call(self, ids: list[str], failed: str, call: Callable[[], Awaitable[list[OutcomeT]]]) -> list[OutcomeT]:
        """One call to the upstream with the bookkeeping every call shares: the breaker in front of it, its
        duration and outcome in the metrics, and on failure the journal entry naming every receipt (each
        attempt is part of each receipt's story: journalctl RECEIPT_ID=...), the breaker's count and the
        last error. `failed` completes "... failed: REASON", e.g. "delivery of 3 receipts to UPSTREAM"."""
        if not self.breaker.allow():
            raise CircuitOpen(self.breaker.retry_after())
        name = self.upstream.name
        started = time.perf_counter()
        try:
            outcomes = await call()
        except UpstreamUnavailable as exc:
            self.metrics.upstream_request(name, RequestOutcome.failed(exc.kind), time.perf_counter() - started)
            log.info(
                "%s failed: %s", failed, exc, extra={"receipt_id": ids, "upstream": name, "upstream_status": exc.reason}
            )
            self.breaker.record_failure()
            self._note_error(f"{name} unavailable: {exc}")
            raise
        self.metrics.upstream_request(name, RequestOutcome.OK, time.perf_counter() - started)
        self.metrics.upstream_outcomes(name, outcomes)
        self.breaker.record_success()
        return outcomes

    async def _deliver(self, batch: list[delivery.Outgoing], generation: int) -> CycleResult:
        ids = [r.receipt_id for r in batch]
        try:
            outcomes: list[SubmitOutcome] = await self._call(
                ids, f"delivery of {len(batch)} receipts to {self.upstream.name}", lambda: self.upstream.submit(batch)
            )
        except UpstreamUnavailable as exc:
            await self._count_failure(ids, exc)
            raise
        self.policy.on_success(generation)
        return await self._record(outcomes)

    async def _record(self, outcomes: Sequence[SubmitOutcome]) -> CycleResult:
        await self.store.settle(outcomes, ReceiptStatus.PENDING)
        registered = [o.receipt_id for o in outcomes if isinstance(o, delivery.Registered)]
        self.polls.polled(registered)  # just registered: its result is asked for a second from now
        undelivered = [o for o in outcomes if isinstance(o, Undelivered)]
        answered = [o.receipt_id for o in outcomes if not isinstance(o, Undelivered)]
        if answered:
            self.policy.on_answered(answered)
        for failure in undelivered:
            # The upstream answered others of this call: this receipt's own call failed, alone.
            log.info(
                "delivery of receipt %s to %s failed: %s",
                failure.receipt_id,
                self.upstream.name,
                failure.error,
                extra={
                    "receipt_id": failure.receipt_id,
                    "upstream": self.upstream.name,
                    "upstream_status": failure.error.reason,
                },
            )
            self._note_error(f"{self.upstream.name} unavailable for receipt {failure.receipt_id}: {failure.error}")
            await self._count_failure([failure.receipt_id], failure.error)
        return self._tally(outcomes, submitted=len(registered))

    def _tally(self, outcomes: Sequence[SubmitOutcome | PollOutcome], submitted: int = 0) -> CycleResult:
        refused = [o for o in outcomes if isinstance(o, delivery.Refused)]
        self._tell(outcomes)
        delivered = sum(1 for o in outcomes if isinstance(o, delivery.Fiscalized))
        self._clear_operator_action()
        self.stats.last_success_ms = now_ms()
        self.stats.delivered_total += delivered
        self.stats.rejected_total += len(refused)
        return CycleResult(delivered, len(refused), 1, submitted)

    def _tell(self, outcomes: Sequence[SubmitOutcome | PollOutcome]) -> None:
        """Each receipt's part of a call's answer, in its story (journalctl RECEIPT_ID=...): one entry per
        kind of outcome, naming every receipt; a refusal, one entry per receipt with its code."""
        name = self.upstream.name
        for kind, status, text in (
            (delivery.Fiscalized, "fiscalized", "fiscalized by"),
            (delivery.Registered, "registered", "registered (result pending) by"),
        ):
            ids = [o.receipt_id for o in outcomes if isinstance(o, kind)]
            if ids:
                log.info(
                    "%d receipts %s %s",
                    len(ids),
                    text,
                    name,
                    extra={"receipt_id": ids, "upstream": name, "upstream_status": status},
                )
        for rejection in (o for o in outcomes if isinstance(o, delivery.Refused)):
            log.warning(
                "receipt %s rejected by the upstream (%s), moved to dead letters: %s: %s",
                rejection.receipt_id,
                name,
                rejection.code,
                rejection.message,
                extra={
                    "receipt_id": rejection.receipt_id,
                    "upstream": name,
                    "upstream_status": "refused",
                    "error_code": rejection.code,
                },
            )

    # ---- two-phase upstreams: asking for the results of registered documents ----

    async def _poll_due(self) -> CycleResult:
        """Ask once for the result of every registered document that is due (at most once a second each),
        oldest first; record each answer before asking about the next page."""
        total = CycleResult()
        after_seq = 0
        while not self._stop.is_set():
            page = await self.store.submitted_batch(self.policy.batch_size, after_seq)
            if not page:
                break
            after_seq = page[-1].seq
            due = [r for r in page if self.polls.is_due(r.receipt_id)]
            if due:
                total.add(await self._poll(due))
        return total

    async def _poll(self, due: list[delivery.AwaitingResult]) -> CycleResult:
        ids = [r.receipt_id for r in due]
        name = self.upstream.name
        try:
            outcomes: list[PollOutcome] = await self._call(
                ids, f"asking {name} for the result of {len(ids)} receipts", lambda: self.upstream.poll(due)
            )
        except UpstreamUnavailable as exc:
            self.polls.polled(ids)
            if exc.operator_action is not None:
                self._needs_operator(exc.operator_action)
            raise
        self.polls.polled(ids)
        await self.store.settle(outcomes, ReceiptStatus.SUBMITTED)
        finished = [
            o.receipt_id
            for o in outcomes
            if isinstance(o, (delivery.Fiscalized, delivery.Refused, delivery.NotRegistered))
        ]
        self.polls.forget(finished)
        for failed in (o for o in outcomes if isinstance(o, delivery.NotRegistered)):
            log.warning(
                "receipt %s was not registered by %s (%s: %s); registering it again under a new external id",
                failed.receipt_id,
                self.upstream.name,
                failed.code,
                failed.message,
                extra={
                    "receipt_id": failed.receipt_id,
                    "upstream": name,
                    "upstream_status": "not_registered",
                    "error_code": failed.code,
                },
            )
        for failure in (o for o in outcomes if isinstance(o, Undelivered)):
            self._note_error(f"{self.upstream.name} unavailable for receipt {failure.receipt_id}: {failure.error}")
        return self._tally(outcomes)

    async def _count_failure(self, ids: list[str], exc: UpstreamUnavailable) -> None:
        if exc.operator_action is not None:
            self._needs_operator(exc.operator_action)
        if exc.kind is FailureKind.NOT_SENT:
            return  # nothing reached the upstream: not a failed delivery
        verdict = self.policy.on_failure(ids)
        moved = await self.store.record_attempt_failure(ids, exc.reason, self.config.max_attempts, verdict.strike)
        self.policy.forget(moved)
        for receipt_id in moved:
            log.error(
                "receipt %s moved to dead letters after more than %d failed deliveries (%s)",
                receipt_id,
                self.config.max_attempts,
                exc.reason,
                extra={
                    "receipt_id": receipt_id,
                    "upstream": self.upstream.name,
                    "upstream_status": exc.reason,
                    "error_code": "max_attempts",
                },
            )
        self.stats.dead_lettered_total += len(moved)

    def _needs_operator(self, action: str) -> None:
        if self.stats.operator_action != action:
            log.error("%s refuses kktd itself, receipts wait until this is fixed: %s", self.upstream.name, action)
        self.stats.operator_action = action

    def _clear_operator_action(self) -> None:
        if self.stats.operator_action is not None:
            log.info("%s accepts kktd again", self.upstream.name)
        self.stats.operator_action = None

    def _note_error(self, error: str) -> None:
        if self.stats.last_error != error:
            log.warning("%s", error)
        self.stats.last_error = error
        self.stats.last_error_ms = now_ms()


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
