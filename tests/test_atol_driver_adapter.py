"""The atol-driver upstream (kktd/upstreams/atol_driver.py) against its mock register, in process: every outcome
class and fault of docs/atol-driver.md, and, wherever a receipt could be printed twice, the register's own
documents (each receipt printed exactly once). The generic contract (tests/test_upstream_contract.py) is not
repeated here.

Each test starts its own mock on port 0 and closes it. The adapter's clock is a FakeTime (the shift it read is
trusted for a minute: the tests move that minute, never wait for it); nothing sleeps to synchronise: results
are polled with a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    Fiscalized,
    NotRegistered,
    Outgoing,
    PollOutcome,
    Refused,
    Registered,
    RegisterUnavailable,
    ShiftState,
    StillProcessing,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.receipt import sample_receipt, validate_receipt
from kktd.seller import parse_seller
from kktd.upstreams.atol_driver import SHIFT_CHECK_S, AtolDriver, _Reference, driver_settings
from kktd.upstreams.atol_driver_mapping import task_uuid
from kktd_mocks import atol_driver as mock_module
from kktd_mocks.atol_driver import FN_NUMBER, FNS_URL, REGISTRATION_NUMBER, MockRegister, start_mock_register
from tests.support import FakeTime, async_wait_until

LOGIN = "kktd"
SECRET = "s3cret-adapter-password"
TIMEOUT_S = 0.5  # one HTTP request to the mock
SETTLE_S = 10.0  # a result the mock gives within milliseconds: generous for a loaded machine
RECEIPT_TYPES = frozenset({"sell", "sellReturn", "buy", "buyReturn"})
TOTAL_KOPECKS = 24430  # sample_receipt's
MILK = "Молоко 3,2% 1 л"  # sample_receipt's first item (receipt(name=...) renames it)


@dataclasses.dataclass
class Rig:
    adapter: AtolDriver
    mock: MockRegister
    clock: FakeTime

    def receipts(self, external_id: str | None = None) -> list[dict[str, Any]]:
        """The register's receipt documents (of one registration when external_id is given)."""
        wanted = None if external_id is None else uuid_of(external_id)
        return [
            d for d in self.mock.documents() if d["type"] in RECEIPT_TYPES and (wanted is None or d["uuid"] == wanted)
        ]

    def kinds(self) -> list[str]:
        return [d["type"] for d in self.mock.documents()]

    def forget_shift(self) -> None:
        """A minute passes for the adapter: it reads the shift again before the next receipt."""
        self.clock.advance(SHIFT_CHECK_S + 1)

    async def finished(self, external_id: str) -> None:
        """The register has run the receipt's request (whatever it ended with)."""
        uuid = uuid_of(external_id)

        def done() -> bool:
            request = self.mock.state.requests.get(uuid)
            return request is not None and request.finished

        await async_wait_until(done, SETTLE_S, f"the register to run {external_id}")


@asynccontextmanager
async def started(
    *, auto_shift: bool = True, password: str = SECRET, device_id: str | None = None, **behaviour: Any
) -> AsyncIterator[Rig]:
    """A mock register (HTTP Basic, the given behaviour) and the adapter pointing at it, as kktd makes it."""
    mock = await start_mock_register("127.0.0.1", 0, login=LOGIN, password=SECRET, **behaviour)
    try:
        with tempfile.TemporaryDirectory() as directory:
            password_file = Path(directory) / "atol_driver_password"
            password_file.write_text(password + "\n")
            values: dict[str, Any] = {
                "atol_driver_url": mock.url,
                "atol_driver_login": LOGIN,
                "atol_driver_password_file": str(password_file),
                "atol_driver_timeout": TIMEOUT_S,
                "atol_driver_auto_shift": auto_shift,
                "cashier_name": "Иванова",
            }
            if device_id is not None:
                values["atol_driver_device_id"] = device_id
            clock = FakeTime()
            adapter = AtolDriver(driver_settings(values, parse_seller(values), environ={}), clock=clock)
            await adapter.start()
            try:
                yield Rig(adapter, mock, clock)
            finally:
                await adapter.close()
    finally:
        await mock.close()


def receipt_id_of(key: str) -> str:
    return key.encode().hex().ljust(32, "0")[:32]


def uuid_of(external_id: str) -> str:
    """The task uuid of a registration of receipt(KEY) under external_id KEY or KEY~N."""
    return task_uuid(receipt_id_of(external_id.split("~")[0]), external_id)


def receipt(key: str, *, name: str | None = None) -> Outgoing:
    raw = sample_receipt(key)
    if name is not None:
        raw["items"][0]["name"] = name
    valid = validate_receipt(raw)
    return Outgoing(receipt_id_of(key), valid.idempotency_key, key, 1_796_000_000_000, valid.canonical_json)


def again(outgoing: Outgoing, n: int = 1) -> Outgoing:
    """The loop's re-registration after NotRegistered: the same receipt under a new external id."""
    return dataclasses.replace(outgoing, external_id=f"{outgoing.idempotency_key}~{n}")


def awaiting(outgoing: Outgoing, registered: Registered) -> AwaitingResult:
    return AwaitingResult(outgoing.receipt_id, outgoing.external_id, registered.reference)


async def register(adapter: AtolDriver, outgoing: Outgoing) -> Registered:
    [first] = await adapter.submit([outgoing])
    assert isinstance(first, Registered), first
    assert first.receipt_id == outgoing.receipt_id
    return first


