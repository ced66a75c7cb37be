"""The ATOL driver v10 web-server mock against the protocol facts: routes, the queue, the simulated register's
shift and FN, strict receipt validation with the driver's codes, and every fault with its resolution.

These tests speak raw HTTP to the mock (no kktd code in the way): the mock is the test double of kktd's
atol-driver upstream, so it must behave as the real web server does on its own. Waits poll with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import os
import signal
import socket
import sys
import uuid as uuid_module
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kktd_mocks import atol_driver
from kktd_mocks.atol_driver import (
    FN_NUMBER,
    REGISTRATION_NUMBER,
    MockRegister,
    start_embedded,
    start_mock_register,
)
from tests.support import REPO, Child, async_wait_until, free_port

TERMINAL = {"ready", "error", "interrupted", "canceled"}
# 2026-06-01 12:00:00 UTC: a fixed register clock for the tests that read dates.
FIXED_EPOCH = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()

Start = Callable[..., Awaitable[MockRegister]]


@pytest.fixture
async def registers() -> AsyncIterator[Start]:
    """Starts mocks in the test's event loop; every one is closed after the test."""
    started: list[MockRegister] = []

    async def start(**options: Any) -> MockRegister:
        mock = await start_mock_register("127.0.0.1", 0, **options)
        started.append(mock)
        return mock

    try:
        yield start
    finally:
        for mock in started:
            await mock.close()


@pytest.fixture
async def register(registers: Start) -> MockRegister:
    return await registers()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def sell(**changes: Any) -> dict[str, Any]:
    """A correct receipt task: 89.90 x 2.000 = 179.80 and 0.01 x 0.333 = 0.00 (half up), paid 200 in cash."""
    task: dict[str, Any] = {
        "type": "sell",
        "taxationType": "osn",
        "electronically": False,
        "ignoreNonFiscalPrintErrors": False,
        "operator": {"name": "Иванов", "vatin": "123654789507"},
        "clientInfo": {"emailOrPhone": "+79990000000"},
        "items": [
            {
                "type": "position",
                "name": "Кофе",
                "price": 89.9,
                "quantity": 2.0,
                "amount": 179.8,
                "tax": {"type": "vat20"},
                "paymentMethod": "fullPayment",
                "paymentObject": "commodity",
                "measurementUnit": "piece",
            },
            {
                "type": "position",
                "name": "Пакет",
                "price": 0.01,
                "quantity": 0.333,
                "amount": 0,
                "tax": {"type": "none"},
                "paymentMethod": "fullPayment",
                "paymentObject": "commodity",
                "measurementUnit": 0,
            },
        ],
        "payments": [{"type": "cash", "sum": 200}],
        "total": 179.8,
    }
    task.update(changes)
    return task


def basic(login: str, password: str) -> str:
    """An HTTP Basic Authorization header's value."""
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


