"""The ATOL Online v5 adapter against the mock, in process: every outcome, every failure kind, no secret leaked.

Plus the adapter's settings (atol_settings): each bad value is a ConfigError naming its key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kktd import seller
from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    Fiscalized,
    NotRegistered,
    Outgoing,
    Refused,
    Registered,
    StillProcessing,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.errors import ConfigError
from kktd.receipt import sample_receipt, validate_receipt
from kktd.seller import inn_is_valid, parse_seller
from kktd.upstreams import atol_v5
from kktd.upstreams.atol_v5 import (
    NAME,
    OPTIONS,
    AtolOnlineV5,
    AtolSettings,
)
from kktd.upstreams.atol_v5_mapping import Company
from kktd_mocks.atol import DEFAULT_GROUP, DEFAULT_INN, DEFAULT_LOGIN, DEFAULT_PASSWORD, MockAtol
from tests.conftest import MockAtols
from tests.support import free_port

MSK = timezone(timedelta(hours=3))
PASSWORD = DEFAULT_PASSWORD


def settings_for(url: str, **changes: Any) -> AtolSettings:
    company = Company(changes.pop("company_inn", DEFAULT_INN), "shop@example.ru", "https://shop.example.ru")
    values: dict[str, Any] = dict(
        url=url,
        login=DEFAULT_LOGIN,
        password=PASSWORD,
        group_code=DEFAULT_GROUP,
        company=company,
        concurrency=4,
        timeout=5.0,
    )
    values.update(changes)
    return AtolSettings(**values)


@pytest.fixture
async def atol(mock_atols: MockAtols) -> MockAtol:
    return await mock_atols(seed=11)  # its tokens are checked against every log record


@pytest.fixture
async def upstream(atol: MockAtol) -> AsyncIterator[AtolOnlineV5]:
    async with AtolOnlineV5(settings_for(atol.url), tz=MSK) as adapter:
        yield adapter


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture, mock_atols: MockAtols) -> Iterator[None]:
    """Every test: whatever was logged (any logger, any level) holds neither the password nor a token."""
    caplog.set_level(logging.DEBUG)
    yield
    tokens = issued_tokens(mock_atols)
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text or "")
        assert PASSWORD not in text, record
        for token in tokens:
            assert token not in text, record


def issued_tokens(mocks: MockAtols) -> set[str]:
    return mocks.tokens() | {"garbage-token"}


def outgoing(key: str, *, external_id: str | None = None, **changes: Any) -> Outgoing:
    body = sample_receipt(key)
    body["customer_contact"] = "buyer@example.ru"
    body.update(changes)
    receipt = validate_receipt(body)
    return Outgoing(f"r-{key}", key, external_id or key, 1_764_579_600_000, receipt.canonical_json)


def assert_no_secret(atol: MockAtol, *things: Any) -> None:
    for thing in things:
        text = repr(thing) + str(thing)
        if isinstance(thing, BaseException):
            text += repr(thing.args) + str(getattr(thing, "detail", "")) + str(getattr(thing, "operator_action", ""))
        assert PASSWORD not in text
        for token in {*atol.state.tokens, "garbage-token"}:
            assert token not in text


async def registered(upstream: AtolOnlineV5, *items: Outgoing) -> list[Registered]:
    outcomes = await upstream.submit(items)
    assert all(isinstance(o, Registered) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def awaiting(item: Outgoing, reg: Registered) -> AwaitingResult:
    return AwaitingResult(item.receipt_id, item.external_id, reg.reference)


# ---- the happy path and tokens ----


async def test_submit_then_poll_fiscalizes_with_all_the_fiscal_data(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    item = outgoing("k1")
    [reg] = await registered(upstream, item)
    document = atol.state.by_external_id["k1"]
    assert reg == Registered("r-k1", document.uuid)
    assert document.timestamp == "01.12.2025 12:00:00"  # accepted_ms in the terminal's time zone
    [result] = await upstream.poll([awaiting(item, reg)])
    assert isinstance(result, Fiscalized) and result.receipt_id == "r-k1"
    payload = document.payload
    assert payload is not None
    fiscal = result.fiscal
    assert fiscal.fiscal_document_number == payload["fiscal_document_number"]
    assert fiscal.fiscal_sign == str(payload["fiscal_document_attribute"])
    assert fiscal.registered_at == payload["receipt_datetime"]
    assert fiscal.fn_number == payload["fn_number"]
    assert fiscal.shift_number == payload["shift_number"]
    assert fiscal.receipt_number == payload["fiscal_receipt_number"]
    assert fiscal.kkt_registration_number == payload["ecr_registration_number"]
    assert fiscal.ofd_receipt_url == payload["ofd_receipt_url"]
    assert upstream.two_phase and upstream.name == NAME == "atol-online-v5"


async def test_each_operation_goes_to_its_method(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    operations = {"sale": "sell", "sale_refund": "sell_refund", "purchase": "buy", "purchase_refund": "buy_refund"}
    await registered(upstream, *(outgoing(f"op-{op}", operation=op) for op in operations))
    assert {atol.state.by_external_id[f"op-{op}"].operation for op in operations} == set(operations.values())


async def test_the_token_is_obtained_once_and_reused(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    for n in range(3):
        await registered(upstream, outgoing(f"t{n}"), outgoing(f"t{n}b"))
    assert atol.stats()["token_requests"] == 1 and upstream.tokens_obtained == 1


async def test_an_expired_token_is_replaced_once_and_the_call_retried(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    await registered(upstream, outgoing("before"))
    atol.state.expire_tokens()
    items = [outgoing(f"after{n}") for n in range(12)]
    regs = await registered(upstream, *items)
    assert len({r.reference for r in regs}) == 12
    stats = atol.stats()
    # Up to `concurrency` requests saw the old token refused; one getToken served them all.
    assert stats["token_requests"] == 2 and stats["tokens_issued"] == 2
    assert 1 <= stats["unauthorized"] <= 4
    assert stats["registered"] == 13


async def test_a_token_expiring_between_submit_and_poll(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    item = outgoing("mid")
    [reg] = await registered(upstream, item)
    atol.state.expire_tokens()
    [result] = await upstream.poll([awaiting(item, reg)])
    assert isinstance(result, Fiscalized)
    assert upstream.tokens_obtained == 2


async def test_the_derived_external_id_is_what_atol_deduplicates_on(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    item = outgoing("key-7", external_id="key-7.r1")
    [reg] = await registered(upstream, item)
    assert atol.state.by_external_id["key-7.r1"].uuid == reg.reference
    assert "key-7" not in atol.state.by_external_id


# ---- exactly once ----


async def test_a_lost_registration_answer_is_retried_and_adopts_the_uuid_from_33(
    atol: MockAtol, upstream: AtolOnlineV5
) -> None:
    await upstream.submit([outgoing("warm")])  # a token first: getToken itself is never dropped
    atol.set_behaviour(drop_ratio=1.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.submit([outgoing("lost")])
    assert caught.value.kind is FailureKind.MAYBE_SENT and caught.value.reason == "connection_lost"
    assert_no_secret(atol, caught.value)
    atol.set_behaviour(drop_ratio=0.0)
    [reg] = await registered(upstream, outgoing("lost"))
    assert reg.reference == atol.state.by_external_id["lost"].uuid
    assert atol.stats()["registered"] == 2 and atol.stats()["duplicates"] == 1
    assert atol.state.by_external_id["lost"].registration_requests == 2


async def test_some_answers_lost_in_a_batch_are_undelivered_the_others_registered(
    atol: MockAtol, upstream: AtolOnlineV5
) -> None:
    await upstream.submit([outgoing("warm")])
    atol.set_behaviour(drop_ratio=0.5, seed=4)
    items = [outgoing(f"b{n}") for n in range(20)]
    outcomes = await upstream.submit(items)
    kinds = {type(o) for o in outcomes}
    assert kinds == {Registered, Undelivered}, outcomes
    for item, outcome in zip(items, outcomes, strict=True):
        assert outcome.receipt_id == item.receipt_id
        if isinstance(outcome, Undelivered):
            assert outcome.error.kind is FailureKind.MAYBE_SENT
    atol.set_behaviour(drop_ratio=0.0)
    again = await registered(upstream, *items)
    assert [r.reference for r in again] == [atol.state.by_external_id[i.external_id].uuid for i in items]
    assert atol.stats()["registered"] == 21


async def test_wait_for_several_polls_then_done(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    atol.set_behaviour(wait_polls=3)
    item = outgoing("w")
    [reg] = await registered(upstream, item)
    for _ in range(3):
        assert await upstream.poll([awaiting(item, reg)]) == [StillProcessing("r-w")]
    [result] = await upstream.poll([awaiting(item, reg)])
    assert isinstance(result, Fiscalized)


async def test_fail_minus_one_is_not_registered(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    atol.set_behaviour(fail_ratio=1.0)
    item = outgoing("f")
    [reg] = await registered(upstream, item)
    [result] = await upstream.poll([awaiting(item, reg)])
    assert isinstance(result, NotRegistered) and result.code == "atol_-1" and result.message


async def test_an_inn_mismatch_at_the_kkt_is_refused_with_atols_code(atol: MockAtol) -> None:
    async with AtolOnlineV5(settings_for(atol.url, company_inn="7707083893")) as upstream:
        item = outgoing("inn")
        [reg] = await registered(upstream, item)
        [result] = await upstream.poll([awaiting(item, reg)])
    assert isinstance(result, Refused) and result.code == "atol_2009"


async def test_a_body_atol_refuses_is_refused_with_code_32_and_its_text(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    # Beyond ATOL's item limit: intake would refuse it now, but a receipt stored earlier may be like this.
    item = outgoing(
        "big",
        items=[
            {
                "name": "Станок",
                "price": 5_000_000_000,
                "quantity": "1",
                "vat": "vat20",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            }
        ],
        payments=[{"type": "electronic", "amount": 5_000_000_000}],
    )
    [result] = await upstream.submit([item])
    assert isinstance(result, Refused) and result.code == "atol_32" and "price" in result.message
    assert atol.stats()["registered"] == 0


async def test_a_poll_of_an_unknown_uuid_is_refused(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    await upstream.submit([outgoing("warm")])
    [result] = await upstream.poll([AwaitingResult("r-x", "x", "no-such-uuid")])
    assert isinstance(result, Refused) and result.code == "atol_30"


# ---- failures: kinds ----


async def test_5xx_is_maybe_sent_and_nothing_is_registered(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    item = outgoing("e")
    [reg] = await registered(upstream, item)
    atol.set_behaviour(error5xx_ratio=1.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.submit([outgoing("e2"), outgoing("e3")])
    assert (caught.value.kind, caught.value.reason) == (FailureKind.MAYBE_SENT, "http_500")
    with pytest.raises(UpstreamUnavailable) as polled:
        await upstream.poll([awaiting(item, reg)])
    assert polled.value.reason == "http_500"
    assert atol.stats()["registered"] == 1


async def test_get_token_failing_with_5xx_is_not_sent(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    atol.set_behaviour(error5xx_ratio=1.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.submit([outgoing("x")])
    assert (caught.value.kind, caught.value.reason) == (FailureKind.NOT_SENT, "http_500")


async def test_a_slow_registration_is_a_maybe_sent_timeout(atol: MockAtol) -> None:
    async with AtolOnlineV5(settings_for(atol.url, timeout=0.3)) as upstream:
        await upstream.submit([outgoing("warm")])
        atol.set_behaviour(delay_s=1.0)
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.submit([outgoing("slow")])
        assert (caught.value.kind, caught.value.reason) == (FailureKind.MAYBE_SENT, "timeout")
        assert_no_secret(atol, caught.value)


async def test_a_slow_get_token_is_not_sent(atol: MockAtol) -> None:
    atol.set_behaviour(delay_s=1.0)
    async with AtolOnlineV5(settings_for(atol.url, timeout=0.3)) as upstream:
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.submit([outgoing("slow")])
    assert (caught.value.kind, caught.value.reason) == (FailureKind.NOT_SENT, "timeout")


async def test_slow_but_within_the_timeout_works(atol: MockAtol) -> None:
    atol.set_behaviour(delay_s=0.2)
    async with AtolOnlineV5(settings_for(atol.url, timeout=5.0)) as upstream:
        await registered(upstream, outgoing("s1"), outgoing("s2"))


async def test_nothing_listening_is_not_sent() -> None:
    async with AtolOnlineV5(settings_for(f"http://127.0.0.1:{free_port()}/possystem/v5")) as upstream:
        with pytest.raises(UpstreamUnavailable) as caught:
            await upstream.submit([outgoing("x")])
    assert (caught.value.kind, caught.value.reason) == (FailureKind.NOT_SENT, "connect_error")


async def test_offline_after_the_token_is_maybe_sent(atol: MockAtol, upstream: AtolOnlineV5) -> None:
    await upstream.submit([outgoing("warm")])
    atol.set_behaviour(offline=True)
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.submit([outgoing("x")])
    assert caught.value.kind is FailureKind.MAYBE_SENT
    assert atol.stats()["registered"] == 1


async def test_at_most_concurrency_requests_in_flight_for_submit_and_poll_together(atol: MockAtol) -> None:
    import asyncio

    async with AtolOnlineV5(settings_for(atol.url, concurrency=3)) as upstream:
        first = [outgoing(f"p{n}") for n in range(10)]
        regs = await registered(upstream, *first)
        atol.set_behaviour(delay_s=0.05)
        await asyncio.gather(
            upstream.submit([outgoing(f"q{n}") for n in range(10)]),
            upstream.poll([awaiting(i, r) for i, r in zip(first, regs)]),
        )
    assert atol.stats()["max_in_flight"] == 3


# ---- authentication problems: receipts wait, a person is told what to fix ----


@pytest.mark.parametrize(
    ("behaviour", "changes", "reason", "hint"),
    [
        ({}, {"password": "wrong-password"}, "auth_failed", "atol_login"),
        ({}, {"login": "nobody"}, "auth_failed", "password"),
        ({"blocked": True}, {}, "user_blocked", "support"),
        ({"group_v4": True}, {}, "group_not_v5", "FFD 1.2"),
        ({}, {"group_code": "another-group"}, "group_mismatch", "atol_group_code"),
    ],
)
async def test_auth_failures_are_not_sent_with_an_operator_action(
    atol: MockAtol,
    caplog: pytest.LogCaptureFixture,
    behaviour: dict[str, Any],
    changes: dict[str, Any],
    reason: str,
    hint: str,
) -> None:
    atol.set_behaviour(**behaviour)
    async with AtolOnlineV5(settings_for(atol.url, **changes)) as upstream:
        for _ in range(2):  # the same answer each time; the log says it once
            with pytest.raises(UpstreamUnavailable) as caught:
                await upstream.submit([outgoing("a1"), outgoing("a2"), outgoing("a3")])
            error = caught.value
            assert (error.kind, error.reason) == (FailureKind.NOT_SENT, reason)
            assert error.operator_action and hint in error.operator_action
            assert_no_secret(atol, error)
    assert atol.stats()["registered"] == 0
    told = [r for r in caplog.records if r.levelno >= logging.ERROR and reason in r.getMessage()]
    assert len(told) == 1 and hint in told[0].getMessage()
    if reason != "group_mismatch":
        assert atol.stats()["token_requests"] == 2  # once per call, not once per receipt
    else:
        assert atol.stats()["registration_requests"] <= 6


async def test_a_wrong_password_mid_drain_makes_the_unanswered_undelivered(
    atol: MockAtol, upstream: AtolOnlineV5
) -> None:
    await registered(upstream, outgoing("ok"))
    atol.state.password = "changed-by-the-operator"
    atol.state.expire_tokens()
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.submit([outgoing(f"m{n}") for n in range(6)])
    assert caught.value.reason == "auth_failed" and caught.value.operator_action
    assert atol.stats()["token_requests"] == 2  # one refresh attempt for the whole call


# ---- strict answer parsing ----


def _garbage_app(register: web.Response | None = None, report: web.Response | None = None) -> web.Application:
    async def get_token(request: web.Request) -> web.Response:
        return web.json_response({"error": None, "token": "garbage-token", "timestamp": "01.12.2026 10:00:00"})

    async def on_register(request: web.Request) -> web.Response:
        assert register is not None
        return register

    async def on_report(request: web.Request) -> web.Response:
        assert report is not None
        return report

    app = web.Application()
    app.router.add_post("/possystem/v5/getToken", get_token)
    app.router.add_get("/possystem/v5/{group}/report/{uuid}", on_report)
    app.router.add_post("/possystem/v5/{group}/{operation}", on_register)
    return app


def _json(status: int, body: Any) -> web.Response:
    return web.json_response(body, status=status)


DONE_PAYLOAD = {
    "fiscal_receipt_number": 1,
    "shift_number": 1,
    "receipt_datetime": "01.12.2026 10:00:00",
    "total": 244.3,
    "fn_number": "9999078900012345",
    "ecr_registration_number": "0000000001012345",
    "fiscal_document_number": 5,
    "fiscal_document_attribute": 123,
    "fns_site": "www.nalog.gov.ru",
}


@pytest.mark.parametrize(
    ("what", "answer"),
    [
        ("html 200", web.Response(text="<html>ok</html>", content_type="text/html")),
        ("not json", web.Response(text="{", content_type="application/json")),
        ("a list", _json(200, [])),
        ("no uuid", _json(200, {"status": "wait", "error": None, "timestamp": "x"})),
        ("uuid not a string", _json(200, {"uuid": 5, "status": "wait", "error": None})),
        ("status done unknown", _json(200, {"uuid": "u", "status": "queued", "error": None})),
        ("error not an object", _json(400, {"error": "bad", "status": "fail"})),
        ("error code a string", _json(400, {"error": {"code": "33", "text": "x", "error_id": "e"}, "uuid": "u"})),
        ("error code a boolean", _json(400, {"error": {"code": True, "text": "x", "error_id": "e"}})),
        ("33 without uuid", _json(400, {"error": {"code": 33, "text": "dup", "error_id": "e"}})),
        ("an unknown code", _json(400, {"error": {"code": 999, "text": "?", "error_id": "e"}})),
        ("code 34 at registration", _json(200, {"error": {"code": 34, "text": "?", "error_id": "e"}})),
        ("a redirect", web.Response(status=302, headers={"Location": "http://127.0.0.1:1/"})),
        ("404 html", web.Response(status=404, text="not found", content_type="text/html")),
    ],
)
async def test_off_protocol_registration_answers_are_bad_answers(what: str, answer: web.Response) -> None:
    async with _serve(_garbage_app(register=answer)) as url:
        async with AtolOnlineV5(settings_for(url)) as upstream:
            with pytest.raises(UpstreamUnavailable) as caught:
                await upstream.submit([outgoing("g")])
    assert caught.value.kind is FailureKind.BAD_ANSWER, what
    assert "garbage-token" not in str(caught.value)


@pytest.mark.parametrize(
    ("what", "answer"),
    [
        ("done without payload", _json(200, {"uuid": "u-1", "status": "done", "error": None, "payload": None})),
        (
            "done, document number 0",
            _json(
                200,
                {
                    "uuid": "u-1",
                    "status": "done",
                    "error": None,
                    "payload": {**DONE_PAYLOAD, "fiscal_document_number": 0},
                },
            ),
        ),
        (
            "done, sign a string",
            _json(
                200,
                {
                    "uuid": "u-1",
                    "status": "done",
                    "error": None,
                    "payload": {**DONE_PAYLOAD, "fiscal_document_attribute": "123"},
                },
            ),
        ),
        (
            "done, no fn_number",
            _json(
                200,
                {
                    "uuid": "u-1",
                    "status": "done",
                    "error": None,
                    "payload": {k: v for k, v in DONE_PAYLOAD.items() if k != "fn_number"},
                },
            ),
        ),
        (
            "done for another uuid",
            _json(200, {"uuid": "u-2", "status": "done", "error": None, "payload": DONE_PAYLOAD}),
        ),
        (
            "done for another external_id",
            _json(
                200, {"uuid": "u-1", "external_id": "other", "status": "done", "error": None, "payload": DONE_PAYLOAD}
            ),
        ),
        (
            "done with an error",
            _json(
                200,
                {
                    "uuid": "u-1",
                    "status": "done",
                    "payload": DONE_PAYLOAD,
                    "error": {"code": 1, "text": "?", "error_id": "e"},
                },
            ),
        ),
        ("fail without error", _json(200, {"uuid": "u-1", "status": "fail", "error": None})),
        (
            "wait with another code",
            _json(200, {"uuid": "u-1", "status": "wait", "error": {"code": 999, "text": "?", "error_id": "e"}}),
        ),
        ("no status", _json(200, {"uuid": "u-1", "error": None})),
    ],
)
async def test_off_protocol_reports_are_bad_answers_never_fiscalized(what: str, answer: web.Response) -> None:
    async with _serve(_garbage_app(report=answer)) as url:
        async with AtolOnlineV5(settings_for(url)) as upstream:
            with pytest.raises(UpstreamUnavailable) as caught:
                await upstream.poll([AwaitingResult("r-1", "ext-1", "u-1")])
    assert caught.value.kind is FailureKind.BAD_ANSWER, what


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": -1, "text": "queue timeout", "type": "timeout"}, NotRegistered),
        ({"code": 1, "text": "queue timeout", "type": "timeout"}, NotRegistered),
        ({"code": 36, "text": "date before the last document", "type": "driver"}, NotRegistered),
        ({"code": 16, "text": "wrong price", "type": "driver"}, Refused),
        ({"code": 177, "text": "closing interrupted", "type": "driver"}, Refused),
        ({"code": 2007, "text": "wrong value", "type": "agent"}, Refused),
    ],
)
async def test_which_failures_mean_not_registered(error: dict[str, Any], expected: type) -> None:
    answer = _json(200, {"uuid": "u-1", "status": "fail", "error": {**error, "error_id": "e"}, "payload": None})
    async with _serve(_garbage_app(report=answer)) as url:
        async with AtolOnlineV5(settings_for(url)) as upstream:
            [result] = await upstream.poll([AwaitingResult("r-1", "ext-1", "u-1")])
    assert isinstance(result, expected)
    assert result.code == f"atol_{error['code']}" and result.message == error["text"]  # type: ignore[union-attr]


async def test_a_too_large_answer_is_bad() -> None:
    answer = web.Response(body=b'{"x":"' + b"a" * (300 << 10) + b'"}', content_type="application/json")
    async with _serve(_garbage_app(register=answer)) as url:
        async with AtolOnlineV5(settings_for(url)) as upstream:
            with pytest.raises(UpstreamUnavailable) as caught:
                await upstream.submit([outgoing("g")])
    assert caught.value.kind is FailureKind.BAD_ANSWER


class _serve:
    """An aiohttp app on a free port for the duration of an ``async with``; yields its base URL."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)

    async def __aenter__(self) -> str:
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/possystem/v5"

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()


