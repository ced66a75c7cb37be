"""SyncLoop against a fake upstream (kktd.upstreams.base.Upstream), a real Store on tmp_path and fake time.

The loop takes a clock and a sleep: here the sleep moves the fake clock and returns at once, so backoff
growth, the breaker's open / half-open / closed pacing and long outages run in milliseconds, and every
wait the loop asked for is known exactly. tests/test_sync.py keeps the end-to-end smoke test of real
backoff against the real mock in its own process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pytest

from kktd.clock import Sleep
from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    FiscalData,
    Fiscalized,
    Outgoing,
    PollOutcome,
    Refused,
    SubmitOutcome,
    UpstreamUnavailable,
)
from kktd.receipt import sample_receipt, validate_receipt
from kktd.store import ReceiptStatus, Store
from kktd.sync import BreakerState, CircuitBreaker, SyncLoop
from kktd.upstreams.base import Upstream
from tests.conftest import make_config
from tests.support import FakeTime, async_wait_until

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@dataclasses.dataclass(frozen=True)
class Call:
    at: float  # fake monotonic time
    receipt_ids: tuple[str, ...]
    answered: bool


class FakeUpstream:
    """A one-phase upstream scripted by the test: down (every call raises `failure`), poisoned receipts
    (a batch holding one fails as if the upstream choked on it), refused receipts; it fiscalizes each
    external id once and answers a resubmission with the same fiscal data."""

    name: ClassVar[str] = "fake"
    two_phase: ClassVar[bool] = False

    def __init__(self, clock: FakeTime, max_batch: int = 100) -> None:
        self.max_batch = max_batch
        self.clock = clock
        self.failure: tuple[FailureKind, str] | None = None
        self.poison: set[str] = set()
        self.refuse: set[str] = set()
        self.calls: list[Call] = []
        self.documents: dict[str, FiscalData] = {}  # external id -> what was fiscalized

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        ids = tuple(r.receipt_id for r in batch)
        await asyncio.sleep(0)  # a network call yields
        if self.failure is not None or self.poison.intersection(ids):
            self.calls.append(Call(self.clock(), ids, answered=False))
            kind, reason = self.failure or (FailureKind.MAYBE_SENT, "http_500")
            raise UpstreamUnavailable(kind, reason)
        self.calls.append(Call(self.clock(), ids, answered=True))
        outcomes: list[SubmitOutcome] = []
        for receipt in batch:
            if receipt.receipt_id in self.refuse:
                outcomes.append(Refused(receipt.receipt_id, "kkt_not_registered", "refused by the test"))
                continue
            number = len(self.documents) + 1
            fiscal = self.documents.setdefault(
                receipt.external_id, FiscalData(number, f"{number:010d}", "2026-11-24T00:00:00Z")
            )
            outcomes.append(Fiscalized(receipt.receipt_id, fiscal))
        return outcomes

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        raise TypeError("one-phase")

    def failed_alone(self, receipt_id: str) -> int:
        return sum(1 for c in self.calls if c.receipt_ids == (receipt_id,) and not c.answered)


@dataclasses.dataclass
class LoopRig:
    store: Store
    upstream: FakeUpstream
    breaker: CircuitBreaker
    loop: SyncLoop
    time: FakeTime
    changes: list[tuple[float, BreakerState, BreakerState]]

    async def accept(self, key: str) -> str:
        result = await self.store.accept(validate_receipt(sample_receipt(key)))
        self.loop.wake()  # as the intake handler does
        return result.receipt_id

    task: asyncio.Task[None] | None = None

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Run the loop (from the first call on) until `predicate` holds; the timeout is in real seconds, fake
        time runs far faster. The loop goes on running until the test ends."""
        if self.task is None:
            self.task = asyncio.create_task(self.loop.run())
        task = self.task
        await async_wait_until(lambda: predicate() or task.done(), timeout, what, interval=0.002)
        assert not task.done(), f"the loop ended: {task}"

    async def stop(self) -> None:
        self.loop.request_stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)

    async def statuses(self) -> dict[str, int]:
        rows = await self.store.run(
            lambda conn: conn.execute_fetchall("SELECT status, count(*) FROM receipts GROUP BY status")
        )
        return {"pending": 0, "submitted": 0, "sent": 0, "failed": 0, **{status: n for status, n in rows}}


