"""A mock of ATOL Online v5 (the cloud KKT service), written from ATOL's protocol specification v5 (FFD 1.2).

Used by kktd's tests and benchmark and by integrators: ``kktd mock-atol --listen 127.0.0.1:9100``, or in
process with :func:`start_mock_atol`. State is in memory. One listener serves both

* the protocol, under ``/possystem/v5``: ``POST|GET getToken``, ``POST {group_code}/{operation}`` (sell,
  sell_refund, buy, buy_refund; the four correction operations are answered code 31: not modelled here) and
  ``GET {group_code}/report/{uuid}``, the token in the ``Token`` header or the ``token`` query parameter;
* the admin API, under ``/admin``: ``GET|POST /admin/behaviour`` (partial update; ``seed`` restarts the random
  choices), ``POST /admin/expire-tokens``, ``POST /admin/reset``, ``GET /admin/stats``,
  ``GET /admin/documents`` and ``GET /admin/documents/{external_id}`` (per external_id: registration requests,
  uuid, fate, polls, polls less than a second apart).

Behaviour (each settable at start and through the admin API):

* ``token_lifetime_s``: a token's life from its first issue; getToken returns the live token while there is one;
* ``wait_polls``: report answers ``wait`` (code 34) that many times before the result;
* ``fail_ratio``: that share of new documents ends ``fail`` with code -1, type ``timeout`` (no KKT of the
  group took it in time): not fiscalized;
* ``error5xx_ratio``: that share of protocol requests is answered 500 (code 50) before anything is done;
* ``delay_s``: every protocol answer waits that long (slow), before anything is done;
* ``answer_delay_s``: a new registration is stored, then its answer waits that long (the window between
  ATOL registering a document and the client learning its uuid);
* ``drop_ratio``: that share of new registrations is stored, then the connection is reset instead of the
  answer (the answer lost after registering);
* ``offline``: every protocol request gets a connection reset, nothing is done;
* ``blocked`` / ``group_v4``: getToken answers code 14 (user blocked) / code 21 (group not on v5);
* ``refuse_external_ids``: registrations of these external ids are refused for their content (code 32).

In process, :meth:`MockAtol.go_offline` closes the listening socket (connections refused, pooled ones
dropped) and :meth:`MockAtol.go_online` binds the same port again.

A registration is validated strictly against the rules of the ``sell`` schema (every object closed to unknown
fields, types, patterns, limits, numbers as exact decimals with at most 2 or 3 places), plus the arithmetic the
specification states: item sum = price x quantity (to the kopeck), total = the items' sums, payments = total.
A violation is answered 400, code 32, naming the field. A known ``external_id`` is answered 400, code 33, with
the uuid the document already has. A document whose ``company.inn`` is not the group's ends ``fail`` with the
KKT's agent error 2009.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import re
import secrets
import socket
import struct
import sys
import time
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from kktd.upstreams import EmbeddedMock
from kktd.upstreams.atol_v5 import AtolSettings
from kktd_mocks.server import MockServer, admin_body, parse_listen, serve_until_signalled

__all__ = [
    "Behaviour",
    "Document",
    "MockAtol",
    "MockAtolState",
    "create_app",
    "main",
    "start_mock_atol",
]

log = logging.getLogger("kktd_mocks.atol")

PREFIX = "/possystem/v5"
DEFAULT_LOGIN = "kktd-mock"
DEFAULT_PASSWORD = "kktd-mock-password"
DEFAULT_GROUP = "kktd-mock-group"
DEFAULT_INN = "5544332219"  # the INN of ATOL's public test environment
SELL_OPERATIONS = frozenset({"sell", "sell_refund", "buy", "buy_refund"})
CORRECTION_OPERATIONS = frozenset(
    {"sell_correction", "buy_correction", "sell_refund_correction", "buy_refund_correction"}
)
MAX_REQUEST_BYTES = 1 << 20
EX_OK, EX_CONFIG, EX_IOERR = 0, 78, 74

TIMESTAMP_RE = re.compile(r"(0[1-9]|[12]\d|3[01])\.(0[1-9]|1[0-2])\.(19|20)\d\d ([01]\d|2[0-3]):[0-5]\d:[0-5]\d")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")
PHONE_RE = re.compile(r"none|\+[0-9]{1,18}")
INN_RE = re.compile(r"[0-9]{10}|[0-9]{12}")
SNO = frozenset({"osn", "usn_income", "usn_income_outcome", "envd", "esn", "patent"})
PAYMENT_METHODS = frozenset(
    {"full_prepayment", "prepayment", "advance", "full_payment", "partial_payment", "credit", "credit_payment"}
)
# The 2024 specification's rates, and those of 2025-2026 under the same naming scheme.
VAT_TYPES = frozenset(
    {"none", "vat0", "vat10", "vat110", "vat20", "vat120", "vat5", "vat7", "vat22", "vat105", "vat107", "vat122"}
)
MEASURES = frozenset({0, 10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 42, 50, 51, 70, 71, 72, 73, 80, 81, 82, 83, 255})
PAYMENT_OBJECTS = frozenset(range(1, 28)) | frozenset(range(30, 34))
PAYMENT_TYPES = frozenset(range(10))
MAX_PRICE = Decimal("42949672.95")
MAX_TWO_FORMAT = Decimal("100000000")
CENT = Decimal("0.01")
MILLI = Decimal("0.001")

RECEIPT_FIELDS = frozenset(
    {
        "client",
        "company",
        "items",
        "payments",
        "vats",
        "cashier",
        "cashier_inn",
        "additional_check_props",
        "total",
        "additional_user_props",
        "operating_check_props",
        "sectoral_check_props",
        "device_number",
    }
)
CLIENT_FIELDS = frozenset(
    {"email", "phone", "name", "inn", "birthdate", "citizenship", "document_code", "document_data", "address"}
)
COMPANY_FIELDS = frozenset({"email", "sno", "inn", "payment_address", "location"})
ITEM_FIELDS = frozenset(
    {
        "name",
        "price",
        "quantity",
        "measure",
        "sum",
        "payment_method",
        "payment_object",
        "vat",
        "user_data",
        "excise",
        "country_code",
        "declaration_number",
        "mark_quantity",
        "mark_processing_mode",
        "sectoral_item_props",
        "mark_code",
        "agent_info",
        "supplier_info",
    }
)
# Objects of the schema this mock checks only for their JSON type (kktd never sends them).
OPAQUE_ITEM_OBJECTS = frozenset({"mark_quantity", "mark_code", "agent_info", "supplier_info"})
OPAQUE_RECEIPT_OBJECTS = frozenset({"additional_user_props", "operating_check_props"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- state -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Behaviour:
    token_lifetime_s: float = 86400.0
    wait_polls: int = 0
    fail_ratio: float = 0.0
    error5xx_ratio: float = 0.0
    delay_s: float = 0.0
    answer_delay_s: float = 0.0
    drop_ratio: float = 0.0
    offline: bool = False
    blocked: bool = False
    group_v4: bool = False
    refuse_external_ids: list[str] = field(default_factory=list)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; ValueError names the first bad key (nothing is changed then)."""
        known = {f.name: f for f in fields(self)}
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown behaviour {key!r}; known: {', '.join(sorted(known))}")
            checked[key] = _check_behaviour(key, value)
        for key, value in checked.items():
            setattr(self, key, value)


