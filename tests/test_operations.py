"""GET /metrics, the export endpoint and a receipt's logged story, on kktd assembled in process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kktd import ctl
from kktd.delivery import Refused
from kktd.receipt import validate_receipt
from kktd.states import BreakerState
from kktd.store import Store
from kktd.upstreams import REGISTRY
from kktd_mocks.ofd import MockOfd, start_mock_ofd
from tests.conftest import App, AppFactory
from tests.faulty_kktd import wedge_writer
from tests.support import receipts, sample_receipt


@pytest.fixture
async def mock_ofd() -> AsyncIterator[MockOfd]:
    mock = await start_mock_ofd("127.0.0.1", 0)
    try:
        yield mock
    finally:
        await mock.close()


async def scrape(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await app.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def post(app: App, body: Any, **headers: str) -> int:
    response = await app.client.post("/v1/kkt/receipt", json=body, headers=headers)
    return response.status


# ---- /metrics ----


async def test_metrics_follow_intake_and_rejections(app: App) -> None:
    before = await scrape(app)
    assert before[("kktd_receipts_accepted_total", ())] == 0
    assert before[("kktd_oldest_pending_age_seconds", ())] == 0
    for receipt in receipts("m", 5):
        assert await post(app, receipt) == 201
    assert await post(app, sample_receipt("m-0")) == 200  # a replay
    conflicting = sample_receipt("m-1")
    conflicting["items"][0]["name"] = "something else"
    assert await post(app, conflicting) == 409
    response = await app.client.post("/v1/kkt/receipt", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    found = await scrape(app)
    assert found[("kktd_receipts_accepted_total", ())] == 5
    assert found[("kktd_receipts_replayed_total", ())] == 1
    assert found[("kktd_receipts_rejected_total", (("code", "idempotency_conflict"),))] == 1
    assert found[("kktd_receipts_rejected_total", (("code", "invalid_json"),))] == 1
    assert found[("kktd_intake_duration_seconds_count", ())] == 6
    assert found[("kktd_group_commit_size_sum", ())] == 5
    assert found[("kktd_receipts", (("status", "pending"),))] == 5
    assert found[("kktd_buffer_capacity", ())] == app.store.max_pending
    assert 0 <= found[("kktd_oldest_pending_age_seconds", ())] < 60
    assert found[("kktd_database_size_bytes", ())] > 0
    assert found[("kktd_upstream_breaker_state", (("state", "closed"), ("upstream", "kktd-ofd")))] == 1
    assert found[("process_resident_memory_bytes", ())] > 0
    assert found[("kktd_pending_warn_age_seconds", ())] == app.kktd.config.pending_warn_age


async def test_a_scrape_never_waits_for_the_database(app_factory: AppFactory) -> None:
    """The writer is wedged (as if the disk hung): every database operation waits, /metrics answers."""
    app = await app_factory(drain_timeout=0.2)  # closing abandons the wedged job after this
    assert await post(app, sample_receipt("w-1")) == 201
    wedge = await wedge_writer(app.store)
    try:
        found = await asyncio.wait_for(scrape(app), 2)
        assert found[("kktd_receipts", (("status", "pending"),))] == 1
        assert found[("kktd_oldest_pending_age_seconds", ())] >= 0
    finally:
        wedge.cancel()


async def test_oldest_pending_age_follows_the_rows(app_factory: AppFactory, mock_ofd: MockOfd) -> None:
    app = await app_factory(ofd_url=mock_ofd.url, backoff_max=0.05, breaker_reset=0.05)
    store = app.store
    assert store.counters.oldest_unsent_ms is None
    first = await store.accept(validate_receipt(sample_receipt("o-1")))
    await store.accept(validate_receipt(sample_receipt("o-2")))
    assert store.counters.oldest_unsent_ms == first.accepted_ms  # type: ignore[union-attr]
    assert store.counters.oldest_unsent_ms == await store.oldest_unsent_ms()
    await app.kktd.sync.run_once_now()
    assert store.counts.pending == 0
    assert store.counters.oldest_unsent_ms is None and await store.oldest_unsent_ms() is None
    found = await scrape(app)
    assert found[("kktd_oldest_pending_age_seconds", ())] == 0
    assert found[("kktd_upstream_receipts_total", (("outcome", "fiscalized"), ("upstream", "kktd-ofd")))] == 2
    assert found[("kktd_upstream_requests_total", (("outcome", "ok"), ("upstream", "kktd-ofd")))] == 1
    assert found[("kktd_upstream_request_duration_seconds_count", (("upstream", "kktd-ofd"),))] == 1
    assert ("kktd_upstream_last_delivery_timestamp_seconds", (("upstream", "kktd-ofd"),)) in found


# ---- export ----


async def export(app: App, query: str = "") -> tuple[int, list[dict[str, Any]]]:
    response = await app.client.get(f"/v1/kkt/receipts{query}")
    text = await response.text()
    if response.status != 200:
        return response.status, [json.loads(text)]
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    return response.status, [json.loads(line) for line in text.splitlines()]


async def accept_group(app: App, prefix: str, count: int) -> list[str]:
    """`count` receipts, all accepted after the clock moved past the previous group's millisecond."""
    start = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == start:
        await asyncio.sleep(0.001)
    results = await asyncio.gather(*(app.store.accept(validate_receipt(r)) for r in receipts(prefix, count)))
    return [r.receipt_id for r in results]