async def result(adapter: AtolDriver, item: AwaitingResult) -> PollOutcome:
    """Poll until the result is final (anything but StillProcessing)."""
    final: list[PollOutcome] = []

    async def polled() -> bool:
        [outcome] = await adapter.poll([item])
        assert outcome.receipt_id == item.receipt_id
        if isinstance(outcome, StillProcessing):
            return False
        final.append(outcome)
        return True

    await async_wait_until(polled, SETTLE_S, f"a result for {item.external_id}", interval=0.01)
    return final[0]


async def deliver(adapter: AtolDriver, outgoing: Outgoing) -> PollOutcome:
    return await result(adapter, awaiting(outgoing, await register(adapter, outgoing)))


async def fiscalized(adapter: AtolDriver, outgoing: Outgoing) -> Fiscalized:
    outcome = await deliver(adapter, outgoing)
    assert isinstance(outcome, Fiscalized), outcome
    return outcome


async def unavailable(call: Callable[[], Awaitable[Any]]) -> UpstreamUnavailable:
    with pytest.raises(UpstreamUnavailable) as caught:
        await call()
    return caught.value


async def poll_raises(adapter: AtolDriver, item: AwaitingResult) -> UpstreamUnavailable:
    """Poll until the poll itself fails (the register is blocked): that failure."""
    failures: list[UpstreamUnavailable] = []

    async def failed() -> bool:
        try:
            [outcome] = await adapter.poll([item])
        except UpstreamUnavailable as exc:
            failures.append(exc)
            return True
        assert isinstance(outcome, StillProcessing), outcome
        return False

    await async_wait_until(failed, SETTLE_S, f"the poll of {item.external_id} to fail", interval=0.01)
    return failures[0]


def shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


# ---- 1. a fresh receipt ----


async def test_a_fresh_receipt_is_registered_then_fiscalized_with_all_its_fiscal_data() -> None:
    async with started() as rig:
        outgoing = receipt("fresh-1")
        registered = await register(rig.adapter, outgoing)
        reference = _Reference.parse(registered.reference)
        assert reference == _Reference(uuid_of("fresh-1"), TOTAL_KOPECKS)
        assert _Reference.parse(str(reference)) == reference
        outcome = await result(rig.adapter, awaiting(outgoing, registered))
        assert isinstance(outcome, Fiscalized), outcome
        [document] = rig.receipts("fresh-1")
        fiscal = outcome.fiscal
        assert fiscal.fiscal_document_number == document["fd"]
        assert fiscal.fiscal_sign == document["sign"] and fiscal.fiscal_sign.isdigit()
        assert fiscal.fn_number == FN_NUMBER
        assert fiscal.kkt_registration_number == REGISTRATION_NUMBER
        assert fiscal.shift_number == 1 and fiscal.receipt_number == 1
        assert fiscal.fns_url == FNS_URL
        assert fiscal.registered_at == document["dateTime"]
        assert datetime.fromisoformat(fiscal.registered_at).utcoffset() == timedelta(hours=3)
        assert document["printed"] is True and document["total"] == "244.30"


# ---- 2. the same registration sent again ----


async def test_resubmitting_a_registration_is_adopted_and_prints_once() -> None:
    """A crash between the POST and the loop's commit: the same external id goes again, the web server answers
    409 and the adapter adopts the task."""
    async with started() as rig:
        outgoing = receipt("again-1")
        first = await register(rig.adapter, outgoing)
        second = await register(rig.adapter, outgoing)
        assert second.reference == first.reference
        assert rig.mock.stats()["duplicate_posts"] == 1
        one = await result(rig.adapter, awaiting(outgoing, first))
        two = await fiscalized(rig.adapter, outgoing)  # and once more after it was fiscalized
        assert isinstance(one, Fiscalized) and one.fiscal == two.fiscal
        assert len(rig.receipts("again-1")) == 1


async def test_a_lost_answer_is_maybe_sent_and_the_resend_settles_it_once() -> None:
    async with started() as rig:
        outgoing = receipt("lost-1")
        rig.mock.set_behaviour(lose_receipt_answers=1)
        error = await unavailable(lambda: rig.adapter.submit([outgoing]))
        assert error.kind is FailureKind.MAYBE_SENT, error
        outcome = await fiscalized(rig.adapter, outgoing)
        [document] = rig.receipts("lost-1")
        assert outcome.fiscal.fiscal_document_number == document["fd"]
        assert rig.mock.stats()["duplicate_posts"] == 1


# ---- 3. paper out, cover open: not printed, printed once when the operator has acted ----


@pytest.mark.parametrize(
    ("fault", "cleared", "code", "reason", "word"),
    [
        ({"paper_present": False}, {"paper_present": True}, 44, "paper_out", "paper"),
        ({"cover_open": True}, {"cover_open": False}, 45, "cover_open", "cover"),
    ],
    ids=["paper_out", "cover_open"],
)
async def test_a_receipt_the_printer_cannot_take_waits_for_the_operator_then_prints_once(
    fault: dict[str, Any], cleared: dict[str, Any], code: int, reason: str, word: str
) -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(**fault)
        outgoing = receipt("printer-1")
        outcome = await deliver(rig.adapter, outgoing)
        assert isinstance(outcome, NotRegistered), outcome
        assert outcome.code == f"atol_driver_{code}"
        retry = again(outgoing)
        for _ in range(2):  # receipts wait, as long as the operator has not acted
            error = await unavailable(lambda: rig.adapter.submit([retry]))
            assert error.kind is FailureKind.NOT_SENT and error.reason == reason, error
            assert error.operator_action is not None and word in error.operator_action
        assert rig.receipts("printer-1") == [] and rig.receipts(retry.external_id) == []
        assert uuid_of(retry.external_id) not in rig.mock.state.requests  # nothing of it was even sent
        rig.mock.set_behaviour(**cleared)
        await fiscalized(rig.adapter, retry)
        assert len(rig.receipts(retry.external_id)) == 1 and rig.receipts("printer-1") == []
        assert len(rig.receipts()) == 2


