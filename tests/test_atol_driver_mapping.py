"""kktd receipt -> ATOL driver v10 task: every receipt kktd stores for this upstream maps to a task the mock
register's validator accepts, with every amount exact to the kopeck; the error-code table classifies each code
once; the request carries the FN status first and the uuid derived from the external id."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given

from kktd import receipt as receipt_module
from kktd.receipt import ReceiptInvalid, validate_receipt
from kktd.upstreams import atol_driver
from kktd.upstreams.atol_driver_mapping import (
    FN_STATUS_TASK,
    Operator,
    driver_intake_check,
    receipt_task,
    request_body,
    task_uuid,
)
from kktd_mocks.atol_driver import Refusal
from kktd_mocks.atol_driver import validate_receipt as register_accepts
from tests.fuzzing import fuzz_settings
from tests.receipt_strategies import receipts

# kktd's whole range (amounts up to 10**9 kopecks an item, quantities up to 100,000): the intake check decides
# what the register gets.
stored_receipts = receipts(max_quantity_milli=10**8, max_item_kopecks=10**9, max_items=10)


def _decimal(value: Any) -> Decimal:
    assert isinstance(value, (int, Decimal)) and not isinstance(value, bool), value
    return Decimal(value)


@fuzz_settings(300)
@given(stored_receipts)
def test_every_stored_receipt_maps_to_a_task_the_register_accepts_exact_to_the_kopeck(raw: dict[str, Any]) -> None:
    try:
        stored = validate_receipt(raw).canonical
        driver_intake_check(stored)
    except ReceiptInvalid:
        return  # refused at intake: never stored for this upstream
    body = request_body(
        task_uuid("0" * 32, raw["idempotency_key"]), [FN_STATUS_TASK, receipt_task(stored, Operator("Иванова"))]
    )
    request = json.loads(body, parse_float=Decimal)
    assert request["request"][0] == {"type": "getFnStatus"}
    task = request["request"][1]
    try:
        register_accepts(task)
    except Refusal as refusal:
        raise AssertionError(f"the register refuses a stored receipt: {refusal.code} {refusal.detail}") from None
    kopecks = Decimal("0.01")
    for item, mapped in zip(stored["items"], task["items"], strict=True):
        assert _decimal(mapped["price"]) / kopecks == item["price"]
        assert _decimal(mapped["amount"]) / kopecks == item["sum"]
        assert (_decimal(mapped["price"]) * _decimal(mapped["quantity"])).quantize(
            kopecks, "ROUND_HALF_UP"
        ) == _decimal(mapped["amount"])
    assert (
        sum(_decimal(i["amount"]) for i in task["items"]) == _decimal(task["total"]) == Decimal(stored["total"]) / 100
    )
    assert sum(_decimal(p["sum"]) for p in task["payments"]) == _decimal(task["total"])


def test_the_sample_receipt_as_the_register_gets_it() -> None:
    raw = receipt_module.sample_receipt("till7-0001") | {"customer_contact": "buyer@example.ru"}
    stored = validate_receipt(raw).canonical
    task = receipt_task(stored, Operator("Иванова", "500100732259"))
    assert task == {
        "type": "sell",
        "taxationType": "usnIncome",
        "electronically": False,
        "items": [
            {
                "type": "position",
                "name": "Молоко 3,2% 1 л",
                "price": "89.9",
                "quantity": "2",
                "amount": "179.8",
                "tax": {"type": "vat10"},
                "paymentMethod": "fullPayment",
                "paymentObject": "commodity",
                "measurementUnit": 0,
            },
            {
                "type": "position",
                "name": "Хлеб бородинский",
                "price": "64.5",
                "quantity": "1",
                "amount": "64.5",
                "tax": {"type": "vat10"},
                "paymentMethod": "fullPayment",
                "paymentObject": "commodity",
                "measurementUnit": 0,
            },
        ],
        "payments": [{"type": "electronically", "sum": "244.3"}],
        "total": "244.3",
        "operator": {"name": "Иванова", "vatin": "500100732259"},
        "clientInfo": {"emailOrPhone": "buyer@example.ru"},
    }


def test_a_receipts_own_cashier_replaces_the_default_operator_whole() -> None:
    stored = validate_receipt(receipt_module.sample_receipt("k1") | {"cashier": {"name": "Петров"}}).canonical
    assert receipt_task(stored, Operator("Иванова", "500100732259"))["operator"] == {"name": "Петров"}
    assert "operator" not in receipt_task(validate_receipt(receipt_module.sample_receipt("k2")).canonical, Operator())


def test_the_uuid_is_a_function_of_the_receipt_and_its_external_id() -> None:
    receipt_id = "01a25042c5aab59e7763a6671392677b"
    assert task_uuid(receipt_id, "till7-0001") == task_uuid(receipt_id, "till7-0001")
    assert task_uuid(receipt_id, "till7-0001") != task_uuid(receipt_id, "till7-0001~1")
    # Another kktd's receipt under the same key (a reinstalled till, a second till on one web server).
    assert task_uuid(receipt_id, "till7-0001") != task_uuid("01a25042c5aab59e7763a6671392677c", "till7-0001")


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"price": 4_294_967_296, "quantity": "1.000"}, "amount_out_of_range", "items[0].price"),
        ({"price": 1, "quantity": "100000.000"}, "quantity_out_of_range", "items[0].quantity"),
    ],
)
def test_intake_refuses_what_the_register_cannot_take(change: dict[str, Any], code: str, field: str) -> None:
    raw = receipt_module.sample_receipt("big")
    raw["items"] = [{key: value for key, value in (raw["items"][0] | change).items() if key != "sum"}]
    item = raw["items"][0]
    total = (item["price"] * int(item["quantity"].replace(".", "")) + 500) // 1000
    raw["payments"] = [{"type": "cash", "amount": total}]
    stored = validate_receipt(raw).canonical
    with pytest.raises(ReceiptInvalid) as refused:
        driver_intake_check(stored)
    assert (refused.value.code, refused.value.field) == (code, field)


def test_every_driver_code_has_one_class() -> None:
    classes = [
        atol_driver.SHIFT_EXPIRED_CODES,
        atol_driver.SHIFT_CLOSED_CODES,
        atol_driver.PAPER_CODES,
        atol_driver.COVER_CODES,
        atol_driver.PRINTER_CODES,
        atol_driver.BUSY_CODES,
        atol_driver.NEVER_RAN_CODES,
        atol_driver.FN_BLOCKED_CODES,
        atol_driver.UNKNOWN_OUTCOME_CODES,
    ]
    seen: set[int] = set()
    for codes in classes:
        assert not seen & codes, seen & codes
        seen |= codes
    # The content refusals of the facts sheet fall in none of the retry classes: they are dead letters.
    assert not seen & {501, 16, 17, 52, 63, 66, 110, 143, 144, 145, 216, 217, 227, 503}
