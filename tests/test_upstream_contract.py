"""The contract every upstream adapter passes, against its mock: one test suite, parametrized over the pairs.

An adapter (kktd/upstreams/<name>.py) is made through its registry entry (kktd.upstreams.REGISTRY), the way
kktd makes it. A pair is a small async context manager that starts the adapter's mock, makes the adapter
pointing at it (with credentials the adapter must never leak) and hands the contract a driver for the
mock's failure modes and its count of documents. Adding an upstream = one more entry in PAIRS
(docs/upstreams.md).

The contract:
- submit returns one outcome per receipt, in order;
- a fresh receipt ends Fiscalized: at once (one-phase), or Registered and then, after polls, Fiscalized
  (two-phase);
- resubmitting the same external id never creates a second document upstream and yields the same fiscal
  data, also after an answer was lost;
- a receipt the upstream refuses yields Refused with a code;
- an unreachable upstream raises UpstreamUnavailable with kind NOT_SENT;
- a lost answer and a timeout raise UpstreamUnavailable with kind MAYBE_SENT;
- no exception text (message, repr, traceback) holds the credentials.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    Fiscalized,
    Outgoing,
    Refused,
    Registered,
    StillProcessing,
    SubmitOutcome,
    UpstreamUnavailable,
)
from kktd.receipt import sample_receipt, validate_receipt
from kktd.seller import parse_seller
from kktd.upstreams import REGISTRY
from kktd.upstreams.atol_driver_mapping import task_uuid
from kktd.upstreams.base import Upstream
from kktd_mocks.atol import DEFAULT_GROUP, DEFAULT_INN, DEFAULT_LOGIN, start_mock_atol
from kktd_mocks.atol_driver import start_mock_register
from kktd_mocks.ofd import start_mock_ofd
from tests.support import async_wait_until

# Short enough for a quick timeout test, long enough for a loaded 2-core machine to answer in time.
ADAPTER_TIMEOUT_S = 0.5
SETTLE_TIMEOUT_S = 20.0


class MockDriver(Protocol):
    """What the contract asks of an adapter's mock."""

    def documents(self) -> int:
        """Documents the upstream created (fiscalized or registered), each external id counted once."""
        ...

    async def refuse(self, receipt: Outgoing) -> None:
        """Make the upstream refuse this receipt's content for good."""
        ...

    async def unreachable(self) -> None:
        """Nothing answers at the adapter's address any more (connections refused)."""
        ...

    async def lose_answers(self) -> None:
        """The upstream processes requests, then the connection breaks before the answer arrives."""
        ...

    async def answer_late(self) -> None:
        """The upstream answers long after the adapter's timeout."""
        ...

    async def recover(self) -> None:
        """Back to normal service."""
        ...


@dataclass
class ContractPair:
    adapter: Upstream
    mock: MockDriver
    secrets: tuple[str, ...]  # text that must never appear in an exception


PairFactory = Callable[[], AbstractAsyncContextManager[ContractPair]]


def make_adapter(name: str, values: Mapping[str, Any]) -> Upstream:
    """The adapter as kktd makes it: its registry entry's options parsed (defaults for the rest), its settings
    built, its factory called."""
    spec = REGISTRY[name]
    parsed = {
        option.key: option.parse(values[option.key]) if option.key in values else option.default
        for option in spec.options
    }
    return spec.create(spec.settings(parsed, parse_seller(values)))


# ---- kktd-ofd × kktd_mocks.ofd ----


class KktdOfdMock:
    def __init__(self, mock: Any) -> None:
        self._mock = mock

    def documents(self) -> int:
        return int(self._mock.stats()["unique"])

    async def refuse(self, receipt: Outgoing) -> None:
        # The mock refuses receipts of tills it does not know (kkt_not_registered).
        self._mock.set_rejected_pos_ids([json.loads(receipt.body)["pos_id"]])

    async def unreachable(self) -> None:
        await self._mock.set_mode("offline")  # the mock really closes its listening socket

    async def lose_answers(self) -> None:
        await self._mock.set_mode("drop_ack")

    async def answer_late(self) -> None:
        await self._mock.set_mode("slow", delay_s=ADAPTER_TIMEOUT_S * 10)

    async def recover(self) -> None:
        await self._mock.set_mode("online")


@asynccontextmanager
async def kktd_ofd_pair() -> AsyncIterator[ContractPair]:
    mock = await start_mock_ofd("127.0.0.1", 0)
    secret = "s3cret-contract-password"
    adapter = make_adapter(
        "kktd-ofd", {"ofd_url": f"http://kktd:{secret}@127.0.0.1:{mock.port}", "ofd_timeout": ADAPTER_TIMEOUT_S}
    )
    try:
        await adapter.start()
        yield ContractPair(adapter, KktdOfdMock(mock), (secret,))
    finally:
        await adapter.close()
        await mock.close()


# ---- atol-online-v5 × kktd_mocks.atol ----