class LoopFactory(Protocol):
    async def __call__(self, sleep: Sleep | None = None, **overrides: Any) -> LoopRig: ...


@pytest.fixture
async def loop_factory(tmp_path: Path) -> AsyncIterator[LoopFactory]:
    rigs: list[LoopRig] = []

    async def factory(sleep: Sleep | None = None, **overrides: Any) -> LoopRig:
        """A loop on a fresh store; its sleep is the fake clock's unless the test brings its own."""
        config = make_config(tmp_path, **overrides)
        clock = FakeTime()
        store = await Store.open(config.db, config.max_pending)
        upstream = FakeUpstream(clock)
        changes: list[tuple[float, BreakerState, BreakerState]] = []
        breaker = CircuitBreaker(
            config.breaker_threshold,
            config.breaker_reset,
            on_change=lambda old, new: changes.append((clock(), old, new)),
            clock=clock,
        )
        checked: Upstream = upstream  # FakeUpstream implements the protocol the loop is written against
        loop = SyncLoop(store, checked, breaker, config, clock=clock, sleep=sleep or clock.sleep)
        rigs.append(LoopRig(store, upstream, breaker, loop, clock, changes))
        return rigs[-1]

    try:
        yield factory
    finally:
        for rig in rigs:
            await rig.stop()
            await rig.store.close()


def gaps(calls: Sequence[Call]) -> list[float]:
    return [b.at - a.at for a, b in zip(calls, calls[1:])]


async def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(loop_factory: LoopFactory) -> None:
    rig = await loop_factory(backoff_max=30.0, breaker_threshold=1000)
    for i in range(10):
        await rig.accept(f"b-{i}")
    rig.upstream.failure = (FailureKind.MAYBE_SENT, "http_500")
    await rig.until(lambda: len(rig.upstream.calls) >= 10, "ten failed deliveries")
    waits = gaps(rig.upstream.calls[:10])
    # tenacity's wait_exponential_jitter: 0.5 s x 2^(n-1) plus up to 1 s of jitter, capped at backoff_max.
    for n, wait in enumerate(waits, start=1):
        low = min(0.5 * 2 ** (n - 1), 30.0)
        assert low <= wait <= min(low + 1.0, 30.0), (n, waits)
    assert waits[-3:] == pytest.approx([30.0, 30.0, 30.0])
    assert rig.time.sleeps[:9] == pytest.approx(waits)  # the loop waited exactly that long, once per failure
    assert await rig.statuses() == {"pending": 10, "submitted": 0, "sent": 0, "failed": 0}


async def test_breaker_opens_paces_half_open_trials_and_closes(loop_factory: LoopFactory) -> None:
    rig = await loop_factory(backoff_max=30.0, breaker_threshold=4, breaker_reset=3.0)
    for i in range(10):
        await rig.accept(f"br-{i}")
    rig.upstream.failure = (FailureKind.MAYBE_SENT, "http_500")
    await rig.until(lambda: [c[1:] for c in rig.changes].count((HALF_OPEN, OPEN)) >= 5, "five failed trials")
    assert rig.changes[0][1:] == (CLOSED, OPEN)
    opened_at = rig.changes[0][0]
    calls = rig.upstream.calls
    assert [c.at for c in calls[:4]][-1] == opened_at  # the fourth consecutive failure opened it
    # While open, nothing goes out but one trial per breaker_reset: no busy loop, no early trial.
    trials = [c for c in calls if c.at > opened_at]
    assert len(trials) >= 5
    assert [c.at - opened_at for c in trials[:5]] == pytest.approx([3.0, 6.0, 9.0, 12.0, 15.0])
    assert rig.changes[1:11] == [
        item
        for k in range(1, 6)
        for item in ((opened_at + 3.0 * k, OPEN, HALF_OPEN), (opened_at + 3.0 * k, HALF_OPEN, OPEN))
    ]
    # One wait per trial, each the breaker's remaining time: the loop never spins while it is open.
    assert rig.time.sleeps[3:8] == [3.0] * 5
    status = rig.loop.status()
    assert status.breaker is OPEN and status.consecutive_failures >= 9
    assert await rig.statuses() == {"pending": 10, "submitted": 0, "sent": 0, "failed": 0}, (
        "an outage dead-lettered receipts"
    )
    # The upstream comes back: the next trial closes the breaker and everything goes out once.
    rig.upstream.failure = None
    await rig.until(lambda: rig.store.counts.sent == 10, "everything delivered")
    assert (HALF_OPEN, CLOSED) in [c[1:] for c in rig.changes]
    assert rig.breaker.state is CLOSED and rig.loop.status().consecutive_failures == 0
    assert len(rig.upstream.documents) == 10
    assert await rig.statuses() == {"pending": 0, "submitted": 0, "sent": 10, "failed": 0}