async def test_batch_limits() -> None:
    async with AtolOnlineV5(settings_for("http://127.0.0.1:1/possystem/v5")) as upstream:
        with pytest.raises(ValueError):
            await upstream.submit([])
        with pytest.raises(ValueError):
            await upstream.poll([AwaitingResult(f"r{n}", "e", "u") for n in range(upstream.max_batch + 1)])


# ---- settings ----


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "atol_password"
    path.write_text(PASSWORD + "\n")
    return path


def raw_settings(password_file: Path, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "atol_url": "https://online.atol.ru/possystem/v5/",
        "atol_login": "shop-login",
        "atol_group_code": "group_5179",
        "atol_password_file": str(password_file),
        "company_inn": "5544332219",
        "company_email": "shop@example.ru",
        "company_payment_address": "https://shop.example.ru",
        "upstream_concurrency": "8",
        "atol_timeout": "2.5s",
    }
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def atol_settings(values: dict[str, Any], environ: dict[str, str]) -> AtolSettings:
    """The upstream's settings as kktd.config builds them: kktd's seller settings parsed first."""
    return atol_v5.atol_settings(values, parse_seller(values), environ=environ)


def test_settings_are_parsed(password_file: Path) -> None:
    settings = atol_settings(raw_settings(password_file), environ={})
    assert settings == AtolSettings(
        "https://online.atol.ru/possystem/v5",
        "shop-login",
        PASSWORD,
        "group_5179",
        Company("5544332219", "shop@example.ru", "https://shop.example.ru"),
        8,
        2.5,
        password_file,
    )
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.describe())
    assert "***" in repr(settings)


