"""kktd/metrics.py: every metric on kktd's own registry, state read from a snapshot at scrape time."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from kktd.delivery import FailureKind, FiscalData, Fiscalized, Refused, Registered, Undelivered, UpstreamUnavailable
from kktd.errors import ErrorCode
from kktd.metrics import (
    BREAKER_STATES,
    INTAKE_BUCKETS,
    RECEIPT_STATUSES,
    Metrics,
    ReceiptOutcome,
    RequestOutcome,
    StateSnapshot,
)
from tests.conftest import App
from tests.support import async_wait_until

NOW_MS = 1_800_000_000_000
API_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def snapshot(tmp_path: Path, **overrides: object) -> StateSnapshot:
    values: dict[str, object] = dict(
        receipts={"pending": 7, "submitted": 2, "sent": 40, "failed": 1},
        capacity=1000,
        oldest_pending_ms=NOW_MS - 90_000,
        db_path=tmp_path / "buffer.db",
        upstream="kktd-ofd",
        breaker_state="open",
        last_delivery_ms=NOW_MS - 5_000,
        pending_warn_age_s=3600.0,
        pending_critical_age_s=7200.0,
        version="9.9",
        journal_fallbacks=3,
    )
    values.update(overrides)
    return StateSnapshot(**values)  # type: ignore[arg-type]


def test_own_registry_not_the_global_one() -> None:
    metrics = Metrics()
    metrics.intake_accepted(0.001)
    assert "kktd_receipts_accepted" not in prometheus_client.REGISTRY._names_to_collectors
    assert b"kktd_receipts_accepted_total 1.0" in metrics.exposition()


def test_intake_counters_and_histograms() -> None:
    metrics = Metrics(process=False)
    for seconds in (0.0002, 0.0004, 0.3):
        metrics.intake_accepted(seconds)
    metrics.intake_replayed(0.0001)
    metrics.intake_rejected("invalid_json")
    metrics.intake_rejected("invalid_json")
    metrics.intake_rejected("buffer_full")
    metrics.group_committed(1)
    metrics.group_committed(300)
    found = samples(metrics)
    assert found[("kktd_receipts_accepted_total", ())] == 3
    assert found[("kktd_receipts_replayed_total", ())] == 1
    assert found[("kktd_receipts_rejected_total", (("code", "invalid_json"),))] == 2
    assert found[("kktd_receipts_rejected_total", (("code", "buffer_full"),))] == 1
    assert found[("kktd_intake_duration_seconds_count", ())] == 4
    # Sub-millisecond commits land in sub-millisecond buckets, a slow card's in the tail.
    assert found[("kktd_intake_duration_seconds_bucket", (("le", "0.00025"),))] == 2
    assert found[("kktd_intake_duration_seconds_bucket", (("le", "0.0005"),))] == 3
    assert found[("kktd_intake_duration_seconds_bucket", (("le", "0.25"),))] == 3
    assert found[("kktd_intake_duration_seconds_bucket", (("le", "0.5"),))] == 4
    assert INTAKE_BUCKETS[0] <= 0.0001 and INTAKE_BUCKETS[-1] >= 5
    assert found[("kktd_group_commit_size_bucket", (("le", "1.0"),))] == 1
    assert found[("kktd_group_commit_size_bucket", (("le", "512.0"),))] == 2
    assert not any(name.endswith("_created") for name, _ in found)


def test_label_values_cannot_be_chosen_by_a_client() -> None:
    metrics = Metrics(process=False)
    for hostile in ("Robert'); DROP", "x" * 200, "код", "a\nb", ""):
        metrics.intake_rejected(hostile)
    found = samples(metrics)
    # Every known code has its series at 0 from the start; the hostile values all counted under "other".
    rejected = {
        labels: value for (name, labels), value in found.items() if name == "kktd_receipts_rejected_total" and value
    }
    assert rejected == {(("code", "other"),): 5}


def test_upstream_requests_outcomes_retries() -> None:
    metrics = Metrics(process=False)
    metrics.prepare_upstream("kktd-ofd")
    before = samples(metrics)
    assert before[("kktd_upstream_requests_total", (("outcome", "maybe_sent"), ("upstream", "kktd-ofd")))] == 0
    assert before[("kktd_upstream_retries_total", (("upstream", "kktd-ofd"),))] == 0
    metrics.upstream_request("kktd-ofd", RequestOutcome.OK, 0.04)
    metrics.upstream_request("kktd-ofd", RequestOutcome.failed(FailureKind.NOT_SENT), 0.002)
    fiscal = FiscalData(1, "sign", "2026-01-01T00:00:00Z")
    error = UpstreamUnavailable(FailureKind.MAYBE_SENT, "timeout")
    metrics.upstream_outcomes(
        "kktd-ofd",
        [
            Fiscalized("a", fiscal),
            Fiscalized("b", fiscal),
            Refused("c", "x", "y"),
            Registered("d", "ref"),
            Undelivered("e", error),
        ],
    )
    metrics.upstream_receipts("kktd-ofd", ReceiptOutcome.FISCALIZED, 3)
    metrics.upstream_retry("kktd-ofd")
    found = samples(metrics)

    def receipts(outcome: str) -> float:
        return found[("kktd_upstream_receipts_total", (("outcome", outcome), ("upstream", "kktd-ofd")))]

    assert receipts("fiscalized") == 5 and receipts("refused") == 1 and receipts("registered") == 1
    assert receipts("undelivered") == 1 and receipts("still_processing") == 0
    assert found[("kktd_upstream_requests_total", (("outcome", "ok"), ("upstream", "kktd-ofd")))] == 1
    assert found[("kktd_upstream_requests_total", (("outcome", "not_sent"), ("upstream", "kktd-ofd")))] == 1
    assert found[("kktd_upstream_request_duration_seconds_count", (("upstream", "kktd-ofd"),))] == 2
    assert found[("kktd_upstream_retries_total", (("upstream", "kktd-ofd"),))] == 1


def test_state_is_read_from_the_snapshot_at_each_scrape(tmp_path: Path) -> None:
    (tmp_path / "buffer.db").write_bytes(b"x" * 4096)
    (tmp_path / "buffer.db-wal").write_bytes(b"x" * 1000)
    calls: list[int] = []
    current = {"value": snapshot(tmp_path)}

    def read() -> StateSnapshot:
        calls.append(1)
        return current["value"]

    metrics = Metrics(now_ms=lambda: NOW_MS, process=False)
    metrics.bind_state(read)
    assert calls == []  # registering does not read the state
    found = samples(metrics)
    assert len(calls) == 1
    for status, count in {"pending": 7, "submitted": 2, "sent": 40, "failed": 1}.items():
        assert found[("kktd_receipts", (("status", status),))] == count
    assert set(RECEIPT_STATUSES) == {"pending", "submitted", "sent", "failed", "resolved"}
    assert found[("kktd_buffer_capacity", ())] == 1000
    assert found[("kktd_oldest_pending_age_seconds", ())] == 90
    assert found[("kktd_pending_warn_age_seconds", ())] == 3600
    assert found[("kktd_pending_critical_age_seconds", ())] == 7200
    for state in BREAKER_STATES:
        assert found[("kktd_upstream_breaker_state", (("state", state), ("upstream", "kktd-ofd")))] == (
            1 if state == "open" else 0
        )
    assert (
        found[("kktd_upstream_last_delivery_timestamp_seconds", (("upstream", "kktd-ofd"),))] == (NOW_MS - 5_000) / 1000
    )
    assert found[("kktd_database_size_bytes", ())] == 4096
    assert found[("kktd_database_wal_size_bytes", ())] == 1000
    assert 0 < found[("kktd_storage_free_bytes", ())] <= found[("kktd_storage_size_bytes", ())]
    assert found[("kktd_info", (("upstream", "kktd-ofd"), ("version", "9.9")))] == 1
    assert found[("kktd_journal_fallbacks_total", ())] == 3

    current["value"] = snapshot(
        tmp_path, oldest_pending_ms=None, breaker_state="closed", last_delivery_ms=None, db_path=tmp_path / "missing.db"
    )
    found = samples(metrics)
    assert len(calls) == 2
    assert found[("kktd_oldest_pending_age_seconds", ())] == 0
    assert found[("kktd_upstream_breaker_state", (("state", "closed"), ("upstream", "kktd-ofd")))] == 1
    assert ("kktd_upstream_last_delivery_timestamp_seconds", (("upstream", "kktd-ofd"),)) not in found
    assert found[("kktd_database_size_bytes", ())] == 0


def test_rebinding_replaces_the_state_collector(tmp_path: Path) -> None:
    metrics = Metrics(now_ms=lambda: NOW_MS, process=False)
    metrics.bind_state(lambda: snapshot(tmp_path))
    metrics.bind_state(lambda: snapshot(tmp_path, capacity=5))
    assert samples(metrics)[("kktd_buffer_capacity", ())] == 5


def test_process_metrics() -> None:
    found = samples(Metrics())
    assert found[("process_resident_memory_bytes", ())] > 0
    assert found[("process_open_fds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in found


async def test_event_loop_lag_sees_a_blocked_loop() -> None:
    metrics = Metrics(process=False)
    watcher = asyncio.create_task(metrics.watch_event_loop(interval=0.01))
    try:
        await async_wait_until(
            lambda: asyncio.sleep(0, samples(metrics)[("kktd_event_loop_lag_seconds_count", ())] >= 2),
            5,
            "two lag probes",
        )
        time.sleep(0.3)  # the fault under test: something blocks the event loop for 300 ms

        def late_probes() -> float:
            found = samples(metrics)
            return (
                found[("kktd_event_loop_lag_seconds_count", ())]
                - found[("kktd_event_loop_lag_seconds_bucket", (("le", "0.25"),))]
            )

        await async_wait_until(
            lambda: asyncio.sleep(0, late_probes() >= 1), 5, "the lag probe to report the blocked loop"
        )
        assert samples(metrics)[("kktd_event_loop_lag_seconds_sum", ())] >= 0.25
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_a_fresh_till_shows_every_labelled_counter_at_zero(app: App) -> None:
    """The dashboard's panels show 0, not "No data", on a till that has refused and delivered nothing yet."""
    response = await app.client.get("/metrics")
    assert response.status == 200
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    for code in (
        "invalid_json",
        "amount_out_of_range",
        "idempotency_conflict",
        "buffer_full",
        "storage_unavailable",
        "unauthorized",
    ):
        assert found[("kktd_receipts_rejected_total", (("code", code),))] == 0
    upstream = app.services.config.upstream
    for outcome in ("fiscalized", "refused", "undelivered"):
        assert found[("kktd_upstream_receipts_total", (("outcome", outcome), ("upstream", upstream)))] == 0
    assert found[("kktd_upstream_requests_total", (("outcome", "not_sent"), ("upstream", upstream)))] == 0


def test_every_error_code_is_a_rejection_series_from_the_start() -> None:
    found = samples(Metrics(process=False))
    for code in ErrorCode:
        assert found[("kktd_receipts_rejected_total", (("code", code.value),))] == 0


def test_every_error_code_is_in_the_api_reference() -> None:
    documented = set(re.findall(r"^\| \d{3} \| (.+?) \|", API_REFERENCE.read_text(), re.MULTILINE))
    codes = {code for cell in documented for code in re.findall(r"`([a-z_]+)`", cell)}
    assert {code.value for code in ErrorCode} <= codes
