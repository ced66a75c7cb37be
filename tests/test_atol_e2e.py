"""kktd end to end through ATOL Online v5: a real `kktd serve` process against `kktd mock-atol` (its own
process, so its documents outlive every kktd crash).

Each test ends with the same proof: every receipt the till got a 2xx for is `sent` with the fiscal data of
exactly one fiscalized document, and the mock holds no fiscalized document beyond one per receipt (a receipt
registered again after "not registered" gets a new external id; a second fiscalized document would show).
"""

from __future__ import annotations

import json
import random
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kktd.receipt import sample_receipt
from tests.atol_support import MockAtolProcess, fiscalized_once
from tests.e2e_support import counts, get, health, post, wait_all_sent
from tests.support import KktdProcess, wait_until
from tests.test_two_phase import make_v1_database

# Starts kktd, a mock or another program as a process: the rest of `make test`, not the fast tier.
pytestmark = pytest.mark.process

# Quick retries: these tests are about what happens, not about waiting for production back-offs.
SYNC_FLAGS = ("--sync-interval", "0.2", "--backoff-max", "0.5", "--breaker-reset", "0.5", "--atol-timeout", "3")


def start_kktd(tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess], *extra: str) -> KktdProcess:
    kktd = KktdProcess(db=tmp_path / "buffer.db", extra_args=atol_process.kktd_args(*SYNC_FLAGS, *extra))
    kktds.append(kktd)
    return kktd.start()


def receipts_with_contact(prefix: str, count: int) -> list[dict[str, Any]]:
    bodies = []
    for n in range(count):
        body = sample_receipt(f"{prefix}-{n}")
        body["customer_contact"] = f"buyer{n}@example.ru" if n % 2 else f"+7999{n:07d}"
        bodies.append(body)
    return bodies


# The FNS check string's n= (tag 1054), written out here rather than imported from kktd.
FNS_OPERATION_TYPE = {"sale": 1, "sale_refund": 2, "purchase": 3, "purchase_refund": 4}


def assert_exactly_once(kktd: KktdProcess, atol_process: MockAtolProcess, receipt_ids: dict[str, str]) -> list[Any]:
    """Every receipt sent with the fiscal data of its one fiscalized document; nothing fiscalized twice."""
    documents = {d["external_id"]: d for d in atol_process.documents()}
    views = [get(kktd, f"/v1/kkt/receipt/{receipt_id}") for receipt_id in receipt_ids.values()]
    for view in views:
        assert view["status"] == "sent", view
        document = documents[view["upstream"]["external_id"]]
        fiscal, shown = document["fiscal"], view["ofd"]
        assert document["fiscalized"] and shown is not None, (view, document)
        assert shown["fiscal_document_number"] == fiscal["fiscal_document_number"]
        assert shown["fiscal_sign"] == str(fiscal["fiscal_document_attribute"])
        # ATOL's "dd.mm.yyyy HH:MM:SS" is the register's local time: shown as RFC 3339 with the zone's offset.
        at = datetime.fromisoformat(shown["fiscalized_at"])
        assert at.tzinfo is not None and f"{at.astimezone():%d.%m.%Y %H:%M:%S}" == fiscal["receipt_datetime"]
        assert shown["fns_url"] == fiscal["fns_site"] and shown["ofd_inn"] == fiscal["ofd_inn"]
        total, kind = view["total"], FNS_OPERATION_TYPE[view["receipt"]["operation"]]
        assert shown["qr"] == (
            f"t={at.astimezone():%Y%m%dT%H%M}&s={total // 100}.{total % 100:02d}&fn={fiscal['fn_number']}"
            f"&i={fiscal['fiscal_document_number']}&fp={fiscal['fiscal_document_attribute']}&n={kind}"
        )
        assert shown["fn_number"] == fiscal["fn_number"]
        assert shown["shift_number"] == fiscal["shift_number"]
        assert shown["receipt_number"] == fiscal["fiscal_receipt_number"]
        assert shown["kkt_registration_number"] == fiscal["ecr_registration_number"]
        assert shown["ofd_receipt_url"] == fiscal["ofd_receipt_url"]
        assert view["upstream"]["reference"] == document["uuid"]
        registrations = view["upstream"]["registrations"]
        key = view["idempotency_key"]
        assert view["upstream"]["external_id"] == (key if registrations == 0 else f"{key}~{registrations}")
    problems = fiscalized_once(list(documents.values()), {v["receipt_id"]: v["upstream"]["external_id"] for v in views})
    assert not problems, problems
    stats = atol_process.stats()
    assert stats["fiscalized"] == len(receipt_ids), stats
    assert stats["early_polls"] == 0, "a document was polled twice within a second"
    assert atol_process.password not in kktd.log()
    return views


# ---- offline, then online ----


