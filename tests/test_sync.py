"""Forwarding to the OFD: outages, lost acknowledgements, backoff, the breaker, dead letters, crashes."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    KktdProcess,
    MockOfdProcess,
    cpu_seconds,
    http,
    post_many,
    receipts,
    sample_receipt,
    wait_until,
)

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

FAST_RETRY = ["--backoff-max", "1", "--breaker-reset", "0.5", "--sync-interval", "0.2", "--ofd-timeout", "2"]


def start_kktd(kktds: list[KktdProcess], tmp_path: Path, ofd_process: MockOfdProcess, *args: str) -> KktdProcess:
    proc = KktdProcess(db=tmp_path / "buffer.db", ofd_url=ofd_process.url, extra_args=[*FAST_RETRY, *args])
    kktds.append(proc)
    return proc.start()


def status(proc: KktdProcess) -> dict[str, Any]:
    code, body = http("GET", f"{proc.url}/v1/kkt/buffer/status")
    assert code == 200
    return body


def post(proc: KktdProcess, bodies: list[dict[str, Any]], concurrency: int = 8) -> list[str]:
    answers = asyncio.run(post_many(proc.url, bodies, concurrency=concurrency))
    assert all(a.status == 201 for a in answers), [a.body for a in answers if a.status != 201][:3]
    return [a.body["receipt_id"] for a in answers]


def wait_all_sent(proc: KktdProcess, count: int, timeout: float = 60) -> None:
    wait_until(
        lambda: status(proc)["counts"] == {"pending": 0, "submitted": 0, "sent": count, "failed": 0, "resolved": 0},
        timeout,
        f"all {count} receipts sent",
        interval=0.1,
    )


def test_offline_then_online_delivers_everything_once(
    tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess]
) -> None:
    ofd_process.set_mode("offline")
    kktd = start_kktd(kktds, tmp_path, ofd_process)
    ids = post(kktd, receipts("off", 200))
    wait_until(lambda: status(kktd)["sync"]["last_error"], 10, "a failed delivery attempt")
    assert status(kktd)["counts"]["pending"] == 200
    ofd_process.set_mode("online")
    wait_all_sent(kktd, 200)
    stats = ofd_process.stats()
    assert stats["unique"] == 200
    code, receipt = http("GET", f"{kktd.url}/v1/kkt/receipt/{ids[0]}")
    assert receipt["status"] == "sent"
    assert receipt["ofd"]["fiscal_document_number"] == ofd_process.stored(ids[0])["ack"]["fiscal_document_number"]  # type: ignore[index]
    assert re.fullmatch(r"[0-9]{10}", receipt["ofd"]["fiscal_sign"])


def test_lost_acknowledgements_are_redelivered_without_duplicates(
    tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess]
) -> None:
    ofd_process.set_mode("drop_ack")
    kktd = start_kktd(kktds, tmp_path, ofd_process)
    post(kktd, receipts("drop", 60))
    wait_until(lambda: ofd_process.stats()["redeliveries"] >= 5, 30, "redeliveries after lost acknowledgements")
    assert ofd_process.stats()["unique"] > 0
    assert status(kktd)["counts"]["sent"] == 0, "a receipt was marked sent without an acknowledgement"
    ofd_process.set_mode("online")
    wait_all_sent(kktd, 60)
    stats = ofd_process.stats()
    assert stats["unique"] == 60
    assert stats["received"] == stats["unique"] + stats["redeliveries"]


# The end-to-end smoke test of the breaker in real time against the real mock in its own process: it opens,
# costs no CPU while open, its half-open trials fail and the first one after recovery closes it. The backoff
# gaps themselves are asserted on the injected clock in tests/test_sync_inprocess.py (error500, slow and
# flaky, with the real client and mock); the loop's retry rules one by one are in tests/test_loop.py.
FAILURE_MODES: list[tuple[str, dict[str, Any]]] = [
    ("error500", {}),
]


@pytest.mark.parametrize(("mode", "params"), FAILURE_MODES, ids=[mode for mode, _ in FAILURE_MODES])
def test_failing_ofd_backoff_breaker_and_no_busy_loop(
    tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess], mode: str, params: dict[str, Any]
) -> None:
    ofd_process.set_mode(mode, **params)
    kktd = KktdProcess(
        db=tmp_path / "buffer.db",
        ofd_url=ofd_process.url,
        extra_args=[
            "--backoff-max",
            "30",
            "--breaker-threshold",
            "4",
            "--breaker-reset",
            "3",
            "--ofd-timeout",
            "0.3",
            "--sync-interval",
            "0.2",
        ],
    )
    kktds.append(kktd.start())
    post(kktd, receipts(mode, 10))
    wait_until(lambda: status(kktd)["sync"]["breaker"] != "closed", 30, "the breaker to open")
    assert "breaker closed -> open" in kktd.log()
    assert status(kktd)["sync"]["breaker"] in ("open", "half_open")
    code, health = http("GET", f"{kktd.url}/v1/health")
    assert code == 200 and health["status"] == "warning"
    # No busy loop while the breaker is open.
    assert kktd.proc is not None
    before, started = cpu_seconds(kktd.proc.pid), time.monotonic()
    wait_until(lambda: time.monotonic() - started >= 2.0, 5, "two seconds of outage", interval=0.1)
    used = cpu_seconds(kktd.proc.pid) - before
    assert used < 0.2, f"kktd used {used:.2f} CPU seconds in 2 s while the OFD was down"
    # While open nothing goes out but the half-open trial, and only a request that went out can fail: one
    # more consecutive failure is the trial that failed and re-opened the breaker.
    failures = status(kktd)["sync"]["consecutive_failures"]
    wait_until(
        lambda: status(kktd)["sync"]["consecutive_failures"] > failures, 30, "a failed half-open trial", interval=0.1
    )
    assert "open -> half_open" in kktd.log()
    assert "half_open -> open" in kktd.log()
    assert status(kktd)["counts"] == {"pending": 10, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}, (
        "an outage dead-lettered receipts"
    )
    ofd_process.set_mode("online")
    wait_all_sent(kktd, 10)
    assert "half_open -> closed" in kktd.log()
    assert status(kktd)["sync"]["breaker"] == "closed"
    assert ofd_process.stats()["unique"] == 10


def test_slow_ofd_past_the_timeout(tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess]) -> None:
    ofd_process.set_mode("slow", delay_s=1.5)
    kktd = start_kktd(kktds, tmp_path, ofd_process, "--ofd-timeout", "0.3")
    post(kktd, receipts("slow", 40))
    wait_until(lambda: "timeout" in (status(kktd)["sync"]["last_error"] or ""), 20, "a timed-out delivery")
    # Intake does not wait for the OFD: the writer is never held across a network call.
    started = time.monotonic()
    post(kktd, receipts("slow-more", 40), concurrency=4)
    assert time.monotonic() - started < 1.5
    ofd_process.set_mode("online")
    wait_all_sent(kktd, 80)
    assert ofd_process.stats()["unique"] == 80


def test_rejected_receipt_goes_to_dead_letters_and_requeues(
    tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess]
) -> None:
    ofd_process.reject_pos_ids(["POS-BAD"])
    kktd = start_kktd(kktds, tmp_path, ofd_process)
    good = post(kktd, receipts("good", 10))
    bad = post(kktd, [sample_receipt("bad-1", pos_id="POS-BAD")])[0]
    wait_until(
        lambda: status(kktd)["counts"] == {"pending": 0, "submitted": 0, "sent": 10, "failed": 1, "resolved": 0},
        30,
        "settled",
    )
    code, dlq = http("GET", f"{kktd.url}/v1/kkt/dlq")
    assert [entry["receipt_id"] for entry in dlq["dead_letters"]] == [bad]
    assert "kkt_not_registered" in dlq["dead_letters"][0]["last_error"]
    assert f"receipt {bad} rejected by the upstream" in kktd.log()
    ofd_process.reject_pos_ids([])

    def requeue(receipt_id: str) -> tuple[int, Any]:
        return http("POST", f"{kktd.url}/v1/kkt/dlq/{receipt_id}/requeue")

    assert requeue(bad)[0] == 200
    wait_all_sent(kktd, 11)
    assert requeue(bad)[0] == 409  # no longer a dead letter
    assert requeue("0000")[0] == 404
    assert ofd_process.stored(bad) is not None and ofd_process.stored(good[0]) is not None


def test_sigkill_during_sync_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, ofd_process: MockOfdProcess, kktds: list[KktdProcess]
) -> None:
    ofd_process.set_mode("slow", delay_s=0.2)
    kktd = start_kktd(kktds, tmp_path, ofd_process, "--batch-size", "20")
    ids = post(kktd, receipts("kill", 400), concurrency=16)
    wait_until(lambda: ofd_process.stats()["unique"] >= 40, 30, "deliveries under way")
    kktd.signal(signal.SIGKILL)
    kktd.wait(10)
    restarted = start_kktd(kktds, tmp_path, ofd_process)
    ofd_process.set_mode("online")
    wait_all_sent(restarted, 400)
    stats = ofd_process.stats()
    assert stats["unique"] == 400
    assert all(ofd_process.stored(receipt_id) is not None for receipt_id in ids[::37])
