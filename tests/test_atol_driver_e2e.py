"""kktd end to end on the till's own register: a real `kktd serve` process against `kktd mock-atol-driver` (a
simulated register behind ATOL driver v10's web server, its own process, so its documents outlive every
kktd crash).

Each test ends with the same proof: every receipt the till got a 2xx for is `sent` with the fiscal data of
exactly one receipt document the register made, and the register made no receipt document beyond one per
receipt (a receipt printed again after "not printed" gets a new task uuid; a second document would show).
"""

from __future__ import annotations

import random
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kktd.receipt import sample_receipt
from tests.e2e_support import counts, get, health, post, wait_all_sent
from tests.register_support import MockRegisterProcess
from tests.support import KKTD_BIN, KktdProcess, child_env, wait_until

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

# Quick retries: these tests are about what happens, not about waiting for production back-offs.
SYNC_FLAGS = ("--sync-interval", "0.2", "--backoff-max", "0.5", "--breaker-reset", "0.5", "--atol-driver-timeout", "3")


@pytest.fixture
def register(tmp_path: Path) -> Iterator[MockRegisterProcess]:
    """The register's mock as a process, not started yet; stopped after the test whatever its state."""
    mock = MockRegisterProcess(tmp_path)
    try:
        yield mock
    finally:
        mock.stop()


def start_kktd(tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess], *extra: str) -> KktdProcess:
    kktd = KktdProcess(db=tmp_path / "buffer.db", extra_args=register.kktd_args(*SYNC_FLAGS, *extra))
    kktds.append(kktd)
    return kktd.start()


def receipts(prefix: str, count: int) -> list[dict[str, Any]]:
    bodies = []
    for n in range(count):
        body = sample_receipt(f"{prefix}-{n}")
        if n % 3 == 0:
            body["customer_contact"] = f"buyer{n}@example.ru"
        bodies.append(body)
    return bodies


def assert_printed_once(kktd: KktdProcess, register: MockRegisterProcess, receipt_ids: dict[str, str]) -> list[Any]:
    """Every receipt sent with the fiscal data of its one document; the register made no other receipt."""
    documents = {d["fd"]: d for d in register.receipts()}
    views = [get(kktd, f"/v1/kkt/receipt/{receipt_id}") for receipt_id in receipt_ids.values()]
    used: Counter[int] = Counter()
    for view in views:
        assert view["status"] == "sent", view
        shown = view["ofd"]
        document = documents[shown["fiscal_document_number"]]
        used[document["fd"]] += 1
        assert view["upstream"]["reference"].split(";")[0] == document["uuid"], (view, document)
        assert Decimal(document["total"]) * 100 == view["total"]
        assert shown["fiscal_sign"] == document["sign"] and shown["fn_number"] and shown["kkt_registration_number"]
        assert shown["shift_number"] == document["shift"] and shown["receipt_number"] == document["receiptNumber"]
        assert shown["fns_url"] and shown["qr"] and f"&i={document['fd']}&" in shown["qr"]
    assert all(n == 1 for n in used.values()), used
    assert len(documents) == len(receipt_ids), f"{len(documents)} receipt documents for {len(receipt_ids)} receipts"
    assert register.password not in kktd.log()
    return views


# ---- offline, then online ----


