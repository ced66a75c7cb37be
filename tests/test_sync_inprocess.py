"""The sync loop in-process against the real mock OFD or a scripted one: deterministic cycle-level checks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kktd.clock import now_ms
from kktd.delivery import FiscalData, Fiscalized, Outgoing, Refused, SubmitOutcome
from kktd.errors import StorageUnavailable
from kktd.receipt import sample_receipt, validate_receipt
from kktd.store import ReceiptStatus, Store, queries
from kktd.sync import BreakerState, CircuitBreaker, SyncLoop
from kktd.sync.policy import MAX_HELD, DeliveryPolicy
from kktd_mocks.ofd import MockOfd
from tests.conftest import App, AppFactory
from tests.support import FakeTime, async_wait_until


@dataclasses.dataclass
class Rig:
    store: Store
    sync: SyncLoop
    http: TestClient


class RigFactory(Protocol):
    async def __call__(self, ofd_url: str, **overrides: Any) -> Rig: ...


@pytest.fixture
async def rig_factory(app_factory: AppFactory) -> RigFactory:
    """kktd assembled in process against the OFD at `ofd_url`, with quick retries; the loop is driven by
    the test."""

    async def factory(ofd_url: str, **overrides: Any) -> Rig:
        app = await app_factory(ofd_url=ofd_url, backoff_max=0.05, breaker_reset=0.05, **overrides)
        return Rig(app.store, app.kktd.sync, app.client)

    return factory


async def accept(store: Store, key: str, pos_id: str = "POS-001") -> str:
    result = await store.accept(validate_receipt(sample_receipt(key, pos_id=pos_id)))
    return result.receipt_id


async def test_sync_endpoint_runs_one_cycle_and_reports(rig_factory: RigFactory, mock_ofd: MockOfd) -> None:
    rig = await rig_factory(mock_ofd.url)
    for i in range(7):
        await accept(rig.store, f"now-{i}")
    response = await rig.http.post("/v1/kkt/buffer/sync")
    result = await response.json()
    assert response.status == 200
    assert result["delivered"] == 7 and result["pending"] == 0 and result["error"] is None
    assert mock_ofd.stats()["unique"] == 7
    await mock_ofd.set_mode("offline")
    await accept(rig.store, "now-offline")
    result = await (await rig.http.post("/v1/kkt/buffer/sync")).json()
    assert result["delivered"] == 0 and "connect_error" in result["error"] and result["pending"] == 1


async def test_retention_prunes_only_old_sent_receipts(rig_factory: RigFactory, mock_ofd: MockOfd) -> None:
    rig = await rig_factory(mock_ofd.url, retention_days=90)
    ids = [await accept(rig.store, f"ret-{i}") for i in range(1200)]
    await rig.sync.run_once_now()
    await accept(rig.store, "ret-pending")
    old = now_ms() - 91 * 86_400_000

    async def age(conn: Any) -> None:
        await conn.execute(
            f"UPDATE receipts SET sent_ms = ? WHERE receipt_id IN ({','.join('?' * 1000)})", (old, *ids[:1000])
        )

    await rig.store.run(age)
    assert await rig.sync.housekeeping.prune() == 1000
    assert rig.store.counts.sent == 200 and rig.store.counts.pending == 1
    assert await rig.store.get(ids[0]) is None
    assert await rig.store.get(ids[1000]) is not None


async def test_pending_age_alarm_warns_then_goes_critical(
    rig_factory: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig = await rig_factory("http://127.0.0.1:9", pending_warn_age=3 * 86400.0, pending_critical_age=25 * 86400.0)
    receipt_id = await accept(rig.store, "old-1")

    async def set_age(days: float) -> None:
        stamp = now_ms() - int(days * 86_400_000)
        await rig.store.run(
            lambda conn: conn.execute("UPDATE receipts SET accepted_ms = ? WHERE receipt_id = ?", (stamp, receipt_id))
        )

    assert await rig.sync.housekeeping.check_pending_age() == "ok"
    await set_age(4)
    assert await rig.sync.housekeeping.check_pending_age() == "warning"
    assert any(r.levelname == "WARNING" and "4.0 days old" in r.getMessage() for r in caplog.records)
    health = await (await rig.http.get("/v1/health")).json()
    assert health["status"] == "warning"
    status = await (await rig.http.get("/v1/kkt/buffer/status")).json()
    assert status["oldest_pending_alarm"] == "warning"
    await set_age(26)
    assert await rig.sync.housekeeping.check_pending_age() == "critical"
    assert any(r.levelname == "ERROR" and "26.0 days old" in r.getMessage() for r in caplog.records)
    response = await rig.http.get("/v1/health")
    assert response.status == 503
    assert "pending_critical_age" in (await response.json())["problems"][0]


class ScriptedOfd:
    """An OFD that answers 500 to any batch holding a poisoned receipt id, or to everything."""

    def __init__(self) -> None:
        self.poison: set[str] = set()
        self.down = False
        self.acked: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.Response:
        items = await request.json()
        if self.down or any(item["receipt_id"] in self.poison for item in items):
            return web.Response(status=500, text="internal error")
        results = []
        for item in items:
            number = self.acked.setdefault(item["idempotency_key"], len(self.acked) + 1)
            results.append(
                {
                    "receipt_id": item["receipt_id"],
                    "fiscal_document_number": number,
                    "fiscal_sign": f"{number:010d}",
                    "ofd_received_at": "2026-11-24T00:00:00Z",
                }
            )
        return web.json_response({"results": results})


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedOfd, str]]:
    ofd = ScriptedOfd()
    app = web.Application()
    app.router.add_post("/v1/receipts", ofd.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield ofd, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def run_loop_until(rig: Rig, predicate: Callable[[], bool], timeout: float) -> None:
    task = asyncio.create_task(rig.sync.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await asyncio.sleep(0.01)
    finally:
        rig.sync.request_stop()
        await asyncio.wait_for(task, 5)


async def test_poison_receipt_is_isolated_and_dead_lettered(
    rig_factory: RigFactory, scripted: tuple[ScriptedOfd, str]
) -> None:
    ofd, url = scripted
    rig = await rig_factory(url, max_attempts=3, breaker_threshold=1000, sync_interval=0.01)
    ids = [await accept(rig.store, f"p-{i}") for i in range(30)]
    ofd.poison.add(ids[5])

    async def till_keeps_selling() -> None:
        # Other receipts flowing is the evidence that the OFD works and the poisoned one is the problem.
        for i in range(10_000):
            if rig.store.counts.failed:
                return
            await accept(rig.store, f"later-{i}")
            await asyncio.sleep(0.02)

    seller = asyncio.create_task(till_keeps_selling())
    try:
        await run_loop_until(rig, lambda: seller.done() and rig.store.counts.pending == 0, 60)
    finally:
        seller.cancel()
        await asyncio.gather(seller, return_exceptions=True)
    assert rig.store.counts.failed == 1
    row = await rig.store.get(ids[5])
    assert row is not None and row.status == "failed" and row.attempts == 4
    assert row.last_error is not None and "gave up after 3 failed deliveries" in row.last_error
    innocent = [await rig.store.get(receipt_id) for receipt_id in ids if receipt_id != ids[5]]
    assert all(r is not None and r.status == "sent" and r.attempts == 0 for r in innocent)


async def test_an_outage_never_dead_letters_receipts(
    rig_factory: RigFactory, scripted: tuple[ScriptedOfd, str]
) -> None:
    ofd, url = scripted
    ofd.down = True
    rig = await rig_factory(url, max_attempts=2, breaker_threshold=1000, sync_interval=0.01)
    for i in range(10):
        await accept(rig.store, f"o-{i}")
    await run_loop_until(rig, lambda: rig.sync.stats.cycles >= 30, 60)
    assert rig.store.counts.failed == 0 and rig.store.counts.pending == 10
    rows = [await rig.store.get(r.receipt_id) for r in await rig.store.pending_batch(10)]
    assert all(row is not None and row.attempts == 0 and row.last_error == "http_500" for row in rows)
    ofd.down = False
    config = rig.sync.config
    rig.sync = SyncLoop(
        rig.store, rig.sync.upstream, CircuitBreaker(config.breaker_threshold, config.breaker_reset), config
    )
    await run_loop_until(rig, lambda: rig.store.counts.sent == 10, 30)
    assert len(ofd.acked) == 10


async def db_counts(store: Store) -> dict[str, int]:
    rows = await store.run(lambda conn: conn.execute_fetchall("SELECT status, count(*) FROM receipts GROUP BY status"))
    return {"pending": 0, "submitted": 0, "sent": 0, "failed": 0, **{status: n for status, n in rows}}


async def test_loop_outlives_a_storage_failure_and_counters_stay_true(
    rig_factory: RigFactory, mock_ofd: MockOfd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error while recording the OFD's answers: the loop retries (it used to end for good), the
    receipts stay pending until recorded, and the counters never drift from the database."""
    rig = await rig_factory(mock_ofd.url, sync_interval=0.01)
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    for i in range(20):
        await accept(rig.store, f"st-{i}")
    await accept(rig.store, "st-bad", pos_id="POS-BAD")
    real_update = Store.settle
    failures = {"left": 2}

    async def flaky_settle(self: Store, outcomes: Any, source: Any = ReceiptStatus.PENDING) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise StorageUnavailable("disk full: database or disk is full")
        await real_update(self, outcomes, source)

    monkeypatch.setattr(Store, "settle", flaky_settle)
    await run_loop_until(rig, lambda: rig.store.counts.pending == 0, 30)
    assert failures["left"] == 0
    assert await db_counts(rig.store) == {"pending": 0, "submitted": 0, "sent": 20, "failed": 1}
    assert (rig.store.counts.pending, rig.store.counts.sent, rig.store.counts.failed) == (0, 20, 1)
    assert mock_ofd.stats()["unique"] == 20