async def test_with_no_paper_on_a_fresh_register_the_shift_waits_too() -> None:
    async with started(paper_present=False) as rig:
        outgoing = receipt("no-paper-fresh")
        error = await unavailable(lambda: rig.adapter.submit([outgoing]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "paper_out", error
        assert rig.mock.documents() == []
        rig.mock.set_behaviour(paper_present=True)
        await fiscalized(rig.adapter, outgoing)
        assert rig.kinds() == ["openShift", "sell"]


# ---- 4. the paper ran out while printing: fiscalized, its copy finished later ----


async def test_a_copy_not_printed_is_finished_with_continue_print_once_paper_is_back() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(paper_runs_out_next=True)
        outcome = await fiscalized(rig.adapter, receipt("runs-out"))
        pending = rig.mock.state.pending_copy
        assert pending is not None and pending.fd == outcome.fiscal.fiscal_document_number
        # The next receipt waits for paper; nothing of it is sent to the register.
        following = receipt("after-runs-out")
        error = await unavailable(lambda: rig.adapter.submit([following]))
        assert error.reason == "paper_out" and error.operator_action is not None, error
        assert "paper" in error.operator_action
        assert rig.mock.state.pending_copy is pending and rig.receipts("after-runs-out") == []
        rig.mock.set_behaviour(paper_present=True)
        await fiscalized(rig.adapter, following)
        assert rig.mock.state.pending_copy is None
        [copy] = rig.receipts("runs-out")
        assert copy["printed"] is True
        assert len(rig.receipts("after-runs-out")) == 1 and len(rig.receipts()) == 3


async def test_a_copy_not_printed_is_finished_also_when_the_paper_was_loaded_before_the_next_receipt() -> None:
    async with started() as rig:
        rig.mock.set_behaviour(paper_runs_out_next=True)
        await fiscalized(rig.adapter, receipt("runs-out"))
        assert rig.mock.state.pending_copy is not None
        rig.mock.set_behaviour(paper_present=True)  # the operator loads paper at once
        await fiscalized(rig.adapter, receipt("next"))
        assert rig.mock.state.pending_copy is None
        assert all(d["printed"] for d in rig.receipts())


# ---- 5. the power lost mid-print: the queue blocks, the driver settles it ----


async def test_power_lost_mid_print_after_the_document_was_made_is_fiscalized_once() -> None:
    async with started(power_back_after_s=None) as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(power_loss_next="made")
        outgoing = receipt("power-made")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        for _ in range(2):
            error = await poll_raises(rig.adapter, item)
            assert error.reason == "register_blocked" and error.kind is FailureKind.NOT_SENT, error
            assert error.operator_action is not None and "power" in error.operator_action
        rig.mock.set_behaviour(device_off=False)  # the power is back
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, Fiscalized), outcome
        [document] = rig.receipts("power-made")
        assert outcome.fiscal.fiscal_document_number == document["fd"]
        # Its copy was not printed: finished before the next receipt.
        await fiscalized(rig.adapter, receipt("after-power"))
        assert rig.mock.state.pending_copy is None and all(d["printed"] for d in rig.receipts())
        assert len(rig.receipts("power-made")) == 1 and len(rig.receipts()) == 3


@pytest.mark.parametrize("warm", [True, False], ids=["after-a-receipt", "first-receipt"])
async def test_power_lost_mid_print_before_the_document_was_made_prints_it_again_once(warm: bool) -> None:
    async with started(power_back_after_s=None) as rig:
        if warm:
            await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(power_loss_next="not_made")
        outgoing = receipt("power-not-made")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        error = await poll_raises(rig.adapter, item)
        assert error.reason == "register_blocked" and error.operator_action, error
        rig.mock.set_behaviour(device_off=False)
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, NotRegistered), outcome
        assert rig.receipts("power-not-made") == []
        await fiscalized(rig.adapter, again(outgoing))
        assert len(rig.receipts(again(outgoing).external_id)) == 1
        assert len(rig.receipts()) == 1 + warm


async def test_power_back_by_itself_settles_the_receipt() -> None:
    async with started(power_back_after_s=0.05) as rig:
        rig.mock.set_behaviour(power_loss_next="made")
        outgoing = receipt("power-back")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        final: list[PollOutcome] = []

        async def settled() -> bool:
            try:
                [outcome] = await rig.adapter.poll([item])
            except UpstreamUnavailable as exc:  # blocked for the moment the power is off
                assert exc.reason == "register_blocked", exc
                return False
            if isinstance(outcome, StillProcessing):
                return False
            final.append(outcome)
            return True

        await async_wait_until(settled, SETTLE_S, "the power to come back", interval=0.01)
        [document] = rig.receipts("power-back")
        assert isinstance(final[0], Fiscalized) and final[0].fiscal.fiscal_document_number == document["fd"]


# ---- 6. a plain error of the link or the FN: the register's last receipt decides ----


async def test_an_unknown_outcome_that_was_fiscalized_is_taken_from_the_register() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(unknown_error_next="made")
        outgoing = receipt("unknown-made")
        outcome = await fiscalized(rig.adapter, outgoing)
        [document] = rig.receipts("unknown-made")
        assert outcome.fiscal.fiscal_document_number == document["fd"]
        assert outcome.fiscal.fiscal_sign == document["sign"]
        assert outcome.fiscal.registered_at == document["dateTime"]
        assert rig.mock.state.requests[uuid_of("unknown-made")].subtasks[1].code == 15
        assert len(rig.receipts()) == 2