def _check_behaviour(key: str, value: Any) -> Any:
    if key == "refuse_external_ids":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("refuse_external_ids must be a list of strings")
        return list(value)
    if key in ("offline", "blocked", "group_v4"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    if key == "wait_polls":
        if not isinstance(value, int) or not 0 <= value <= 1_000_000:
            raise ValueError("wait_polls must be an integer in [0, 1000000]")
        return value
    limits = {"token_lifetime_s": (0.0, 864000.0), "delay_s": (0.0, 3600.0), "answer_delay_s": (0.0, 3600.0)}
    low, high = limits.get(key, (0.0, 1.0))
    if not low <= value <= high:
        raise ValueError(f"{key} must be in [{low:g}, {high:g}]")
    return float(value)


@dataclass(slots=True)
class Token:
    value: str
    login: str
    expires_at: float  # time.monotonic()


@dataclass(slots=True)
class Document:
    uuid: str
    external_id: str
    operation: str
    received_at: str
    fate: str  # "done" or "fail"
    polls_left: int
    payload: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    registration_requests: int = 1  # the first one and every resend answered 33
    polls: int = 0
    early_polls: int = 0  # polls less than a second after the previous one
    last_poll: float | None = None
    total: str = "0"
    timestamp: str = ""  # the body's timestamp, as the client sent it

    def summary(self) -> dict[str, Any]:
        return {
            "external_id": self.external_id,
            "uuid": self.uuid,
            "operation": self.operation,
            "fate": self.fate,
            "fiscalized": self.fate == "done",
            "fiscal_document_number": self.payload["fiscal_document_number"] if self.payload else None,
            "error_code": self.error["code"] if self.error else None,
            "registration_requests": self.registration_requests,
            "polls": self.polls,
            "early_polls": self.early_polls,
            "total": self.total,
            "timestamp": self.timestamp,
            "fiscal": None if self.payload is None else {**self.payload, "total": str(self.payload["total"])},
        }


COUNTERS = (
    "token_requests",
    "tokens_issued",
    "registration_requests",
    "registered",
    "duplicates",
    "validation_errors",
    "unauthorized",
    "report_requests",
    "wait_answers",
    "results",
    "errors_5xx",
    "dropped_answers",
    "resets",
)


class MockAtolState:
    """Everything the mock knows; the handlers and the admin API share it."""

    def __init__(
        self,
        *,
        login: str = DEFAULT_LOGIN,
        password: str = DEFAULT_PASSWORD,
        group_code: str = DEFAULT_GROUP,
        inn: str = DEFAULT_INN,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        **behaviour: Any,
    ) -> None:
        self.login = login
        self.password = password
        self.group_code = group_code
        self.inn = inn
        self.clock = clock
        self.behaviour = Behaviour()
        self.behaviour.update(behaviour)
        self._seed = seed
        self.rng = random.Random(seed)
        self.tokens: dict[str, Token] = {}
        self.documents: dict[str, Document] = {}  # by uuid
        self.by_external_id: dict[str, Document] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.fiscal_document_number = 0
        self.in_flight = 0
        self.max_in_flight = 0  # protocol requests being served at once, at most

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def reset(self) -> None:
        self.tokens.clear()
        self.documents.clear()
        self.by_external_id.clear()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.fiscal_document_number = 0
        self.max_in_flight = 0
        self.rng = random.Random(self._seed)

    def reseed(self, seed: int | None) -> None:
        self._seed = seed
        self.rng = random.Random(seed)

    def live_token(self) -> Token | None:
        now = self.clock()
        for token in self.tokens.values():
            if token.expires_at > now:
                return token
        return None

    def issue_token(self) -> Token:
        live = self.live_token()
        if live is not None:
            return live  # the specification: asking again may return the token already issued
        token = Token(secrets.token_hex(16), self.login, self.clock() + self.behaviour.token_lifetime_s)
        self.tokens[token.value] = token
        self.count("tokens_issued")
        return token

    def expire_tokens(self) -> int:
        now = self.clock()
        for token in self.tokens.values():
            token.expires_at = min(token.expires_at, now)
        return len(self.tokens)

    def register(self, external_id: str, operation: str, receipt: dict[str, Any], timestamp: str) -> Document:
        if receipt["company"]["inn"] != self.inn:
            fate, error = "fail", _error_object(2009, "INN in the request does not match the KKT's INN", "agent")
        elif self.rng.random() < self.behaviour.fail_ratio:
            fate, error = "fail", _error_object(-1, "the document timed out in the queue", "timeout")
        else:
            fate, error = "done", None
        document = Document(
            uuid=str(uuid_module.uuid4()),
            external_id=external_id,
            operation=operation,
            received_at=_timestamp(),
            fate=fate,
            polls_left=self.behaviour.wait_polls,
            error=error,
            total=str(receipt["total"]),
            timestamp=timestamp,
        )
        if fate == "done":
            document.payload = self._fiscalize(receipt["total"])
        self.documents[document.uuid] = document
        self.by_external_id[external_id] = document
        self.count("registered")
        return document

    def _fiscalize(self, total: Decimal) -> dict[str, Any]:
        self.fiscal_document_number += 1
        number = self.fiscal_document_number
        sign = self.rng.randrange(1, 1 << 32)
        return {
            "fiscal_receipt_number": (number - 1) % 5000 + 1,
            "shift_number": (number - 1) // 5000 + 1,
            "receipt_datetime": _timestamp(),
            "total": total,
            "fn_number": "9999078900012345",
            "ecr_registration_number": "0000000001012345",
            "fiscal_document_number": number,
            "fiscal_document_attribute": sign,
            "fns_site": "www.nalog.gov.ru",
            "ofd_inn": "7704211201",
            "ofd_receipt_url": f"https://ofd.mock.invalid/receipt?fn=9999078900012345&i={number}&fp={sign}",
        }

    def stats(self) -> dict[str, Any]:
        fates = {"done": 0, "fail": 0}
        for document in self.documents.values():
            fates[document.fate] += 1
        most = max((d.registration_requests for d in self.documents.values()), default=0)
        return {
            **self.counters,
            "documents": len(self.documents),
            "fiscalized": fates["done"],
            "failed": fates["fail"],
            "max_registration_requests_per_external_id": most,
            "early_polls": sum(d.early_polls for d in self.documents.values()),
            "max_in_flight": self.max_in_flight,
            "behaviour": asdict(self.behaviour),
        }


# ---- answers -----------------------------------------------------------------------------------------------


def _timestamp() -> str:
    return datetime.now().strftime("%d.%m.%Y %H:%M:%S")


def _error_object(code: int, text: str, kind: str = "system") -> dict[str, Any]:
    return {"error_id": str(uuid_module.uuid4()), "code": code, "text": text, "type": kind}


def _decimal_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Two decimals at most, so the shortest float repr spells exactly this decimal.
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(type(value).__name__)


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_decimal_default)