class AtolMock:
    def __init__(self, mock: Any) -> None:
        self._mock = mock

    def documents(self) -> int:
        return int(self._mock.stats()["documents"])

    async def refuse(self, receipt: Outgoing) -> None:
        # ATOL's content refusal: code 32 at registration.
        refused = self._mock.state.behaviour.refuse_external_ids
        self._mock.set_behaviour(refuse_external_ids=[*refused, receipt.external_id])

    async def unreachable(self) -> None:
        await self._mock.go_offline()  # the listening socket really closes

    async def lose_answers(self) -> None:
        self._mock.set_behaviour(drop_ratio=1.0)  # registered, then the connection is reset

    async def answer_late(self) -> None:
        # Registered at once, answered long after the adapter's timeout (getToken is answered in time).
        self._mock.set_behaviour(answer_delay_s=ADAPTER_TIMEOUT_S * 10)

    async def recover(self) -> None:
        await self._mock.go_online()
        self._mock.set_behaviour(drop_ratio=0.0, answer_delay_s=0.0, offline=False)


@asynccontextmanager
async def atol_pair() -> AsyncIterator[ContractPair]:
    mock = await start_mock_atol("127.0.0.1", 0, password="s3cret-contract-password")
    with tempfile.TemporaryDirectory() as directory:
        password_file = f"{directory}/atol_password"
        with open(password_file, "w") as handle:
            handle.write("s3cret-contract-password\n")
        adapter = make_adapter(
            "atol-online-v5",
            {
                "atol_url": mock.url,
                "atol_login": DEFAULT_LOGIN,
                "atol_group_code": DEFAULT_GROUP,
                "atol_password_file": password_file,
                "company_inn": DEFAULT_INN,
                "company_email": "shop@example.ru",
                "company_payment_address": "https://shop.example.ru",
                "atol_timeout": ADAPTER_TIMEOUT_S,
            },
        )
        try:
            await adapter.start()
            yield ContractPair(adapter, AtolMock(mock), ("s3cret-contract-password",))
        finally:
            await adapter.close()
            await mock.close()


# ---- atol-driver × kktd_mocks.atol_driver ----


class RegisterMock:
    def __init__(self, mock: Any) -> None:
        self._mock = mock

    def documents(self) -> int:
        return sum(1 for d in self._mock.documents() if d["type"] in ("sell", "sellReturn", "buy", "buyReturn"))

    async def refuse(self, receipt: Outgoing) -> None:
        # The register refuses the task's content (error 501 by default).
        refused = self._mock.state.behaviour.refuse_uuids
        self._mock.set_behaviour(refuse_uuids=[*refused, task_uuid(receipt.receipt_id, receipt.external_id)])

    async def unreachable(self) -> None:
        await self._mock.go_offline()  # the web server's socket really closes

    async def lose_answers(self) -> None:
        self._mock.set_behaviour(lose_receipt_answers=1000)  # queued (it will print), then the connection reset

    async def answer_late(self) -> None:
        self._mock.set_behaviour(receipt_answer_delay_s=ADAPTER_TIMEOUT_S * 10)

    async def recover(self) -> None:
        await self._mock.go_online()
        self._mock.set_behaviour(lose_receipt_answers=0, receipt_answer_delay_s=0.0)


@asynccontextmanager
async def register_pair() -> AsyncIterator[ContractPair]:
    secret = "s3cret-contract-password"
    mock = await start_mock_register("127.0.0.1", 0, login="kktd", password=secret)
    with tempfile.TemporaryDirectory() as directory:
        password_file = f"{directory}/atol_driver_password"
        with open(password_file, "w") as handle:
            handle.write(secret + "\n")
        adapter = make_adapter(
            "atol-driver",
            {
                "atol_driver_url": mock.url,
                "atol_driver_login": "kktd",
                "atol_driver_password_file": password_file,
                "atol_driver_timeout": ADAPTER_TIMEOUT_S,
                "cashier_name": "Иванова",
            },
        )
        try:
            await adapter.start()
            yield ContractPair(adapter, RegisterMock(mock), (secret,))
        finally:
            await adapter.close()
            await mock.close()


# One entry per adapter × its mock.
PAIRS: dict[str, PairFactory] = {
    "kktd-ofd": kktd_ofd_pair,
    "atol-online-v5": atol_pair,
    "atol-driver": register_pair,
}


def test_every_registered_upstream_has_a_contract_pair() -> None:
    assert set(PAIRS) == set(REGISTRY)


@pytest.fixture(params=sorted(PAIRS))
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[ContractPair]:
    async with PAIRS[request.param]() as started:
        yield started


# ---- helpers ----


def outgoing(key: str, pos_id: str = "POS-001", external_id: str | None = None) -> Outgoing:
    receipt = validate_receipt(sample_receipt(key, pos_id=pos_id))
    receipt_id = key.encode().hex().ljust(32, "0")[:32]
    return Outgoing(
        receipt_id,
        receipt.idempotency_key,
        external_id or receipt.idempotency_key,
        1_796_000_000_000,
        receipt.canonical_json,
    )