async def post(
    http: aiohttp.ClientSession,
    mock: MockRegister,
    body: Any,
    *,
    device: str | None = None,
    raw: bytes | None = None,
    auth: str | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode()
    params = {} if device is None else {"deviceID": device}
    headers = {"Content-Type": "application/json"} | ({} if auth is None else {"Authorization": auth})
    async with http.post(f"{mock.api_url}/requests", data=data, params=params, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def results(
    http: aiohttp.ClientSession, mock: MockRegister, task_id: str, auth: str | None = None
) -> tuple[int, Any]:
    headers = {} if auth is None else {"Authorization": auth}
    async with http.get(f"{mock.api_url}/requests/{task_id}", headers=headers) as response:
        return response.status, await response.json(loads=lambda t: json.loads(t, parse_float=Decimal))


async def get(http: aiohttp.ClientSession, url: str, auth: str | None = None) -> tuple[int, Any]:
    headers = {} if auth is None else {"Authorization": auth}
    async with http.get(url, headers=headers) as response:
        return response.status, await response.json(loads=lambda t: json.loads(t, parse_float=Decimal))


async def admin(http: aiohttp.ClientSession, mock: MockRegister, path: str, body: Any = None) -> tuple[int, Any]:
    method = http.get if body is None else http.post
    kwargs = {} if body is None else {"json": body}
    async with method(f"{mock.admin_url}/{path}", **kwargs) as response:
        return response.status, await response.json()


async def submit(http: aiohttp.ClientSession, mock: MockRegister, tasks: Any, task_id: str | None = None) -> str:
    task_id = task_id or str(uuid_module.uuid4())
    status, body = await post(http, mock, {"uuid": task_id, "request": tasks})
    assert status == 201, body
    return task_id


async def until_done(
    http: aiohttp.ClientSession, mock: MockRegister, task_id: str, timeout: float = 5.0
) -> list[dict[str, Any]]:
    async def done() -> list[dict[str, Any]] | None:
        status, body = await results(http, mock, task_id)
        assert status == 200, body
        entries: list[dict[str, Any]] = body["results"]
        return entries if all(e["status"] in TERMINAL for e in entries) else None

    found: list[dict[str, Any]] = await async_wait_until(done, timeout, f"request {task_id} to finish")
    return found


async def until_status(
    http: aiohttp.ClientSession, mock: MockRegister, task_id: str, status: str, index: int = 0
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        _, body = await results(http, mock, task_id)
        entry: dict[str, Any] = body["results"][index]
        return entry if entry["status"] == status else None

    found: dict[str, Any] = await async_wait_until(reached, 5, f"request {task_id} to be {status}")
    return found


async def run(http: aiohttp.ClientSession, mock: MockRegister, tasks: Any) -> list[dict[str, Any]]:
    return await until_done(http, mock, await submit(http, mock, tasks))


async def run_one(http: aiohttp.ClientSession, mock: MockRegister, task: dict[str, Any]) -> dict[str, Any]:
    [entry] = await run(http, mock, [task])
    return entry


async def queue_status(http: aiohttp.ClientSession, mock: MockRegister) -> dict[str, Any]:
    status, body = await get(http, f"{mock.api_url}/getRequestsQueueStatus")
    assert status == 200
    answer: dict[str, Any] = body
    return answer


# ---- the routes ----


async def test_server_info_answers_without_auth(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(login="cashier", password="secret", clock=lambda: FIXED_EPOCH)
    status, body = await get(http, f"{mock.api_url}/serverInfo")
    assert status == 200
    assert body == {
        "serverVersion": "1.0.4.0",
        "driverVersion": body["driverVersion"],
        "os": "Linux",
        "currentDateTime": "2026-06-01T15:00:00+03:00",
    }
    assert body["driverVersion"].startswith("10.10.")


async def test_a_sell_is_fiscalized_with_its_fiscal_params(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH)
    status, answer = await post(http, mock, {"uuid": "sale-1", "request": [{"type": "getFnStatus"}, sell()]})
    assert (status, answer) == (
        201,
        {"number": 0, "uuid": "sale-1", "isBlocked": False, "blockedUUID": "", "blockReason": ""},
    )
    before, receipt = await until_done(http, mock, "sale-1")
    assert before["status"] == "ready" and before["result"]["fnStatus"]["fiscalDocumentNumber"] == 0
    assert receipt["status"] == "ready"
    assert receipt["error"] == {"code": 0, "description": "Ошибок нет"}
    params = receipt["result"]["fiscalParams"]
    # The closed shift was opened first: FD 1 is the shift's opening, the receipt FD 2.
    assert params == {
        "total": Decimal("179.8"),
        "fiscalDocumentNumber": 2,
        "fiscalDocumentSign": params["fiscalDocumentSign"],
        "fiscalDocumentDateTime": "2026-06-01T15:00:00+03:00",
        "fnNumber": FN_NUMBER,
        "registrationNumber": REGISTRATION_NUMBER,
        "shiftNumber": 1,
        "fiscalReceiptNumber": 1,
        "fnsUrl": "www.nalog.gov.ru",
    }
    assert isinstance(params["fiscalDocumentSign"], str) and len(params["fiscalDocumentSign"]) == 10
    assert params["fiscalDocumentSign"].isdigit()
    assert receipt["result"]["warnings"] == {"notPrinted": False, "shiftAutoOpened": True}
    _, documents = await admin(http, mock, "documents")
    keys = ("fd", "type", "uuid", "total", "items", "shift", "printed")
    assert [tuple(d[k] for k in keys) for d in documents["documents"]] == [
        (1, "openShift", "sale-1", "0.00", [], 1, True),
        (2, "sell", "sale-1", "179.80", ["Кофе", "Пакет"], 1, True),
    ]


async def test_the_fiscal_sign_is_deterministic(registers: Start, http: aiohttp.ClientSession) -> None:
    signs = []
    for _ in range(2):
        mock = await registers(clock=lambda: FIXED_EPOCH)
        [receipt] = await until_done(http, mock, await submit(http, mock, [sell()], "same-task"))
        signs.append(receipt["result"]["fiscalParams"]["fiscalDocumentSign"])
    assert signs[0] == signs[1]  # the same document on the same FN: the same sign


async def test_a_request_may_be_a_single_task_object(register: MockRegister, http: aiohttp.ClientSession) -> None:
    task_id = await submit(http, register, {"type": "getShiftStatus"})
    [entry] = await until_done(http, register, task_id)
    assert entry["status"] == "ready" and entry["result"]["shiftStatus"]["state"] == "closed"


async def test_the_register_speaks_its_own_time_zone(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH, utc_offset_minutes=300)
    receipt = await run_one(http, mock, sell())
    assert receipt["result"]["fiscalParams"]["fiscalDocumentDateTime"] == "2026-06-01T17:00:00+05:00"


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "object"),
        (b'{"request": [{"type": "getShiftStatus"}]}', "uuid"),
        (json.dumps({"uuid": "x" * 129, "request": [{"type": "getShiftStatus"}]}).encode(), "uuid"),
        (json.dumps({"uuid": "a\u0001b", "request": [{"type": "getShiftStatus"}]}).encode(), "uuid"),
        (b'{"uuid": 5, "request": [{"type": "getShiftStatus"}]}', "uuid"),
        (b'{"uuid": "u1"}', "request"),
        (b'{"uuid": "u1", "request": []}', "request"),
        (b'{"uuid": "u1", "request": ["getShiftStatus"]}', "request"),
        (b'{"uuid": "u1", "request": [{"type": "sell"}, {"type": "closeShift"}]}', "one fiscal"),
        (b'{"uuid": "u1", "request": [{"type": "openShift"}, {"type": "sellCorrection"}]}', "one fiscal"),
        (b'{"uuid": "u1", "request": [{"type": "getShiftStatus", "n": NaN}]}', "not JSON"),
    ],
)
async def test_a_malformed_post_is_400_and_nothing_is_queued(
    register: MockRegister, http: aiohttp.ClientSession, raw: bytes, what: str
) -> None:
    status, body = await post(http, register, None, raw=raw)
    assert status == 400
    assert body["error"]["code"] == 505 and what in body["error"]["description"]
    assert register.stats()["requests"] == 0 and register.stats()["bad_posts"] == 1


async def test_a_known_uuid_is_409_and_never_runs_again(register: MockRegister, http: aiohttp.ClientSession) -> None:
    await until_done(http, register, await submit(http, register, [sell()], "once"))
    status, body = await post(http, register, {"uuid": "once", "request": [sell()]})
    assert status == 409 and body["error"]["code"] == 505
    status, body = await post(http, register, {"uuid": "once", "request": [{"type": "getShiftStatus"}]})
    assert status == 409
    assert [d["type"] for d in register.documents()] == ["openShift", "sell"]
    stats = register.stats()
    assert (stats["accepted"], stats["duplicate_posts"], stats["tasks_run"]) == (1, 2, 1)


async def test_the_default_device_and_an_unknown_one(register: MockRegister, http: aiohttp.ClientSession) -> None:
    status, _ = await post(http, register, {"uuid": "d1", "request": [{"type": "getShiftStatus"}]}, device="default")
    assert status == 201
    status, body = await post(http, register, {"uuid": "d2", "request": [{"type": "getShiftStatus"}]}, device="kkt2")
    assert status == 404 and body["error"]["code"] == 505
    status, _ = await get(http, f"{register.api_url}/requests/d1?deviceID=kkt2")
    assert status == 404
    status, _ = await get(http, f"{register.api_url}/getRequestsQueueStatus?deviceID=default")
    assert status == 200
    assert "d2" not in register.state.requests


async def test_an_unknown_uuid_is_404(register: MockRegister, http: aiohttp.ClientSession) -> None:
    status, body = await results(http, register, "never-posted")
    assert status == 404 and body["error"]["code"] == 505
    async with http.delete(f"{register.api_url}/requests/never-posted") as response:
        assert response.status == 404


async def test_an_unknown_task_type_and_the_unmodelled_ones_end_501(
    register: MockRegister, http: aiohttp.ClientSession
) -> None:
    for task in ({"type": "reportX"}, {"type": "sellCorrection"}, {"notype": True}, {"type": 7}):
        entry = await run_one(http, register, task)
        assert (entry["status"], entry["error"]["code"], entry["result"]) == ("error", 501, None), task


# ---- the queue ----


async def test_subtasks_run_one_at_a_time_in_post_order(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(print_time_s=0.05)
    ids = [await submit(http, mock, [{"type": "getDeviceStatus"}, sell()]) for _ in range(4)]
    # While the first prints, the others wait their turn.
    await until_status(http, mock, ids[0], "inProgress", index=1)
    for later in ids[1:]:
        _, body = await results(http, mock, later)
        assert [e["status"] for e in body["results"]] == ["wait", "wait"]
        assert all(e["result"] is None for e in body["results"])
    numbers = []
    for task_id in ids:
        _, receipt = await until_done(http, mock, task_id)
        numbers.append(receipt["result"]["fiscalParams"]["fiscalDocumentNumber"])
    assert numbers == [2, 3, 4, 5]  # FD 1 opened the shift
    stats = mock.stats()
    assert stats["max_tasks_in_flight"] == 1
    assert stats["max_posts_waiting"] >= 2 and stats["tasks_run"] == 8
    status = await queue_status(http, mock)
    assert (status["number"], status["ready"], status["canceled"], status["isBlocked"]) == (0, 4, 0, False)


async def test_the_rest_of_a_request_is_interrupted_after_an_error(
    register: MockRegister, http: aiohttp.ClientSession
) -> None:
    bad = sell(total=1)
    first, failed, skipped = await run(http, register, [{"type": "getDeviceStatus"}, bad, {"type": "getFnStatus"}])
    assert first["status"] == "ready"
    assert (failed["status"], failed["error"]["code"]) == ("error", 227)
    assert (skipped["status"], skipped["error"]["code"], skipped["result"]) == ("interrupted", 502, None)
    # The next request runs as usual.
    assert (await run_one(http, register, sell()))["status"] == "ready"


async def test_delete_cancels_only_a_request_still_waiting(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(device_off=True)
    blocked = await submit(http, mock, [sell()])
    await until_status(http, mock, blocked, "blocked")
    behind = await submit(http, mock, [{"type": "getDeviceStatus"}, {"type": "getShiftStatus"}])
    async with http.delete(f"{mock.api_url}/requests/{behind}") as response:
        assert response.status == 200
    _, body = await results(http, mock, behind)
    assert [(e["status"], e["error"]["code"]) for e in body["results"]] == [("canceled", 503), ("canceled", 503)]
    async with http.delete(f"{mock.api_url}/requests/{blocked}") as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == 505
    mock.set_behaviour(cancel_refusal=405)
    async with http.delete(f"{mock.api_url}/requests/{blocked}") as response:
        assert response.status == 405
    status = await queue_status(http, mock)
    assert (status["number"], status["canceled"], status["isBlocked"]) == (1, 1, True)
    mock.set_behaviour(device_off=False)
    await until_done(http, mock, blocked)
    async with http.delete(f"{mock.api_url}/requests/{blocked}") as response:
        assert response.status == 405  # finished: refused too
    status = await queue_status(http, mock)
    assert (status["number"], status["ready"], status["canceled"]) == (0, 1, 1)
    assert mock.stats()["cancel_refused"] == 3


# ---- validation ----


async def test_amounts_are_checked_to_the_kopeck_half_up(register: MockRegister, http: aiohttp.ClientSession) -> None:
    # 0.1 x 3 is 0.30000000000000004 in binary floats and exactly 0.3 in the JSON text; 0.05 x 0.5 = 0.025 is
    # 0.03 half up (0.02 with banker's rounding).
    items = [
        {"type": "position", "name": "a", "price": 0.1, "quantity": 3, "amount": 0.3, "tax": {"type": "vat10"}},
        {"type": "position", "name": "b", "price": 0.05, "quantity": 0.5, "amount": 0.03, "tax": {"type": "vat0"}},
    ]
    task: dict[str, Any] = {"type": "sellReturn", "items": items, "payments": [{"type": "electronically", "sum": 0.33}]}
    receipt = await run_one(http, register, task)
    assert receipt["status"] == "ready", receipt["error"]
    assert receipt["result"]["fiscalParams"]["total"] == Decimal("0.33")
    # The numbers as their text spells them, trailing zeros and all.
    raw = (
        b'{"uuid": "exact", "request": [{"type": "buy", "items": [{"type": "position", "name": "c", '
        b'"price": 89.90, "quantity": 2.000, "amount": 179.80, "tax": {"type": "vat22"}}], '
        b'"payments": [{"type": "cash", "sum": 179.80}], "total": 179.80}]}'
    )
    status, _ = await post(http, register, None, raw=raw)
    assert status == 201
    [entry] = await until_done(http, register, "exact")
    assert entry["status"] == "ready", entry["error"]
    banker = copy.deepcopy(task)
    banker["items"][1]["amount"] = 0.02
    banker["payments"][0]["sum"] = 0.32
    refused = await run_one(http, register, banker)
    assert (refused["status"], refused["error"]["code"]) == ("error", 16)
    assert "items[1].amount" in refused["error"]["description"]


def _item(task: dict[str, Any], **changes: Any) -> dict[str, Any]:
    task["items"][0].update(changes)
    return task


def _drop_item_key(task: dict[str, Any], key: str) -> dict[str, Any]:
    del task["items"][0][key]
    return task


# The dearest line a receipt may have: three of them overflow its total.
BIG_ITEM: dict[str, Any] = {
    "type": "position",
    "name": "big",
    "price": 42949672.95,
    "quantity": 1,
    "amount": 42949672.95,
    "tax": {"type": "none"},
}

REFUSALS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], int, str]] = [
    ("unknown top-level key", lambda t: t | {"discount": 1}, 501, "discount"),
    ("no payments", lambda t: {k: v for k, v in t.items() if k != "payments"}, 501, "payments"),
    ("taxation unknown", lambda t: t | {"taxationType": "usn"}, 143, "taxationType"),
    ("taxation not a string", lambda t: t | {"taxationType": 1}, 501, "taxationType"),
    ("electronically not a boolean", lambda t: t | {"electronically": "yes"}, 501, "electronically"),
    ("operator without a name", lambda t: t | {"operator": {"vatin": "123654789507"}}, 501, "operator.name"),
    ("operator name too long", lambda t: t | {"operator": {"name": "x" * 65}}, 501, "operator.name"),
    ("operator vatin malformed", lambda t: t | {"operator": {"name": "A", "vatin": "12345"}}, 501, "operator.vatin"),
    ("client contact malformed", lambda t: t | {"clientInfo": {"emailOrPhone": "nobody"}}, 501, "emailOrPhone"),
    (
        "electronic without a contact",
        lambda t: {k: v for k, v in t.items() if k != "clientInfo"} | {"electronically": True},
        501,
        "clientInfo.emailOrPhone",
    ),
    ("company email malformed", lambda t: t | {"companyInfo": {"email": "shop"}}, 501, "companyInfo.email"),
    ("payments place empty", lambda t: t | {"paymentsPlace": ""}, 501, "paymentsPlace"),
    ("no items", lambda t: t | {"items": []}, 501, "items"),
    ("101 items", lambda t: t | {"items": [t["items"][1]] * 101}, 110, "items"),
    ("item unknown key", lambda t: _item(t, discount=1), 501, "items[0].discount"),
    ("item without tax", lambda t: _drop_item_key(t, "tax"), 501, "items[0].tax"),
    ("item not a position", lambda t: _item(t, type="text"), 501, "items[0].type"),
    ("item name empty", lambda t: _item(t, name=""), 501, "items[0].name"),
    ("item name too long", lambda t: _item(t, name="x" * 129), 501, "items[0].name"),
    ("price with 3 decimals", lambda t: _item(t, price=89.901), 501, "items[0].price"),
    ("price a string", lambda t: _item(t, price="89.90"), 501, "items[0].price"),
    ("price negative", lambda t: _item(t, price=-1), 16, "items[0].price"),
    ("quantity zero", lambda t: _item(t, quantity=0), 17, "items[0].quantity"),
    ("quantity with 4 decimals", lambda t: _item(t, quantity=2.0001), 501, "items[0].quantity"),
    ("amount not price x quantity", lambda t: _item(t, amount=179.81), 16, "items[0].amount"),
    ("amount with 3 decimals", lambda t: _item(t, amount=179.801), 501, "items[0].amount"),
    ("tax rate unknown", lambda t: _item(t, tax={"type": "vat18"}), 144, "items[0].tax.type"),
    ("tax unknown key", lambda t: _item(t, tax={"type": "vat20", "rate": 20}), 501, "items[0].tax.rate"),
    ("payment method unknown", lambda t: _item(t, paymentMethod="full"), 216, "items[0].paymentMethod"),
    ("payment object unknown", lambda t: _item(t, paymentObject="thing"), 217, "items[0].paymentObject"),
    ("payment object code unknown", lambda t: _item(t, paymentObject=28), 217, "items[0].paymentObject"),
    ("unit unknown", lambda t: _item(t, measurementUnit="bucket"), 501, "items[0].measurementUnit"),
    ("unit code too big", lambda t: _item(t, measurementUnit=256), 501, "items[0].measurementUnit"),
    ("payment type unknown", lambda t: t | {"payments": [{"type": "card", "sum": 200}]}, 145, "payments[0].type"),
    ("payment without a sum", lambda t: t | {"payments": [{"type": "cash"}]}, 501, "payments[0].sum"),
    ("payment sum with 3 decimals", lambda t: t | {"payments": [{"type": "cash", "sum": 200.001}]}, 501, "sum"),
    ("11 payments", lambda t: t | {"payments": [{"type": "cash", "sum": 20}] * 11}, 501, "payments"),
    ("total not the items' sum", lambda t: t | {"total": 179.9}, 227, "total"),
    ("total with 3 decimals", lambda t: t | {"total": 179.801}, 501, "total"),
    ("not fully paid", lambda t: t | {"payments": [{"type": "cash", "sum": 179.79}]}, 66, "179.79"),
    (
        "non-cash over the total",
        lambda t: t | {"payments": [{"type": "electronically", "sum": 180}]},
        52,
        "180",
    ),
    (
        "the items overflow the receipt",
        lambda t: t | {"items": [BIG_ITEM] * 3, "total": 128849018.85, "payments": [{"type": "cash", "sum": 1}]},
        63,
        "128849018.85",
    ),
]


