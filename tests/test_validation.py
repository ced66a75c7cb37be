"""Receipt validation over HTTP: every bad body answers its status and stable code, and stores nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from kktd.api import api_error
from kktd.receipt import ReceiptInvalid, parse_receipt, sample_receipt
from tests.conftest import App

Mutation = Callable[[dict[str, Any]], Any]


def good() -> dict[str, Any]:
    return sample_receipt("valid-key-1")


def with_(path: str, value: Any) -> Mutation:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        target: Any = body
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        target[int(last) if last.isdigit() else last] = value
        return body

    return mutate


def without(path: str) -> Mutation:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        target: Any = body
        parts = path.split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[parts[-1]]
        return body

    return mutate


def replace(value: Any) -> Mutation:
    return lambda body: value


def one_item(price: int, quantity: Any, item_sum: Any = None, pay: int | None = None) -> Mutation:
    def mutate(body: dict[str, Any]) -> dict[str, Any]:
        item = dict(body["items"][0], price=price, quantity=quantity)
        item.pop("sum")
        if item_sum is not None:
            item["sum"] = item_sum
        body["items"] = [item]
        body["payments"] = [{"type": "cash", "amount": pay if pay is not None else 0}]
        return body

    return mutate


ITEM = "items.0"
# (id, mutation, status, code, field)
BAD_BODIES: list[tuple[str, Mutation, int, str, str | None]] = [
    ("array body", replace([1, 2]), 422, "invalid_type", None),
    ("string body", replace("receipt"), 422, "invalid_type", None),
    ("null body", replace(None), 422, "invalid_type", None),
    ("unknown top field", with_("discount", 5), 422, "unknown_field", "discount"),
    ("missing key", without("idempotency_key"), 422, "missing_field", "idempotency_key"),
    ("empty key", with_("idempotency_key", ""), 422, "invalid_idempotency_key", "idempotency_key"),
    ("key too long", with_("idempotency_key", "k" * 65), 422, "invalid_idempotency_key", "idempotency_key"),
    ("key bad chars", with_("idempotency_key", "key with space"), 422, "invalid_idempotency_key", "idempotency_key"),
    ("key cyrillic", with_("idempotency_key", "ключ"), 422, "invalid_idempotency_key", "idempotency_key"),
    ("key number", with_("idempotency_key", 12345), 422, "invalid_type", "idempotency_key"),
    ("missing pos_id", without("pos_id"), 422, "missing_field", "pos_id"),
    ("empty pos_id", with_("pos_id", ""), 422, "invalid_length", "pos_id"),
    ("long pos_id", with_("pos_id", "P" * 33), 422, "invalid_length", "pos_id"),
    ("pos_id number", with_("pos_id", 7), 422, "invalid_type", "pos_id"),
    ("missing operation", without("operation"), 422, "missing_field", "operation"),
    ("bad operation", with_("operation", "gift"), 422, "invalid_value", "operation"),
    ("bad taxation", with_("taxation", "none"), 422, "invalid_value", "taxation"),
    ("taxation list", with_("taxation", ["osn"]), 422, "invalid_type", "taxation"),
    ("missing items", without("items"), 422, "missing_field", "items"),
    ("items empty", with_("items", []), 422, "invalid_count", "items"),
    ("items object", with_("items", {"name": "x"}), 422, "invalid_type", "items"),
    ("too many items", lambda b: dict(b, items=[b["items"][1]] * 101), 422, "invalid_count", "items"),
    ("item not object", with_("items.0", "milk"), 422, "invalid_type", "items[0]"),
    ("item unknown field", with_(f"{ITEM}.barcode", "4600000000000"), 422, "unknown_field", "items[0].barcode"),
    ("item missing name", without(f"{ITEM}.name"), 422, "missing_field", "items[0].name"),
    ("item empty name", with_(f"{ITEM}.name", ""), 422, "invalid_length", "items[0].name"),
    ("item blank name", with_(f"{ITEM}.name", "   "), 422, "invalid_length", "items[0].name"),
    ("item long name", with_(f"{ITEM}.name", "Я" * 129), 422, "invalid_length", "items[0].name"),
    ("item name control char", with_(f"{ITEM}.name", "milk\nbread"), 422, "invalid_value", "items[0].name"),
    ("item name lone surrogate", with_(f"{ITEM}.name", "milk\ud800"), 422, "invalid_value", "items[0].name"),
    ("pos_id lone surrogate", with_("pos_id", "POS-\udfff"), 422, "invalid_value", "pos_id"),
    ("price float", with_(f"{ITEM}.price", 89.9), 422, "invalid_type", "items[0].price"),
    ("price integral float", with_(f"{ITEM}.price", 8990.0), 422, "invalid_type", "items[0].price"),
    ("price string", with_(f"{ITEM}.price", "8990"), 422, "invalid_type", "items[0].price"),
    ("price bool", with_(f"{ITEM}.price", True), 422, "invalid_type", "items[0].price"),
    ("price negative", with_(f"{ITEM}.price", -1), 422, "amount_out_of_range", "items[0].price"),
    ("price too big", with_(f"{ITEM}.price", 10**12), 422, "amount_out_of_range", "items[0].price"),
    ("missing price", without(f"{ITEM}.price"), 422, "missing_field", "items[0].price"),
    ("missing quantity", without(f"{ITEM}.quantity"), 422, "missing_field", "items[0].quantity"),
    ("quantity float", with_(f"{ITEM}.quantity", 2.5), 422, "invalid_type", "items[0].quantity"),
    ("quantity 4 places", with_(f"{ITEM}.quantity", "1.0005"), 422, "invalid_quantity", "items[0].quantity"),
    ("quantity zero", with_(f"{ITEM}.quantity", "0.000"), 422, "invalid_quantity", "items[0].quantity"),
    ("quantity negative", with_(f"{ITEM}.quantity", "-1"), 422, "invalid_quantity", "items[0].quantity"),
    ("quantity text", with_(f"{ITEM}.quantity", "two"), 422, "invalid_quantity", "items[0].quantity"),
    ("quantity exponent", with_(f"{ITEM}.quantity", "1e3"), 422, "invalid_quantity", "items[0].quantity"),
    ("item sum mismatch", with_(f"{ITEM}.sum", 17981), 422, "item_sum_mismatch", "items[0].sum"),
    ("item sum float", with_(f"{ITEM}.sum", 17980.0), 422, "invalid_type", "items[0].sum"),
    ("rounding down is wrong", one_item(333, "0.5", item_sum=166), 422, "item_sum_mismatch", "items[0].sum"),
    ("item sum over limit", one_item(10**12 - 1, "2", pay=0), 422, "amount_out_of_range", "items[0].sum"),
    (
        "total over limit",
        lambda b: one_item(6 * 10**11, "1")(b) and dict(b, items=[b["items"][0], b["items"][0]]),
        422,
        "amount_out_of_range",
        "items",
    ),
    ("bad vat", with_(f"{ITEM}.vat", "vat18"), 422, "invalid_value", "items[0].vat"),
    ("bad payment method", with_(f"{ITEM}.payment_method", "barter"), 422, "invalid_value", "items[0].payment_method"),
    ("bad payment object", with_(f"{ITEM}.payment_object", "goods"), 422, "invalid_value", "items[0].payment_object"),
    ("missing payments", without("payments"), 422, "missing_field", "payments"),
    ("payments empty", with_("payments", []), 422, "invalid_count", "payments"),
    ("too many payments", with_("payments", [{"type": "cash", "amount": 0}] * 11), 422, "invalid_count", "payments"),
    ("payment unknown field", with_("payments.0.currency", "RUB"), 422, "unknown_field", "payments[0].currency"),
    ("payment bad type", with_("payments.0.type", "crypto"), 422, "invalid_value", "payments[0].type"),
    ("payment amount string", with_("payments.0.amount", "24430"), 422, "invalid_type", "payments[0].amount"),
    ("payment amount negative", with_("payments.0.amount", -24430), 422, "amount_out_of_range", "payments[0].amount"),
    ("payments short", with_("payments.0.amount", 24429), 422, "payment_total_mismatch", "payments"),
    (
        "payments over",
        with_("payments", [{"type": "cash", "amount": 24430}, {"type": "electronic", "amount": 1}]),
        422,
        "payment_total_mismatch",
        "payments",
    ),
    ("contact not email or phone", with_("customer_contact", "call me"), 422, "invalid_contact", "customer_contact"),
    ("contact foreign phone", with_("customer_contact", "+19991234567"), 422, "invalid_contact", "customer_contact"),
    ("contact number", with_("customer_contact", 79991234567), 422, "invalid_type", "customer_contact"),
    (
        "contact lone surrogate",
        with_("customer_contact", "a\ud800@example.ru"),
        422,
        "invalid_contact",
        "customer_contact",
    ),
    ("cashier string", with_("cashier", "Иванова"), 422, "invalid_type", "cashier"),
    (
        "cashier unknown field",
        with_("cashier", {"name": "Иванова", "role": "senior"}),
        422,
        "unknown_field",
        "cashier.role",
    ),
    ("cashier inn short", with_("cashier", {"inn": "12345"}), 422, "invalid_inn", "cashier.inn"),
    ("cashier inn number", with_("cashier", {"inn": 123456789012}), 422, "invalid_type", "cashier.inn"),
]


async def post_raw(app: App, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    response = await app.client.post(
        "/v1/kkt/receipt", data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    return response.status, await response.json()


def test_table_is_large_enough() -> None:
    assert len(BAD_BODIES) >= 40


@pytest.mark.parametrize(("name", "mutate", "status", "code", "field"), BAD_BODIES, ids=[row[0] for row in BAD_BODIES])
async def test_bad_body_is_rejected_and_not_stored(
    app: App, name: str, mutate: Mutation, status: int, code: str, field: str | None
) -> None:
    body = mutate(copy.deepcopy(good()))
    # ASCII-escaped JSON, so that a lone surrogate travels as the "\ud800" escape a client would send.
    got_status, answer = await post_raw(app, json.dumps(body).encode())
    assert (got_status, answer["error"]["code"]) == (status, code), answer
    assert answer["error"].get("field") == field
    assert answer["error"]["message"]
    assert await app.row_count() == 0
    assert app.store.counts.pending == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"", {}, 400, "invalid_json"),
        (b"\xff\xfe{}", {}, 400, "invalid_encoding"),  # a UTF-16 byte order mark: only UTF-8 JSON is taken
        (b'{"a": 1', {}, 400, "invalid_json"),
        (json.dumps(good()).encode(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (
            json.dumps(good()).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (b"{" + b" " * (64 * 1024 + 10) + b"}", {}, 413, "body_too_large"),
        (json.dumps(good()).encode(), {"Idempotency-Key": "other-key"}, 422, "idempotency_key_mismatch"),
    ],
)
async def test_malformed_requests(app: App, body: bytes, headers: dict[str, str], status: int, code: str) -> None:
    got_status, answer = await post_raw(app, body, headers)
    assert (got_status, answer["error"]["code"]) == (status, code)
    assert await app.row_count() == 0


async def test_chunked_body_over_limit_is_413(app: App) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(80):
            yield b" " * 1024

    response = await app.client.post("/v1/kkt/receipt", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "body_too_large"


async def test_daemon_keeps_serving_after_bad_input(app: App) -> None:
    for _name, mutate, *_ in BAD_BODIES[:10]:
        await post_raw(app, json.dumps(mutate(copy.deepcopy(good()))).encode())
    status, answer = await post_raw(app, json.dumps(good()).encode())
    assert status == 201, answer


async def test_unknown_route_and_method_are_json_errors(app: App) -> None:
    response = await app.client.get("/v1/kkt/nothing")
    assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"
    response = await app.client.delete("/v1/kkt/receipt")
    assert response.status == 405 and (await response.json())["error"]["code"] == "method_not_allowed"


# ---- valid receipts: normalization and arithmetic ----


def test_sum_is_computed_half_up_when_omitted() -> None:
    body = one_item(333, "0.5", pay=167)(good())  # 166.5 kopecks rounds half-up to 167
    receipt = parse_receipt(json.dumps(body).encode(), None)
    assert receipt.total == 167
    assert receipt.canonical["items"][0] == dict(receipt.canonical["items"][0], sum=167, quantity="0.500")


def test_quantity_integer_and_header_key_are_accepted() -> None:
    body = good()
    del body["idempotency_key"]
    body["items"][1]["quantity"] = 1
    receipt = parse_receipt(json.dumps(body).encode(), "header-key")
    assert receipt.idempotency_key == "header-key"
    assert receipt.canonical["items"][1]["quantity"] == "1.000"


def test_same_receipt_with_key_in_header_or_body_hashes_the_same() -> None:
    body = good()
    in_body = parse_receipt(json.dumps(body).encode(), None)
    del body["idempotency_key"]
    in_header = parse_receipt(json.dumps(body).encode(), "valid-key-1")
    assert in_body.body_hash == in_header.body_hash


def test_optional_fields_and_zero_amounts() -> None:
    body = one_item(0, "1", pay=0)(good())
    body["customer_contact"] = "buyer@example.ru"
    body["cashier"] = {"name": "Иванова А.", "inn": "123456789012"}
    receipt = parse_receipt(json.dumps(body, ensure_ascii=False).encode(), None)
    assert receipt.total == 0
    assert receipt.canonical["cashier"]["inn"] == "123456789012"
    body["customer_contact"] = "+79991234567"
    assert parse_receipt(json.dumps(body).encode(), None).canonical["customer_contact"] == "+79991234567"


def test_api_error_shape() -> None:
    with pytest.raises(ReceiptInvalid) as caught:
        parse_receipt(b'{"idempotency_key": "k"}', None)
    assert api_error(caught.value).body() == {
        "error": {"code": "missing_field", "message": "items is required", "field": "items"}
    }
