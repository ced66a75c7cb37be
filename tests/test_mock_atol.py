"""The ATOL Online v5 mock against the specification: every mode, strict validation, tokens, idempotency, stats.

These tests speak raw HTTP to the mock (no kktd code in the way): the mock is the test double of the adapter
and of kktd end to end, so it must behave as the specification says on its own.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kktd_mocks.atol import DEFAULT_GROUP, DEFAULT_INN, DEFAULT_LOGIN, DEFAULT_PASSWORD, MockAtol
from tests.conftest import MockAtols
from tests.support import REPO, Child, FakeTime, free_port

JSON = {"Content-Type": "application/json; charset=utf-8"}


@pytest.fixture
async def clock() -> FakeTime:
    return FakeTime()


@pytest.fixture
async def atol(clock: FakeTime, mock_atols: MockAtols) -> MockAtol:
    return await mock_atols(clock=clock, seed=7)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sell_body(external_id: str = "ext-1", **receipt_changes: Any) -> dict[str, Any]:
    receipt: dict[str, Any] = {
        "client": {"email": "buyer@example.ru"},
        "company": {"email": "shop@example.ru", "sno": "osn", "inn": DEFAULT_INN, "payment_address": "shop.ru"},
        "items": [
            {
                "name": "Товар",
                "price": 120.5,
                "quantity": 2,
                "measure": 0,
                "sum": 241,
                "payment_method": "full_payment",
                "payment_object": 1,
                "vat": {"type": "vat20"},
            }
        ],
        "payments": [{"type": 1, "sum": 241}],
        "total": 241,
    }
    receipt.update(receipt_changes)
    return {"timestamp": "01.12.2026 12:05:31", "external_id": external_id, "receipt": receipt}


async def get_token(
    atol: MockAtol, http: aiohttp.ClientSession, login: str = DEFAULT_LOGIN, password: str = DEFAULT_PASSWORD
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{atol.url}/getToken", data=json.dumps({"login": login, "pass": password}), headers=JSON
    ) as response:
        return response.status, await response.json()


async def token(atol: MockAtol, http: aiohttp.ClientSession) -> str:
    status, body = await get_token(atol, http)
    assert status == 200, body
    return str(body["token"])


async def register(
    atol: MockAtol,
    http: aiohttp.ClientSession,
    body: Any,
    tok: str,
    *,
    operation: str = "sell",
    group: str = DEFAULT_GROUP,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
    async with http.post(f"{atol.url}/{group}/{operation}", data=data, headers={**JSON, "Token": tok}) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def report(atol: MockAtol, http: aiohttp.ClientSession, uuid: str, tok: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{atol.url}/{DEFAULT_GROUP}/report/{uuid}", headers={"Token": tok}) as response:
        return response.status, await response.json(loads=lambda t: json.loads(t, parse_float=Decimal))


async def admin(http: aiohttp.ClientSession, atol: MockAtol, path: str, body: Any = None) -> Any:
    method = http.get if body is None else http.post
    kwargs = {} if body is None else {"json": body}
    async with method(f"{atol.admin_url}/{path}", **kwargs) as response:
        return response.status, await response.json()


# ---- tokens ----


async def test_get_token_answers_a_token_and_the_same_one_while_it_lives(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    status, first = await get_token(atol, http)
    assert status == 200 and first["error"] is None and isinstance(first["token"], str)
    assert len(first["timestamp"]) == 19
    _, second = await get_token(atol, http)
    assert second["token"] == first["token"]
    assert atol.stats()["tokens_issued"] == 1 and atol.stats()["token_requests"] == 2


async def test_get_token_by_get_with_query_parameters(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{atol.url}/getToken", params={"login": DEFAULT_LOGIN, "pass": DEFAULT_PASSWORD}) as r:
        assert r.status == 200 and (await r.json())["token"]


@pytest.mark.parametrize(
    ("behaviour", "login", "password", "status", "code"),
    [
        ({}, DEFAULT_LOGIN, "wrong", 401, 12),
        ({}, "someone-else", DEFAULT_PASSWORD, 401, 12),
        ({"blocked": True}, DEFAULT_LOGIN, DEFAULT_PASSWORD, 403, 14),
        ({"group_v4": True}, DEFAULT_LOGIN, DEFAULT_PASSWORD, 401, 21),
    ],
)
async def test_get_token_refusals(
    atol: MockAtol,
    http: aiohttp.ClientSession,
    behaviour: dict[str, Any],
    login: str,
    password: str,
    status: int,
    code: int,
) -> None:
    atol.set_behaviour(**behaviour)
    got_status, body = await get_token(atol, http, login, password)
    assert (got_status, body["error"]["code"]) == (status, code)
    assert "token" not in body and body["error"]["error_id"] and body["error"]["type"] == "system"


async def test_get_token_needs_json(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{atol.url}/getToken", data="login=x", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415 and (await r.json())["error"]["code"] == 41


async def test_a_token_expires_after_its_lifetime(atol: MockAtol, http: aiohttp.ClientSession, clock: FakeTime) -> None:
    atol.set_behaviour(token_lifetime_s=60)
    tok = await token(atol, http)
    assert (await register(atol, http, sell_body("a"), tok))[0] == 200
    clock.now += 61
    status, body = await register(atol, http, sell_body("b"), tok)
    assert (status, body["error"]["code"]) == (401, 11)
    assert atol.state.by_external_id.keys() == {"a"}
    new = await token(atol, http)
    assert new != tok
    assert (await register(atol, http, sell_body("b"), new))[0] == 200


async def test_expire_tokens_through_the_admin_api(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    assert await admin(http, atol, "expire-tokens", {}) == (200, {"expired": 1})
    status, body = await report(atol, http, "00000000-0000-0000-0000-000000000000", tok)
    assert (status, body["error"]["code"]) == (401, 11)


@pytest.mark.parametrize(("headers", "code"), [({}, 10), ({"Token": "forged"}, 10)])
async def test_a_missing_or_unknown_token_is_code_10(
    atol: MockAtol, http: aiohttp.ClientSession, headers: dict[str, str], code: int
) -> None:
    async with http.post(
        f"{atol.url}/{DEFAULT_GROUP}/sell", data=json.dumps(sell_body()), headers={**JSON, **headers}
    ) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (401, code)
    assert atol.stats()["registered"] == 0


async def test_the_token_may_be_a_query_parameter(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    async with http.post(
        f"{atol.url}/{DEFAULT_GROUP}/sell", params={"token": tok}, data=json.dumps(sell_body()), headers=JSON
    ) as response:
        assert response.status == 200


async def test_another_group_is_code_20(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    status, body = await register(atol, http, sell_body(), tok, group="other-group")
    assert (status, body["error"]["code"]) == (401, 20)


# ---- registration ----


async def test_registration_answers_wait_with_a_uuid_and_a_resend_answers_33_with_it(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    tok = await token(atol, http)
    status, first = await register(atol, http, sell_body("ext-1"), tok)
    assert status == 200
    assert first["status"] == "wait" and first["error"] is None and first["uuid"] and first["timestamp"]
    status, again = await register(atol, http, sell_body("ext-1"), tok)
    assert status == 400
    assert again["error"]["code"] == 33 and again["uuid"] == first["uuid"]
    stats = atol.stats()
    assert (stats["registered"], stats["duplicates"], stats["documents"]) == (1, 1, 1)
    _, one = await admin(http, atol, "documents/ext-1")
    assert one["registration_requests"] == 2 and one["uuid"] == first["uuid"]
    assert stats["max_registration_requests_per_external_id"] == 2


@pytest.mark.parametrize("operation", ["sell", "sell_refund", "buy", "buy_refund"])
async def test_every_receipt_operation_registers(atol: MockAtol, http: aiohttp.ClientSession, operation: str) -> None:
    tok = await token(atol, http)
    status, _ = await register(atol, http, sell_body(f"ext-{operation}"), tok, operation=operation)
    assert status == 200
    assert atol.documents()[0]["operation"] == operation


@pytest.mark.parametrize("operation", ["sell_correction", "refund", "report"])
async def test_other_operations_are_code_31(atol: MockAtol, http: aiohttp.ClientSession, operation: str) -> None:
    tok = await token(atol, http)
    status, body = await register(atol, http, sell_body(), tok, operation=operation)
    assert (status, body["error"]["code"]) == (400, 31)


async def test_registration_needs_json(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    async with http.post(
        f"{atol.url}/{DEFAULT_GROUP}/sell", data=b"{}", headers={"Content-Type": "text/plain", "Token": tok}
    ) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (415, 41)
    status, body = await register(atol, http, None, tok, raw=b'{"timestamp": ')
    assert (status, body["error"]["code"]) == (400, 40)


def _mutations() -> list[tuple[str, Any]]:
    """(what, how) pairs: how(body) breaks one rule of the sell schema or of its arithmetic."""

    def item(**changes: Any) -> Any:
        return lambda b: b["receipt"]["items"][0].update(changes)

    def receipt(**changes: Any) -> Any:
        return lambda b: b["receipt"].update(changes)

    def drop(*path: Any) -> Any:
        def apply(b: Any) -> None:
            target = b
            for key in path[:-1]:
                target = target[key]
            del target[path[-1]]

        return apply

    return [
        ("unknown top-level field", lambda b: b.update(extra=1)),
        ("unknown receipt field", receipt(discount=1)),
        ("unknown item field", item(colour="red")),
        ("no timestamp", drop("timestamp")),
        ("timestamp in ISO form", lambda b: b.update(timestamp="2026-12-01T12:05:31")),
        ("timestamp hour 24", lambda b: b.update(timestamp="01.12.2026 24:00:00")),
        ("empty external_id", lambda b: b.update(external_id="")),
        ("external_id of 129 characters", lambda b: b.update(external_id="x" * 129)),
        ("no client contact", receipt(client={"name": "Иванов"})),
        ("client email without @", receipt(client={"email": "buyer.example.ru"})),
        ("client phone without +", receipt(client={"phone": "79991234567"})),
        ("no company", drop("receipt", "company")),
        ("company inn of 11 digits", lambda b: b["receipt"]["company"].update(inn="12345678901")),
        ("unknown sno", lambda b: b["receipt"]["company"].update(sno="usn")),
        ("no items", receipt(items=[])),
        ("price with 3 decimals", item(price=120.505, sum=241.01)),
        ("price as a string", item(price="120.5")),
        ("price beyond the maximum", item(price=42949672.96, quantity=1, sum=42949672.96)),
        ("negative price", item(price=-1, sum=-2)),
        ("a float artefact", item(price=0.30000000000000004, quantity=1, sum=0.3)),
        ("quantity 0", item(quantity=0, sum=0)),
        ("quantity with 4 decimals", item(quantity=1.0001)),
        ("quantity beyond 99999.999", item(quantity=100000, price=0, sum=0)),
        ("measure not in the list", item(measure=1)),
        ("no measure", drop("receipt", "items", 0, "measure")),
        ("sum not price x quantity", item(sum=240.99)),
        ("payment_method unknown", item(payment_method="full")),
        ("payment_object as v4's string", item(payment_object="commodity")),
        ("payment_object 28", item(payment_object=28)),
        ("vat type unknown", item(vat={"type": "vat18"})),
        ("vat without type", item(vat={"sum": 1})),
        ("a boolean as a number", item(price=True, quantity=1, sum=True)),
        ("total not the items' sum", receipt(total=240, payments=[{"type": 1, "sum": 240}])),
        ("payments not the total", receipt(payments=[{"type": 1, "sum": 200}])),
        ("payment type 10", receipt(payments=[{"type": 10, "sum": 241}])),
        ("no payments", receipt(payments=[])),
        ("11 payments", receipt(payments=[{"type": 0, "sum": 0}] * 10 + [{"type": 1, "sum": 241}])),
        ("cashier of 65 characters", receipt(cashier="к" * 65)),
        ("cashier_inn of 10 digits", receipt(cashier_inn="5544332219")),
        ("receipt is a list", lambda b: b.update(receipt=[])),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
async def test_strict_validation_answers_code_32_and_registers_nothing(
    atol: MockAtol, http: aiohttp.ClientSession, what: str, mutate: Any
) -> None:
    tok = await token(atol, http)
    body = copy.deepcopy(sell_body())
    mutate(body)
    status, answer = await register(atol, http, body, tok)
    assert (status, answer["error"]["code"]) == (400, 32), what
    assert answer["status"] == "fail" and "uuid" not in answer
    assert atol.stats()["registered"] == 0 and atol.stats()["validation_errors"] == 1


async def test_nan_is_not_a_number(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    raw = json.dumps(sell_body()).replace('"total": 241', '"total": NaN').encode()
    status, body = await register(atol, http, None, tok, raw=raw)
    assert status == 400 and body["error"]["code"] in (32, 40)
    assert atol.stats()["registered"] == 0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"client": {"phone": "+79991234567"}},
        {"client": {"email": "none"}},
        {"cashier": "Иванова", "cashier_inn": "500100732259"},
        {"vats": [{"type": "vat20", "sum": 40.17}]},
    ],
)
async def test_valid_variants_register(atol: MockAtol, http: aiohttp.ClientSession, changes: dict[str, Any]) -> None:
    tok = await token(atol, http)
    status, body = await register(atol, http, sell_body(**changes), tok)
    assert status == 200, body


async def test_sum_rounds_half_up_to_the_kopeck(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    body = sell_body(
        items=[
            {
                "name": "Сыр",
                "price": 10.01,
                "quantity": 0.25,
                "measure": 11,
                "sum": 2.5,
                "payment_method": "full_payment",
                "payment_object": 1,
                "vat": {"type": "vat10"},
            }
        ],
        payments=[{"type": 0, "sum": 2.5}],
        total=2.5,
    )
    assert (await register(atol, http, body, tok))[0] == 200  # 2.5025 -> 2.50


# ---- reports ----


async def test_report_waits_n_polls_then_answers_done_with_the_fiscal_data(
    atol: MockAtol, http: aiohttp.ClientSession, clock: FakeTime
) -> None:
    atol.set_behaviour(wait_polls=2)
    tok = await token(atol, http)
    _, registered = await register(atol, http, sell_body("ext-9"), tok)
    uuid = registered["uuid"]
    for _ in range(2):
        clock.now += 1
        status, body = await report(atol, http, uuid, tok)
        assert (status, body["status"], body["error"]["code"]) == (200, "wait", 34)
    clock.now += 1
    status, done = await report(atol, http, uuid, tok)
    assert status == 200 and done["status"] == "done" and done["error"] is None
    assert done["uuid"] == uuid and done["external_id"] == "ext-9" and done["group_code"] == DEFAULT_GROUP
    payload = done["payload"]
    for name in ("fiscal_receipt_number", "shift_number", "fiscal_document_number", "fiscal_document_attribute"):
        assert type(payload[name]) is int and payload[name] >= 0
    for name in ("receipt_datetime", "fn_number", "ecr_registration_number", "fns_site", "ofd_inn", "ofd_receipt_url"):
        assert isinstance(payload[name], str) and payload[name]
    assert payload["total"] == Decimal("241")
    summary = atol.documents()[0]
    assert (summary["polls"], summary["early_polls"], summary["fiscalized"]) == (3, 0, True)


async def test_polls_less_than_a_second_apart_are_counted(
    atol: MockAtol, http: aiohttp.ClientSession, clock: FakeTime
) -> None:
    atol.set_behaviour(wait_polls=5)
    tok = await token(atol, http)
    uuid = (await register(atol, http, sell_body(), tok))[1]["uuid"]
    await report(atol, http, uuid, tok)
    clock.now += 0.5
    await report(atol, http, uuid, tok)
    clock.now += 1.0
    await report(atol, http, uuid, tok)
    assert atol.stats()["early_polls"] == 1


async def test_fail_ratio_fails_documents_with_a_queue_timeout(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    atol.set_behaviour(fail_ratio=1.0)
    tok = await token(atol, http)
    uuid = (await register(atol, http, sell_body(), tok))[1]["uuid"]
    status, body = await report(atol, http, uuid, tok)
    assert (status, body["status"], body["error"]["code"], body["error"]["type"]) == (200, "fail", -1, "timeout")
    assert body["payload"] is None
    assert atol.stats()["fiscalized"] == 0 and atol.stats()["failed"] == 1


async def test_fail_ratio_is_a_share(http: aiohttp.ClientSession, mock_atols: MockAtols) -> None:
    atol = await mock_atols(fail_ratio=0.5, seed=3)
    tok = await token(atol, http)
    for n in range(40):
        assert (await register(atol, http, sell_body(f"e{n}"), tok))[0] == 200
    assert 5 <= atol.stats()["failed"] <= 35 and atol.stats()["fiscalized"] == 40 - atol.stats()["failed"]


async def test_a_company_inn_other_than_the_kkts_fails_with_agent_error_2009(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    tok = await token(atol, http)
    body = sell_body()
    body["receipt"]["company"]["inn"] = "7707083893"
    uuid = (await register(atol, http, body, tok))[1]["uuid"]
    _, result = await report(atol, http, uuid, tok)
    assert (result["status"], result["error"]["code"], result["error"]["type"]) == ("fail", 2009, "agent")


async def test_an_unknown_uuid_is_code_30(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    status, body = await report(atol, http, "no-such-uuid", tok)
    assert (status, body["error"]["code"]) == (400, 30)


# ---- faults ----


async def test_error5xx_answers_500_code_50_and_does_nothing(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(error5xx_ratio=1.0)
    status, body = await register(atol, http, sell_body(), tok)
    assert (status, body["error"]["code"]) == (500, 50)
    status, body = await get_token(atol, http)
    assert (status, body["error"]["code"]) == (500, 50)
    assert atol.stats()["registered"] == 0 and atol.stats()["errors_5xx"] == 2


async def test_slow_answers_wait_delay_s(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(delay_s=0.3)
    started = time.monotonic()
    assert (await register(atol, http, sell_body(), tok))[0] == 200
    assert time.monotonic() - started >= 0.3


async def test_offline_resets_every_protocol_request_but_admin_answers(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    atol.set_behaviour(offline=True)
    with pytest.raises(aiohttp.ClientError):
        await get_token(atol, http)
    assert (await admin(http, atol, "stats"))[1]["resets"] == 1
    assert (await admin(http, atol, "behaviour", {"offline": False}))[0] == 200
    assert (await get_token(atol, http))[0] == 200


async def test_a_dropped_answer_registers_the_document_and_the_resend_gets_its_uuid(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(drop_ratio=1.0)
    with pytest.raises(aiohttp.ClientError):
        await register(atol, http, sell_body("lost"), tok)
    assert atol.stats()["registered"] == 1 and atol.stats()["dropped_answers"] == 1
    atol.set_behaviour(drop_ratio=0.0)
    status, body = await register(atol, http, sell_body("lost"), tok)
    assert (status, body["error"]["code"]) == (400, 33)
    assert body["uuid"] == atol.state.by_external_id["lost"].uuid


# ---- admin ----


async def test_admin_behaviour_is_validated_and_partial(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    status, body = await admin(http, atol, "behaviour", {"wait_polls": 3, "seed": 5})
    assert status == 200 and body["wait_polls"] == 3 and body["fail_ratio"] == 0.0
    for bad in (
        {"wait_polls": -1},
        {"fail_ratio": 2},
        {"offline": "yes"},
        {"colour": 1},
        {"delay_s": "1"},
        {"seed": "x"},
    ):
        status, body = await admin(http, atol, "behaviour", bad)
        assert status == 400 and body["error"], bad
    assert (await admin(http, atol, "behaviour"))[1]["wait_polls"] == 3


async def test_admin_documents_and_reset(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    await register(atol, http, sell_body("d1"), tok)
    _, listed = await admin(http, atol, "documents")
    assert [d["external_id"] for d in listed["documents"]] == ["d1"]
    assert listed["documents"][0]["timestamp"] == "01.12.2026 12:05:31"
    assert (await admin(http, atol, "documents/none-such"))[0] == 404
    assert await admin(http, atol, "reset", {}) == (200, {"reset": True})
    assert atol.stats()["documents"] == 0 and atol.stats()["registration_requests"] == 0


async def test_max_in_flight_counts_concurrent_requests(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(delay_s=0.2)
    await asyncio.gather(*(register(atol, http, sell_body(f"c{n}"), tok) for n in range(3)))
    assert atol.stats()["max_in_flight"] == 3


# ---- the command ----


def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "kktd_mocks.atol", "--listen", f"127.0.0.1:{port}", "--wait-polls", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mock = Child("mock atol", argv, tmp_path / "mock-atol.log", env=env, cwd=REPO).start()
    try:
        mock.wait_until(lambda: f"http://127.0.0.1:{port}/possystem/v5" in mock.log(), 30, "its URL printed")

        async def probe() -> int:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/admin/behaviour") as response:
                    return (await response.json())["wait_polls"]

        assert asyncio.run(probe()) == 1
        mock.signal(signal.SIGTERM)
        assert mock.wait(10) == 0
    finally:
        mock.stop()


def test_main_refuses_a_bad_listen_address() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kktd_mocks.atol", "--listen", "nowhere"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 78 and "HOST:PORT" in result.stderr


def test_main_reports_a_port_in_use() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kktd_mocks.atol", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    assert result.returncode == 74 and "cannot listen" in result.stderr


async def test_answer_delay_holds_the_answer_of_a_document_already_registered(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(answer_delay_s=5.0)
    pending = asyncio.ensure_future(register(atol, http, sell_body("held"), tok))
    deadline = time.monotonic() + 5
    while "held" not in atol.state.by_external_id:  # registered while its answer is still held
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert not pending.done()
    pending.cancel()
    atol.set_behaviour(answer_delay_s=0.0)
    status, body = await register(atol, http, sell_body("held"), tok)
    assert (status, body["error"]["code"], body["uuid"]) == (400, 33, atol.state.by_external_id["held"].uuid)


async def test_a_document_summary_carries_its_fiscal_data(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    await register(atol, http, sell_body("f1"), tok)
    _, summary = await admin(http, atol, "documents/f1")
    assert summary["fiscal"]["fiscal_document_number"] == summary["fiscal_document_number"] == 1
    assert summary["fiscal"]["total"] == "241"


async def test_refused_external_ids_are_answered_code_32(atol: MockAtol, http: aiohttp.ClientSession) -> None:
    tok = await token(atol, http)
    atol.set_behaviour(refuse_external_ids=["no-1"])
    status, body = await register(atol, http, sell_body("no-1"), tok)
    assert (status, body["error"]["code"]) == (400, 32)
    assert (await register(atol, http, sell_body("yes-1"), tok))[0] == 200
    assert (await admin(http, atol, "behaviour", {"refuse_external_ids": "no-1"}))[0] == 400


async def test_go_offline_refuses_connections_and_go_online_listens_on_the_same_port(
    atol: MockAtol, http: aiohttp.ClientSession
) -> None:
    port = atol.port
    await token(atol, http)  # a pooled keep-alive connection now exists
    await atol.go_offline()
    with pytest.raises(aiohttp.ClientConnectorError):
        async with aiohttp.ClientSession() as fresh:
            await get_token(atol, fresh)
    with pytest.raises(aiohttp.ClientError):
        await get_token(atol, http)  # the pooled connection was dropped
    await atol.go_online()
    assert atol.port == port and (await get_token(atol, http))[0] == 200