def _answer(status: int, document: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(document).encode(), content_type="application/json", charset="utf-8"
    )


def _fail(status: int, code: int, text: str, **extra: Any) -> web.Response:
    return _answer(status, {"error": _error_object(code, text), "status": "fail", "timestamp": _timestamp(), **extra})


def _reset_connection(request: web.BaseRequest) -> web.Response:
    """A TCP reset instead of an answer."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


# ---- validation of a registration --------------------------------------------------------------------------


class Invalid(Exception):
    """A body breaks the schema; the argument is the field's path."""


def _object(value: Any, path: str, allowed: frozenset[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{path}: must be an object")
    for key in value:
        if key not in allowed:
            raise Invalid(f"{path}.{key}: unknown field")
    for key in required:
        if key not in value:
            raise Invalid(f"{path}.{key}: required")
    return value


def _string(value: Any, path: str, max_len: int, pattern: re.Pattern[str] | None = None, min_len: int = 0) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise Invalid(f"{path}: must be a string of {min_len}..{max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise Invalid(f"{path}: does not match the required format")
    return value


def _number(value: Any, path: str, low: Decimal, high: Decimal, step: Decimal) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise Invalid(f"{path}: must be a number")
    number = Decimal(value)
    if not low <= number <= high:
        raise Invalid(f"{path}: must be between {low} and {high}")
    if number % step != 0:
        raise Invalid(f"{path}: must be a multiple of {step}")
    return number


def _enum(value: Any, path: str, allowed: frozenset[Any], kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind) or value not in allowed:
        raise Invalid(f"{path}: not an allowed value")
    return value


def _array(value: Any, path: str, min_items: int, max_items: int | None = None) -> list[Any]:
    if not isinstance(value, list) or len(value) < min_items or (max_items is not None and len(value) > max_items):
        raise Invalid(f"{path}: must be an array of {min_items}..{max_items or 'any'} entries")
    return value


def _client(value: Any) -> None:
    client = _object(value, "receipt.client", CLIENT_FIELDS)
    if "email" not in client and "phone" not in client:
        raise Invalid("receipt.client: email or phone is required")
    if "email" in client and client["email"] != "none":
        _string(client["email"], "receipt.client.email", 64, EMAIL_RE)
    if "phone" in client:
        _string(client["phone"], "receipt.client.phone", 19, PHONE_RE)
    for name, limit in (
        ("name", 256),
        ("document_data", 64),
        ("address", 256),
        ("citizenship", 3),
        ("document_code", 2),
        ("birthdate", 10),
    ):
        if name in client:
            _string(client[name], f"receipt.client.{name}", limit)
    if "inn" in client:
        _string(client["inn"], "receipt.client.inn", 12, INN_RE)


def _company(value: Any) -> dict[str, Any]:
    company = _object(value, "receipt.company", COMPANY_FIELDS, ("email", "sno", "inn", "payment_address"))
    if company["email"] != "none":
        _string(company["email"], "receipt.company.email", 64, EMAIL_RE)
    _enum(company["sno"], "receipt.company.sno", SNO, str)
    _string(company["inn"], "receipt.company.inn", 12, INN_RE)
    _string(company["payment_address"], "receipt.company.payment_address", 256)
    if "location" in company:
        _string(company["location"], "receipt.company.location", 256, min_len=1)
    return company


def _item(value: Any, path: str) -> Decimal:
    item = _object(
        value,
        path,
        ITEM_FIELDS,
        ("name", "price", "quantity", "measure", "sum", "payment_method", "payment_object", "vat"),
    )
    _string(item["name"], f"{path}.name", 128, min_len=1)
    price = _number(item["price"], f"{path}.price", Decimal(0), MAX_PRICE, CENT)
    quantity = _number(item["quantity"], f"{path}.quantity", MILLI, Decimal("99999.999"), MILLI)
    _enum(item["measure"], f"{path}.measure", MEASURES, int)
    item_sum = _number(item["sum"], f"{path}.sum", Decimal(0), MAX_PRICE, CENT)
    # The specification: sum = price x quantity; a KKT works in kopecks, so to the kopeck (half up).
    if item_sum != (price * quantity).quantize(CENT, rounding=ROUND_HALF_UP):
        raise Invalid(f"{path}.sum: must equal price x quantity")
    _enum(item["payment_method"], f"{path}.payment_method", PAYMENT_METHODS, str)
    _enum(item["payment_object"], f"{path}.payment_object", PAYMENT_OBJECTS, int)
    vat = _object(item["vat"], f"{path}.vat", frozenset({"type", "sum"}), ("type",))
    _enum(vat["type"], f"{path}.vat.type", VAT_TYPES, str)
    if "sum" in vat:
        _number(vat["sum"], f"{path}.vat.sum", Decimal(0), MAX_TWO_FORMAT, CENT)
    if "user_data" in item:
        _string(item["user_data"], f"{path}.user_data", 64)
    if "excise" in item:
        _number(item["excise"], f"{path}.excise", Decimal(0), MAX_TWO_FORMAT, CENT)
    if "country_code" in item:
        _string(item["country_code"], f"{path}.country_code", 3, min_len=3)
    if "declaration_number" in item:
        _string(item["declaration_number"], f"{path}.declaration_number", 32)
    if "mark_processing_mode" in item:
        _enum(item["mark_processing_mode"], f"{path}.mark_processing_mode", frozenset({"0"}), str)
    if "sectoral_item_props" in item:
        _array(item["sectoral_item_props"], f"{path}.sectoral_item_props", 0)
    for name in OPAQUE_ITEM_OBJECTS & item.keys():
        if not isinstance(item[name], dict):
            raise Invalid(f"{path}.{name}: must be an object")
    return item_sum


def validate_registration(document: Any) -> dict[str, Any]:
    """Check a sell/sell_refund/buy/buy_refund body; raise Invalid naming the first bad field."""
    body = _object(
        document,
        "",
        frozenset({"timestamp", "external_id", "service", "ism_optional", "receipt"}),
        ("timestamp", "external_id", "receipt"),
    )
    _string(body["timestamp"], "timestamp", 19, TIMESTAMP_RE)
    _string(body["external_id"], "external_id", 128, min_len=1)
    if "service" in body:
        service = _object(body["service"], "service", frozenset({"callback_url"}))
        if "callback_url" in service:
            _string(service["callback_url"], "service.callback_url", 256)
    if "ism_optional" in body and not isinstance(body["ism_optional"], bool):
        raise Invalid("ism_optional: must be true or false")
    receipt = _object(body["receipt"], "receipt", RECEIPT_FIELDS, ("client", "company", "items", "payments", "total"))
    _client(receipt["client"])
    _company(receipt["company"])
    items = _array(receipt["items"], "receipt.items", 1)
    items_sum = sum((_item(item, f"receipt.items[{i}]") for i, item in enumerate(items)), Decimal(0))
    payments = _array(receipt["payments"], "receipt.payments", 1, 10)
    paid = Decimal(0)
    for i, value in enumerate(payments):
        payment = _object(value, f"receipt.payments[{i}]", frozenset({"type", "sum"}), ("type", "sum"))
        _enum(payment["type"], f"receipt.payments[{i}].type", PAYMENT_TYPES, int)
        paid += _number(payment["sum"], f"receipt.payments[{i}].sum", Decimal(0), MAX_TWO_FORMAT, CENT)
    if "vats" in receipt:
        for i, value in enumerate(_array(receipt["vats"], "receipt.vats", 1, 6)):
            vat = _object(value, f"receipt.vats[{i}]", frozenset({"type", "sum"}), ("type", "sum"))
            _enum(vat["type"], f"receipt.vats[{i}].type", VAT_TYPES, str)
            _number(vat["sum"], f"receipt.vats[{i}].sum", Decimal(0), MAX_TWO_FORMAT, CENT)
    if "cashier" in receipt:
        _string(receipt["cashier"], "receipt.cashier", 64)
    if "cashier_inn" in receipt:
        _string(receipt["cashier_inn"], "receipt.cashier_inn", 12, re.compile(r"[0-9]{12}"))
    if "additional_check_props" in receipt:
        _string(receipt["additional_check_props"], "receipt.additional_check_props", 16)
    if "device_number" in receipt:
        _string(receipt["device_number"], "receipt.device_number", 20, min_len=1)
    if "sectoral_check_props" in receipt:
        _array(receipt["sectoral_check_props"], "receipt.sectoral_check_props", 0)
    for name in OPAQUE_RECEIPT_OBJECTS & receipt.keys():
        if not isinstance(receipt[name], dict):
            raise Invalid(f"receipt.{name}: must be an object")
    total = _number(receipt["total"], "receipt.total", Decimal(0), MAX_TWO_FORMAT, CENT)
    if total >= MAX_TWO_FORMAT:
        raise Invalid("receipt.total: at most 8 digits before the decimal point")
    if total != items_sum:
        raise Invalid("receipt.total: must equal the sum of the items' sums")
    if paid != total:
        raise Invalid("receipt.payments: must add up to the total")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(raw: bytes) -> Any:
    # Decimals, not floats: the mock must see the number kktd wrote, not its nearest binary fraction.
    return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)


# ---- handlers ----------------------------------------------------------------------------------------------

STATE_KEY: web.AppKey[MockAtolState] = web.AppKey("mock_atol_state", MockAtolState)


async def _misbehave(request: web.Request, state: MockAtolState) -> web.Response | None:
    """The faults every protocol request is subject to; None when the request is to be served."""
    behaviour = state.behaviour
    if behaviour.offline:
        state.count("resets")
        return _reset_connection(request)
    if behaviour.delay_s:
        await asyncio.sleep(behaviour.delay_s)
    if behaviour.error5xx_ratio and state.rng.random() < behaviour.error5xx_ratio:
        state.count("errors_5xx")
        return _fail(500, 50, "server error (mock)")
    return None


def _json_content_type(request: web.Request) -> bool:
    return request.content_type == "application/json"


async def handle_get_token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("token_requests")
    fault = await _misbehave(request, state)
    if fault is not None:
        return fault
    if request.method == "GET":
        credentials: Any = {k: request.query[k] for k in ("login", "pass", "source") if k in request.query}
    else:
        if not _json_content_type(request):
            return _fail(415, 41, f"unsupported Content-Type: {request.content_type}")
        try:
            credentials = _loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _fail(400, 40, "the request is not JSON")
    if (
        not isinstance(credentials, dict)
        or not isinstance(credentials.get("login"), str)
        or not isinstance(credentials.get("pass"), str)
        or not credentials.keys() <= {"login", "pass", "source"}
    ):
        return _fail(400, 13, "validation error of the request: login and pass are required strings")
    if credentials["login"] != state.login or credentials["pass"] != state.password:
        return _fail(401, 12, "wrong login or password")
    if state.behaviour.blocked:
        return _fail(403, 14, "the user is blocked")
    if state.behaviour.group_v4:
        return _fail(401, 21, "the group code does not support this protocol version")
    token = state.issue_token()
    return _answer(200, {"error": None, "token": token.value, "timestamp": _timestamp()})


def _authorize(request: web.Request, state: MockAtolState) -> web.Response | None:
    presented = request.headers.get("Token") or request.query.get("token")
    if not presented:
        state.count("unauthorized")
        return _fail(401, 10, "the request's token is not recognised")
    token = state.tokens.get(presented)
    if token is None:
        state.count("unauthorized")
        return _fail(401, 10, "the request's token is not recognised")
    if token.expires_at <= state.clock():
        state.count("unauthorized")
        return _fail(401, 11, "the token has expired")
    if request.match_info["group_code"] != state.group_code:
        state.count("unauthorized")
        return _fail(401, 20, "the group code does not match the token")
    return None


async def handle_register(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("registration_requests")
    fault = await _misbehave(request, state)
    if fault is not None:
        return fault
    if not _json_content_type(request):
        return _fail(415, 41, f"unsupported Content-Type: {request.content_type}")
    denied = _authorize(request, state)
    if denied is not None:
        return denied
    operation = request.match_info["operation"]
    if operation not in SELL_OPERATIONS:
        what = "not modelled by this mock" if operation in CORRECTION_OPERATIONS else "not supported"
        return _fail(400, 31, f"operation {operation!r} {what}")
    try:
        document = _loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        state.count("validation_errors")
        return _fail(400, 40, "bad request: the body is not JSON")
    try:
        body = validate_registration(document)
    except Invalid as exc:
        state.count("validation_errors")
        return _fail(400, 32, f"validation error of the receipt; fields: {exc}")
    external_id = body["external_id"]
    if external_id in state.behaviour.refuse_external_ids:
        state.count("validation_errors")
        return _fail(
            400,
            32,
            f"validation error of the receipt; fields: receipt (refused by the mock for external_id {external_id})",
        )
    known = state.by_external_id.get(external_id)
    if known is not None:
        known.registration_requests += 1
        state.count("duplicates")
        return _answer(
            400,
            {
                "uuid": known.uuid,
                "timestamp": _timestamp(),
                "status": "wait",
                "error": _error_object(
                    33, f"a document with external_id {external_id} already exists in group {state.group_code}"
                ),
            },
        )
    registered = state.register(external_id, operation, body["receipt"], body["timestamp"])
    if state.behaviour.answer_delay_s:
        await asyncio.sleep(state.behaviour.answer_delay_s)
    if state.behaviour.drop_ratio and state.rng.random() < state.behaviour.drop_ratio:
        state.count("dropped_answers")
        return _reset_connection(request)
    return _answer(200, {"uuid": registered.uuid, "timestamp": registered.received_at, "error": None, "status": "wait"})


async def handle_report(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("report_requests")
    fault = await _misbehave(request, state)
    if fault is not None:
        return fault
    denied = _authorize(request, state)
    if denied is not None:
        return denied
    document = state.documents.get(request.match_info["uuid"])
    if document is None:
        return _fail(400, 30, f"unknown uuid {request.match_info['uuid'][:128]!r}")
    now = state.clock()
    document.polls += 1
    if document.last_poll is not None and now - document.last_poll < 1.0:
        document.early_polls += 1
    document.last_poll = now
    common = {
        "uuid": document.uuid,
        "timestamp": document.received_at,
        "group_code": state.group_code,
        "daemon_code": "mock-agent-1",
        "device_code": "MOCK-KKT-1",
        "external_id": document.external_id,
        "callback_url": "",
    }
    if document.polls_left > 0:
        document.polls_left -= 1
        state.count("wait_answers")
        return _answer(
            200,
            {
                **common,
                "status": "wait",
                "payload": None,
                "error": _error_object(34, "the document's state is not known yet; ask later"),
            },
        )
    state.count("results")
    if document.fate == "done":
        return _answer(200, {**common, "status": "done", "error": None, "payload": document.payload})
    return _answer(200, {**common, "status": "fail", "error": document.error, "payload": None})


# ---- admin -------------------------------------------------------------------------------------------------


async def admin_behaviour(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        body = await admin_body(request)
        seed = body.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            return web.json_response({"error": "seed must be an integer"}, status=400)
        try:
            state.behaviour.update(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if seed is not None:
            state.reseed(seed)
        log.info("mock ATOL behaviour: %s", asdict(state.behaviour))
    return web.json_response(asdict(state.behaviour))


async def admin_expire_tokens(request: web.Request) -> web.Response:
    return web.json_response({"expired": request.app[STATE_KEY].expire_tokens()})


async def admin_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


async def admin_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats())


async def admin_documents(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"documents": [d.summary() for d in state.documents.values()]})


async def admin_document(request: web.Request) -> web.Response:
    document = request.app[STATE_KEY].by_external_id.get(request.match_info["external_id"])
    if document is None:
        return web.json_response({"error": "no document with this external_id"}, status=404)
    return web.json_response(document.summary())


@web.middleware
async def _track_in_flight(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(PREFIX):
        return await handler(request)
    state = request.app[STATE_KEY]
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        return await handler(request)
    finally:
        state.in_flight -= 1


def create_app(state: MockAtolState | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_track_in_flight])
    app[STATE_KEY] = state if state is not None else MockAtolState()
    app.router.add_route("POST", f"{PREFIX}/getToken", handle_get_token)
    app.router.add_route("GET", f"{PREFIX}/getToken", handle_get_token)
    app.router.add_route("GET", PREFIX + "/{group_code}/report/{uuid}", handle_report)
    app.router.add_route("POST", PREFIX + "/{group_code}/{operation}", handle_register)
    app.router.add_route("GET", "/admin/behaviour", admin_behaviour)
    app.router.add_route("POST", "/admin/behaviour", admin_behaviour)
    app.router.add_route("POST", "/admin/expire-tokens", admin_expire_tokens)
    app.router.add_route("POST", "/admin/reset", admin_reset)
    app.router.add_route("GET", "/admin/stats", admin_stats)
    app.router.add_route("GET", "/admin/documents", admin_documents)
    app.router.add_route("GET", "/admin/documents/{external_id}", admin_document)
    return app


# ---- running it --------------------------------------------------------------------------------------------


class MockAtol(MockServer):
    """A running mock: ``url`` is the protocol's base (``…/possystem/v5``), ``admin_url`` the admin API's."""

    def __init__(self, state: MockAtolState, runner: web.AppRunner, site: web.TCPSite, host: str, port: int) -> None:
        super().__init__(runner, site, host, port)
        self.state = state

    @property
    def url(self) -> str:
        return self.origin + PREFIX

    @property
    def admin_url(self) -> str:
        return f"{self.origin}/admin"

    def set_behaviour(self, **changes: Any) -> None:
        seed = changes.pop("seed", None)
        self.state.behaviour.update(changes)
        if seed is not None:
            self.state.reseed(seed)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def documents(self) -> list[dict[str, Any]]:
        return [d.summary() for d in self.state.documents.values()]


async def start_mock_atol(host: str = "127.0.0.1", port: int = 0, **options: Any) -> MockAtol:
    """Start a mock in this event loop (port 0: a free one). ``options``: login, password, group_code, inn,
    seed, clock and any Behaviour field."""
    state = MockAtolState(**options)
    runner, site, bound = await MockServer.serve(create_app(state), host, port)
    mock = MockAtol(state, runner, site, host, bound)
    log.info("mock ATOL Online v5 listening on %s (admin %s)", mock.url, mock.admin_url)
    return mock


async def start_embedded(settings: AtolSettings) -> EmbeddedMock:
    """`kktd serve --embedded-mock` (development): a mock in kktd's own event loop that accepts the configured
    login, password, group and INN, and the settings that send to it."""
    mock = await start_mock_atol(
        "127.0.0.1",
        0,
        login=settings.login,
        password=settings.password,
        group_code=settings.group_code,
        inn=settings.company.inn,
    )
    return EmbeddedMock(
        dataclasses.replace(settings, url=mock.url),
        f"mock ATOL Online v5 on {mock.url} (admin {mock.admin_url})",
        mock.close,
    )


async def _serve(host: str, port: int, options: dict[str, Any]) -> None:
    mock = await start_mock_atol(host, port, **options)
    banner = (
        f"mock ATOL Online v5: {mock.url} (login {mock.state.login}, password {mock.state.password}, "
        f"group {mock.state.group_code}, INN {mock.state.inn}), admin {mock.admin_url}/stats\n"
        f"kktd settings for it: atol_url = {mock.url}, atol_login = {mock.state.login}, "
        f"atol_group_code = {mock.state.group_code}, company_inn = {mock.state.inn}, and a file holding "
        f"{mock.state.password} as atol_password_file"
    )
    await serve_until_signalled(mock, banner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kktd mock-atol", description="Mock of ATOL Online v5 for tests and development."
    )
    parser.add_argument("--listen", default="127.0.0.1:9100", help="HOST:PORT (default 127.0.0.1:9100)")
    parser.add_argument("--login", default=DEFAULT_LOGIN)
    parser.add_argument("--password", default=DEFAULT_PASSWORD, help="the password getToken accepts (a mock's)")
    parser.add_argument("--group-code", default=DEFAULT_GROUP)
    parser.add_argument("--inn", default=DEFAULT_INN, help="INN of the group's KKTs (company.inn must match)")
    parser.add_argument("--token-lifetime", type=float, default=86400.0, help="seconds a token lives")
    parser.add_argument("--wait-polls", type=int, default=0, help="report answers wait this many times first")
    parser.add_argument("--fail-ratio", type=float, default=0.0, help="share of documents failing with -1")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every protocol answer waits")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Exit codes: 0 clean stop, 78 bad arguments, 74 cannot listen."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(args.listen)
        options: dict[str, Any] = {
            "login": args.login,
            "password": args.password,
            "group_code": args.group_code,
            "inn": args.inn,
            "seed": args.seed,
            "token_lifetime_s": args.token_lifetime,
            "wait_polls": args.wait_polls,
            "fail_ratio": args.fail_ratio,
            "delay_s": args.delay,
        }
        Behaviour().update({k: options[k] for k in ("token_lifetime_s", "wait_polls", "fail_ratio", "delay_s")})
    except ValueError as exc:
        print(f"kktd mock-atol: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        asyncio.run(_serve(host, port, options))
    except OSError as exc:
        print(f"kktd mock-atol: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return EX_IOERR
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