@pytest.mark.parametrize("warm", [True, False], ids=["after-a-receipt", "first-receipt"])
async def test_an_unknown_outcome_that_was_not_fiscalized_prints_it_again_once(warm: bool) -> None:
    async with started() as rig:
        if warm:
            await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(unknown_error_next="not_made")
        outgoing = receipt("unknown-not-made")
        outcome = await deliver(rig.adapter, outgoing)
        assert isinstance(outcome, NotRegistered), outcome
        assert outcome.code == "atol_driver_15"
        assert rig.receipts("unknown-not-made") == []
        await fiscalized(rig.adapter, again(outgoing))
        assert len(rig.receipts(again(outgoing).external_id)) == 1 and len(rig.receipts()) == 1 + warm


async def test_an_unknown_outcome_waits_while_the_register_cannot_say() -> None:
    """The register does not answer the question right after the error: the receipt waits (never a dead letter
    for a link that is down for a moment), and is settled when the register answers."""
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(unknown_error_next="made")
        outgoing = receipt("unknown-later")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        await rig.finished("unknown-later")
        rig.mock.set_behaviour(device_off=True)
        error = await unavailable(lambda: rig.adapter.poll([item]))
        assert error.kind is FailureKind.NOT_SENT and error.operator_action, error
        rig.mock.set_behaviour(device_off=False)
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, Fiscalized), outcome
        [document] = rig.receipts("unknown-later")
        assert outcome.fiscal.fiscal_document_number == document["fd"]


async def test_an_unknown_outcome_the_register_cannot_match_is_a_dead_letter_for_a_person() -> None:
    """The register's last receipt follows the FN number read before, but its total is another: a person must
    compare (a reprint could fiscalize it twice)."""
    async with started() as rig:
        rig.mock.set_behaviour(unknown_error_next="made")
        outgoing = receipt("unknown-mismatch")
        registered = await register(rig.adapter, outgoing)
        reference = _Reference.parse(registered.reference)
        item = AwaitingResult(outgoing.receipt_id, outgoing.external_id, str(dataclasses.replace(reference, total=1)))
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, Refused) and outcome.code == "atol_driver_unknown_outcome", outcome
        assert len(rig.receipts()) == 1


# ---- 7. the register unplugged, its web server up ----


