"""The kktd receipt -> ATOL Online v5 mapping, over every valid receipt hypothesis can think of.

The reference for what ATOL accepts is the mock's validator (kktd_mocks.atol), written from the specification
independently of the mapping: every receipt kktd accepts for ATOL must pass it, and read back exactly.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kktd import receipt as receipt_module
from kktd.receipt import ReceiptInvalid, validate_receipt
from kktd.upstreams.atol_v5_mapping import (
    ATOL_OPERATIONS,
    MAX_ITEM_KOPECKS,
    MAX_QUANTITY_MILLI,
    MAX_TOTAL_KOPECKS,
    MEASURE_CODES,
    PAYMENT_OBJECT_CODES,
    PAYMENT_TYPE_CODES,
    SNO_VALUES,
    VAT_TYPES,
    Company,
    atol_intake_check,
    atol_timestamp,
    encode_json,
    kopecks_to_rubles,
    quantity_number,
    registration_body,
)
from kktd_mocks import atol as mock
from tests.receipt_strategies import receipts

COMPANY = Company("5544332219", "shop@example.ru", "https://shop.example.ru")
MSK = timezone(timedelta(hours=3))
ACCEPTED_MS = 1_764_579_600_123  # 01.12.2025 12:00:00.123 in Moscow
# A JSON number as the mapping writes it: no exponent, no sign, no trailing zero after the point.
NUMBER_TOKEN_RE = re.compile(r"(?<=[:\[,])(-?[0-9][0-9.eE+-]*)(?=[,\]}])")
CANONICAL_NUMBER_RE = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


def atol_receipts() -> st.SearchStrategy[dict[str, Any]]:
    """Valid receipts within ATOL Online's limits, each with the buyer's contact ATOL requires."""
    return receipts(MAX_QUANTITY_MILLI, MAX_ITEM_KOPECKS, MAX_TOTAL_KOPECKS, contact_required=True)


def _decimal_json(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def _as_decimal(value: Any) -> Decimal:
    assert not isinstance(value, bool) and isinstance(value, (int, Decimal)), value
    return Decimal(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(atol_receipts())
def test_every_valid_receipt_maps_to_an_exact_body_atol_accepts(raw: dict[str, Any]) -> None:
    receipt = validate_receipt(raw)
    canonical = receipt.canonical
    atol_intake_check(canonical)  # within ATOL's limits by construction: must not refuse

    text = registration_body(canonical, receipt.idempotency_key, ACCEPTED_MS, COMPANY, MSK)
    body = _decimal_json(text)

    # The specification's own rules, as the mock enforces them: the body is accepted as it is.
    mock.validate_registration(_decimal_json(text))

    atol = body["receipt"]
    assert body["external_id"] == receipt.idempotency_key
    cents = Decimal(100)
    for item, sent in zip(canonical["items"], atol["items"], strict=True):
        assert _as_decimal(sent["price"]) == Decimal(item["price"]) / cents
        assert _as_decimal(sent["sum"]) == Decimal(item["sum"]) / cents
        assert _as_decimal(sent["quantity"]) == Decimal(item["quantity"])
        assert sent["measure"] == MEASURE_CODES[item.get("measure", "piece")]
        assert sent["payment_object"] == PAYMENT_OBJECT_CODES[item["payment_object"]]
        assert sent["vat"] == {"type": item["vat"]}
        assert sent["payment_method"] == item["payment_method"]
        assert sent["name"] == item["name"]
    for payment, sent in zip(canonical["payments"], atol["payments"], strict=True):
        assert _as_decimal(sent["sum"]) == Decimal(payment["amount"]) / cents
        assert sent["type"] == PAYMENT_TYPE_CODES[payment["type"]]
    total = _as_decimal(atol["total"])
    assert total == Decimal(canonical["total"]) / cents
    assert sum(_as_decimal(i["sum"]) for i in atol["items"]) == total
    assert sum(_as_decimal(p["sum"]) for p in atol["payments"]) == total
    assert atol["company"] == {
        "email": COMPANY.email,
        "sno": canonical["taxation"],
        "inn": COMPANY.inn,
        "payment_address": COMPANY.payment_address,
    }
    contact = canonical["customer_contact"]
    assert atol["client"] == ({"phone": contact} if contact.startswith("+") else {"email": contact})
    cashier = canonical.get("cashier", {})
    assert atol.get("cashier") == cashier.get("name")
    assert atol.get("cashier_inn") == cashier.get("inn")

    # No float artefact anywhere in the text: every number is the shortest plain decimal.
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # numbers only outside strings
    numbers = NUMBER_TOKEN_RE.findall(stripped)
    assert numbers
    for token in numbers:
        assert CANONICAL_NUMBER_RE.fullmatch(token), token


@given(st.integers(0, 10**12))
def test_kopecks_to_rubles_is_exact_and_shortest(kopecks: int) -> None:
    text = kopecks_to_rubles(kopecks)
    assert Decimal(text) == Decimal(kopecks) / 100
    assert CANONICAL_NUMBER_RE.fullmatch(text)
    assert len(text.partition(".")[2]) <= 2


@pytest.mark.parametrize(
    ("kopecks", "text"),
    [
        (24430, "244.3"),
        (24400, "244"),
        (5, "0.05"),
        (0, "0"),
        (1, "0.01"),
        (10, "0.1"),
        (4_294_967_295, "42949672.95"),
        (9_999_999_999, "99999999.99"),
    ],
)
def test_kopecks_to_rubles_examples(kopecks: int, text: str) -> None:
    assert kopecks_to_rubles(kopecks) == text


@pytest.mark.parametrize("bad", [-1, 1.5, True, "100"])
def test_kopecks_to_rubles_refuses_what_is_not_kopecks(bad: Any) -> None:
    with pytest.raises(ValueError):
        kopecks_to_rubles(bad)


@pytest.mark.parametrize(
    ("quantity", "text"),
    [
        ("1.000", "1"),
        ("2.500", "2.5"),
        ("0.001", "0.001"),
        ("99999.999", "99999.999"),
        ("10.250", "10.25"),
    ],
)
def test_quantity_numbers(quantity: str, text: str) -> None:
    assert quantity_number(quantity) == text


def test_encode_json_never_writes_a_float() -> None:
    with pytest.raises(TypeError):
        encode_json({"price": 0.1})
    assert encode_json({"a": [kopecks_to_rubles(10), 'x"y', None, True, 3]}) == '{"a":[0.1,"x\\"y",null,true,3]}'


def test_every_enum_value_is_mapped_to_what_atol_knows() -> None:
    assert set(ATOL_OPERATIONS) == receipt_module.OPERATIONS
    assert set(ATOL_OPERATIONS.values()) <= mock.SELL_OPERATIONS
    assert set(SNO_VALUES) == receipt_module.TAXATIONS
    assert set(SNO_VALUES.values()) <= mock.SNO
    assert set(VAT_TYPES) == receipt_module.VAT_RATES
    assert set(VAT_TYPES.values()) <= mock.VAT_TYPES
    assert set(PAYMENT_OBJECT_CODES) == receipt_module.PAYMENT_OBJECTS
    assert set(PAYMENT_OBJECT_CODES.values()) <= mock.PAYMENT_OBJECTS
    assert set(PAYMENT_TYPE_CODES) == receipt_module.PAYMENT_TYPES
    assert set(PAYMENT_TYPE_CODES.values()) <= mock.PAYMENT_TYPES
    assert set(MEASURE_CODES) == receipt_module.MEASURES
    assert set(MEASURE_CODES.values()) == mock.MEASURES
    assert receipt_module.PAYMENT_METHODS <= mock.PAYMENT_METHODS


def test_the_v5_integers_are_the_specifications() -> None:
    assert PAYMENT_OBJECT_CODES == {"commodity": 1, "excise": 2, "job": 3, "service": 4, "payment": 10, "another": 13}
    assert PAYMENT_TYPE_CODES == {"cash": 0, "electronic": 1, "prepaid": 2, "credit": 3, "other": 4}
    assert (MEASURE_CODES["piece"], MEASURE_CODES["kilogram"], MEASURE_CODES["liter"], MEASURE_CODES["other"]) == (
        0,
        11,
        41,
        255,
    )
    assert ATOL_OPERATIONS == {
        "sale": "sell",
        "sale_refund": "sell_refund",
        "purchase": "buy",
        "purchase_refund": "buy_refund",
    }


def test_timestamp_is_the_acceptance_time_in_local_time() -> None:
    assert atol_timestamp(ACCEPTED_MS, MSK) == "01.12.2025 12:00:00"
    assert atol_timestamp(ACCEPTED_MS, UTC) == "01.12.2025 09:00:00"
    assert re.fullmatch(r"\d\d\.\d\d\.\d{4} \d\d:\d\d:\d\d", atol_timestamp(ACCEPTED_MS))


def _sample(**changes: Any) -> dict[str, Any]:
    body = receipt_module.sample_receipt("key-1")
    body["customer_contact"] = "buyer@example.ru"
    body.update(changes)
    return body


def _intake_error(body: dict[str, Any]) -> ReceiptInvalid:
    with pytest.raises(ReceiptInvalid) as caught:
        atol_intake_check(validate_receipt(body).canonical)
    return caught.value


def test_intake_requires_a_customer_contact() -> None:
    body = _sample()
    del body["customer_contact"]
    error = _intake_error(body)
    assert (error.code, error.field) == ("customer_contact_required", "customer_contact")


@given(st.integers(MAX_ITEM_KOPECKS + 1, receipt_module.MAX_AMOUNT - 1))
def test_intake_refuses_an_item_beyond_atols_price_limit(price: int) -> None:
    body = _sample(
        items=[
            {
                "name": "x",
                "price": price,
                "quantity": "1",
                "vat": "none",
                "payment_method": "full_payment",
                "payment_object": "service",
            }
        ],
        payments=[{"type": "cash", "amount": price}],
    )
    error = _intake_error(body)
    assert (error.code, error.field) == ("amount_out_of_range", "items[0].price")


def test_intake_refuses_an_item_sum_beyond_the_limit_even_with_a_price_within() -> None:
    price = 100_000_000  # 1,000,000 rubles x 5000 = beyond 42,949,672.95
    body = _sample(
        items=[
            {
                "name": "x",
                "price": price,
                "quantity": "5000",
                "vat": "none",
                "payment_method": "full_payment",
                "payment_object": "service",
            }
        ],
        payments=[{"type": "cash", "amount": price * 5000}],
    )
    error = _intake_error(body)
    assert (error.code, error.field) == ("amount_out_of_range", "items[0].sum")


def test_intake_refuses_a_total_beyond_eight_digits_of_rubles() -> None:
    item = {
        "name": "x",
        "price": MAX_ITEM_KOPECKS,
        "quantity": "1",
        "vat": "none",
        "payment_method": "full_payment",
        "payment_object": "service",
    }
    body = _sample(items=[item] * 3, payments=[{"type": "cash", "amount": 3 * MAX_ITEM_KOPECKS}])
    error = _intake_error(body)
    assert (error.code, error.field) == ("amount_out_of_range", "items")


@given(st.integers(MAX_QUANTITY_MILLI + 1, 999_999_999_999))
def test_intake_refuses_a_quantity_beyond_atols_limit(milli: int) -> None:
    body = _sample(
        items=[
            {
                "name": "x",
                "price": 0,
                "quantity": f"{milli // 1000}.{milli % 1000:03d}",
                "vat": "none",
                "payment_method": "full_payment",
                "payment_object": "service",
            }
        ],
        payments=[{"type": "cash", "amount": 0}],
    )
    error = _intake_error(body)
    assert (error.code, error.field) == ("quantity_out_of_range", "items[0].quantity")


def test_measure_is_validated_and_piece_is_the_default() -> None:
    body = _sample()
    body["items"][0]["measure"] = "kilogram"
    body["items"][1]["measure"] = "piece"
    canonical = validate_receipt(body).canonical
    assert canonical["items"][0]["measure"] == "kilogram"
    assert "measure" not in canonical["items"][1]  # the default is left out: old receipts hash the same
    sent = json.loads(registration_body(canonical, "key-1", ACCEPTED_MS, COMPANY, MSK))["receipt"]["items"]
    assert [i["measure"] for i in sent] == [11, 0]
    body["items"][0]["measure"] = "furlong"
    with pytest.raises(ReceiptInvalid) as caught:
        validate_receipt(body)
    assert (caught.value.code, caught.value.field) == ("invalid_value", "items[0].measure")
    body["items"][0]["measure"] = 11
    with pytest.raises(ReceiptInvalid) as caught:
        validate_receipt(body)
    assert (caught.value.code, caught.value.field) == ("invalid_type", "items[0].measure")


def test_an_explicit_piece_hashes_like_no_measure() -> None:
    plain = _sample()
    explicit = _sample()
    for item in explicit["items"]:
        item["measure"] = "piece"
    assert validate_receipt(plain).body_hash == validate_receipt(explicit).body_hash


def test_a_stored_receipt_without_contact_is_sent_with_the_specifications_none() -> None:
    body = receipt_module.sample_receipt("legacy-1")  # as accepted before kktd fiscalized through ATOL
    canonical = validate_receipt(body).canonical
    text = registration_body(canonical, "legacy-1", ACCEPTED_MS, COMPANY, MSK)
    assert json.loads(text)["receipt"]["client"] == {"email": "none"}
    mock.validate_registration(_decimal_json(text))


def test_the_sample_receipt_maps_to_the_documented_body() -> None:
    canonical = validate_receipt(_sample(cashier={"name": "Иванова А.", "inn": "500100732259"})).canonical
    text = registration_body(canonical, "key-1", ACCEPTED_MS, COMPANY, MSK)
    assert text == (
        '{"timestamp":"01.12.2025 12:00:00","external_id":"key-1","receipt":{'
        '"client":{"email":"buyer@example.ru"},'
        '"company":{"email":"shop@example.ru","sno":"usn_income","inn":"5544332219",'
        '"payment_address":"https://shop.example.ru"},'
        '"items":[{"name":"Молоко 3,2% 1 л","price":89.9,"quantity":2,"measure":0,"sum":179.8,'
        '"payment_method":"full_payment","payment_object":1,"vat":{"type":"vat10"}},'
        '{"name":"Хлеб бородинский","price":64.5,"quantity":1,"measure":0,"sum":64.5,'
        '"payment_method":"full_payment","payment_object":1,"vat":{"type":"vat10"}}],'
        '"payments":[{"type":1,"sum":244.3}],"total":244.3,'
        '"cashier":"Иванова А.","cashier_inn":"500100732259"}}'
    )