def rfc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


async def test_export_pages_through_everything_in_order(app: App) -> None:
    ids = await accept_group(app, "e", 450)  # more than two pages
    status, rows = await export(app)
    assert status == 200
    assert [r["receipt_id"] for r in rows] == sorted(ids)
    assert rows[0]["receipt"]["items"] and rows[0]["status"] == "pending" and "accepted_at" in rows[0]


async def test_export_since_until(app: App) -> None:
    early = await accept_group(app, "early", 3)
    middle = await accept_group(app, "middle", 4)
    late = await accept_group(app, "late", 2)
    accepted = {
        r.receipt_id: r.accepted_ms for r in [await app.store.get(i) for i in early + middle + late] if r is not None
    }
    since, until = accepted[middle[0]], accepted[late[0]]
    status, rows = await export(app, f"?since={rfc(since)}&until={rfc(until)}")
    assert status == 200 and sorted(r["receipt_id"] for r in rows) == sorted(middle)
    status, rows = await export(app, f"?since={rfc(since)}")
    assert sorted(r["receipt_id"] for r in rows) == sorted(middle + late)
    status, rows = await export(app, f"?until={rfc(until).replace('Z', '%2B00:00')}")
    assert sorted(r["receipt_id"] for r in rows) == sorted(early + middle)
    status, rows = await export(app, f"?since={rfc(until + 3_600_000)}")
    assert (status, rows) == (200, [])


@pytest.mark.parametrize(
    "query, field",
    [
        ("?since=yesterday", "since"),
        ("?until=2027-01-01T00:00:00", "until"),
        ("?since=2027-01-02T00:00:00Z&until=2027-01-01T00:00:00Z", "until"),
    ],
)
async def test_export_refuses_bad_times(app: App, query: str, field: str) -> None:
    status, [body] = await export(app, query)
    assert status == 400
    assert body["error"]["code"] == "invalid_query" and body["error"]["field"] == field


async def test_an_unencoded_plus_gets_the_hint_to_encode_it(app: App) -> None:
    status, [body] = await export(app, "?since=2027-01-01T00:00:00+03:00")  # the + arrives as a space
    assert status == 400 and body["error"]["field"] == "since"
    assert "encode + as %2B" in body["error"]["message"]
    status, _ = await export(app, "?since=2027-01-01T00:00:00%2B03:00")
    assert status == 200


# ---- dead letters page on ----