async def test_an_unplugged_register_makes_receipts_wait_then_prints_once() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(device_off=True)
        outgoing = receipt("unplugged")
        outcome = await deliver(rig.adapter, outgoing)  # its FN status read failed: the receipt never ran
        assert isinstance(outcome, NotRegistered), outcome
        retry = again(outgoing)
        for _ in range(2):
            error = await unavailable(lambda: rig.adapter.submit([retry]))
            assert error.kind is FailureKind.NOT_SENT and error.reason == "register_unreachable", error
            assert error.operator_action is not None and "power and cable" in error.operator_action
        rig.forget_shift()  # also when the adapter reads the shift first
        error = await unavailable(lambda: rig.adapter.submit([retry]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "register_unreachable", error
        assert rig.receipts("unplugged") == [] and uuid_of(retry.external_id) not in rig.mock.state.requests
        rig.mock.set_behaviour(device_off=False)
        await fiscalized(rig.adapter, retry)
        assert len(rig.receipts(retry.external_id)) == 1 and len(rig.receipts()) == 2


async def test_an_unplugged_register_when_the_adapter_reads_the_shift_names_the_operators_action() -> None:
    async with started() as rig:
        rig.mock.set_behaviour(device_off=True)
        error = await unavailable(lambda: rig.adapter.submit([receipt("unplugged-first")]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "register_unreachable", error
        assert error.operator_action is not None and "register" in error.operator_action
        rig.mock.set_behaviour(device_off=False)
        await fiscalized(rig.adapter, receipt("unplugged-first"))
        assert rig.kinds() == ["openShift", "sell"]


# ---- 8. the web server down; a wrong password ----


async def test_a_web_server_that_is_down_is_not_sent() -> None:
    async with started() as rig:
        await rig.mock.go_offline()
        error = await unavailable(lambda: rig.adapter.submit([receipt("down-1")]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "connect_error", error
        with pytest.raises(RegisterUnavailable) as caught:
            await rig.adapter.shift()
        assert caught.value.reason == "connect_error"
        await rig.mock.go_online()
        outgoing = receipt("down-1")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        await rig.finished("down-1")
        await rig.mock.go_offline()  # now with a keep-alive connection the web server drops
        error = await unavailable(lambda: rig.adapter.poll([item]))
        assert error.kind is FailureKind.NOT_SENT and error.reason in ("connect_error", "connection_lost"), error
        error = await unavailable(lambda: rig.adapter.poll([item]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "connect_error", error
        with pytest.raises(RegisterUnavailable) as caught:
            await rig.adapter.shift()
        assert caught.value.reason == "connect_error"
        rig.forget_shift()  # a receipt's checks before it fail alike: not sent
        error = await unavailable(lambda: rig.adapter.submit([receipt("down-2")]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "connect_error", error
        await rig.mock.go_online()
        assert isinstance(await result(rig.adapter, item), Fiscalized)
        await fiscalized(rig.adapter, receipt("down-2"))
        assert len(rig.receipts()) == 2


async def test_a_wrong_password_is_auth_failed_and_never_shown() -> None:
    wrong = "wr0ng-adapter-password"
    async with started(password=wrong) as rig:
        errors: list[BaseException] = []
        errors.append(await unavailable(lambda: rig.adapter.submit([receipt("auth-1")])))
        errors.append(
            await unavailable(
                lambda: rig.adapter.poll([AwaitingResult("r", "auth-1", str(_Reference(uuid_of("auth-1"))))])
            )
        )
        with pytest.raises(RegisterUnavailable) as caught:
            await rig.adapter.report()
        errors.append(caught.value)
        for error in errors[:2]:
            assert isinstance(error, UpstreamUnavailable)
            assert error.kind is FailureKind.NOT_SENT and error.reason == "auth_failed", error
            assert error.operator_action is not None and "atol_driver_password_file" in error.operator_action
        assert isinstance(errors[2], RegisterUnavailable) and errors[2].reason == "auth_failed"
        for error in errors:
            text = shown(error)
            assert wrong not in text and SECRET not in text, text
        assert wrong not in repr(rig.adapter) and wrong not in repr(rig.adapter._settings)
        assert rig.mock.stats()["unauthorized"] >= 3 and rig.mock.documents() == []


async def test_an_unknown_device_id_names_the_setting() -> None:
    async with started(device_id="other-register") as rig:
        error = await unavailable(lambda: rig.adapter.submit([receipt("device-1")]))
        assert error.kind is FailureKind.NOT_SENT and error.reason == "unknown_device", error
        assert error.operator_action is not None and "atol_driver_device_id" in error.operator_action


# ---- 9. content refused: a dead letter with the driver's code and text ----


@pytest.mark.parametrize("code", [501, 66, 16])
async def test_content_the_register_refuses_is_refused_with_the_drivers_code(code: int) -> None:
    async with started(refuse_names=[MILK], refuse_code=code) as rig:
        outcome = await deliver(rig.adapter, receipt(f"refused-{code}"))
        assert isinstance(outcome, Refused), outcome
        assert outcome.code == f"atol_driver_{code}"
        assert MILK in outcome.message
        assert rig.receipts() == []
        await fiscalized(rig.adapter, receipt("not-refused", name="Кефир"))  # the next one prints


async def test_the_drivers_text_is_escaped_and_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = "\x1b[2J\u202eЧек не оплачен\r\nFAKE: fiscalized" + "Ж" * 2000
    monkeypatch.setitem(mock_module.ERRORS, 66, hostile)
    async with started(refuse_names=[MILK], refuse_code=66) as rig:
        outcome = await deliver(rig.adapter, receipt("refused-hostile"))
        assert isinstance(outcome, Refused) and outcome.code == "atol_driver_66", outcome
        assert outcome.message.isprintable(), outcome.message
        assert "\\x1b" in outcome.message and "\\u202e" in outcome.message and "\\r\\n" in outcome.message
        assert len(outcome.message) <= 330
        assert "more characters" in outcome.message


async def test_a_task_the_register_refuses_as_invalid_is_refused() -> None:
    """The register's own validation (a 501 naming the field), not a mock switch: a stored receipt whose
    name is longer than the register takes (kktd's intake holds the same limit; older receipts may not)."""
    async with started() as rig:
        outgoing = receipt("too-long")
        body = json.loads(outgoing.body)
        body["items"][0]["name"] = "Я" * 129
        outcome = await deliver(rig.adapter, dataclasses.replace(outgoing, body=json.dumps(body)))
        assert isinstance(outcome, Refused) and outcome.code == "atol_driver_501", outcome
        assert "items[0].name" in outcome.message
        assert rig.receipts() == []


# ---- 10. shifts ----


async def test_a_closed_shift_is_opened_before_the_first_receipt() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("first"))
        documents = rig.mock.documents()
        assert [d["type"] for d in documents] == ["openShift", "sell"]
        assert documents[0]["uuid"] != uuid_of("first") and documents[1]["uuid"] == uuid_of("first")
        await fiscalized(rig.adapter, receipt("second"))
        assert rig.kinds() == ["openShift", "sell", "sell"]  # opened once


async def test_an_expired_shift_is_closed_and_reopened_before_the_receipt() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("day-1"))
        rig.mock.advance_clock(25 * 3600)
        rig.forget_shift()
        outcome = await fiscalized(rig.adapter, receipt("day-2"))
        assert rig.kinds() == ["openShift", "sell", "closeShift", "openShift", "sell"]
        assert outcome.fiscal.shift_number == 2 and outcome.fiscal.receipt_number == 1
        assert len(rig.receipts("day-2")) == 1


async def test_a_receipt_refused_for_an_expired_shift_is_printed_once_after_the_shift_is_renewed() -> None:
    """The adapter trusted the shift it read a moment ago; the register says 68: not printed, and the
    re-registration closes and reopens the shift first."""
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("day-1"))
        rig.mock.advance_clock(25 * 3600)
        outgoing = receipt("day-2")
        outcome = await deliver(rig.adapter, outgoing)
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_68", outcome
        await fiscalized(rig.adapter, again(outgoing))
        assert rig.kinds() == ["openShift", "sell", "closeShift", "openShift", "sell"]
        assert rig.receipts("day-2") == [] and len(rig.receipts(again(outgoing).external_id)) == 1


async def test_without_auto_shift_receipts_wait_for_kktd_shift_close() -> None:
    async with started(auto_shift=False) as rig:
        await fiscalized(rig.adapter, receipt("day-1"))
        rig.mock.advance_clock(25 * 3600)
        outgoing = receipt("day-2")
        outcome = await deliver(rig.adapter, outgoing)  # the shift it trusted had run out meanwhile
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_68", outcome
        retry = again(outgoing)
        for _ in range(2):
            error = await unavailable(lambda: rig.adapter.submit([retry]))
            assert error.kind is FailureKind.NOT_SENT and error.reason == "shift_expired", error
            assert error.operator_action is not None and "kktd shift close" in error.operator_action
        rig.forget_shift()
        error = await unavailable(lambda: rig.adapter.submit([retry]))
        assert error.reason == "shift_expired", error
        assert rig.kinds() == ["openShift", "sell"]
        assert (await rig.adapter.shift()).state is ShiftState.EXPIRED
        closed = await rig.adapter.close_shift()
        assert closed.state is ShiftState.CLOSED
        await fiscalized(rig.adapter, retry)
        assert rig.kinds() == ["openShift", "sell", "closeShift", "openShift", "sell"]
        assert len(rig.receipts(retry.external_id)) == 1


async def test_a_shift_closed_behind_the_adapters_back_is_opened_again() -> None:
    """Someone closed the shift on the register (73 for a receipt, the register not opening shifts itself):
    not printed; the re-registration opens the shift and prints once."""
    async with started(auto_open_shift=False) as rig:
        await fiscalized(rig.adapter, receipt("before"))
        async with started_twin(rig) as other:
            await other.close_shift()
        outgoing = receipt("after-close")
        outcome = await deliver(rig.adapter, outgoing)
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_73", outcome
        await fiscalized(rig.adapter, again(outgoing))
        assert rig.kinds() == ["openShift", "sell", "closeShift", "openShift", "sell"]


@asynccontextmanager
async def started_twin(rig: Rig) -> AsyncIterator[AtolDriver]:
    """A second adapter on the same register (another kktd, or the operator at the register)."""
    twin = AtolDriver(rig.adapter._settings)
    await twin.start()
    try:
        yield twin
    finally:
        await twin.close()


async def test_the_register_protocol_shift_commands() -> None:
    async with started() as rig:
        assert (await rig.adapter.shift()).state is ShiftState.CLOSED
        with pytest.raises(RegisterUnavailable) as caught:
            await rig.adapter.close_shift()
        assert caught.value.reason == "shift_closed"
        opened = await rig.adapter.open_shift()
        assert opened.state is ShiftState.OPEN and opened.number == 1 and opened.expires_at
        assert datetime.fromisoformat(opened.expires_at).utcoffset() == timedelta(hours=3)
        with pytest.raises(RegisterUnavailable) as caught:
            await rig.adapter.open_shift()
        assert caught.value.reason == "shift_not_closed"
        await fiscalized(rig.adapter, receipt("in-shift"))
        closed = await rig.adapter.close_shift()
        assert closed.state is ShiftState.CLOSED and closed.number == 1
        assert rig.kinds() == ["openShift", "sell", "closeShift"]
        rig.mock.set_behaviour(device_off=True)
        with pytest.raises(RegisterUnavailable) as unreachable:
            await rig.adapter.shift()
        assert unreachable.value.reason == "register_unreachable"


async def test_the_register_report() -> None:
    async with started(ofd_online=False) as rig:
        report = await rig.adapter.report()
        assert report.shift.state is ShiftState.CLOSED
        assert report.unsent_documents == 0 and report.oldest_unsent_ms is None
        assert report.fn_valid_until_ms == int(datetime.fromisoformat("2028-06-30T00:00:00+03:00").timestamp() * 1000)
        assert report.paper_present is True and report.cover_open is False and report.fn_warnings == ()
        await fiscalized(rig.adapter, receipt("unsent"))
        rig.mock.set_behaviour(paper_present=False, cover_open=True, fn_validity_date="2026-01-01")
        report = await rig.adapter.report()
        oldest = rig.mock.state.documents[0]
        assert report.shift.state is ShiftState.OPEN and report.shift.number == 1
        assert report.unsent_documents == 2
        assert report.oldest_unsent_ms == int(datetime.fromisoformat(oldest.date_time).timestamp() * 1000)
        assert report.paper_present is False and report.cover_open is True
        assert "needReplacement" in report.fn_warnings
        rig.mock.set_behaviour(ofd_online=True)
        assert (await rig.adapter.report()).unsent_documents == 0


# ---- 11. the flat result shape; a task the web server forgot ----


async def test_the_flat_result_shape_works_end_to_end() -> None:
    async with started(result_shape="flat") as rig:
        first = await fiscalized(rig.adapter, receipt("flat-1"))
        assert first.fiscal.fn_number == FN_NUMBER
        rig.mock.set_behaviour(refuse_names=[MILK], refuse_code=66)
        refused = await deliver(rig.adapter, receipt("flat-refused"))
        assert isinstance(refused, Refused) and refused.code == "atol_driver_66", refused
        rig.mock.set_behaviour(refuse_names=[], paper_present=False)
        outgoing = receipt("flat-paper")
        not_printed = await deliver(rig.adapter, outgoing)
        assert isinstance(not_printed, NotRegistered) and not_printed.code == "atol_driver_44", not_printed
        rig.mock.set_behaviour(paper_present=True, unknown_error_next="made")
        made = await fiscalized(rig.adapter, again(outgoing))
        [document] = rig.receipts(again(outgoing).external_id)
        assert made.fiscal.fiscal_document_number == document["fd"] and len(rig.receipts()) == 2


async def test_a_task_the_web_server_forgot_is_a_dead_letter_never_printed_again() -> None:
    async with started() as rig:
        outgoing = receipt("forgotten")
        item = awaiting(outgoing, await register(rig.adapter, outgoing))
        await rig.finished("forgotten")
        await rig.mock.state.reset()  # the web server lost its queue and results
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, Refused) and outcome.code == "atol_driver_unknown_task", outcome
        assert rig.mock.documents() == []  # and nothing was sent again


# ---- 12. batches ----


async def test_a_batch_gets_one_outcome_per_receipt_in_order() -> None:
    async with started() as rig:
        batch = [receipt(f"batch-{i}") for i in range(3)]
        registered = await rig.adapter.submit(batch)
        assert [type(o) for o in registered] == [Registered] * 3
        assert [o.receipt_id for o in registered] == [r.receipt_id for r in batch]
        items = [awaiting(r, o) for r, o in zip(batch, registered, strict=True) if isinstance(o, Registered)]
        for r in batch:
            await rig.finished(r.external_id)
        outcomes = await rig.adapter.poll(items)
        assert [type(o) for o in outcomes] == [Fiscalized] * 3
        assert [o.receipt_id for o in outcomes] == [r.receipt_id for r in batch]
        numbers = [o.fiscal.fiscal_document_number for o in outcomes if isinstance(o, Fiscalized)]
        assert numbers == [d["fd"] for d in rig.receipts()] and numbers == sorted(numbers)


async def test_a_web_server_that_dies_after_the_first_receipt_leaves_the_rest_undelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        batch = [receipt(f"dies-{i}") for i in range(3)]
        die_after_first(monkeypatch, rig, "_register")
        outcomes = await rig.adapter.submit(batch)
        assert [type(o) for o in outcomes] == [Registered, Undelivered, Undelivered]
        assert [o.receipt_id for o in outcomes] == [r.receipt_id for r in batch]
        for outcome in outcomes[1:]:
            assert isinstance(outcome, Undelivered)
            # What failed was asking whether the receipt before had run: nothing of this one went out.
            assert outcome.error.kind is FailureKind.NOT_SENT, outcome.error
            assert outcome.error.reason in ("connect_error", "connection_lost"), outcome.error
        assert uuid_of("dies-0") in rig.mock.state.requests
        assert uuid_of("dies-1") not in rig.mock.state.requests
        assert uuid_of("dies-2") not in rig.mock.state.requests
        await rig.mock.go_online()
        monkeypatch.undo()
        first = outcomes[0]
        assert isinstance(first, Registered)
        assert isinstance(await result(rig.adapter, awaiting(batch[0], first)), Fiscalized)
        for rest in batch[1:]:
            await fiscalized(rig.adapter, rest)
        assert [len(rig.receipts(r.external_id)) for r in batch] == [1, 1, 1]


async def test_a_web_server_that_dies_after_the_first_result_leaves_the_rest_undelivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with started() as rig:
        batch = [receipt(f"dies-poll-{i}") for i in range(3)]
        registered = await rig.adapter.submit(batch)
        items = [awaiting(r, o) for r, o in zip(batch, registered, strict=True) if isinstance(o, Registered)]
        for r in batch:
            await rig.finished(r.external_id)
        die_after_first(monkeypatch, rig, "_result")
        outcomes = await rig.adapter.poll(items)
        assert [type(o) for o in outcomes] == [Fiscalized, Undelivered, Undelivered]
        assert [o.receipt_id for o in outcomes] == [r.receipt_id for r in batch]
        await rig.mock.go_online()
        monkeypatch.undo()
        rest = await rig.adapter.poll(items[1:])
        assert [type(o) for o in rest] == [Fiscalized] * 2
        assert len(rig.receipts()) == 3


def die_after_first(monkeypatch: pytest.MonkeyPatch, rig: Rig, method: str) -> None:
    """The web server goes away right after the adapter's call for the first item of a batch."""
    original = getattr(rig.adapter, method)
    calls = 0

    async def then_die(item: Any) -> Any:
        nonlocal calls
        outcome = await original(item)
        calls += 1
        if calls == 1:
            await rig.mock.go_offline()
        return outcome

    monkeypatch.setattr(rig.adapter, method, then_die)


# ---- the other error classes: busy, printer, FN; a cancelled request; a control answer lost ----


@pytest.mark.parametrize(
    ("code", "reason"),
    [(55, None), (82, None), (502, None), (46, "printer_fault"), (137, "fn_blocked")],
    ids=["busy", "receipt-open", "interrupted", "printer-fault", "fn-blocked"],
)
async def test_a_receipt_the_register_did_not_print_is_printed_once_under_its_new_id(
    code: int, reason: str | None
) -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        if reason == "fn_blocked":  # a document the FN cannot get to the OFD
            rig.mock.set_behaviour(ofd_online=False)
            await fiscalized(rig.adapter, receipt("unsent-1"))
        outgoing = receipt(f"not-printed-{code}")
        rig.mock.set_behaviour(refuse_uuids=[uuid_of(outgoing.external_id)], refuse_code=code)
        outcome = await deliver(rig.adapter, outgoing)
        assert isinstance(outcome, NotRegistered) and outcome.code == f"atol_driver_{code}", outcome
        retry = again(outgoing)
        if reason == "fn_blocked":
            # While the FN warns (here its OFD backlog is over 30 days old) receipts wait with the FN action;
            # once its documents reach the OFD the receipt is tried again and prints.
            rig.mock.advance_clock(31 * 86400)
            for _ in range(2):
                error = await unavailable(lambda: rig.adapter.submit([retry]))
                assert error.kind is FailureKind.NOT_SENT and error.reason == reason, error
                assert error.operator_action is not None and "FN" in error.operator_action
            assert rig.receipts(retry.external_id) == []
            rig.mock.set_behaviour(ofd_online=True)
            rig.forget_shift()  # a month passed: the shift is renewed before the receipt
        await fiscalized(rig.adapter, retry)
        assert rig.receipts(outgoing.external_id) == [] and len(rig.receipts(retry.external_id)) == 1


async def test_a_request_cancelled_in_the_queue_is_printed_once_under_its_new_id() -> None:
    """Another program's task holds the queue (the register is off); kktd's receipt waits behind it and
    someone's DELETE cancels it: never printed, so printed once under a new id."""
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(device_off=True)
        rig.mock.state.enqueue("someone-elses-task", [{"type": "closeShift"}])
        queued = receipt("cancelled")
        item = awaiting(queued, await register(rig.adapter, queued))
        assert rig.mock.state.cancel(rig.mock.state.requests[uuid_of("cancelled")])
        outcome = await result(rig.adapter, item)
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_503", outcome
        rig.mock.set_behaviour(device_off=False)
        await fiscalized(rig.adapter, again(queued))
        assert rig.receipts("cancelled") == [] and len(rig.receipts(again(queued).external_id)) == 1


# ---- one receipt in the queue at a time: the evidence of an unknown outcome is never spoilt ----


@pytest.mark.parametrize("made", ["made", "not_made"])
async def test_an_unknown_outcome_is_settled_right_even_when_the_next_receipt_was_sent_before_its_poll(
    made: str,
) -> None:
    """The loop registers the whole backlog before it polls: the register's last receipt read right after the
    failed one (before the next one prints) settles it, not the last receipt at the time of its poll."""
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(unknown_error_next=made)
        failed, following = receipt("backlog-unknown"), receipt("backlog-next")
        failed_item = awaiting(failed, await register(rig.adapter, failed))
        following_item = awaiting(following, await register(rig.adapter, following))
        assert isinstance(await result(rig.adapter, following_item), Fiscalized)  # it printed first
        outcome = await result(rig.adapter, failed_item)
        if made == "made":
            assert isinstance(outcome, Fiscalized), outcome
            [document] = rig.receipts("backlog-unknown")
            assert outcome.fiscal.fiscal_document_number == document["fd"]
            assert outcome.fiscal.fiscal_sign == document["sign"]
        else:
            assert isinstance(outcome, NotRegistered), outcome
            await fiscalized(rig.adapter, again(failed))
            assert rig.receipts("backlog-unknown") == [] and len(rig.receipts(again(failed).external_id)) == 1
        assert len(rig.receipts()) == 3


async def test_while_the_queue_is_blocked_no_receipt_is_sent() -> None:
    async with started(power_back_after_s=None) as rig:
        await fiscalized(rig.adapter, receipt("warm-up"))
        rig.mock.set_behaviour(power_loss_next="not_made")
        blocked = receipt("blocked")
        blocked_item = awaiting(blocked, await register(rig.adapter, blocked))
        following = receipt("held-back")
        # The blocked task may be "inProgress" for a moment: the submission waits for it, then holds back.
        error = await unavailable(lambda: rig.adapter.submit([following]))
        assert error.reason == "register_blocked" and error.kind is FailureKind.NOT_SENT, error
        assert error.operator_action is not None and "power" in error.operator_action
        assert uuid_of("held-back") not in rig.mock.state.requests
        rig.mock.set_behaviour(device_off=False)
        await fiscalized(rig.adapter, following)  # the loop tries the next receipt first
        assert isinstance(await result(rig.adapter, blocked_item), NotRegistered)
        await fiscalized(rig.adapter, again(blocked))
        assert rig.receipts("blocked") == [] and len(rig.receipts()) == 3


async def test_receipts_refused_for_the_same_expired_shift_renew_it_once() -> None:
    async with started() as rig:
        await fiscalized(rig.adapter, receipt("day-1"))
        rig.mock.advance_clock(25 * 3600)
        first, second = receipt("day-2-a"), receipt("day-2-b")
        first_item = awaiting(first, await register(rig.adapter, first))
        second_item = awaiting(second, await register(rig.adapter, second))
        outcome = await result(rig.adapter, first_item)
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_68", outcome
        await fiscalized(rig.adapter, again(first))
        outcome = await result(rig.adapter, second_item)  # an answer older than the renewed shift
        assert isinstance(outcome, NotRegistered) and outcome.code == "atol_driver_68", outcome
        await fiscalized(rig.adapter, again(second))
        assert rig.kinds() == ["openShift", "sell", "closeShift", "openShift", "sell", "sell"]


async def test_a_lost_answer_to_a_control_request_is_asked_again_under_its_uuid() -> None:
    async with started() as rig:
        rig.mock.set_behaviour(lose_answers=1)
        assert (await rig.adapter.shift()).state is ShiftState.CLOSED
        assert rig.mock.stats()["lost_answers"] == 1 and rig.mock.stats()["duplicate_posts"] == 1
        rig.mock.set_behaviour(lose_answers=2)  # the shift is opened once, whatever answers were lost
        await fiscalized(rig.adapter, receipt("after-lost"))
        assert rig.kinds() == ["openShift", "sell"]
        rig.mock.set_behaviour(lose_answers=1000)  # every first answer lost: the second POST's 409 is one
        assert (await rig.adapter.shift()).state is ShiftState.OPEN
        assert rig.mock.stats()["duplicate_posts"] == 4