def test_offline_for_a_while_then_every_receipt_is_fiscalized_once(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    kktd = start_kktd(tmp_path, atol_process, kktds)  # the mock is not running yet: connection refused
    ids = post(kktd, receipts_with_contact("offline", 60))
    wait_until(lambda: get(kktd, "/v1/kkt/buffer/status")["sync"]["last_error"], 20, "a failed attempt")
    assert counts(kktd) == {"pending": 60, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}
    atol_process.start(wait_polls=1)
    wait_all_sent(kktd, 60)
    assert_exactly_once(kktd, atol_process, ids)
    assert all(d["registration_requests"] == 1 for d in atol_process.documents())
    assert health(kktd)["status"] == "ok"


def test_offline_mock_connections_reset_then_back(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start(offline=True)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("reset", 40))
    wait_until(lambda: atol_process.stats()["resets"] >= 3, 20, "kktd's attempts reset")
    assert atol_process.stats()["documents"] == 0 and counts(kktd)["pending"] == 40
    atol_process.set_behaviour(offline=False)
    wait_all_sent(kktd, 40)
    assert_exactly_once(kktd, atol_process, ids)


# ---- faults while draining ----


def test_lost_registration_answers_are_retried_and_adopt_the_uuid(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start(drop_ratio=0.5, seed=3)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("lost", 60))
    wait_all_sent(kktd, 60)
    assert_exactly_once(kktd, atol_process, ids)
    stats = atol_process.stats()
    assert stats["dropped_answers"] > 0 and stats["duplicates"] >= stats["dropped_answers"]
    assert stats["documents"] == 60


def test_token_expiry_mid_drain(tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]) -> None:
    atol_process.start(token_lifetime_s=0.3, wait_polls=1, delay_s=0.005)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("token", 120))
    wait_all_sent(kktd, 120)
    assert_exactly_once(kktd, atol_process, ids)
    stats = atol_process.stats()
    assert stats["tokens_issued"] >= 2 and stats["unauthorized"] >= 1, stats
    # A new token only after ATOL refused the old one: never more getTokens than refusals (+ the first).
    assert stats["token_requests"] <= stats["unauthorized"] + 1, stats


def test_forced_token_expiry_mid_drain(tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]) -> None:
    atol_process.start(wait_polls=3, delay_s=0.01)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("expire", 80))
    wait_until(lambda: atol_process.stats()["registered"] >= 20, 30, "the drain under way")
    atol_process.expire_tokens()
    wait_all_sent(kktd, 80)
    assert_exactly_once(kktd, atol_process, ids)
    assert atol_process.stats()["tokens_issued"] == 2


def test_wait_for_several_polls(tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]) -> None:
    atol_process.start(wait_polls=3)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("wait", 30))
    wait_all_sent(kktd, 30)
    assert_exactly_once(kktd, atol_process, ids)
    assert all(d["polls"] == 4 for d in atol_process.documents()), atol_process.documents()[:2]


def test_fail_minus_one_is_registered_again_under_a_new_external_id(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start(fail_ratio=0.4, seed=5)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("fail", 50))
    wait_all_sent(kktd, 50)
    views = assert_exactly_once(kktd, atol_process, ids)
    again = [v for v in views if v["upstream"]["registrations"] > 0]
    assert again, "fail_ratio 0.4 failed no document"
    stats = atol_process.stats()
    assert stats["failed"] == sum(v["upstream"]["registrations"] for v in views)
    assert stats["documents"] == 50 + stats["failed"]