async def test_counters_follow_the_rows_when_the_second_statement_fails(
    rig_factory: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await rig_factory("http://127.0.0.1:9")
    ids = [await accept(rig.store, f"cf-{i}") for i in range(3)]
    real = queries._update_from_values

    async def fail_rejections(conn: Any, assignments: str, stamp: int, source: Any, rows: Any) -> int:
        if "failed" in assignments:
            raise __import__("sqlite3").OperationalError("database or disk is full")
        return await real(conn, assignments, stamp, source, rows)

    monkeypatch.setattr(queries, "_update_from_values", fail_rejections)
    with pytest.raises(StorageUnavailable):
        await rig.store.settle(
            [
                Fiscalized(ids[0], FiscalData(1, "0000000001", "2026-11-24T00:00:00Z")),
                Refused(ids[1], "kkt_not_registered", "test"),
            ]
        )
    assert await db_counts(rig.store) == {"pending": 2, "submitted": 0, "sent": 1, "failed": 0}
    assert (rig.store.counts.pending, rig.store.counts.sent, rig.store.counts.failed) == (2, 1, 0)


def test_held_receipts_are_capped() -> None:
    policy = DeliveryPolicy(50, hold_s=60)
    for i in range(MAX_HELD + 50):
        policy._hold(f"r{i}", float(i))
    assert len(policy.held) == MAX_HELD
    assert f"r{MAX_HELD + 49}" in policy.held and "r0" not in policy.held


async def test_sync_endpoint_reports_dead_letters(rig_factory: RigFactory, scripted: tuple[ScriptedOfd, str]) -> None:
    """POST /v1/kkt/buffer/sync says how many receipts a cycle dead-lettered (it used to say 0 always)."""
    ofd, url = scripted
    rig = await rig_factory(url, max_attempts=1, breaker_threshold=1000)
    poison = await accept(rig.store, "dl-poison")
    ofd.poison.add(poison)
    reported = 0
    deadline = asyncio.get_running_loop().time() + 20
    i = 0
    while rig.store.counts.failed == 0:
        assert asyncio.get_running_loop().time() < deadline, "the poisoned receipt was never dead-lettered"
        await accept(rig.store, f"dl-other-{i}")  # acknowledged others: the evidence against the poison
        i += 1
        reported += (await (await rig.http.post("/v1/kkt/buffer/sync")).json())["dead_lettered"]
        await asyncio.sleep(0.02)  # lets the poison's short hold (2 x backoff_max = 0.1 s) run out
    assert reported == 1
    row = await rig.store.get(poison)
    assert row is not None and row.status == "failed"


# ---- retries and the breaker against the real mock and the real kktd-ofd client, in fake time ----
# These took over from end-to-end tests that spent tens of seconds watching real backoff; tests/test_sync.py
# keeps the breaker's part of one (error500) as a smoke test in a real process.


@dataclasses.dataclass
class FakeTimed:
    app: App
    time: FakeTime
    requests: list[float]  # fake time of every request to the upstream
    task: asyncio.Task[None] | None = None

    @property
    def sync(self) -> SyncLoop:
        return self.app.kktd.sync

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0, tick: float = 0.0) -> None:
        """Run the loop (from the first call on) until `predicate` holds. `tick` moves the fake clock on at
        every poll, for tests where time must also pass while the loop idles (holds ending)."""
        if self.task is None:
            self.task = asyncio.create_task(self.sync.run())
        task = self.task

        def reached() -> bool:
            self.time.advance(tick)
            return predicate() or task.done()

        await async_wait_until(reached, timeout, what, interval=0.002)
        assert not task.done(), f"the loop ended: {task}"

    async def stop(self) -> None:
        self.sync.request_stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)


