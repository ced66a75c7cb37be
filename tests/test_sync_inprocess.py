"""The sync loop in-process against the real mock OFD or a scripted one: deterministic cycle-level checks."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kktd.clock import now_ms
from kktd.errors import StorageUnavailable
from kktd.receipt import sample_receipt, validate_receipt
from kktd.store import Store, queries
from kktd.sync import CircuitBreaker, SyncLoop
from kktd.sync.policy import MAX_HELD, DeliveryPolicy
from kktd.upstreams.base import FiscalData, Fiscalized, Refused
from kktd_mocks.ofd import MockOfd, start_mock_ofd
from tests.conftest import AppFactory


@dataclasses.dataclass
class Rig:
    store: Store
    sync: SyncLoop
    http: TestClient


@pytest.fixture
async def mock_ofd() -> AsyncIterator[MockOfd]:
    mock = await start_mock_ofd("127.0.0.1", 0)
    try:
        yield mock
    finally:
        await mock.close()


@pytest.fixture
async def rig_factory(app_factory: AppFactory) -> Callable[..., Any]:
    """kktd assembled in process against the OFD at `ofd_url`, with quick retries; the loop is driven by
    the test."""
    async def factory(ofd_url: str, **overrides: Any) -> Rig:
        app = await app_factory(ofd_url=ofd_url, backoff_max=0.05, breaker_reset=0.05, **overrides)
        return Rig(app.store, app.kktd.sync, app.client)

    return factory


async def accept(store: Store, key: str, pos_id: str = "POS-001") -> str:
    result = await store.accept(validate_receipt(sample_receipt(key, pos_id=pos_id)))
    return result.receipt_id  # type: ignore[union-attr]


async def test_sync_endpoint_runs_one_cycle_and_reports(rig_factory: Any, mock_ofd: MockOfd) -> None:
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


async def test_retention_prunes_only_old_sent_receipts(rig_factory: Any, mock_ofd: MockOfd) -> None:
    rig = await rig_factory(mock_ofd.url, retention_days=90)
    ids = [await accept(rig.store, f"ret-{i}") for i in range(1200)]
    await rig.sync.run_once_now()
    await accept(rig.store, "ret-pending")
    old = now_ms() - 91 * 86_400_000

    async def age(conn: Any) -> None:
        await conn.execute("UPDATE receipts SET sent_ms = ? WHERE receipt_id IN (%s)" % ",".join(
            "?" * 1000), (old, *ids[:1000]))

    await rig.store.run(age)
    assert await rig.sync.prune() == 1000
    assert rig.store.counts.sent == 200 and rig.store.counts.pending == 1
    assert await rig.store.get(ids[0]) is None
    assert await rig.store.get(ids[1000]) is not None


async def test_pending_age_alarm_warns_then_goes_critical(rig_factory: Any, caplog: Any) -> None:
    rig = await rig_factory("http://127.0.0.1:9", pending_warn_age=3 * 86400.0,
                            pending_critical_age=25 * 86400.0)
    receipt_id = await accept(rig.store, "old-1")

    async def set_age(days: float) -> None:
        stamp = now_ms() - int(days * 86_400_000)
        await rig.store.run(lambda conn: conn.execute(
            "UPDATE receipts SET accepted_ms = ? WHERE receipt_id = ?", (stamp, receipt_id)))

    assert await rig.sync.check_pending_age() == "ok"
    await set_age(4)
    assert await rig.sync.check_pending_age() == "warning"
    assert any(r.levelname == "WARNING" and "4.0 days old" in r.getMessage() for r in caplog.records)
    health = await (await rig.http.get("/v1/health")).json()
    assert health["status"] == "warning"
    status = await (await rig.http.get("/v1/kkt/buffer/status")).json()
    assert status["oldest_pending_alarm"] == "warning"
    await set_age(26)
    assert await rig.sync.check_pending_age() == "critical"
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
            results.append({"receipt_id": item["receipt_id"], "fiscal_document_number": number,
                            "fiscal_sign": f"{number:010d}", "ofd_received_at": "2026-11-24T00:00:00Z"})
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


async def test_poison_receipt_is_isolated_and_dead_lettered(rig_factory: Any, scripted: Any) -> None:
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


async def test_an_outage_never_dead_letters_receipts(rig_factory: Any, scripted: Any) -> None:
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
    rig.sync = SyncLoop(rig.store, rig.sync.upstream,
                        CircuitBreaker(config.breaker_threshold, config.breaker_reset), config)
    await run_loop_until(rig, lambda: rig.store.counts.sent == 10, 30)
    assert len(ofd.acked) == 10


async def db_counts(store: Store) -> dict[str, int]:
    rows = await store.run(lambda conn: conn.execute_fetchall(
        "SELECT status, count(*) FROM receipts GROUP BY status"))
    return {"pending": 0, "sent": 0, "failed": 0, **{status: n for status, n in rows}}


async def test_loop_outlives_a_storage_failure_and_counters_stay_true(rig_factory: Any, mock_ofd: MockOfd,
                                                                       monkeypatch: Any) -> None:
    """A disk error while recording the OFD's answers: the loop retries (it used to end for good), the
    receipts stay pending until recorded, and the counters never drift from the database."""
    rig = await rig_factory(mock_ofd.url, sync_interval=0.01)
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    for i in range(20):
        await accept(rig.store, f"st-{i}")
    await accept(rig.store, "st-bad", pos_id="POS-BAD")
    real_update = Store.settle
    failures = {"left": 2}

    async def flaky_settle(self: Store, outcomes: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise StorageUnavailable("disk full: database or disk is full")
        await real_update(self, outcomes)

    monkeypatch.setattr(Store, "settle", flaky_settle)
    await run_loop_until(rig, lambda: rig.store.counts.pending == 0, 30)
    assert failures["left"] == 0
    assert await db_counts(rig.store) == {"pending": 0, "sent": 20, "failed": 1}
    assert (rig.store.counts.pending, rig.store.counts.sent, rig.store.counts.failed) == (0, 20, 1)
    assert mock_ofd.stats()["unique"] == 20


async def test_counters_follow_the_rows_when_the_second_statement_fails(rig_factory: Any,
                                                                        monkeypatch: Any) -> None:
    rig = await rig_factory("http://127.0.0.1:9")
    ids = [await accept(rig.store, f"cf-{i}") for i in range(3)]
    real = queries._update_pending_from_values

    async def fail_rejections(conn: Any, assignments: str, stamp: int, rows: Any) -> int:
        if "failed" in assignments:
            raise __import__("sqlite3").OperationalError("database or disk is full")
        return await real(conn, assignments, stamp, rows)

    monkeypatch.setattr(queries, "_update_pending_from_values", fail_rejections)
    with pytest.raises(StorageUnavailable):
        await rig.store.settle([Fiscalized(ids[0], FiscalData(1, "0000000001", "2026-11-24T00:00:00Z")),
                                Refused(ids[1], "kkt_not_registered", "test")])
    assert await db_counts(rig.store) == {"pending": 2, "sent": 1, "failed": 0}
    assert (rig.store.counts.pending, rig.store.counts.sent, rig.store.counts.failed) == (2, 1, 0)


def test_held_receipts_are_capped() -> None:
    policy = DeliveryPolicy(50, hold_s=60)
    for i in range(MAX_HELD + 50):
        policy._hold(f"r{i}", float(i))
    assert len(policy.held) == MAX_HELD
    assert f"r{MAX_HELD + 49}" in policy.held and "r0" not in policy.held


async def test_sync_endpoint_reports_dead_letters(rig_factory: Any, scripted: Any) -> None:
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
    assert (await rig.store.get(poison)).status == "failed"  # type: ignore[union-attr]