async def settle(adapter: Upstream, receipt: Outgoing, first: SubmitOutcome) -> Fiscalized | Refused:
    """The final outcome of a submission: at once (one-phase), or by polling its reference (two-phase)."""
    if not isinstance(first, Registered):
        assert isinstance(first, (Fiscalized, Refused)), first
        return first
    assert adapter.two_phase, f"a one-phase upstream answered {first}"
    awaiting = AwaitingResult(receipt.receipt_id, receipt.external_id, first.reference)
    final: list[Fiscalized | Refused] = []

    async def polled() -> bool:
        [outcome] = await adapter.poll([awaiting])
        assert outcome.receipt_id == receipt.receipt_id
        if isinstance(outcome, StillProcessing):
            return False
        assert isinstance(outcome, (Fiscalized, Refused)), outcome
        final.append(outcome)
        return True

    await async_wait_until(polled, SETTLE_TIMEOUT_S, f"a result for {receipt.receipt_id}", interval=0.05)
    return final[0]


async def submit_one(adapter: Upstream, receipt: Outgoing) -> Fiscalized | Refused:
    [first] = await adapter.submit([receipt])
    assert first.receipt_id == receipt.receipt_id
    return await settle(adapter, receipt, first)


def assert_no_secrets(exc: BaseException, secrets: Sequence[str]) -> None:
    shown = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)
    for secret in secrets:
        assert secret not in shown, f"an exception shows a credential: {shown}"


async def failure_of(pair: ContractPair, receipt: Outgoing) -> UpstreamUnavailable:
    with pytest.raises(UpstreamUnavailable) as caught:
        await pair.adapter.submit([receipt])
    assert_no_secrets(caught.value, pair.secrets)
    return caught.value


# ---- the contract ----


async def test_one_outcome_per_receipt_in_order(pair: ContractPair) -> None:
    batch = [outgoing("c-order-1"), outgoing("c-order-2", pos_id="POS-REFUSED"), outgoing("c-order-3")]
    await pair.mock.refuse(batch[1])
    outcomes = await pair.adapter.submit(batch)
    assert [o.receipt_id for o in outcomes] == [r.receipt_id for r in batch]
    final = [await settle(pair.adapter, r, o) for r, o in zip(batch, outcomes)]
    assert [type(o) for o in final] == [Fiscalized, Refused, Fiscalized]


async def test_a_fresh_receipt_is_fiscalized(pair: ContractPair) -> None:
    receipt = outgoing("c-fresh")
    outcome = await submit_one(pair.adapter, receipt)
    assert isinstance(outcome, Fiscalized), outcome
    assert outcome.fiscal.fiscal_document_number > 0 and outcome.fiscal.fiscal_sign
    assert outcome.fiscal.registered_at
    assert pair.mock.documents() == 1


async def test_resubmitting_an_external_id_creates_no_second_document(pair: ContractPair) -> None:
    receipt = outgoing("c-again")
    first = await submit_one(pair.adapter, receipt)
    again = await submit_one(pair.adapter, receipt)
    assert isinstance(first, Fiscalized) and isinstance(again, Fiscalized)
    assert again.fiscal == first.fiscal
    assert pair.mock.documents() == 1


async def test_a_lost_answer_is_maybe_sent_and_the_resubmission_settles_it_once(pair: ContractPair) -> None:
    receipt = outgoing("c-lost")
    await pair.mock.lose_answers()
    error = await failure_of(pair, receipt)
    assert error.kind is FailureKind.MAYBE_SENT, error
    await pair.mock.recover()
    outcome = await submit_one(pair.adapter, receipt)
    assert isinstance(outcome, Fiscalized), outcome
    assert pair.mock.documents() == 1


async def test_a_refused_receipt_is_refused_with_a_code(pair: ContractPair) -> None:
    receipt = outgoing("c-refused", pos_id="POS-REFUSED")
    await pair.mock.refuse(receipt)
    outcome = await submit_one(pair.adapter, receipt)
    assert isinstance(outcome, Refused), outcome
    assert outcome.code and outcome.receipt_id == receipt.receipt_id


async def test_an_unreachable_upstream_is_not_sent(pair: ContractPair) -> None:
    await pair.mock.unreachable()
    error = await failure_of(pair, outgoing("c-unreachable"))
    assert error.kind is FailureKind.NOT_SENT, error
    assert error.reason
    await pair.mock.recover()
    assert isinstance(await submit_one(pair.adapter, outgoing("c-unreachable")), Fiscalized)


async def test_a_timeout_is_maybe_sent(pair: ContractPair) -> None:
    await pair.mock.answer_late()
    error = await failure_of(pair, outgoing("c-late"))
    assert error.kind is FailureKind.MAYBE_SENT, error
    assert error.reason == "timeout"
