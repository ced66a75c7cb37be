"""kktd receipt (canonical dict, kktd.receipt) -> an ATOL driver v10 JSON task (`sell`, `sellReturn`, `buy`,
`buyReturn`), as pure functions; and the request kktd posts to the driver's web server.

Money goes as rubles with at most two decimals, quantities with at most three, each written as the exact text
of its number (kktd.upstreams.ffd): the driver checks amount = price × quantity to the kopeck. The names are
driver 10's camelCase ones (docs/atol-driver.md has the table); the unit of a quantity goes as its FFD code
(tag 2108), which every driver build that knows FFD 1.2 takes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kktd.receipt import DEFAULT_MEASURE
from kktd.upstreams.ffd import MEASURE_CODES, check_register_limits, encode_json, kopecks_to_rubles, quantity_number

__all__ = [
    "DRIVER_OPERATIONS",
    "INTAKE_CODES",
    "driver_intake_check",
    "FN_STATUS_TASK",
    "Operator",
    "receipt_task",
    "request_body",
    "task_uuid",
]

# Tag 1054.
DRIVER_OPERATIONS: Mapping[str, str] = {
    "sale": "sell",
    "sale_refund": "sellReturn",
    "purchase": "buy",
    "purchase_refund": "buyReturn",
}
# Tag 1055.
TAXATION_TYPES: Mapping[str, str] = {
    "osn": "osn",
    "usn_income": "usnIncome",
    "usn_income_outcome": "usnIncomeOutcome",
    "esn": "esn",
    "patent": "patent",
}
# Tag 1199: the driver's names are kktd's (vat0 … vat122, none).
# Tag 1214.
PAYMENT_METHODS: Mapping[str, str] = {
    "full_prepayment": "fullPrepayment",
    "prepayment": "prepayment",
    "advance": "advance",
    "full_payment": "fullPayment",
    "partial_payment": "partialPayment",
    "credit": "credit",
    "credit_payment": "creditPayment",
}
# Tag 1212: kktd's names are the driver's.
PAYMENT_OBJECTS = frozenset({"commodity", "excise", "job", "service", "payment", "another"})
# payments[].type.
PAYMENT_TYPES: Mapping[str, str] = {
    "cash": "cash",
    "electronic": "electronically",
    "prepaid": "prepaid",
    "credit": "credit",
    "other": "other",
}
# Asked for in the same request, right before the receipt: the FN's last document number then. If the receipt's
# outcome is ever unknown (an error of the link or the FN, not a blocked queue), a larger number now than this one
# is the only evidence that decides whether it was fiscalized.
FN_STATUS_TASK: Mapping[str, str] = {"type": "getFnStatus"}
# The namespace of kktd's task uuids: the uuid of a registration is a function of the receipt and its external id,
# so the same registration, sent again after a lost answer or a crash, is the same task to the driver (409), never
# a second one.
UUID_NAMESPACE = uuid.UUID("6f1d4c1e-5b8a-4f43-9a51-6b6b7464642d")


@dataclass(frozen=True, slots=True)
class Operator:
    """The cashier printed when a receipt names none (tags 1021, 1203): kktd's cashier_name / cashier_inn."""

    name: str | None = None
    inn: str | None = None


def task_uuid(receipt_id: str, external_id: str) -> str:
    """kktd's receipt id (unique to this buffer) with the registration's external id: the same registration
    is the same task; another kktd's receipt under the same idempotency key (a reinstalled till, a second till
    on a shared web server) is another task."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{receipt_id}/{external_id}"))


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "position",
        "name": item["name"],
        "price": kopecks_to_rubles(item["price"]),
        "quantity": quantity_number(item["quantity"]),
        "amount": kopecks_to_rubles(item["sum"]),
        "tax": {"type": item["vat"]},
        "paymentMethod": PAYMENT_METHODS[item["payment_method"]],
        "paymentObject": item["payment_object"] if item["payment_object"] in PAYMENT_OBJECTS else "another",
        "measurementUnit": MEASURE_CODES[item.get("measure", DEFAULT_MEASURE)],
    }


def receipt_task(receipt: Mapping[str, Any], operator: Operator) -> dict[str, Any]:
    """The driver's task for a canonical receipt (amounts as JsonNumber; see request_body)."""
    task: dict[str, Any] = {
        "type": DRIVER_OPERATIONS[receipt["operation"]],
        "taxationType": TAXATION_TYPES[receipt["taxation"]],
        "electronically": False,
        "items": [_item(item) for item in receipt["items"]],
        "payments": [
            {"type": PAYMENT_TYPES[p["type"]], "sum": kopecks_to_rubles(p["amount"])} for p in receipt["payments"]
        ],
        "total": kopecks_to_rubles(receipt["total"]),
    }
    cashier = receipt.get("cashier") or {}
    name = cashier.get("name", operator.name)
    inn = cashier.get("inn", operator.inn if "name" not in cashier else None)
    if name is not None:
        task["operator"] = {"name": name} | ({"vatin": inn} if inn is not None else {})
    contact = receipt.get("customer_contact")
    if contact is not None:
        task["clientInfo"] = {"emailOrPhone": contact}
    return task


def request_body(task_id: str, tasks: list[Mapping[str, Any]]) -> bytes:
    """`POST /api/v2/requests`: the task uuid and the subtasks, run in order on the register."""
    return encode_json({"uuid": task_id, "request": tasks}).encode()


# The codes driver_intake_check refuses with beyond kktd's own (the API reference tabulates them).
INTAKE_CODES = frozenset({"quantity_out_of_range"})


def driver_intake_check(receipt: Mapping[str, Any]) -> None:
    """Refuse at intake (422) what the register is certain to refuse (its limits), while the till can still fix
    the receipt, instead of a dead letter later. ``receipt`` is a validated canonical receipt."""
    check_register_limits(receipt, "the register's limit")