class FakeTimedFactory(Protocol):
    async def __call__(self, ofd_url: str, **overrides: Any) -> FakeTimed: ...


@pytest.fixture
async def fake_timed(app_factory: AppFactory) -> AsyncIterator[FakeTimedFactory]:
    started: list[FakeTimed] = []

    async def factory(ofd_url: str, **overrides: Any) -> FakeTimed:
        clock = FakeTime()
        app = await app_factory(ofd_url=ofd_url, clock=clock, sleep=clock.sleep, **overrides)
        requests: list[float] = []
        upstream = app.kktd.sync.upstream
        submit = upstream.submit

        async def timed_submit(batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
            requests.append(clock())
            return await submit(batch)

        upstream.submit = timed_submit  # type: ignore[method-assign]
        started.append(FakeTimed(app, clock, requests))
        return started[-1]

    try:
        yield factory
    finally:
        for rig in started:
            await rig.stop()


async def http_json(app: App, method: str, path: str) -> tuple[int, Any]:
    response = await app.client.request(method, path)
    return response.status, await response.json()


FAKE_TIME_FAILURE_MODES = [
    ("error500", {}),  # also the real-time smoke test in tests/test_sync.py
    ("slow", {"delay_s": 5.0}),  # beyond kktd's ofd_timeout 0.3
    ("flaky", {"fail_ratio": 1.0, "seed": 3}),  # half 500s, half connection resets
]


@pytest.mark.parametrize(("mode", "params"), FAKE_TIME_FAILURE_MODES, ids=[mode for mode, _ in FAKE_TIME_FAILURE_MODES])
async def test_failing_ofd_backoff_breaker_and_no_busy_loop(
    fake_timed: FakeTimedFactory, mock_ofd: MockOfd, caplog: pytest.LogCaptureFixture, mode: str, params: dict[str, Any]
) -> None:
    caplog.set_level(logging.INFO, logger="kktd.app")
    await mock_ofd.set_mode(mode, **params)
    rig = await fake_timed(
        mock_ofd.url, backoff_max=30.0, breaker_threshold=4, breaker_reset=3.0, ofd_timeout=0.3, sync_interval=0.2
    )
    for i in range(10):
        await accept(rig.app.store, f"{mode}-{i}")
    await rig.until(lambda: len(rig.requests) >= 4, "four requests")
    # Backoff: exponential from 0.5 s with up to 1 s of jitter, so the third gap (>= 2 s) always exceeds
    # the first (<= 1.5 s); in fake time the gaps are the waits themselves.
    gaps = [b - a for a, b in zip(rig.requests, rig.requests[1:])]
    assert gaps[2] > gaps[0] and gaps[2] >= 2.0, gaps
    await rig.until(lambda: rig.sync.breaker.state is not BreakerState.CLOSED, "the breaker to open")
    assert any("breaker closed -> open" in r.getMessage() for r in caplog.records)
    status = (await http_json(rig.app, "GET", "/v1/kkt/buffer/status"))[1]
    assert status["sync"]["breaker"] in ("open", "half_open")
    code, health = await http_json(rig.app, "GET", "/v1/health")
    assert code == 200 and health["status"] == "warning"
    await rig.until(lambda: len(rig.requests) >= 7, "three half-open trials")
    # No busy loop while the breaker is open: nothing but one trial per breaker_reset reaches the OFD.
    trials = rig.requests[4:7]
    assert [b - a for a, b in zip(rig.requests[3:7], trials)] == pytest.approx([3.0, 3.0, 3.0])
    assert mock_ofd.stats()["requests"] <= len(rig.requests)  # (the last one may still be on its way)
    messages = [r.getMessage() for r in caplog.records]
    assert any("open -> half_open" in m for m in messages)
    assert any("half_open -> open" in m for m in messages)
    assert await db_counts(rig.app.store) == {"pending": 10, "submitted": 0, "sent": 0, "failed": 0}, (
        "an outage dead-lettered receipts"
    )
    await mock_ofd.set_mode("online")
    await rig.until(lambda: rig.app.store.counts.sent == 10, "everything delivered")
    assert await db_counts(rig.app.store) == {"pending": 0, "submitted": 0, "sent": 10, "failed": 0}
    assert any("half_open -> closed" in r.getMessage() for r in caplog.records)
    status = (await http_json(rig.app, "GET", "/v1/kkt/buffer/status"))[1]
    assert status["sync"]["breaker"] == "closed"
    assert mock_ofd.stats()["unique"] == 10


async def test_flaky_ofd_still_delivers_everything_once(fake_timed: FakeTimedFactory, mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("flaky", fail_ratio=0.5, seed=7)
    rig = await fake_timed(
        mock_ofd.url,
        backoff_max=1.0,
        breaker_reset=0.5,
        sync_interval=0.2,
        ofd_timeout=2.0,
        batch_size=10,
        breaker_threshold=50,
    )
    for i in range(150):
        await accept(rig.app.store, f"flaky-{i}")
    await rig.until(lambda: rig.app.store.counts.pending == 0, "all 150 receipts sent", timeout=60, tick=0.05)
    assert await db_counts(rig.app.store) == {"pending": 0, "submitted": 0, "sent": 150, "failed": 0}
    stats = mock_ofd.stats()
    assert stats["unique"] == 150
    assert stats["requests"] > 15  # failures happened and were retried