async def test_dead_letter_pages_say_where_the_next_starts(app_factory: AppFactory, mock_ofd: MockOfd) -> None:
    app = await app_factory(ofd_url=mock_ofd.url, backoff_max=0.05, breaker_reset=0.05)
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    for i in range(3):
        await app.store.accept(validate_receipt(sample_receipt(f"d-{i}", pos_id="POS-BAD")))
    await app.kktd.sync.run_once_now()
    first = await (await app.client.get("/v1/kkt/dlq?limit=2")).json()
    assert first["count"] == 2 and isinstance(first["next_after_seq"], int)
    second = await (await app.client.get(f"/v1/kkt/dlq?limit=2&after_seq={first['next_after_seq']}")).json()
    assert second["count"] == 1 and second["next_after_seq"] is None
    ids = [r["receipt_id"] for r in first["dead_letters"] + second["dead_letters"]]
    assert len(set(ids)) == 3


async def kktd_cli(app: App, *argv: str) -> tuple[int, str]:
    """The operator CLI against the in-process kktd (in a thread: it is synchronous, the app must keep serving)."""
    parser = ctl.build_parser()
    args = parser.parse_args(list(argv))
    ctl.check_arguments(parser, args)
    out = io.StringIO()
    url = str(app.client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(ctl.run, args, url, out, io.StringIO())
    return code, out.getvalue()


async def test_a_resolved_dead_letter_leaves_the_warning_the_alert_and_the_pending_count(
    app_factory: AppFactory, mock_ofd: MockOfd, caplog: pytest.LogCaptureFixture
) -> None:
    """A receipt refused for its content is refused again on requeue: the operator closes it with a reason."""
    caplog.set_level(logging.INFO)
    app = await app_factory(ofd_url=mock_ofd.url, max_pending=10)
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    accepted = await app.store.accept(validate_receipt(sample_receipt("bad-1", pos_id="POS-BAD")))
    await app.kktd.sync.run_once_now()
    assert (await kktd_cli(app, "status"))[0] == 1  # WARNING: 1 dead letter
    assert (await scrape(app))[("kktd_receipts", (("status", "failed"),))] == 1  # KktdDeadLetters' expression
    before = (await (await app.client.get("/v1/kkt/buffer/status")).json())["fill_ratio"]
    path = f"/v1/kkt/dlq/{accepted.receipt_id}/resolve"
    response = await app.client.post(path, json={"reason": "sold on register 2 by hand\nFAKE=entry"})
    assert response.status == 422  # no control characters in what goes to the journal
    code, out = await kktd_cli(
        app, "dlq", "resolve", accepted.receipt_id, "--reason", "fiscalized by hand on register 2"
    )
    assert code == 0 and out.startswith("resolved 1 of 1"), out
    code, out = await kktd_cli(app, "status")
    assert code == 0 and out.startswith("KKTD OK"), out
    metrics = await scrape(app)
    assert metrics[("kktd_receipts", (("status", "failed"),))] == 0
    assert metrics[("kktd_receipts", (("status", "resolved"),))] == 1
    status = await (await app.client.get("/v1/kkt/buffer/status")).json()
    assert status["counts"]["failed"] == 0 and status["counts"]["resolved"] == 1 and status["fill_ratio"] < before
    assert (await (await app.client.get("/v1/kkt/dlq")).json())["count"] == 0
    _, rows = await export(app, "")
    [row] = [r for r in rows if r["receipt_id"] == accepted.receipt_id]  # kept for audit, with its refusal
    assert row["status"] == "resolved" and row["resolution"] == "fiscalized by hand on register 2"
    assert row["last_error"] and row["ofd"] is None
    [told] = [r for r in story(caplog, accepted.receipt_id) if "resolved by the operator" in r.getMessage()]
    assert "fiscalized by hand on register 2" in told.getMessage() and getattr(told, "error_code") == "resolved"
    again = await app.client.post(path, json={"reason": "twice"})
    assert again.status == 409 and (await again.json())["error"]["code"] == "not_dead_letter"
    assert app.store.counts.resolved == 1


async def test_the_store_counts_resolved_receipts_after_a_restart(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "buffer.db", 100)
    accepted = await store.accept(validate_receipt(sample_receipt("bad-2")))
    await store.settle([Refused(accepted.receipt_id, "refused", "by the test")])
    assert await store.resolve(accepted.receipt_id, "a test")
    assert not await store.requeue(accepted.receipt_id)  # resolved is final: never back in the queue
    await store.close()
    reopened = await Store.open(tmp_path / "buffer.db", 100)
    try:
        assert reopened.counts.resolved == 1 and reopened.counts.failed == 0 and reopened.counts.undelivered == 0
        row = await reopened.get(accepted.receipt_id)
        assert row is not None and row.status == "resolved" and row.resolution == "a test"
    finally:
        await reopened.close()


# ---- a receipt's story, as log records with their journal fields ----


def story(caplog: pytest.LogCaptureFixture, receipt_id: str) -> list[logging.LogRecord]:
    def names(record: logging.LogRecord) -> list[str]:
        value = getattr(record, "receipt_id", None)
        return list(value) if isinstance(value, (list, tuple)) else [value] if value else []

    return [r for r in caplog.records if receipt_id in names(r)]


async def test_story_of_a_delivered_receipt(
    app_factory: AppFactory, mock_ofd: MockOfd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = await app_factory(ofd_url=mock_ofd.url, backoff_max=0.05, breaker_reset=0.05)
    response = await app.client.post("/v1/kkt/receipt", json=sample_receipt("story-1"))
    receipt_id = (await response.json())["receipt_id"]
    await app.kktd.sync.run_once_now()
    told = story(caplog, receipt_id)
    assert [r.getMessage().split()[0] for r in told if r.levelno >= logging.INFO] == ["accepted", "1"]
    accepted, fiscalized = [r for r in told if r.levelno >= logging.INFO]
    assert getattr(accepted, "idempotency_key") == ["story-1"]
    assert getattr(fiscalized, "upstream") == "kktd-ofd" and getattr(fiscalized, "upstream_status") == "fiscalized"
    assert "fiscalized" in fiscalized.getMessage()


async def test_story_of_a_failed_attempt_and_a_refusal(
    app_factory: AppFactory, mock_ofd: MockOfd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = await app_factory(ofd_url=mock_ofd.url, backoff_max=0.05, breaker_reset=0.05)
    await mock_ofd.set_mode("error500")
    accepted = await app.store.accept(validate_receipt(sample_receipt("story-2", pos_id="POS-BAD")))
    receipt_id = accepted.receipt_id
    manual = await app.kktd.sync.run_once_now()
    assert manual.error is not None
    await mock_ofd.set_mode("online")
    mock_ofd.set_rejected_pos_ids(["POS-BAD"])
    await app.kktd.sync.run_once_now()
    told = [r for r in story(caplog, receipt_id) if r.levelno >= logging.INFO]
    assert len(told) == 3, [r.getMessage() for r in told]
    accepted_record, failed, refused = told
    assert accepted_record.getMessage() == f"accepted {receipt_id}"
    assert "failed" in failed.getMessage() and getattr(failed, "upstream_status") == "http_500"
    assert refused.levelno == logging.WARNING and getattr(refused, "error_code")
    assert getattr(refused, "upstream_status") == "refused"


async def test_a_large_group_commit_is_told_in_chunks(app: App, caplog: pytest.LogCaptureFixture) -> None:
    """Every receipt of a group commit is named in an "accepted" entry, 200 at most per entry."""
    from kktd.store.writer import STORY_CHUNK

    caplog.set_level(logging.INFO)
    results = await asyncio.gather(*(app.store.accept(validate_receipt(r)) for r in receipts("chunk", 450)))
    entries = [r for r in caplog.records if r.getMessage().startswith("accepted")]
    named = [receipt_id for r in entries for receipt_id in getattr(r, "receipt_id")]
    assert sorted(named) == sorted(r.receipt_id for r in results)
    assert max(len(getattr(r, "receipt_id")) for r in entries) <= STORY_CHUNK
    assert any(" of " in r.getMessage() for r in entries)  # 450 in commits of up to 512: split


# ---- the operator's actions: sync-now and a reload of the upstream's settings ----


async def open_breaker(app_factory: AppFactory, mock_ofd: MockOfd, key: str) -> App:
    """A kktd whose breaker opened on the upstream's failure, with an hour before its own next trial."""
    app = await app_factory(ofd_url=mock_ofd.url, breaker_threshold=1, breaker_reset=3600.0, backoff_max=0.05)
    await mock_ofd.set_mode("error500")
    await app.store.accept(validate_receipt(sample_receipt(key)))
    failed = await app.kktd.sync.run_once_now()
    assert failed.error is not None and failed.breaker is BreakerState.OPEN
    await mock_ofd.set_mode("online")
    return app


async def test_sync_now_makes_the_trial_call_at_once_when_the_breaker_is_open(
    app_factory: AppFactory, mock_ofd: MockOfd
) -> None:
    app = await open_breaker(app_factory, mock_ofd, "trial-1")
    manual = await app.kktd.sync.run_once_now()  # the operator's request: no "next trial in 3599s"
    assert manual.error is None and manual.delivered == 1 and manual.breaker is BreakerState.CLOSED
    assert app.store.counts.sent == 1


async def test_sync_now_against_a_still_failing_upstream_reopens_the_breaker(
    app_factory: AppFactory, mock_ofd: MockOfd
) -> None:
    app = await open_breaker(app_factory, mock_ofd, "trial-2")
    await mock_ofd.set_mode("error500")
    manual = await app.kktd.sync.run_once_now()
    assert manual.error is not None and "http_500" in manual.error and manual.breaker is BreakerState.OPEN
    assert app.store.counts.pending == 1


async def test_new_upstream_settings_reset_the_breaker_and_the_remembered_error(
    app_factory: AppFactory, mock_ofd: MockOfd
) -> None:
    """The runbook's "fix the setting, systemctl reload": delivery resumes at once, status forgets the old error."""
    app = await open_breaker(app_factory, mock_ofd, "reload-1")
    sync = app.kktd.sync
    loop_task = asyncio.create_task(sync.run())
    try:
        # The running loop waits out the open breaker (an hour): only the reload may cut that short.
        await wait_for(lambda: (sync.status().retry_in_s or 0.0) > 60, 10)
        assert sync.status().last_error is not None
        spec = REGISTRY[app.kktd.config.upstream]
        upstream = spec.create(app.kktd.config.upstream_settings)
        await upstream.start()
        previous = sync.replace_upstream(upstream)
        status = sync.status()
        assert status.breaker is BreakerState.CLOSED and status.consecutive_failures == 0
        assert status.last_error is None and status.retry_in_s is None
        await wait_for(lambda: app.store.counts.sent == 1, 10)
    finally:
        sync.request_stop()
        await loop_task
    await sync.idle()
    await previous.close()


async def wait_for(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---- the package's default upstream is a placeholder, and kktd says so ----


async def test_the_default_upstream_warns_at_start_naming_what_to_set(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await app_factory()  # the packaged default: kktd-ofd at 127.0.0.1:9000
    [warning] = [r for r in caplog.records if getattr(r, "error_code", None) == "default_upstream"]
    assert warning.levelno == logging.WARNING
    assert "ofd_url" in warning.getMessage() and "/etc/kktd/kktd.toml" in warning.getMessage()
    caplog.clear()
    await app_factory(ofd_url="http://ofd.example:9000")
    assert not [r for r in caplog.records if getattr(r, "error_code", None) == "default_upstream"]