@pytest.mark.parametrize(("change", "code", "field"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
async def test_each_kind_of_mistake_is_refused_with_its_code(
    register: MockRegister,
    http: aiohttp.ClientSession,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    code: int,
    field: str,
) -> None:
    entry = await run_one(http, register, change(sell()))
    assert (entry["status"], entry["error"]["code"], entry["result"]) == ("error", code, None)
    assert field in entry["error"]["description"]
    assert register.documents() == []  # refused before the register did anything, the shift included


async def test_cash_beyond_the_total_is_change(register: MockRegister, http: aiohttp.ClientSession) -> None:
    task = sell(payments=[{"type": "cash", "sum": 5000}, {"type": "electronically", "sum": 100}])
    assert (await run_one(http, register, task))["status"] == "ready"


async def test_a_refused_name_ends_with_the_refuse_code(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(refuse_names=["Пакет"], refuse_code=217)
    entry = await run_one(http, mock, sell())
    assert (entry["status"], entry["error"]["code"]) == ("error", 217)
    assert "Пакет" in entry["error"]["description"]
    assert mock.documents() == []


# ---- the shift ----


async def test_the_shift_expires_after_24_hours_and_is_closed_and_opened(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH)
    await run_one(http, mock, sell())
    shift = (await run_one(http, mock, {"type": "getShiftStatus"}))["result"]["shiftStatus"]
    assert shift == {"state": "opened", "number": 1, "expiredTime": "2026-06-02T15:00:00+03:00"}
    status, moved = await admin(http, mock, "clock", {"advance_s": 24 * 3600})
    assert status == 200 and moved["now"] == "2026-06-02T15:00:00+03:00"
    assert (await run_one(http, mock, {"type": "getShiftStatus"}))["result"]["shiftStatus"]["state"] == "expired"
    assert (await run_one(http, mock, {"type": "getDeviceStatus"}))["result"]["deviceStatus"]["shift"] == "expired"
    expired = await run_one(http, mock, sell())
    assert (expired["status"], expired["error"]["code"]) == ("error", 68)
    refused = await run_one(http, mock, {"type": "openShift"})
    assert (refused["status"], refused["error"]["code"]) == ("error", 83)
    closed = await run_one(http, mock, {"type": "closeShift", "operator": {"name": "Иванов"}})
    assert closed["status"] == "ready"
    params = closed["result"]["fiscalParams"]
    assert (params["fiscalDocumentNumber"], params["shiftNumber"], params["receiptsCount"]) == (3, 1, 1)
    assert "total" not in params and "fiscalReceiptNumber" not in params
    shift = (await run_one(http, mock, {"type": "getShiftStatus"}))["result"]["shiftStatus"]
    assert (shift["state"], shift["number"], shift["documentsCount"]) == ("closed", 1, 3)
    again = await run_one(http, mock, {"type": "closeShift"})
    assert (again["status"], again["error"]["code"]) == ("error", 73)
    opened = await run_one(http, mock, {"type": "openShift", "operator": {"name": "Иванов", "vatin": "123654789507"}})
    assert opened["status"] == "ready"
    assert (
        opened["result"]["fiscalParams"]["shiftNumber"],
        opened["result"]["fiscalParams"]["fiscalDocumentNumber"],
    ) == (
        2,
        4,
    )
    again = await run_one(http, mock, {"type": "openShift"})
    assert (again["status"], again["error"]["code"]) == ("error", 83)
    receipt = await run_one(http, mock, sell())
    assert receipt["result"]["warnings"] == {"notPrinted": False}
    params = receipt["result"]["fiscalParams"]
    assert (params["shiftNumber"], params["fiscalReceiptNumber"], params["fiscalDocumentNumber"]) == (2, 1, 5)
    assert [d["type"] for d in mock.documents()] == ["openShift", "sell", "closeShift", "openShift", "sell"]


async def test_without_auto_open_a_closed_shift_refuses_receipts(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(auto_open_shift=False)
    entry = await run_one(http, mock, sell())
    assert (entry["status"], entry["error"]["code"]) == ("error", 73)
    assert mock.documents() == []


async def test_shift_tasks_are_validated(register: MockRegister, http: aiohttp.ClientSession) -> None:
    for task in ({"type": "openShift", "cashier": "x"}, {"type": "openShift", "operator": {"name": ""}}):
        entry = await run_one(http, register, task)
        assert (entry["status"], entry["error"]["code"]) == ("error", 501)
    assert register.documents() == []


# ---- the OFD backlog and the FN ----


async def test_the_ofd_backlog_counts_unsent_documents(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH, ofd_online=False)
    await run_one(http, mock, sell())
    await run_one(http, mock, sell())
    exchange = (await run_one(http, mock, {"type": "ofdExchangeStatus"}))["result"]
    assert exchange["status"]["notSentCount"] == 3  # the shift's opening and two receipts
    assert exchange["status"]["notSentFirstDocNumber"] == 1
    assert exchange["status"]["notSentFirstDocDateTime"] == "2026-06-01T15:00:00+03:00"
    assert isinstance(exchange["status"]["lastSuccessKeysUpdate"], str)
    assert exchange["warnings"] == {"dataForSendIsEmpty": False}
    fn = (await run_one(http, mock, {"type": "getFnStatus"}))["result"]["fnStatus"]
    assert fn["warnings"]["ofdTimeout"] is False
    mock.advance_clock(31 * 86400)
    fn = (await run_one(http, mock, {"type": "getFnStatus"}))["result"]["fnStatus"]
    assert fn["warnings"]["ofdTimeout"] is True
    assert (fn["fiscalDocumentNumber"], fn["fiscalReceiptNumber"]) == (3, 2)
    status, _ = await admin(http, mock, "behaviour", {"ofd_online": True})
    assert status == 200
    exchange = (await run_one(http, mock, {"type": "ofdExchangeStatus"}))["result"]
    assert exchange["status"]["notSentCount"] == 0 and "notSentFirstDocDateTime" not in exchange["status"]
    assert exchange["warnings"] == {"dataForSendIsEmpty": True}
    assert all(d["sentToOfd"] for d in mock.documents())


async def test_the_fn_and_device_queries(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH, fn_validity_date="2026-06-20")
    device, fn_status, fn_info = await run(
        http, mock, [{"type": "getDeviceStatus"}, {"type": "getFnStatus"}, {"type": "getFnInfo"}]
    )
    assert device["result"] == {
        "deviceStatus": {
            "blocked": False,
            "coverOpened": False,
            "paperPresent": True,
            "fiscal": True,
            "fnFiscal": True,
            "fnPresent": True,
            "cashDrawerOpened": False,
            "currentDateTime": "2026-06-01T15:00:00+03:00",
            "shift": "closed",
        }
    }
    assert fn_status["result"]["fnStatus"] == {
        "fiscalDocumentNumber": 0,
        "fiscalReceiptNumber": 0,
        "warnings": {
            "criticalError": False,
            "memoryOverflow": False,
            "needReplacement": True,  # 19 days left
            "ofdTimeout": False,
            "resourceExhausted": False,
        },
    }
    info = fn_info["result"]["fnInfo"]
    assert (info["serial"], info["validityDate"], info["livePhase"]) == (
        FN_NUMBER,
        "2026-06-20T00:00:00+03:00",
        "fiscalMode",
    )
    mock.set_behaviour(fn_validity_date="2027-06-30")
    info = (await run_one(http, mock, {"type": "getFnInfo"}))["result"]["fnInfo"]
    assert info["warnings"]["needReplacement"] is False


async def test_last_fiscal_params_of_the_last_document_and_of_the_last_receipt(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH)
    nothing = (await run_one(http, mock, {"type": "getLastFiscalParams", "forReceipt": True}))["result"]
    assert "fiscalDocumentNumber" not in nothing["fiscalParams"]
    receipt = (await run_one(http, mock, sell()))["result"]["fiscalParams"]
    await run_one(http, mock, {"type": "closeShift"})
    last = (await run_one(http, mock, {"type": "getLastFiscalParams"}))["result"]["fiscalParams"]
    assert last["fiscalDocumentNumber"] == 3 and "total" not in last and "fiscalReceiptNumber" not in last
    last_receipt = (await run_one(http, mock, {"type": "getLastFiscalParams", "forReceipt": True}))["result"]
    assert last_receipt["fiscalParams"] == receipt
    bad = await run_one(http, mock, {"type": "getLastFiscalParams", "forReceipt": "yes"})
    assert (bad["status"], bad["error"]["code"]) == ("error", 501)


async def test_the_flat_result_shape(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(result_shape="flat")
    ok, failed = await run(http, mock, [{"type": "getShiftStatus"}, sell(total=1)])
    assert "error" not in ok and (ok["status"], ok["errorCode"], ok["errorDescription"]) == ("ready", 0, "Ошибок нет")
    assert (failed["status"], failed["errorCode"], failed["result"]) == ("error", 227, None)
    assert "total" in failed["errorDescription"]


async def test_basic_auth_guards_the_protocol_but_not_server_info_or_admin(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(login="cashier", password="secret")
    body = {"uuid": "auth-1", "request": [{"type": "getShiftStatus"}]}
    status, answer = await post(http, mock, body)
    assert status == 401 and answer["error"]["code"] == 505
    async with http.get(f"{mock.api_url}/getRequestsQueueStatus") as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    status, _ = await post(http, mock, body, auth=basic("cashier", "wrong"))
    assert status == 401
    assert "auth-1" not in mock.state.requests
    good = basic("cashier", "secret")
    status, _ = await post(http, mock, body, auth=good)
    assert status == 201
    status, _ = await results(http, mock, "auth-1")
    assert status == 401
    status, _ = await results(http, mock, "auth-1", auth=good)
    assert status == 200
    for garbage in ("Basic !!!", "Bearer secret", basic("cashier", "secret").lower(), "Basic " + "Y2FzaGllcg=="):
        status, _ = await get(http, f"{mock.api_url}/getRequestsQueueStatus", auth=garbage)
        assert status == 401, garbage
    status, _ = await get(http, f"{mock.api_url}/getRequestsQueueStatus", auth=good)
    assert status == 200
    status, _ = await get(http, f"{mock.api_url}/serverInfo")
    assert status == 200
    status, _ = await admin(http, mock, "stats")
    assert status == 200
    assert mock.stats()["unauthorized"] == 8


# ---- faults ----


@pytest.mark.parametrize(
    ("behaviour", "code", "flag", "value"),
    [({"paper_present": False}, 44, "paperPresent", False), ({"cover_open": True}, 45, "coverOpened", True)],
)
async def test_no_paper_and_an_open_cover_refuse_fiscal_documents(
    registers: Start, http: aiohttp.ClientSession, behaviour: dict[str, Any], code: int, flag: str, value: bool
) -> None:
    mock = await registers(**behaviour)
    device, receipt = await run(http, mock, [{"type": "getDeviceStatus"}, sell()])
    assert device["result"]["deviceStatus"][flag] is value
    assert (receipt["status"], receipt["error"]["code"]) == ("error", code)
    shift = await run_one(http, mock, {"type": "openShift"})
    assert (shift["status"], shift["error"]["code"]) == ("error", code)
    assert mock.documents() == []


async def test_a_register_that_is_off_blocks_a_fiscal_task_until_it_is_back(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(device_off=True)
    query = await run_one(http, mock, {"type": "getDeviceStatus"})
    assert (query["status"], query["error"]["code"]) == ("error", 2)
    blocked = await submit(http, mock, [{"type": "getFnStatus"}, sell()])
    # A non-fiscal subtask fails, so the receipt is interrupted; a lone receipt blocks.
    first, second = await until_done(http, mock, blocked)
    assert (first["error"]["code"], second["status"]) == (2, "interrupted")
    blocked = await submit(http, mock, [sell()])
    entry = await until_status(http, mock, blocked, "blocked")
    assert entry["error"]["code"] == 2 and entry["result"] is None
    status = await queue_status(http, mock)
    assert (status["isBlocked"], status["blockedUUID"], status["blockReason"]) == (True, blocked, "connectionError")
    behind = await submit(http, mock, [{"type": "getShiftStatus"}])
    code, answer = await post(http, mock, {"uuid": "third", "request": [{"type": "getShiftStatus"}]})
    assert (code, answer["number"], answer["isBlocked"], answer["blockedUUID"]) == (201, 2, True, blocked)
    _, body = await results(http, mock, behind)
    assert body["results"][0]["status"] == "wait"
    mock.set_behaviour(device_off=False)
    [settled] = await until_done(http, mock, blocked)
    assert (settled["status"], settled["error"]["code"]) == ("error", 2)  # the FD number did not grow
    [after] = await until_done(http, mock, behind)
    assert after["status"] == "ready"
    assert (await queue_status(http, mock))["isBlocked"] is False
    assert mock.documents() == []


async def test_a_register_switched_off_mid_print_loses_the_document(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(print_time_s=0.3)
    await run_one(http, mock, {"type": "openShift"})
    task_id = await submit(http, mock, [sell()])
    await until_status(http, mock, task_id, "inProgress")
    mock.set_behaviour(device_off=True)
    await until_status(http, mock, task_id, "blocked")
    mock.set_behaviour(device_off=False)
    [entry] = await until_done(http, mock, task_id)
    assert (entry["status"], entry["error"]["code"]) == ("error", 2)
    assert [d["type"] for d in mock.documents()] == ["openShift"]


async def test_power_lost_after_the_document_was_made_settles_ready_when_power_is_back(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(power_loss_next="made", power_back_after_s=0.2)
    await run_one(http, mock, {"type": "openShift"})
    task_id = await submit(http, mock, [sell()])
    await until_status(http, mock, task_id, "blocked")
    assert mock.state.behaviour.device_off is True and mock.state.behaviour.power_loss_next is None
    status = await queue_status(http, mock)
    assert (status["isBlocked"], status["blockReason"]) == (True, "connectionError")
    [entry] = await until_done(http, mock, task_id)  # the power comes back by itself
    assert entry["status"] == "ready"
    assert entry["result"]["fiscalParams"]["fiscalDocumentNumber"] == 2
    assert entry["result"]["warnings"] == {"notPrinted": True, "recovered": True}
    assert mock.state.behaviour.device_off is False
    assert [(d["type"], d["printed"]) for d in mock.documents()] == [("openShift", True), ("sell", False)]
    printed = await run_one(http, mock, {"type": "continuePrint"})
    assert printed["status"] == "ready"
    assert mock.documents()[1]["printed"] is True
    # Only the next receipt lost power.
    assert (await run_one(http, mock, sell()))["status"] == "ready"


async def test_power_lost_before_the_document_was_made_settles_error_when_the_admin_restores_it(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(power_loss_next="not_made", power_back_after_s=None)
    task_id = await submit(http, mock, [sell()])
    await until_status(http, mock, task_id, "blocked")
    status, behaviour = await admin(http, mock, "behaviour")
    assert status == 200 and behaviour["device_off"] is True
    assert (await queue_status(http, mock))["blockedUUID"] == task_id
    status, _ = await admin(http, mock, "behaviour", {"device_off": False})
    assert status == 200
    [entry] = await until_done(http, mock, task_id)
    assert (entry["status"], entry["error"]["code"]) == ("error", 2)
    # The automatic shift opening was made before the receipt; the receipt was not.
    assert [d["type"] for d in mock.documents()] == ["openShift"]


@pytest.mark.parametrize(("outcome", "last_fd"), [("made", 2), ("not_made", 1)])
async def test_an_unknown_error_is_settled_by_asking_the_register(
    registers: Start, http: aiohttp.ClientSession, outcome: str, last_fd: int
) -> None:
    mock = await registers(unknown_error_next=outcome)
    await run_one(http, mock, {"type": "openShift"})
    before, receipt = await run(http, mock, [{"type": "getFnStatus"}, sell()])
    assert before["result"]["fnStatus"]["fiscalDocumentNumber"] == 1
    assert (receipt["status"], receipt["error"]["code"]) == ("error", 15)
    assert (await queue_status(http, mock))["isBlocked"] is False
    fn_status, last = await run(http, mock, [{"type": "getFnStatus"}, {"type": "getLastFiscalParams"}])
    assert fn_status["result"]["fnStatus"]["fiscalDocumentNumber"] == last_fd
    assert last["result"]["fiscalParams"]["fiscalDocumentNumber"] == last_fd
    assert len(mock.documents()) == last_fd
    assert (await run_one(http, mock, sell()))["status"] == "ready"  # one shot


async def test_paper_running_out_mid_print_leaves_a_copy_for_continue_print(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(paper_runs_out_next=True)
    receipt = await run_one(http, mock, sell())
    assert receipt["status"] == "ready"
    assert receipt["result"]["warnings"]["notPrinted"] is True
    assert mock.state.behaviour.paper_present is False
    refused = await run_one(http, mock, {"type": "continuePrint"})
    assert (refused["status"], refused["error"]["code"]) == ("error", 44)
    mock.set_behaviour(paper_present=True)
    assert (await run_one(http, mock, {"type": "continuePrint"}))["status"] == "ready"
    assert [d["printed"] for d in mock.documents()] == [True, True]
    assert mock.state.pending_copy is None
    assert (await run_one(http, mock, {"type": "continuePrint"}))["status"] == "ready"  # nothing to print


async def test_a_lost_answer_leaves_the_request_queued_and_a_retry_gets_409(
    registers: Start, http: aiohttp.ClientSession
) -> None:
    mock = await registers(lose_answers=1)
    with pytest.raises(aiohttp.ClientError):
        await post(http, mock, {"uuid": "lost", "request": [sell()]})
    [entry] = await until_done(http, mock, "lost")
    assert entry["status"] == "ready"
    status, _ = await post(http, mock, {"uuid": "lost", "request": [sell()]})
    assert status == 409
    assert [d["type"] for d in mock.documents()] == ["openShift", "sell"]
    stats = mock.stats()
    assert (stats["lost_answers"], stats["duplicate_posts"], stats["accepted"]) == (1, 1, 1)
    assert mock.state.behaviour.lose_answers == 0


# ---- admin ----


@pytest.mark.parametrize(
    "change",
    [
        {"bogus": 1},
        {"print_time_s": -1},
        {"print_time_s": "1"},
        {"cancel_refusal": 404},
        {"result_shape": "deep"},
        {"power_loss_next": "maybe"},
        {"unknown_error_next": True},
        {"power_back_after_s": -0.1},
        {"lose_answers": 1.5},
        {"lose_answers": -1},
        {"refuse_names": "Кофе"},
        {"refuse_code": 0},
        {"utc_offset_minutes": 1000},
        {"fn_validity_date": "tomorrow"},
        {"device_off": 1},
        {"paper_present": False, "bogus": 1},
    ],
)
async def test_a_bad_behaviour_update_is_400_and_changes_nothing(
    register: MockRegister, http: aiohttp.ClientSession, change: dict[str, Any]
) -> None:
    _, before = await admin(http, register, "behaviour")
    status, body = await admin(http, register, "behaviour", change)
    assert status == 400 and body["error"]
    assert (await admin(http, register, "behaviour"))[1] == before


async def test_admin_clock_register_stats_and_reset(registers: Start, http: aiohttp.ClientSession) -> None:
    mock = await registers(clock=lambda: FIXED_EPOCH)
    for bad in ({}, {"advance_s": "1"}, {"advance_s": -5}, {"advance_s": 1, "x": 2}):
        status, _ = await admin(http, mock, "clock", bad)
        assert status == 400, bad
    await run_one(http, mock, sell())
    status, view = await admin(http, mock, "register")
    assert status == 200
    assert (view["fiscalDocumentNumber"], view["shift"]["state"], view["shift"]["receipts"]) == (2, "opened", 1)
    status, stats = await admin(http, mock, "stats")
    assert status == 200 and stats["posts"] == 1 and stats["documents"] == 2 and stats["max_tasks_in_flight"] == 1
    status, _ = await admin(http, mock, "reset", {})
    assert status == 200
    assert mock.documents() == [] and mock.stats()["posts"] == 0 and mock.state.shift_state() == "closed"
    assert (await results(http, mock, "anything"))[0] == 404
    # The worker runs after a reset.
    receipt = await run_one(http, mock, sell())
    assert receipt["result"]["fiscalParams"]["fiscalDocumentNumber"] == 2


async def test_go_offline_refuses_connections_and_go_online_keeps_the_state(
    register: MockRegister, http: aiohttp.ClientSession
) -> None:
    await run_one(http, register, sell())
    await register.go_offline()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"{register.api_url}/serverInfo")
    await register.go_online()
    status, _ = await get(http, f"{register.api_url}/serverInfo")
    assert status == 200
    assert len(register.documents()) == 2


@dataclasses.dataclass(frozen=True)
class _Settings:
    url: str = "http://127.0.0.1:16732"
    timeout: float = 10.0
    login: str | None = None
    password: str | None = None


@pytest.mark.parametrize(("login", "password", "unauthenticated"), [(None, None, 200), ("kktd", "pw", 401)])
async def test_start_embedded_points_the_settings_at_the_mock(
    http: aiohttp.ClientSession, login: str | None, password: str | None, unauthenticated: int
) -> None:
    embedded = await start_embedded(_Settings(login=login, password=password))
    try:
        settings = embedded.settings
        assert isinstance(settings, _Settings) and settings.url.startswith("http://127.0.0.1:")
        assert settings.url != _Settings.url and "mock ATOL driver v10" in embedded.description
        status, _ = await get(http, f"{settings.url}/api/v2/getRequestsQueueStatus")
        assert status == unauthenticated
        if login is not None and password is not None:
            auth = basic(login, password)
            status, _ = await get(http, f"{settings.url}/api/v2/getRequestsQueueStatus", auth=auth)
            assert status == 200
    finally:
        await embedded.close()


# ---- the command ----


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "nowhere"],
        ["--listen", "127.0.0.1:99999"],
        ["--login", "kktd"],
        ["--print-time", "-1"],
        ["--print-time", "soon"],
        ["--no-such-flag"],
    ],
)
def test_main_refuses_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert atol_driver.main(argv) == 78


def test_main_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert atol_driver.main(["--listen", f"127.0.0.1:{port}"]) == 74
    assert "cannot listen" in capsys.readouterr().err


@pytest.mark.process
def test_main_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "kktd_mocks.atol_driver", "--listen", f"127.0.0.1:{port}", "--print-time", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mock = Child("mock atol driver", argv, tmp_path / "mock-atol-driver.log", env=env, cwd=REPO).start()
    try:
        mock.wait_until(lambda: f'atol_driver_url = "http://127.0.0.1:{port}"' in mock.log(), 30, "its settings")
        assert 'upstream = "atol-driver"' in mock.log() and f"http://127.0.0.1:{port}/admin" in mock.log()

        async def probe() -> tuple[Any, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/admin/behaviour") as response:
                    behaviour = await response.json()
                async with session.get(f"http://127.0.0.1:{port}/api/v2/serverInfo") as response:
                    return behaviour, await response.json()

        behaviour, info = asyncio.run(probe())
        assert behaviour["print_time_s"] == 0 and info["serverVersion"] == "1.0.4.0"
        mock.signal(signal.SIGTERM)
        assert mock.wait(10) == 0
    finally:
        mock.stop()