@pytest.mark.parametrize("reason", ["http_500", "timeout", "connection_lost"])
async def test_an_outage_dead_letters_nothing(loop_factory: LoopFactory, reason: str) -> None:
    """Days of an upstream failing everyone: each receipt fails alone many times over max_attempts, yet no
    failure is counted against any (no acknowledgement ever shows the upstream works)."""
    rig = await loop_factory(max_attempts=2, breaker_threshold=1000, backoff_max=60.0)
    ids = [await rig.accept(f"o-{i}") for i in range(10)]
    rig.upstream.failure = (FailureKind.MAYBE_SENT, reason)
    await rig.until(
        lambda: rig.loop.stats.cycles >= 30 and rig.upstream.failed_alone(ids[0]) > 3, "thirty failed cycles"
    )
    assert rig.time() - 1000.0 > 60.0 * 20  # twenty minutes of outage
    assert await rig.statuses() == {"pending": 10, "submitted": 0, "sent": 0, "failed": 0}
    assert rig.loop.stats.dead_lettered_total == 0
    rows = [await rig.store.get(receipt_id) for receipt_id in ids]
    assert all(row is not None and row.attempts == 0 and row.last_error == reason for row in rows)
    rig.upstream.failure = None
    await rig.until(lambda: rig.store.counts.sent == 10, "delivery after the outage")
    assert len(rig.upstream.documents) == 10


async def test_a_failure_that_sent_nothing_changes_nothing_but_the_backoff(loop_factory: LoopFactory) -> None:
    rig = await loop_factory(max_attempts=1, breaker_threshold=1000)
    ids = [await rig.accept(f"n-{i}") for i in range(5)]
    rig.upstream.failure = (FailureKind.NOT_SENT, "connect_error")
    await rig.until(lambda: len(rig.upstream.calls) >= 12, "refused connections")
    # Nothing reached the upstream: the batch is not shrunk, nothing held, no receipt marked.
    assert all(c.receipt_ids == tuple(ids) for c in rig.upstream.calls)
    assert rig.loop.policy.batch_limit == rig.loop.policy.batch_size and rig.loop.policy.held == {}
    rows = [await rig.store.get(receipt_id) for receipt_id in ids]
    assert all(row is not None and row.attempts == 0 and row.last_error is None for row in rows)
    assert "connect_error" in (rig.loop.status().last_error or "")


