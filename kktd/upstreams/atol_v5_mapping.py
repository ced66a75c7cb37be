"""kktd receipt (canonical dict, kktd.receipt) -> ATOL Online v5 registration body, as pure functions.

Money: kktd stores integer kopecks; ATOL wants rubles as JSON numbers with at most two decimals. A binary float
cannot hold most kopeck amounts exactly, so no amount ever passes through one: rubles are formatted from the
integer (24430 -> ``244.3``) and the JSON text is written here, by a small encoder that knows these numbers.

What ATOL is certain to refuse (limits of its schema, a receipt without a customer contact) is found by
:func:`atol_intake_check` while the till can still fix the receipt, instead of a day later as a dead letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from kktd.receipt import DEFAULT_MEASURE, ReceiptInvalid
from kktd.upstreams.ffd import (
    MAX_ITEM_KOPECKS,
    MAX_QUANTITY_MILLI,
    MAX_TOTAL_KOPECKS,
    MEASURE_CODES,
    JsonNumber,
    check_register_limits,
    encode_json,
    kopecks_to_rubles,
    quantity_number,
)

__all__ = [
    "ATOL_OPERATIONS",
    "MAX_ITEM_KOPECKS",
    "MAX_QUANTITY_MILLI",
    "MAX_TOTAL_KOPECKS",
    "MEASURE_CODES",
    "PAYMENT_OBJECT_CODES",
    "PAYMENT_TYPE_CODES",
    "SNO_VALUES",
    "VAT_TYPES",
    "Company",
    "JsonNumber",
    "atol_intake_check",
    "atol_timestamp",
    "encode_json",
    "kopecks_to_rubles",
    "quantity_number",
    "registration_body",
    "registration_document",
]

# kktd operation (tag 1054) -> the path segment of ATOL's registration method.
ATOL_OPERATIONS: Mapping[str, str] = {
    "sale": "sell",
    "sale_refund": "sell_refund",
    "purchase": "buy",
    "purchase_refund": "buy_refund",
}
# Tag 1055: kktd's taxation names are ATOL's sno values (ATOL also knows "envd", which kktd does not offer).
SNO_VALUES: Mapping[str, str] = {name: name for name in ("osn", "usn_income", "usn_income_outcome", "esn", "patent")}
# Tag 1199. The 2024 specification lists none, vat0, vat10, vat110, vat20, vat120; the rates of 2025-2026
# (5 %, 7 %, 22 % and their calculated forms) keep the same naming scheme and are passed through as such.
VAT_TYPES: Mapping[str, str] = {
    name: name
    for name in (
        "none",
        "vat0",
        "vat5",
        "vat7",
        "vat10",
        "vat20",
        "vat22",
        "vat105",
        "vat107",
        "vat110",
        "vat120",
        "vat122",
    )
}
# Tag 1212: an integer in v5 (v4 used strings).
PAYMENT_OBJECT_CODES: Mapping[str, int] = {
    "commodity": 1,
    "excise": 2,
    "job": 3,
    "service": 4,
    "payment": 10,
    "another": 13,
}
# payments[].type: 0 cash, 1 cashless, 2 prepayment offset, 3 credit (postpayment), 4 other (counter-provision).
PAYMENT_TYPE_CODES: Mapping[str, int] = {"cash": 0, "electronic": 1, "prepaid": 2, "credit": 3, "other": 4}
TIMESTAMP_FORMAT = "%d.%m.%Y %H:%M:%S"


@dataclass(frozen=True, slots=True)
class Company:
    """The seller's details ATOL requires on every receipt (tags 1117, 1018, 1187), and the cashier printed when
    a receipt names none (tags 1021, 1203)."""

    inn: str
    email: str
    payment_address: str
    cashier_name: str | None = None
    cashier_inn: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {
            "company_inn": self.inn,
            "company_email": self.email,
            "company_payment_address": self.payment_address,
            "cashier_name": self.cashier_name,
            "cashier_inn": self.cashier_inn,
        }


def atol_timestamp(accepted_ms: int, tz: tzinfo | None = None) -> str:
    """When kktd accepted the receipt, as ATOL's ``dd.mm.yyyy HH:MM:SS`` in the terminal's local time (``tz``
    None) or in ``tz``."""
    moment = datetime.fromtimestamp(accepted_ms / 1000, tz=tz)
    return moment.strftime(TIMESTAMP_FORMAT)


# The codes atol_intake_check refuses with beyond kktd's own (the API reference tabulates them).
INTAKE_CODES = frozenset({"customer_contact_required", "quantity_out_of_range"})


def atol_intake_check(receipt: Mapping[str, Any]) -> None:
    """Refuse at intake what ATOL is certain to refuse, with a stable code the till can act on.

    ``receipt`` is a validated canonical receipt (kktd.receipt). Raises ReceiptInvalid (a 422).
    """
    contact = receipt.get("customer_contact")
    if not isinstance(contact, str) or not contact:
        raise ReceiptInvalid(
            "customer_contact_required",
            "customer_contact (the buyer's e-mail or phone) is required when kktd fiscalizes through ATOL Online",
            "customer_contact",
        )
    check_register_limits(receipt, "ATOL Online's limit")


def _client(contact: str | None) -> dict[str, Any]:
    if contact is None:
        # Only a receipt stored before kktd fiscalized through ATOL can lack a contact (intake requires one
        # now). The specification allows the value "none": the KKT may still take it, and if it does not, ATOL's
        # refusal reaches the dead letters with its own code, instead of kktd guessing.
        return {"email": "none"}
    # kktd.receipt accepts an e-mail address or a +7 phone number, nothing else.
    return {"phone": contact} if contact.startswith("+") else {"email": contact}


def _item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": item["name"],
        "price": kopecks_to_rubles(item["price"]),
        "quantity": quantity_number(item["quantity"]),
        "measure": MEASURE_CODES[item.get("measure", DEFAULT_MEASURE)],
        "sum": kopecks_to_rubles(item["sum"]),
        "payment_method": item["payment_method"],
        "payment_object": PAYMENT_OBJECT_CODES[item["payment_object"]],
        "vat": {"type": VAT_TYPES[item["vat"]]},
    }


def registration_document(
    receipt: Mapping[str, Any], external_id: str, accepted_ms: int, company: Company, tz: tzinfo | None = None
) -> dict[str, Any]:
    """The registration body as a document whose amounts are JsonNumber (exact number texts); see encode_json."""
    body: dict[str, Any] = {
        "client": _client(receipt.get("customer_contact")),
        "company": {
            "email": company.email,
            "sno": SNO_VALUES[receipt["taxation"]],
            "inn": company.inn,
            "payment_address": company.payment_address,
        },
        "items": [_item(item) for item in receipt["items"]],
        "payments": [
            {"type": PAYMENT_TYPE_CODES[p["type"]], "sum": kopecks_to_rubles(p["amount"])} for p in receipt["payments"]
        ],
        "total": kopecks_to_rubles(receipt["total"]),
    }
    cashier = receipt.get("cashier") or _default_cashier(company)
    if "name" in cashier:
        body["cashier"] = cashier["name"]
    if "inn" in cashier:
        body["cashier_inn"] = cashier["inn"]
    return {"timestamp": atol_timestamp(accepted_ms, tz), "external_id": external_id, "receipt": body}


def _default_cashier(company: Company) -> dict[str, str]:
    cashier = {"name": company.cashier_name, "inn": company.cashier_inn}
    return {key: value for key, value in cashier.items() if value is not None}


def registration_body(
    receipt: Mapping[str, Any], external_id: str, accepted_ms: int, company: Company, tz: tzinfo | None = None
) -> str:
    """The JSON text POSTed to ``{group_code}/{operation}`` (operation: ATOL_OPERATIONS[receipt["operation"]])."""
    return encode_json(registration_document(receipt, external_id, accepted_ms, company, tz))