def test_defaults(password_file: Path) -> None:
    settings = atol_settings(
        raw_settings(password_file, atol_url=None, upstream_concurrency=None, atol_timeout=None), environ={}
    )
    assert (settings.url, settings.concurrency, settings.timeout) == ("https://online.atol.ru/possystem/v5", 4, 10.0)


def test_the_password_comes_from_systemd_credentials_when_no_file_is_set(tmp_path: Path) -> None:
    (tmp_path / "atol_password").write_text("from-credentials")
    settings = atol_settings(
        raw_settings(tmp_path / "unused", atol_password_file=None), environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert settings.password == "from-credentials"


def test_no_password_at_all_names_the_key(password_file: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        atol_settings(raw_settings(password_file, atol_password_file=None), environ={})
    assert str(caught.value).startswith("atol_password_file:")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("atol_url", "ftp://online.atol.ru/"),
        ("atol_url", "online.atol.ru"),
        ("atol_url", "https://user:secret@online.atol.ru/possystem/v5"),
        ("atol_url", "https://online.atol.ru/possystem/v5?x=1"),
        ("atol_login", "two words"),
        ("atol_login", ""),
        ("atol_group_code", "group/../x"),
        ("company_inn", "5544332218"),  # a check digit off
        ("company_inn", "554433221"),
        ("company_inn", "500100732258"),
        ("company_inn", "55443322１9"),
        ("company_email", "shop.example.ru"),
        ("company_email", "a" * 60 + "@example.ru"),
        ("company_payment_address", " "),
        ("company_payment_address", "x" * 257),
        ("upstream_concurrency", "0"),
        ("upstream_concurrency", "many"),
        ("atol_timeout", "forever"),
        ("atol_timeout", "0"),
    ],
)
def test_each_bad_value_is_a_config_error_naming_its_key(password_file: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        atol_settings(raw_settings(password_file, **{key: value}), environ={})
    assert str(caught.value).startswith(f"{key} ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "key", ["atol_login", "atol_group_code", "company_inn", "company_email", "company_payment_address"]
)
def test_required_settings(password_file: Path, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        atol_settings(raw_settings(password_file, **{key: None}), environ={})
    assert str(caught.value) == f"{key}: required when upstream = atol-online-v5"


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe", b"two\nlines\n", b"x" * 101])
def test_an_unusable_password_file_is_refused_without_quoting_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        atol_settings(raw_settings(path), environ={})
    message = str(caught.value)
    assert message.startswith("atol_password_file")
    if content.strip():
        assert "lines" not in message and "x" * 20 not in message


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_an_unreadable_password_file_names_the_key(tmp_path: Path, make: str) -> None:
    path = tmp_path / "pw"
    if make == "directory":
        path.mkdir()
    with pytest.raises(ConfigError) as caught:
        atol_settings(raw_settings(path), environ={})
    assert str(caught.value).startswith("atol_password_file")


def test_a_password_file_readable_only_by_others(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root reads any file; the refusal of an unreadable one is the same code path as a missing one above.
        path = tmp_path / "pw"
        path.write_text("ok")
        path.chmod(0)
        assert atol_settings(raw_settings(path), environ={}).password == "ok"
        return
    path = tmp_path / "pw"
    path.write_text("secret")
    path.chmod(0)
    with pytest.raises(ConfigError):
        atol_settings(raw_settings(path), environ={})


@pytest.mark.parametrize(
    ("inn", "valid"),
    [
        ("5544332219", True),
        ("7707083893", True),
        ("500100732259", True),
        ("7830002293", True),
        ("5544332210", False),
        ("500100732250", False),
        ("500100732209", False),
        ("0000000000", True),
        ("12345", False),
        ("abcdefghij", False),
    ],
)
def test_inn_check_digits(inn: str, valid: bool) -> None:
    assert inn_is_valid(inn) is valid


def test_every_option_spec_parses_its_default_or_has_none(password_file: Path) -> None:
    for spec in OPTIONS + seller.OPTIONS:
        assert spec.key and spec.help
        if spec.default is not None:
            assert spec.parse(spec.default) == spec.default
    keys = [spec.key for spec in OPTIONS + seller.OPTIONS]
    assert len(keys) == len(set(keys))