async def test_a_poison_receipt_is_isolated_and_dead_lettered(loop_factory: LoopFactory) -> None:
    rig = await loop_factory(max_attempts=3, breaker_threshold=1000, backoff_max=1.0, sync_interval=0.01)
    ids = [await rig.accept(f"p-{i}") for i in range(30)]
    poison = ids[5]
    rig.upstream.poison.add(poison)
    sold: list[str] = []

    async def till_keeps_selling() -> None:
        # Other receipts flowing is the evidence that the upstream works and the poisoned one is the problem.
        # At a till's pace: the next sale once the last one went out, a quarter of a second later.
        while not rig.store.counts.failed:
            sold.append(await rig.accept(f"later-{len(sold)}"))
            await async_wait_until(lambda: rig.store.counts.pending <= 1, 10, "the sale delivered", 0.001)
            await rig.time.sleep(0.25)

    seller = asyncio.create_task(till_keeps_selling())
    try:
        await rig.until(lambda: seller.done() and rig.store.counts.pending == 0, "the poison dead-lettered")
    finally:
        seller.cancel()
        await asyncio.gather(seller, return_exceptions=True)
    assert rig.store.counts.failed == 1 and rig.loop.stats.dead_lettered_total == 1
    row = await rig.store.get(poison)
    assert row is not None and row.status is ReceiptStatus.FAILED and row.attempts == 4
    assert row.last_error is not None and "gave up after 3 failed deliveries" in row.last_error
    innocent = [await rig.store.get(receipt_id) for receipt_id in ids + sold if receipt_id != poison]
    assert all(r is not None and r.status is ReceiptStatus.SENT and r.attempts == 0 for r in innocent)
    # Each innocent receipt was fiscalized once, the poison never.
    assert len(rig.upstream.documents) == len(innocent)
    assert rig.upstream.failed_alone(poison) >= 4
    assert rig.loop.policy.held == {}  # a dead letter is forgotten by the policy


async def test_a_refused_receipt_is_a_dead_letter_at_once(loop_factory: LoopFactory) -> None:
    rig = await loop_factory()
    ids = [await rig.accept(f"r-{i}") for i in range(4)]
    rig.upstream.refuse.add(ids[2])
    await rig.until(lambda: rig.store.counts.pending == 0, "all settled")
    assert await rig.statuses() == {"pending": 0, "submitted": 0, "sent": 3, "failed": 1}
    row = await rig.store.get(ids[2])
    assert row is not None and row.last_error == "kkt_not_registered: refused by the test"
    # No retry, no backoff: the loop's only waits were its idle waits for more receipts (the idle interval,
    # through the same injected sleep) and the zero-length pauses that give way to intake.
    assert len(rig.upstream.calls) == 1
    assert set(rig.time.sleeps) <= {0.0, rig.loop.config.sync_interval}, rig.time.sleeps
    assert rig.loop.stats.rejected_total == 1 and rig.loop.stats.delivered_total == 3


class BlockingSleep:
    """A sleep that never ends by itself: only a stop can get the loop out of it."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.entered = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


@pytest.mark.parametrize(("threshold", "expected_wait"), [(1, 3600.0), (1000, None)], ids=["breaker-open", "backoff"])
async def test_a_stop_interrupts_a_retry_wait(
    loop_factory: LoopFactory, threshold: int, expected_wait: float | None
) -> None:
    blocking = BlockingSleep()
    rig = await loop_factory(sleep=blocking, breaker_threshold=threshold, breaker_reset=3600.0, backoff_max=3600.0)
    await rig.accept("s-1")
    rig.upstream.failure = (FailureKind.MAYBE_SENT, "http_503")
    task = asyncio.create_task(rig.loop.run())
    await asyncio.wait_for(blocking.entered.wait(), 10)
    rig.loop.request_stop()
    await asyncio.wait_for(task, 1.0)  # not after the wait: at once
    assert blocking.cancelled == 1 and len(rig.upstream.calls) == 1
    if expected_wait is not None:
        assert blocking.asked == [expected_wait]  # the breaker's full reset period
    else:
        assert 0.5 <= blocking.asked[0] <= 1.5  # the first backoff step
    assert rig.store.counts.pending == 1


async def test_a_stop_ends_an_idle_loop_at_once(loop_factory: LoopFactory) -> None:
    rig = await loop_factory(sync_interval=3600.0)
    task = asyncio.create_task(rig.loop.run())
    await async_wait_until(lambda: rig.loop.stats.cycles >= 1, 10, "the first cycle")
    rig.loop.request_stop()
    await asyncio.wait_for(task, 1.0)