def test_offline_for_a_while_then_every_receipt_is_printed_once(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    kktd = start_kktd(tmp_path, register, kktds)  # the web server is not running yet: connection refused
    ids = post(kktd, receipts("offline", 40))
    wait_until(lambda: get(kktd, "/v1/kkt/buffer/status")["sync"]["last_error"], 20, "a failed attempt")
    assert counts(kktd) == {"pending": 40, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}
    register.start(print_time=0.005)
    wait_all_sent(kktd, 40)
    views = assert_printed_once(kktd, register, ids)
    # In the order accepted: the register's document numbers rise with kktd's acceptance.
    by_acceptance = sorted(views, key=lambda v: v["accepted_at"])
    numbers = [v["ofd"]["fiscal_document_number"] for v in by_acceptance]
    assert numbers == sorted(numbers)
    assert register.stats()["max_tasks_in_flight"] == 1
    # The shift was opened before the first receipt: its document comes first.
    assert register.documents()[0]["type"] == "openShift"
    assert health(kktd)["status"] == "ok"


# ---- crashes ----


def test_sigkill_between_the_post_and_the_commit_of_the_registration(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    # The register takes each task and prints it; the web server's answer (201) is held: kktd has committed
    # no registration when it is killed, and sends the same task uuid again after the restart.
    register.start(receipt_answer_delay_s=30.0)
    kktd = start_kktd(tmp_path, register, kktds)
    ids = post(kktd, receipts("held", 5))
    wait_until(lambda: len(register.receipts()) >= 1, 20, "a receipt printed, its answer held")
    assert counts(kktd)["submitted"] == 0
    kktd.kill()
    register.set_behaviour(receipt_answer_delay_s=0.0)
    kktd = start_kktd(tmp_path, register, kktds)
    wait_all_sent(kktd, 5)
    assert_printed_once(kktd, register, ids)
    assert register.stats()["duplicate_posts"] >= 1  # the task resent after the crash was adopted (409)


def test_sigkill_at_random_moments_of_a_drain(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    seed = 20261207
    rng = random.Random(seed)
    register.start(print_time=0.01)
    kktd = start_kktd(tmp_path, register, kktds)
    ids = post(kktd, receipts("kill", 120))
    for cycle in range(8):
        stats = register.stats()
        target = stats["posts"] + stats["gets"] + rng.randint(1, 60)

        def progressed(target: int = target) -> bool:
            now = register.stats()
            return now["posts"] + now["gets"] >= target or len(register.receipts()) >= 120

        wait_until(progressed, 30, f"cycle {cycle}: the drain to progress")
        kktd.signal(signal.SIGKILL)
        kktd.wait(10)
        if cycle % 3 == 1:
            register.set_behaviour(lose_receipt_answers=2)  # and answers lost on the way back
        kktd = start_kktd(tmp_path, register, kktds)
    wait_all_sent(kktd, 120)
    assert_printed_once(kktd, register, ids)


# ---- the register fails mid-print ----


@pytest.mark.parametrize("made", ["made", "not_made"])
def test_power_lost_mid_print_is_settled_without_a_duplicate(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess], made: str
) -> None:
    register.start(print_time=0.01)
    kktd = start_kktd(tmp_path, register, kktds)
    warm = post(kktd, receipts("warm", 2))
    wait_all_sent(kktd, 2)
    register.set_behaviour(power_loss_next=made, power_back_after_s=1.0)
    ids = post(kktd, receipts(f"power-{made}", 10))
    wait_all_sent(kktd, 12)
    views = assert_printed_once(kktd, register, {**warm, **ids})
    printed_again = [v for v in views if v["upstream"]["registrations"] > 0]
    assert len(printed_again) == (0 if made == "made" else 1), printed_again


@pytest.mark.parametrize("made", ["made", "not_made"])
def test_an_unknown_outcome_is_settled_by_the_registers_last_document(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess], made: str
) -> None:
    register.start()
    kktd = start_kktd(tmp_path, register, kktds)
    warm = post(kktd, receipts("warm", 1))
    wait_all_sent(kktd, 1)
    register.set_behaviour(unknown_error_next=made)
    ids = post(kktd, receipts(f"unknown-{made}", 6))
    wait_all_sent(kktd, 7)
    assert_printed_once(kktd, register, {**warm, **ids})
    assert "was fiscalized before the error" in kktd.log() if made == "made" else "was not fiscalized" in kktd.log()


def test_paper_out_then_loaded_prints_everything_and_dead_letters_nothing(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    register.start(print_time=0.01)
    kktd = start_kktd(tmp_path, register, kktds)
    warm = post(kktd, receipts("warm", 3))
    wait_all_sent(kktd, 3)
    register.set_behaviour(paper_present=False)
    ids = post(kktd, receipts("paper", 30))

    def warned() -> Any:
        shown = health(kktd)
        return shown["status"] == "warning" and any("load paper" in w for w in shown["warnings"]) and shown

    wait_until(warned, 30, "health asking to load paper")
    # While the paper is out kktd keeps asking (several cycles) and refuses nothing.
    posts = register.stats()["posts"]
    wait_until(lambda: register.stats()["posts"] >= posts + 3, 30, "kktd checking the register again")
    assert counts(kktd)["failed"] == 0 and len(register.receipts()) == 3
    status = get(kktd, "/v1/kkt/buffer/status")
    assert "load paper" in (status["sync"]["operator_action"] or "")
    register.set_behaviour(paper_present=True)
    wait_all_sent(kktd, 33)
    assert_printed_once(kktd, register, {**warm, **ids})
    wait_until(lambda: health(kktd)["status"] == "ok", 30, "health ok again")


# ---- shifts ----


def test_a_shift_past_24_hours_is_closed_and_reopened(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    register.start()
    kktd = start_kktd(tmp_path, register, kktds)
    first = post(kktd, receipts("day1", 5))
    wait_all_sent(kktd, 5)
    register.advance_clock(25 * 3600)  # the shift opened for the first receipt is now over 24 hours old
    second = post(kktd, receipts("day2", 5))
    wait_all_sent(kktd, 10)
    views = assert_printed_once(kktd, register, {**first, **second})
    kinds = [d["type"] for d in register.documents()]
    assert kinds.count("closeShift") == 1 and kinds.count("openShift") == 2, kinds
    shifts = {v["idempotency_key"].split("-")[0]: v["ofd"]["shift_number"] for v in views}
    assert shifts["day2"] == shifts["day1"] + 1


def test_without_auto_shift_receipts_wait_for_the_operators_shift_close(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    register.start()
    kktd = start_kktd(tmp_path, register, kktds, "--no-atol-driver-auto-shift")
    first = post(kktd, receipts("day1", 3))
    wait_all_sent(kktd, 3)
    register.advance_clock(25 * 3600)
    second = post(kktd, receipts("day2", 4))

    def asks_to_close() -> Any:
        shown = health(kktd)
        return any("kktd shift close" in w for w in shown["warnings"]) and shown

    wait_until(asks_to_close, 30, "health asking for kktd shift close")
    assert counts(kktd)["pending"] + counts(kktd)["submitted"] == 4 and counts(kktd)["failed"] == 0
    closed = ctl(kktd, "shift", "close")
    assert closed.returncode == 0 and "closed (Z report printed)" in closed.stdout, closed
    wait_all_sent(kktd, 7)
    assert_printed_once(kktd, register, {**first, **second})
    status = ctl(kktd, "shift", "status")
    assert status.returncode == 0 and "now open" in status.stdout, status


def ctl(kktd: KktdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KKTD_BIN), "--listen", f"127.0.0.1:{kktd.port}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=child_env(),
        check=False,
    )


# ---- the register's own truth ----


def test_the_registers_ofd_backlog_is_in_status_and_metrics(
    tmp_path: Path, register: MockRegisterProcess, kktds: list[KktdProcess]
) -> None:
    register.start(ofd_online=False)  # the register cannot reach its OFD: its documents stay unsent
    kktd = start_kktd(tmp_path, register, kktds)
    post(kktd, receipts("backlog", 4))
    wait_all_sent(kktd, 4)
    ctl(kktd, "sync-now")  # reads the register's report again now (else every minute)
    metrics = get(kktd, "/metrics")
    unsent = [line for line in metrics.splitlines() if line.startswith("kktd_register_unsent_documents ")]
    assert unsent and float(unsent[0].split()[1]) == 5, unsent  # the shift's opening and four receipts
    assert "kktd_register_oldest_unsent_age_seconds " in metrics
    assert 'kktd_register_shift_state{state="open"} 1.0' in metrics
    assert "kktd_register_paper_present 1.0" in metrics
    shown = get(kktd, "/v1/kkt/buffer/status")["register"]
    assert shown["unsent_documents"] == 5 and shown["oldest_unsent_at"] and shown["shift"]["state"] == "open"
    status = ctl(kktd, "status")
    assert "5 documents not sent to the OFD" in status.stdout, status.stdout
