"""The mock OFD over real HTTP: protocol, idempotency, rejection rules, modes, stats, persistence, CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from kktd.delivery import UpstreamUnavailable
from kktd.upstreams.kktd_ofd import OfdAck, OfdClient, OfdItem
from kktd_mocks.ofd import (
    BadRequest,
    MockOfd,
    MockOfdState,
    create_app,
    parse_listen,
    split_batch,
    start_mock_ofd,
)

ACCEPTED_AT = "2026-11-24T03:00:00.000Z"
REPO = Path(__file__).resolve().parent.parent


def receipt(pos_id: str = "POS-1", amount: int = 5000) -> dict[str, Any]:
    return {
        "pos_id": pos_id,
        "operation": "sale",
        "taxation": "osn",
        "items": [
            {
                "name": "Чай",
                "price": amount - 1000,
                "quantity": "1.000",
                "sum": amount - 1000,
                "vat": "vat20",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            },
            {
                "name": "Сахар",
                "price": 1000,
                "quantity": "1.000",
                "sum": 1000,
                "vat": "vat10",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            },
        ],
        "payments": [{"type": "cash", "amount": amount - 2000}, {"type": "electronic", "amount": 2000}],
        "total": amount,
    }


def entry(n: int, **kwargs: Any) -> dict[str, Any]:
    return {
        "receipt_id": f"rcpt-{n}",
        "idempotency_key": f"key-{n}",
        "accepted_at": ACCEPTED_AT,
        "receipt": receipt(**kwargs),
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, mock_ofd: MockOfd, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(
        f"{mock_ofd.url}/v1/receipts", data=data, headers={"Content-Type": "application/json"}
    ) as response:
        return response.status, await response.json(content_type=None)


async def send(http: aiohttp.ClientSession, mock_ofd: MockOfd, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    status, body = await post(http, mock_ofd, entries)
    assert status == 200, body
    assert len(body["results"]) == len(entries)
    return list(body["results"])


async def admin(
    http: aiohttp.ClientSession, mock_ofd: MockOfd, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, f"{mock_ofd.admin_url}{path}", json=body) as response:
        return response.status, await response.json()


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


# --- protocol -----------------------------------------------------------------------------------------


async def test_acknowledgement_shape(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    results = await send(http, mock_ofd, [entry(1), entry(2), entry(3)])
    assert [r["receipt_id"] for r in results] == ["rcpt-1", "rcpt-2", "rcpt-3"]
    assert [r["fiscal_document_number"] for r in results] == [1, 2, 3]
    for result in results:
        assert set(result) == {
            "receipt_id",
            "fiscal_document_number",
            "fiscal_sign",
            "ofd_received_at",
            # The protocol's optional register identity (docs/contract.md): the mock gives all of it.
            "fn_number",
            "kkt_registration_number",
            "shift_number",
            "receipt_number",
        }
        assert len(result["fn_number"]) == 16 and result["fn_number"].isdigit()
        assert result["receipt_number"] == result["fiscal_document_number"] and result["shift_number"] >= 1
        assert len(result["fiscal_sign"]) == 10 and result["fiscal_sign"].isdigit()
        assert datetime.fromisoformat(result["ofd_received_at"]).tzinfo is not None
    assert len({r["fiscal_sign"] for r in results}) == 3


async def test_fiscal_sign_is_deterministic_per_key() -> None:
    signs = []
    for _ in range(2):
        ofd = await start_mock_ofd("127.0.0.1", 0, sign_key=b"k" * 32)
        try:
            async with OfdClient(ofd.url, 5.0) as client:
                results = await client.send_batch([OfdItem("r", "k", ACCEPTED_AT, receipt())])
            assert isinstance(results[0], OfdAck)
            signs.append(results[0].fiscal_sign)
        finally:
            await ofd.close()
    assert signs[0] == signs[1]


async def test_redelivery_is_acknowledged_identically_and_counted(
    http: aiohttp.ClientSession, mock_ofd: MockOfd
) -> None:
    first = await send(http, mock_ofd, [entry(1), entry(2)])
    again = await send(http, mock_ofd, [entry(2), entry(3), entry(1)])
    assert again[0] == first[1] and again[2] == first[0]
    assert again[1]["fiscal_document_number"] == 3
    twice_in_one = await send(http, mock_ofd, [entry(4), entry(4)])
    assert twice_in_one[0] == twice_in_one[1]
    stats = mock_ofd.stats()
    assert (stats["unique"], stats["received"], stats["redeliveries"]) == (4, 7, 3)
    stored = mock_ofd.stored("rcpt-1")
    assert stored is not None and stored["deliveries"] == 2


async def test_redelivery_is_acknowledged_even_after_the_register_is_blocked(
    http: aiohttp.ClientSession, mock_ofd: MockOfd
) -> None:
    (first,) = await send(http, mock_ofd, [entry(1)])
    status, _ = await admin(http, mock_ofd, "POST", "/admin/reject", {"pos_ids": ["POS-1"]})
    assert status == 200
    (again, fresh) = await send(http, mock_ofd, [entry(1), entry(2)])
    assert again == first
    assert fresh["error"]["code"] == "kkt_not_registered"


async def test_key_reused_by_another_receipt_is_rejected(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await send(http, mock_ofd, [entry(1)])
    other = {**entry(1), "receipt_id": "rcpt-other"}
    (result,) = await send(http, mock_ofd, [other])
    assert result == {
        "receipt_id": "rcpt-other",
        "error": {"code": "idempotency_key_reused", "message": result["error"]["message"]},
    }
    assert mock_ofd.stats()["unique"] == 1


def broken(path: str, value: Any) -> dict[str, Any]:
    """entry(9) with the field at dotted `path` replaced (or removed when value is ...)."""
    data: dict[str, Any] = json.loads(json.dumps(entry(9)))
    *parents, last = path.split(".")
    target: Any = data
    for name in parents:
        target = target[int(name)] if isinstance(target, list) else target[name]
    if value is ...:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


REJECTIONS: dict[str, tuple[Any, str]] = {
    "entry not an object": ("rcpt-9", "invalid_receipt"),
    "receipt_id missing": (broken("receipt_id", ...), "invalid_receipt"),
    "idempotency_key not a string": (broken("idempotency_key", 9), "invalid_receipt"),
    "idempotency_key empty": (broken("idempotency_key", ""), "invalid_receipt"),
    "accepted_at not a time": (broken("accepted_at", "today"), "invalid_receipt"),
    "accepted_at without zone": (broken("accepted_at", "2026-11-24T03:00:00"), "invalid_receipt"),
    "receipt missing": (broken("receipt", ...), "invalid_receipt"),
    "receipt a string": (broken("receipt", "{}"), "invalid_receipt"),
    "pos_id missing": (broken("receipt.pos_id", ...), "invalid_receipt"),
    "total a string": (broken("receipt.total", "5000"), "invalid_receipt"),
    "total a float": (broken("receipt.total", 5000.0), "invalid_receipt"),
    "total negative": (broken("receipt.total", -5), "invalid_receipt"),
    "items empty": (broken("receipt.items", []), "invalid_receipt"),
    "item sum missing": (broken("receipt.items.0.sum", ...), "invalid_receipt"),
    "items do not add up": (broken("receipt.items.0.sum", 3999), "total_mismatch"),
    "payments missing": (broken("receipt.payments", ...), "invalid_receipt"),
    "payment amount float": (broken("receipt.payments.1.amount", 2000.0), "invalid_receipt"),
    "payments short": (broken("receipt.payments.1.amount", 1999), "payment_total_mismatch"),
    "payments over": (broken("receipt.payments.0.amount", 3001), "payment_total_mismatch"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_invalid_receipts_are_rejected_not_stored(
    case: str, http: aiohttp.ClientSession, mock_ofd: MockOfd
) -> None:
    bad, code = REJECTIONS[case]
    (ok_before, result, ok_after) = await send(http, mock_ofd, [entry(1), bad, entry(2)])
    assert ok_before["fiscal_document_number"] == 1 and ok_after["fiscal_document_number"] == 2
    expected_id = bad.get("receipt_id") if isinstance(bad, dict) else None
    assert result["receipt_id"] == expected_id
    assert result["error"]["code"] == code and result["error"]["message"]
    assert mock_ofd.stored("rcpt-9") is None
    assert mock_ofd.stats()["rejected"] == 1 and mock_ofd.stats()["unique"] == 2


async def test_reject_list_set_and_cleared(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    status, body = await admin(http, mock_ofd, "POST", "/admin/reject", {"pos_ids": ["POS-7", "POS-8"]})
    assert (status, body) == (200, {"pos_ids": ["POS-7", "POS-8"]})
    results = await send(http, mock_ofd, [entry(1, pos_id="POS-7"), entry(2, pos_id="POS-1"), entry(3, pos_id="POS-8")])
    codes = [r.get("error", {}).get("code") for r in results]
    assert codes == ["kkt_not_registered", None, "kkt_not_registered"]
    # A rejected receipt was not stored: once the register is cleared it is acknowledged as new.
    status, body = await admin(http, mock_ofd, "POST", "/admin/reject", {"pos_ids": []})
    assert (status, body) == (200, {"pos_ids": []})
    (result,) = await send(http, mock_ofd, [entry(1, pos_id="POS-7")])
    assert result["fiscal_document_number"] == 2
    assert mock_ofd.stats()["rejected"] == 2 and mock_ofd.stats()["redeliveries"] == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b'{"receipt_id": "x"}',
        b'"string"',
        b"[]",
        json.dumps([entry(n) for n in range(101)]).encode(),
    ],
    ids=["not-json", "not-utf8", "object", "string", "empty", "101-items"],
)
async def test_whole_request_problems_are_400(body: bytes, http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    status, answer = await post(http, mock_ofd, body)
    assert status == 400
    assert answer["error"]["code"] == "bad_request"
    stats = mock_ofd.stats()
    assert (stats["unique"], stats["received"], stats["bad_requests"], stats["requests"]) == (0, 0, 1, 1)


@pytest.mark.parametrize(
    "text",
    [
        '[{"a": 1}]',
        ' \n[ {"a": [1, 2, {"b": "]"}]} ,\t{"c": "\\",\\""} ]\r\n',
        "[1,2,3]",
        "[[],{}]",
        '["ж", "\\u0436"]',
        "[null]",
    ],
)
def test_split_batch_keeps_each_items_text(text: str) -> None:
    entries = split_batch(text)
    assert [value for value, _ in entries] == json.loads(text)
    for value, raw in entries:
        assert json.loads(raw) == value
        assert raw == raw.strip() and raw in text


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "not valid JSON"),
        ("[", "not valid JSON"),
        ("[1,]", "not valid JSON"),
        ("[1 2]", "not valid JSON"),
        ("[1] x", "not valid JSON"),
        ("[1]]", "not valid JSON"),
        ("[1,,2]", "not valid JSON"),
        ("\ufeff[1]", "not valid JSON"),
        ("[]", "got 0"),
        ("{}", "must be a JSON array"),
        ("1", "must be a JSON array"),
        ("[" + ",".join(["{}"] * 101) + "]", "got more"),
    ],
)
def test_split_batch_rejects(text: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        split_batch(text)


async def test_stored_copy_is_the_item_as_sent(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    stored_receipt = json.dumps(receipt(), ensure_ascii=False, indent=2)
    body = (
        f'[ {{"receipt_id": "rcpt-1", "idempotency_key": "key-1", "accepted_at": "{ACCEPTED_AT}", '
        f'"receipt": {stored_receipt}}} ]'
    )
    status, answer = await post(http, mock_ofd, body.encode())
    assert status == 200 and answer["results"][0]["fiscal_document_number"] == 1
    stored = mock_ofd.stored("rcpt-1")
    assert stored is not None and stored["receipt"] == receipt() and stored["accepted_at"] == ACCEPTED_AT


async def test_batch_of_100_is_accepted(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    results = await send(http, mock_ofd, [entry(n) for n in range(100)])
    assert [r["fiscal_document_number"] for r in results] == list(range(1, 101))


# --- admin API ----------------------------------------------------------------------------------------


async def test_stats_and_receipt_lookup(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await send(http, mock_ofd, [entry(1), entry(2)])
    await send(http, mock_ofd, [entry(1), broken("receipt.total", "x")])
    status, stats = await admin(http, mock_ofd, "GET", "/admin/stats")
    assert status == 200
    assert {k: stats[k] for k in ("received", "unique", "redeliveries", "rejected", "requests", "mode")} == {
        "received": 4,
        "unique": 2,
        "redeliveries": 1,
        "rejected": 1,
        "requests": 2,
        "mode": "online",
    }
    status, stored = await admin(http, mock_ofd, "GET", "/admin/receipts/rcpt-2")
    assert status == 200
    assert stored["receipt"] == receipt() and stored["idempotency_key"] == "key-2"
    assert stored["ack"]["fiscal_document_number"] == 2 and stored["deliveries"] == 1
    status, missing = await admin(http, mock_ofd, "GET", "/admin/receipts/rcpt-9")
    assert status == 404 and missing["error"]["code"] == "not_found"


async def test_receipt_listing_pages(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await send(http, mock_ofd, [entry(n) for n in range(25)])
    status, page = await admin(http, mock_ofd, "GET", "/admin/receipts?after=10&limit=5")
    assert status == 200 and page["count"] == 25
    assert [r["fiscal_document_number"] for r in page["receipts"]] == [11, 12, 13, 14, 15]
    assert page["receipts"][0]["receipt_id"] == "rcpt-10"
    status, _ = await admin(http, mock_ofd, "GET", "/admin/receipts?limit=many")
    assert status == 400


async def test_admin_routes_are_also_on_the_main_listener(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    async with http.get(f"{mock_ofd.url}/admin/stats") as response:
        assert response.status == 200 and (await response.json())["mode"] == "online"
    async with http.post(f"{mock_ofd.admin_url}/v1/receipts", json=[entry(1)]) as response:
        assert response.status == 404  # receipts only on the main listener


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "sideways"},
        {},
        {"mode": "slow", "delay_s": -1},
        {"mode": "slow", "delay_s": "1"},
        {"mode": "flaky", "fail_ratio": 1.5},
        {"mode": "flaky", "seed": "x"},
        ["online"],
    ],
)
async def test_bad_mode_requests_are_400(body: Any, http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    status, answer = await admin(http, mock_ofd, "POST", "/admin/mode", body)
    assert status == 400 and answer["error"]["code"] == "bad_request"
    assert mock_ofd.stats()["mode"] == "online"


async def test_reset_clears_store_and_counters(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await send(http, mock_ofd, [entry(1)])
    status, _ = await admin(http, mock_ofd, "POST", "/admin/reset")
    assert status == 200
    assert mock_ofd.stats()["unique"] == 0 and mock_ofd.stats()["received"] == 0
    (result,) = await send(http, mock_ofd, [entry(1)])
    assert result["fiscal_document_number"] == 1


# --- modes --------------------------------------------------------------------------------------------


async def test_offline_closes_the_listener_and_comes_back_on_the_same_port(
    http: aiohttp.ClientSession, mock_ofd: MockOfd
) -> None:
    port = mock_ofd.port
    await send(http, mock_ofd, [entry(1)])  # leaves a keep-alive connection in the session's pool
    status, body = await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "offline"})
    assert (status, body["mode"]) == (200, "offline")
    assert refuses_connections(port)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, mock_ofd, [entry(2)])
    status, stats = await admin(http, mock_ofd, "GET", "/admin/stats")
    assert status == 200 and stats["mode"] == "offline"
    status, _ = await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "online"})
    assert status == 200 and mock_ofd.port == port
    assert not refuses_connections(port)
    (result,) = await send(http, mock_ofd, [entry(2)])
    assert result["fiscal_document_number"] == 2
    assert mock_ofd.stats()["unique"] == 2


async def test_going_offline_through_the_main_listener_still_answers(
    http: aiohttp.ClientSession, mock_ofd: MockOfd
) -> None:
    async with http.post(f"{mock_ofd.url}/admin/mode", json={"mode": "offline"}) as response:
        assert response.status == 200 and (await response.json())["mode"] == "offline"
    assert refuses_connections(mock_ofd.port)
    await mock_ofd.set_mode("online")
    assert not refuses_connections(mock_ofd.port)


async def test_offline_twice_and_online_twice_are_harmless(mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("offline")
    await mock_ofd.set_mode("offline")
    assert refuses_connections(mock_ofd.port)
    await mock_ofd.set_mode("online")
    await mock_ofd.set_mode("error500")  # leaving offline for another mode reopens too
    assert not refuses_connections(mock_ofd.port)


async def test_port_taken_while_offline_keeps_it_offline(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await mock_ofd.set_mode("offline")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", mock_ofd.port))
        squatter.listen()
        status, body = await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "online"})
        assert status == 500 and body["error"]["code"] == "listener_error"
        assert mock_ofd.stats()["mode"] == "offline"
    await mock_ofd.set_mode("online")
    assert not refuses_connections(mock_ofd.port)


async def test_close_while_offline() -> None:
    ofd = await start_mock_ofd("127.0.0.1", 0)
    try:
        await ofd.set_mode("offline")
    finally:
        await ofd.close()
    assert refuses_connections(ofd.port) and refuses_connections(ofd.admin_port)


async def test_error500_answers_500_and_stores_nothing(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "error500"})
    status, body = await post(http, mock_ofd, [entry(1)])
    assert status == 500 and "error" in body
    stats = mock_ofd.stats()
    counts = (stats["unique"], stats["requests"], stats["failed_requests"], stats["mode"])
    assert counts == (0, 1, 1, "error500")


async def test_slow_waits_before_storing(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "slow", "delay_s": 0.4})
    loop = asyncio.get_running_loop()
    started = loop.time()
    request = asyncio.ensure_future(send(http, mock_ofd, [entry(1)]))
    try:
        deadline = started + 5.0
        while mock_ofd.stats()["requests"] == 0:
            assert loop.time() < deadline, "the request never reached the mock"
            await asyncio.sleep(0.01)
        assert mock_ofd.stats()["unique"] == 0  # in the delay: nothing stored yet
        (result,) = await request
    finally:
        request.cancel()
    assert loop.time() - started >= 0.4
    assert result["fiscal_document_number"] == 1 and mock_ofd.stats()["unique"] == 1


async def test_close_does_not_wait_for_a_long_slow_request() -> None:
    ofd = await start_mock_ofd("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        await ofd.set_mode("slow", delay_s=600.0)
        async with OfdClient(ofd.url, 0.2) as client:
            with pytest.raises(UpstreamUnavailable):
                await client.send_batch([OfdItem("r1", "k1", ACCEPTED_AT, receipt())])
    finally:
        started = loop.time()
        await ofd.close()
    assert loop.time() - started < 5.0
    assert ofd.stats()["unique"] == 0  # the held request was dropped, not stored


async def flaky_outcomes(seed: int, fail_ratio: float, n: int = 40) -> list[str]:
    ofd = await start_mock_ofd("127.0.0.1", 0)
    try:
        await ofd.set_mode("flaky", fail_ratio=fail_ratio, seed=seed)
        outcomes = []
        async with OfdClient(ofd.url, 5.0) as client:
            for i in range(n):
                try:
                    await client.send_batch([OfdItem(f"r{i}", f"k{i}", ACCEPTED_AT, receipt())])
                    outcomes.append("ok")
                except UpstreamUnavailable as exc:
                    outcomes.append(exc.reason)
        stats = ofd.stats()
        assert stats["failed_requests"] == n - outcomes.count("ok")
        assert stats["unique"] == outcomes.count("ok")
        return outcomes
    finally:
        await ofd.close()


async def test_flaky_is_reproducible_with_a_seed() -> None:
    first = await flaky_outcomes(seed=42, fail_ratio=0.5)
    assert await flaky_outcomes(seed=42, fail_ratio=0.5) == first
    assert set(first) == {"ok", "http_500", "connection_lost"}  # both kinds of failure occur
    assert 8 <= first.count("ok") <= 32
    assert await flaky_outcomes(seed=43, fail_ratio=0.5) != first


@pytest.mark.parametrize("ratio, expect_ok", [(0.0, True), (1.0, False)])
async def test_flaky_extremes(ratio: float, expect_ok: bool) -> None:
    outcomes = await flaky_outcomes(seed=1, fail_ratio=ratio, n=10)
    assert all((o == "ok") == expect_ok for o in outcomes)


async def test_drop_ack_stores_but_the_client_sees_an_error(http: aiohttp.ClientSession, mock_ofd: MockOfd) -> None:
    await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "drop_ack"})
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(http, mock_ofd, [entry(1), entry(2)])
    stats = mock_ofd.stats()
    assert (stats["unique"], stats["dropped_acks"]) == (2, 1)
    stored = mock_ofd.stored("rcpt-2")
    assert stored is not None
    await admin(http, mock_ofd, "POST", "/admin/mode", {"mode": "online"})
    results = await send(http, mock_ofd, [entry(1), entry(2)])
    assert results[1] == stored["ack"]
    assert mock_ofd.stats()["redeliveries"] == 2


async def test_offline_on_a_bare_app_resets_connections() -> None:
    client = TestClient(TestServer(create_app(seed=3)))
    await client.start_server()
    try:
        response = await client.post("/admin/mode", json={"mode": "offline"})
        assert response.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.post("/v1/receipts", json=[entry(1)])
        await client.post("/admin/mode", json={"mode": "online"})
        response = await client.post("/v1/receipts", json=[entry(1)])
        assert response.status == 200 and (await response.json())["results"][0]["fiscal_document_number"] == 1
    finally:
        await client.close()


# --- persistence --------------------------------------------------------------------------------------


def items(n: int) -> list[OfdItem]:
    return [OfdItem(f"r{i}", f"k{i}", ACCEPTED_AT, receipt()) for i in range(n)]


async def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "ofd.db")
    ofd = await start_mock_ofd("127.0.0.1", 0, db)
    try:
        async with OfdClient(ofd.url, 5.0) as client:
            first = await client.send_batch(items(3))
            await client.send_batch([OfdItem("r0", "k0", ACCEPTED_AT, receipt())])
    finally:
        await ofd.close()
    ofd = await start_mock_ofd("127.0.0.1", 0, db)
    try:
        assert {k: ofd.stats()[k] for k in ("unique", "received", "redeliveries", "requests")} == {
            "unique": 3,
            "received": 4,
            "redeliveries": 1,
            "requests": 2,
        }
        async with OfdClient(ofd.url, 5.0) as client:
            again = await client.send_batch(items(4))
        assert again[:3] == first
        assert isinstance(again[3], OfdAck) and again[3].fiscal_document_number == 4
        stored = ofd.stored("r1")
        assert stored is not None and stored["receipt"] == receipt() and stored["deliveries"] == 2
    finally:
        await ofd.close()


async def test_sqlite_store_is_committed_before_the_answer(tmp_path: Path) -> None:
    db = tmp_path / "ofd.db"
    ofd = await start_mock_ofd("127.0.0.1", 0, str(db))
    try:
        async with OfdClient(ofd.url, 5.0) as client:
            await client.send_batch([OfdItem("r1", "k1", ACCEPTED_AT, receipt())])
        # Another connection sees the row while the mock still runs (as after a kill -9 of the mock).
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT receipt_id, fiscal_document_number FROM receipts").fetchall()
        assert rows == [("r1", 1)]
    finally:
        await ofd.close()


# --- command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9000", ":9000", "host:", "host:port", "host:65536", "host:-1"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


def test_admin_port_defaults_to_the_next_port() -> None:
    state = MockOfdState()
    assert MockOfd("127.0.0.1", 9000, None, state).admin_port_requested == 9001
    assert MockOfd("127.0.0.1", 0, None, state).admin_port_requested == 0
    assert MockOfd("127.0.0.1", 9000, 7000, state).admin_port_requested == 7000


def _start_cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "kktd_mocks.ofd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


async def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    proc = _start_cli("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--db", str(tmp_path / "o.db"))
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20.0)
        assert line.startswith("mock OFD: "), line
        receipts_url, admin_url = line.split()[2].rstrip(","), line.split()[4]
        base = receipts_url.removesuffix("/v1/receipts")
        async with OfdClient(base, 5.0) as client:
            (result,) = await client.send_batch([OfdItem("r1", "k1", ACCEPTED_AT, receipt())])
        assert isinstance(result, OfdAck)
        async with aiohttp.ClientSession() as http:
            async with http.get(admin_url) as response:
                assert (await response.json())["unique"] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(proc.wait), 20.0) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize(
    "args, code",
    [
        (("--listen", "nowhere"), 78),
        (("--listen", "127.0.0.1:70000"), 78),
        (("--listen", "127.0.0.1:0", "--db", "/nonexistent-dir/x/o.db"), 74),
    ],
)
def test_cli_bad_arguments_exit_codes(args: tuple[str, ...], code: int) -> None:
    proc = _start_cli(*args)
    try:
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == code
        assert "kktd mock-ofd:" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_corrupt_store_exits_74(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    db.write_bytes(b"this is not a database" * 100)
    proc = _start_cli("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--db", str(db))
    try:
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 74 and "cannot open the store" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_port_in_use_exits_74() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = _start_cli("--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0")
        try:
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 74 and "cannot listen" in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