def test_5xx_dead_letters_nothing_and_the_drain_resumes(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start()
    kktd = start_kktd(tmp_path, atol_process, kktds)
    warm = post(kktd, receipts_with_contact("warm", 1))  # a token first
    wait_all_sent(kktd, 1)
    atol_process.set_behaviour(error5xx_ratio=1.0)
    ids = post(kktd, receipts_with_contact("e5xx", 40))
    wait_until(lambda: atol_process.stats()["errors_5xx"] >= 10, 30, "kktd retrying through 5xx")
    assert atol_process.stats()["documents"] == 1 and counts(kktd)["failed"] == 0
    atol_process.set_behaviour(error5xx_ratio=0.3, seed=9)
    wait_all_sent(kktd, 41)
    assert_exactly_once(kktd, atol_process, {**warm, **ids})


def test_slow_answers_beyond_the_timeout_are_maybe_sent_and_settle_via_33(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    # Every new registration is stored, then answered after the client's timeout: kktd cannot know whether
    # it got through, sends it again with the same external id, and adopts the uuid of error 33.
    atol_process.start(delay_s=0.1, answer_delay_s=1.0)
    kktd = start_kktd(tmp_path, atol_process, kktds, "--atol-timeout", "0.5")
    ids = post(kktd, receipts_with_contact("slow", 12))
    wait_all_sent(kktd, 12)
    assert_exactly_once(kktd, atol_process, ids)
    assert atol_process.stats()["duplicates"] >= 12


# ---- the upstream refuses kktd itself ----


def test_a_wrong_password_dead_letters_nothing_warns_and_says_what_to_fix(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start()
    wrong = tmp_path / "wrong_password"
    wrong.write_text("not-the-password\n")
    kktd = start_kktd(tmp_path, atol_process, kktds, "--atol-password-file", str(wrong))
    ids = post(kktd, receipts_with_contact("auth", 20))

    def warned() -> Any:
        shown = health(kktd)
        return shown["status"] == "warning" and any("atol_login" in w for w in shown["warnings"]) and shown

    shown = wait_until(warned, 30, "health warning naming what to fix")
    assert "not-the-password" not in json.dumps(shown)
    assert counts(kktd) == {"pending": 20, "submitted": 0, "sent": 0, "failed": 0, "resolved": 0}
    assert "atol_login" in kktd.log() and "not-the-password" not in kktd.log()
    kktd.stop()
    kktd = start_kktd(tmp_path, atol_process, kktds)  # fixed: the right password file
    wait_all_sent(kktd, 20)
    assert_exactly_once(kktd, atol_process, ids)
    assert health(kktd)["status"] == "ok"


def test_a_password_fixed_in_its_file_applies_on_reload(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start()
    password_file = tmp_path / "operator_password"
    password_file.write_text("typo-in-the-password\n")
    kktd = start_kktd(tmp_path, atol_process, kktds, "--atol-password-file", str(password_file))
    ids = post(kktd, receipts_with_contact("reload", 10))
    wait_until(lambda: health(kktd)["status"] == "warning", 30, "health warning")
    password_file.write_text(atol_process.password + "\n")
    kktd.signal(signal.SIGHUP)  # systemctl reload kktd: the settings, the password file among them, again
    wait_all_sent(kktd, 10)
    assert_exactly_once(kktd, atol_process, ids)
    assert "typo-in-the-password" not in kktd.log()


def test_a_blocked_user_waits_and_drains_once_unblocked(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start(blocked=True)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("blocked", 20))
    wait_until(lambda: any("support" in w for w in health(kktd)["warnings"]), 30, "a warning to call support")
    assert counts(kktd)["failed"] == 0
    atol_process.set_behaviour(blocked=False)
    wait_all_sent(kktd, 20)
    assert_exactly_once(kktd, atol_process, ids)
    wait_until(lambda: health(kktd)["status"] == "ok", 10, "health back to ok")


# ---- SIGKILL ----


def test_sigkill_between_registration_and_commit_of_the_uuid(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    atol_process.start(answer_delay_s=30.0)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("held", 10))
    # ATOL has the documents; their answers (the uuids) are held: kktd has committed none of them.
    wait_until(lambda: atol_process.stats()["registered"] >= 1, 20, "a document registered, its answer held")
    assert counts(kktd)["submitted"] == 0
    kktd.kill()
    atol_process.set_behaviour(answer_delay_s=0.0)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    wait_all_sent(kktd, 10)
    assert_exactly_once(kktd, atol_process, ids)
    assert atol_process.stats()["duplicates"] >= 1  # the registration resent after the crash adopted the uuid


def test_sigkill_at_random_moments_of_a_drain(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    seed = 20261201
    rng = random.Random(seed)
    atol_process.start(wait_polls=1, fail_ratio=0.1, drop_ratio=0.1, delay_s=0.002, seed=seed)
    kktd = start_kktd(tmp_path, atol_process, kktds)
    ids = post(kktd, receipts_with_contact("kill", 200))
    for cycle in range(8):
        stats = atol_process.stats()
        target = stats["registration_requests"] + stats["report_requests"] + rng.randint(1, 120)

        def progressed(target: int = target) -> bool:
            now = atol_process.stats()
            return now["registration_requests"] + now["report_requests"] >= target or now["fiscalized"] >= 200

        wait_until(progressed, 30, f"cycle {cycle}: the drain to progress")
        kktd.signal(signal.SIGKILL)
        kktd.wait(10)
        kktd = start_kktd(tmp_path, atol_process, kktds)
    wait_all_sent(kktd, 200)
    assert_exactly_once(kktd, atol_process, ids)


# ---- a v1 buffer ----


def test_a_v1_database_with_pending_receipts_is_migrated_and_drained_through_atol(
    tmp_path: Path, atol_process: MockAtolProcess, kktds: list[KktdProcess]
) -> None:
    make_v1_database(tmp_path / "buffer.db", pending=25, sent=5)  # receipts of kktd's own OFD protocol era
    atol_process.start(wait_polls=1)
    # Retention would prune the v1 era's sent receipts (2023): keep them, to show they are left alone.
    kktd = start_kktd(tmp_path, atol_process, kktds, "--retention-days", "3650")
    wait_all_sent(kktd, 30)
    pending_ids = {f"v1-{n}": f"{n:032x}" for n in range(5, 30)}
    assert_exactly_once(kktd, atol_process, pending_ids)
    assert sorted(d["external_id"] for d in atol_process.documents()) == sorted(pending_ids)
    sent_before = get(kktd, f"/v1/kkt/receipt/{0:032x}")
    assert sent_before["status"] == "sent" and sent_before["ofd"]["fiscal_document_number"] == 1
