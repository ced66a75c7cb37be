"""A mock of ATOL's KKT driver v10 local web server ("Web Requests", ``/api/v2``) with a simulated fiscal register
(a KKT with its FN) behind it, written from the protocol facts kktd's ``atol-driver`` upstream is built on.

Used by kktd's tests and benchmark and by ``make run``: ``kktd mock-atol-driver --listen 127.0.0.1:16732``, or
in process with :func:`start_mock_register`. State is in memory. One listener serves both

* the protocol, under ``/api/v2`` (the base URL kktd is given is ``http://HOST:PORT``):
  ``POST requests[?deviceID=]``, ``GET|DELETE requests/{uuid}``, ``GET getRequestsQueueStatus`` and
  ``GET serverInfo``; the only device is ``default`` (no ``deviceID`` means it, any other id is 404);
  with a login and a password every protocol route but ``serverInfo`` needs HTTP Basic (else 401);
* the admin API, under ``/admin`` (never behind auth): ``GET|POST /admin/behaviour`` (partial update,
  validated; nothing changes when one key is bad), ``POST /admin/clock {"advance_s": s}``,
  ``GET /admin/documents``, ``GET /admin/register``, ``GET /admin/stats``, ``POST /admin/reset``.

Errors outside task results are ``{"error": {"code": 505, "description": …}}`` (505, the driver's
``LIBFPTR_ERROR_WEB_FAIL``, for every one of them: clients key on the HTTP status).

**The queue.** One worker per device runs the requests in POST order and their subtasks in order: ``wait`` ->
``inProgress`` -> ``ready`` | ``error``; after the first ``error`` the rest of the request is ``interrupted``
(502). DELETE succeeds while every subtask is ``wait`` (they become ``canceled``, code 503), else it is refused
with ``cancel_refusal`` (409 or 405). A known uuid is answered 409 and never runs again. The ``number`` of a POST
answer is the count of unfinished requests ahead of it; ``getRequestsQueueStatus`` counts unfinished requests
(``number``), finished ones (``ready``: ready, error or interrupted) and ``canceled``.

**Tasks.** ``sell``, ``sellReturn``, ``buy``, ``buyReturn``, ``openShift``, ``closeShift`` (fiscal: each takes
``print_time_s``), ``getShiftStatus``, ``getDeviceStatus``, ``getFnStatus``, ``ofdExchangeStatus``, ``getFnInfo``,
``getLastFiscalParams`` (``forReceipt``), ``continuePrint``. The four ``…Correction`` tasks count as fiscal for
the one-per-request rule but end ``error`` 501 (not modelled); any other type ends ``error`` 501.

**Validation of a receipt** (strict: every object is closed to unknown keys). The first violation found decides,
in this order: the top level's keys, then field by field in the order of the list below, then the sums.

* 501 (task JSON invalid; the description names the field): a missing or unknown key, a value of the wrong JSON
  type, a string out of its length limits or format (``operator.name`` 1..64, ``operator.vatin`` 10 or 12
  digits, ``items[].name`` 1..128, ``clientInfo.emailOrPhone`` an e-mail or ``+``digits, ``companyInfo.email``,
  ``paymentsPlace``/``paymentsAddress`` 1..256), a money value with more than 2 decimals or a quantity with more
  than 3, an item ``type`` other than ``position``, an unknown ``measurementUnit`` (FFD 1.2 names or 0..255),
  no items, no payments or more than 10, a negative payment sum, ``electronically: true`` without
  ``clientInfo.emailOrPhone``;
* 143 ``taxationType`` not osn/usnIncome/usnIncomeOutcome/envd/esn/patent; 144 ``tax.type`` not a known rate;
  216 ``paymentMethod`` unknown (names or 1..7); 217 ``paymentObject`` unknown (ATOL's names or the FFD codes);
  145 ``payments[].type`` unknown (names or 0..9);
* 16 a price or amount below 0 or above 42 949 672.95, or ``amount`` != price × quantity rounded half up to the
  kopeck (exact decimals as the JSON text spells them: a binary float never decides a kopeck); 17 a quantity
  of 0 or less, or above 99 999.999; 110 more than 100 items;
* 63 the items add up to more than 99 999 999.99; 227 ``total`` given and not the items' sum; 66 the payments
  add up to less than the total; 52 the non-cash payments add up to more than the total (cash may exceed it:
  change).

The real driver allows ``amount`` below price × quantity (a discount); kktd never sends one, so the mock holds
kktd's mapping to the exact product. ``openShift``/``closeShift`` take ``type``, ``operator``, ``electronically``
(501 otherwise); the query tasks ignore extra keys (as ATOL's scripts do).

**The register.** One FN (``9999078900004312``, registration ``0000000001002292``), counters from 0: the FD number
advances on every fiscal document (receipt, shift opening, Z report) and only on success; the receipt number
counts receipts in the shift; the fiscal sign is the first 8 bytes of a SHA-256 of the FN number, FD number,
type, total, date and uuid, mod 10^10 (deterministic). Dates are the register's local time in
``utc_offset_minutes`` (default +03:00), from its clock (wall time plus what ``POST /admin/clock`` added).

* A shift expires 24 h after it opened: a receipt on an expired shift is 68; ``closeShift`` closes an opened or
  expired shift (its result's ``fiscalParams`` carry ``receiptsCount``) and on a closed one is 73;
  ``openShift`` on an opened or expired shift is 83 (``LIBFPTR_ERROR_DENIED_IN_OPENED_SHIFT``).
* A receipt on a closed shift opens it first (a shift-opening FD of its own; the receipt's ``warnings`` carry
  ``shiftAutoOpened: true``) unless ``auto_open_shift`` is false: then 73.
* ``getShiftStatus``: ``expiredTime`` is the moment an open shift's 24 h run out; for a closed shift it is the
  register's current time, and ``documentsCount`` (FDs of the last shift) is added, as ATOL's script does.
* Every FD is also a document for the OFD: with ``ofd_online`` (default) the register forwards it at once,
  otherwise it stays unsent (``ofdExchangeStatus``: count, first number and date) until ``ofd_online`` is set
  again. ``getFnStatus`` warns ``ofdTimeout`` when the oldest unsent document is over 30 days old (the mock
  keeps signing: which error a real FN then gives is unconfirmed); ``getFnInfo`` warns ``needReplacement`` in
  the 30 days before ``fn_validity_date``.
* ``getLastFiscalParams`` answers the last FD's (``forReceipt``: the last receipt's) ``fiscalParams`` as ATOL's
  script builds them; with no such document yet only the FN's own fields (no ``fiscalDocumentNumber``).

**Faults** (Behaviour fields, settable at start and through ``/admin/behaviour``), checked for a fiscal task in
this order: validation, ``refuse_names``, the link (``device_off``), the printer (``cover_open`` 45,
``paper_present`` 44: every fiscal task, electronic or not, nothing fiscalized), the shift, then the one-shot
faults, which only a receipt that would otherwise be fiscalized consumes:

* ``device_off``: the register does not answer. A fiscal task goes ``blocked`` (the queue ``isBlocked``, reason
  ``connectionError``; the blocked result carries code 2) and the queue stops; a non-fiscal task ends ``error``
  2. When ``device_off`` goes false the server settles the blocked task as the real one does: the FD number
  grew past the one taken right before the document (after any automatic shift opening) -> ``ready`` with the
  document's ``fiscalParams`` (``warnings.recovered``; ``notPrinted`` when its copy was not printed), else
  ``error`` 2; then the queue goes on. Switching it on during a task's print time loses that document.
* ``power_loss_next: "made"|"not_made"``: the next receipt loses power mid-print, the document fiscalized
  (unprinted) or not; the task goes ``blocked`` and ``device_off`` turns true. **One rule settles it: a blocked
  task is settled when ``device_off`` goes false** - the admin clearing it, or the power coming back by itself
  ``power_back_after_s`` (default 0.5; null: only the admin) after the loss.
* ``unknown_error_next: "made"|"not_made"``: the next receipt ends a plain ``error`` 15 (the server does not
  block) with the document fiscalized (and printed) or not: the client must ask the register.
* ``paper_runs_out_next``: the next receipt is fiscalized but the paper runs out while printing it: ``ready``
  with ``warnings.notPrinted`` and ``paper_present`` turns false; ``continuePrint`` (44 while there is no paper)
  prints the pending copy.
* ``lose_answers: N``: the next N ``POST requests`` are enqueued (they run), then the connection is reset
  instead of the 201.
* ``refuse_names``: a receipt with an item of such a name ends ``error`` ``refuse_code`` (default 501).

In process, :meth:`MockRegister.go_offline` closes the listening socket (connections refused, pooled ones
dropped) and :meth:`MockRegister.go_online` binds the same port again; ``MockRegister.state`` is the register
(documents, shift, behaviour, counters) for tests to read.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import re
import secrets
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from aiohttp import web

from kktd.upstreams import EmbeddedMock
from kktd_mocks.server import MockServer, admin_body, parse_listen, serve_until_signalled

__all__ = [
    "Behaviour",
    "FiscalDocument",
    "MockRegister",
    "RegisterState",
    "Refusal",
    "create_app",
    "main",
    "start_embedded",
    "start_mock_register",
    "validate_receipt",
]

log = logging.getLogger("kktd_mocks.atol_driver")

PREFIX = "/api/v2"
DEFAULT_LISTEN = "127.0.0.1:16732"
DEFAULT_DEVICE = "default"
SERVER_VERSION = "1.0.4.0"
DRIVER_VERSION = "10.10.7.0"
FN_NUMBER = "9999078900004312"
REGISTRATION_NUMBER = "0000000001002292"
FNS_URL = "www.nalog.gov.ru"
MAX_REQUEST_BYTES = 1 << 20
SHIFT_LENGTH_S = 24 * 3600.0
OFD_TIMEOUT_S = 30 * 86400.0
FN_REPLACEMENT_WARNING_S = 30 * 86400.0
# The worker re-reads the behaviour this often while a task is blocked, in case a test changed it without
# going through RegisterState.update_behaviour (which wakes it at once).
BLOCKED_RECHECK_S = 0.05
EX_OK, EX_CONFIG, EX_IOERR = 0, 78, 74
WEB_FAIL = 505

RECEIPT_TYPES = frozenset({"sell", "sellReturn", "buy", "buyReturn"})
CORRECTION_TYPES = frozenset({"sellCorrection", "sellReturnCorrection", "buyCorrection", "buyReturnCorrection"})
SHIFT_TYPES = frozenset({"openShift", "closeShift"})
FISCAL_TYPES = RECEIPT_TYPES | CORRECTION_TYPES | SHIFT_TYPES

ERRORS: dict[int, str] = {
    0: "Ошибок нет",
    2: "Нет связи",
    15: "Неизвестная ошибка",
    16: "Неверная цена (сумма)",
    17: "Неверное количество",
    44: "Нет бумаги",
    45: "Открыта крышка",
    52: "Сумма безналичных оплат превышает сумму чека",
    63: "Переполнение итога чека",
    66: "Чек оплачен не полностью",
    68: "Смена превысила 24 часа",
    73: "Смена закрыта - операция невозможна",
    83: "Смена открыта, операция невозможна",
    110: "Превышено количество позиций в чеке",
    143: "Неверная система налогообложения",
    144: "Неверная ставка налога",
    145: "Неверный тип оплаты",
    216: "Неверный признак способа расчета",
    217: "Неверный признак предмета расчета",
    227: "Неверная сумма чека",
    501: "Некорректное JSON-задание",
    502: "Задание прервано из-за предыдущей ошибки",
    503: "Задание отменено",
    505: "Ошибка веб-сервера",
}

TAXATION_TYPES = frozenset({"osn", "usnIncome", "usnIncomeOutcome", "envd", "esn", "patent"})
TAX_TYPES = frozenset(
    {"none", "vat0", "vat5", "vat7", "vat10", "vat20", "vat22", "vat105", "vat107", "vat110", "vat120", "vat122"}
)
PAYMENT_METHODS = frozenset(
    {"fullPrepayment", "prepayment", "advance", "fullPayment", "partialPayment", "credit", "creditPayment"}
)
PAYMENT_METHOD_CODES = frozenset(range(1, 8))
# ATOL's own list (myscripts_utils.js PAYMENT_OBJECTS), aliases included.
PAYMENT_OBJECTS = frozenset(
    {
        "commodity",
        "excise",
        "job",
        "service",
        "gamblingBet",
        "gamblingPrize",
        "lottery",
        "lotteryPrize",
        "intellectualActivity",
        "payment",
        "agentCommission",
        "composite",
        "pay",
        "another",
        "proprietaryLaw",
        "nonOperatingIncome",
        "insuranceContributions",
        "otherContributions",
        "merchantTax",
        "resortFee",
        "deposit",
        "consumption",
        "soleProprietorCPIContributions",
        "cpiContributions",
        "soleProprietorCMIContributions",
        "cmiContributions",
        "csiContributions",
        "casinoPayment",
        "fundsIssuance",
        "exciseWithoutMarking",
        "exciseWithMarking",
        "commodityWithoutMarking",
        "commodityWithMarking",
    }
)
PAYMENT_OBJECT_CODES = frozenset(range(1, 28)) | frozenset(range(30, 34))
# Tag 2108 (FFD 1.2), by the driver's names; a number 0..255 is taken as the code itself.
MEASUREMENT_UNITS = frozenset(
    {
        "piece",
        "gram",
        "kilogram",
        "ton",
        "centimeter",
        "decimeter",
        "meter",
        "squareCentimeter",
        "squareDecimeter",
        "squareMeter",
        "milliliter",
        "liter",
        "cubicMeter",
        "kilowattHour",
        "gkal",
        "day",
        "hour",
        "minute",
        "second",
        "kilobyte",
        "megabyte",
        "gigabyte",
        "terabyte",
        "otherUnits",
    }
)
PAYMENT_TYPES = frozenset({"cash", "electronically", "prepaid", "credit", "other"})
PAYMENT_TYPE_CODES = frozenset(range(10))  # 0..4 the named ones, 5..9 user-defined

RECEIPT_KEYS = frozenset(
    {
        "type",
        "taxationType",
        "electronically",
        "ignoreNonFiscalPrintErrors",
        "operator",
        "clientInfo",
        "items",
        "payments",
        "total",
        "paymentsPlace",
        "paymentsAddress",
        "companyInfo",
    }
)
ITEM_KEYS = frozenset(
    {"type", "name", "price", "quantity", "amount", "tax", "paymentMethod", "paymentObject", "measurementUnit"}
)
ITEM_REQUIRED = ("type", "name", "price", "quantity", "amount", "tax")
SHIFT_TASK_KEYS = frozenset({"type", "operator", "electronically"})
MAX_ITEMS = 100
MAX_PAYMENTS = 10
CENT = Decimal("0.01")
MAX_PRICE = Decimal("42949672.95")
MAX_QUANTITY = Decimal("99999.999")
MAX_RECEIPT_TOTAL = Decimal("99999999.99")
MAX_PAYMENT = Decimal("9999999999.99")
VATIN_RE = re.compile(r"[0-9]{10}|[0-9]{12}")
EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
PHONE_RE = re.compile(r"\+?[0-9]{5,19}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- behaviour ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Behaviour:
    print_time_s: float = 0.0
    result_shape: str = "nested"
    cancel_refusal: int = 409
    utc_offset_minutes: int = 180
    auto_open_shift: bool = True
    ofd_online: bool = True
    paper_present: bool = True
    cover_open: bool = False
    device_off: bool = False
    power_loss_next: str | None = None
    power_back_after_s: float | None = 0.5
    unknown_error_next: str | None = None
    paper_runs_out_next: bool = False
    lose_answers: int = 0
    # Of requests that hold a receipt only (the contract's "the receipt's own answer lost / late"):
    lose_receipt_answers: int = 0
    receipt_answer_delay_s: float = 0.0
    refuse_names: list[str] = field(default_factory=list)
    refuse_uuids: list[str] = field(default_factory=list)  # requests refused for their content (refuse_code)
    refuse_code: int = 501
    fn_validity_date: str = "2028-06-30"

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update; ValueError names the first bad key (nothing is changed then)."""
        known = {f.name for f in fields(self)}
        checked: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown behaviour {key!r}; known: {', '.join(sorted(known))}")
            checked[key] = _check_behaviour(key, value)
        for key, value in checked.items():
            setattr(self, key, value)


BOOLEAN_BEHAVIOUR = frozenset(
    {"auto_open_shift", "ofd_online", "paper_present", "cover_open", "device_off", "paper_runs_out_next"}
)


def _check_behaviour(key: str, value: Any) -> Any:
    if key in BOOLEAN_BEHAVIOUR:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    if key in ("power_loss_next", "unknown_error_next"):
        if value not in (None, "made", "not_made"):
            raise ValueError(f'{key} must be "made", "not_made" or null')
        return value
    if key == "result_shape":
        if value not in ("nested", "flat"):
            raise ValueError('result_shape must be "nested" or "flat"')
        return value
    if key in ("refuse_names", "refuse_uuids"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} must be a list of strings")
        return list(value)
    if key == "fn_validity_date":
        if not isinstance(value, str):
            raise ValueError("fn_validity_date must be an ISO date (YYYY-MM-DD)")
        try:
            date.fromisoformat(value)
        except ValueError:
            raise ValueError("fn_validity_date must be an ISO date (YYYY-MM-DD)") from None
        return value
    if key == "power_back_after_s" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number")
    if key == "cancel_refusal":
        if value not in (405, 409):
            raise ValueError("cancel_refusal must be 405 or 409")
        return int(value)
    integer_limits = {
        "utc_offset_minutes": (-720, 840),
        "lose_answers": (0, 1_000_000),
        "lose_receipt_answers": (0, 1_000_000),
        "refuse_code": (1, 65535),
    }
    if key in integer_limits:
        low, high = integer_limits[key]
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{key} must be an integer in [{low}, {high}]")
        return value
    high_s = {"print_time_s": 60.0, "power_back_after_s": 3600.0, "receipt_answer_delay_s": 3600.0}[key]
    if not 0.0 <= value <= high_s:
        raise ValueError(f"{key} must be in [0, {high_s:g}]")
    return float(value)


# ---- the register's records --------------------------------------------------------------------------------


@dataclass(slots=True)
class FiscalDocument:
    fd: int
    kind: str  # sell, sellReturn, buy, buyReturn, openShift, closeShift
    uuid: str
    total: Decimal
    items: list[str]
    shift: int
    receipt_number: int | None  # receipts only: its number in the shift
    made_at: float  # the register's clock (epoch seconds)
    date_time: str
    sign: str
    printed: bool
    sent: bool = False  # forwarded to the OFD
    receipts_count: int | None = None  # closeShift only

    def fiscal_params(self) -> dict[str, Any]:
        """As ATOL's getFiscalDocumentResult builds them for the document just made."""
        params: dict[str, Any] = {}
        if self.receipt_number is not None:
            params["total"] = self.total
        params.update(
            {
                "fiscalDocumentNumber": self.fd,
                "fiscalDocumentSign": self.sign,
                "fiscalDocumentDateTime": self.date_time,
                "fnNumber": FN_NUMBER,
                "registrationNumber": REGISTRATION_NUMBER,
                "shiftNumber": self.shift,
            }
        )
        if self.receipt_number is not None:
            params["fiscalReceiptNumber"] = self.receipt_number
        params["fnsUrl"] = FNS_URL
        if self.receipts_count is not None:
            params["receiptsCount"] = self.receipts_count
        return params

    def summary(self) -> dict[str, Any]:
        return {
            "fd": self.fd,
            "type": self.kind,
            "uuid": self.uuid,
            "total": str(self.total.quantize(CENT)),
            "items": list(self.items),
            "shift": self.shift,
            "receiptNumber": self.receipt_number,
            "dateTime": self.date_time,
            "sign": self.sign,
            "printed": self.printed,
            "sentToOfd": self.sent,
        }


@dataclass(slots=True)
class ShiftRecord:
    opened: bool = False
    number: int = 0  # the open shift's, or the last closed one's
    opened_at: float = 0.0  # the register's clock
    receipts: int = 0
    documents: int = 0  # FDs of this shift (its opening and closing included)


@dataclass(slots=True)
class Subtask:
    task: Any
    type: str | None
    status: str = "wait"
    code: int = 0
    description: str = ERRORS[0]
    result: dict[str, Any] | None = None

    def ready(self, result: dict[str, Any]) -> None:
        self.status, self.code, self.description, self.result = "ready", 0, ERRORS[0], result

    def fail(self, code: int, detail: str = "", status: str = "error") -> None:
        text = ERRORS.get(code, "Ошибка")
        self.status, self.code, self.result = status, code, None
        self.description = f"{text} ({detail})" if detail else text

    def answer(self, shape: str) -> dict[str, Any]:
        if shape == "flat":
            return {
                "status": self.status,
                "errorCode": self.code,
                "errorDescription": self.description,
                "result": self.result,
            }
        return {
            "status": self.status,
            "error": {"code": self.code, "description": self.description},
            "result": self.result,
        }


@dataclass(slots=True)
class QueuedRequest:
    uuid: str
    subtasks: list[Subtask]
    canceled: bool = False
    finished: bool = False


COUNTERS = (
    "posts",
    "accepted",
    "duplicate_posts",
    "bad_posts",
    "lost_answers",
    "gets",
    "deletes",
    "canceled",
    "cancel_refused",
    "queue_status_requests",
    "unauthorized",
    "unknown_device",
    "tasks_run",
)


# ---- receipt validation ------------------------------------------------------------------------------------


class Refusal(Exception):
    """A task the register refuses: its code and a description naming the field."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def _invalid(path: str, what: str) -> Refusal:
    return Refusal(501, f'поле "{path}": {what}')


def _object(value: Any, path: str, allowed: frozenset[str], required: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(path or "task", "must be an object")
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in allowed:
            raise _invalid(f"{prefix}{key}", "unknown field")
    for key in required:
        if key not in value:
            raise _invalid(f"{prefix}{key}", "required")
    return value


def _string(value: Any, path: str, max_len: int, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise _invalid(path, "must be a string")
    if not 1 <= len(value) <= max_len:
        raise _invalid(path, f"must be 1..{max_len} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _invalid(path, "bad format")
    return value


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _invalid(path, "must be true or false")
    return value


def _number(value: Any, path: str, places: int, low: Decimal, high: Decimal, range_code: int) -> Decimal:
    """A JSON number as the exact decimal its text spells (json.loads(parse_float=Decimal)); the range is checked
    before the places so that the modulo below never sees an exponent beyond the context's precision."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise _invalid(path, "must be a number")
    number = Decimal(value)
    if not low <= number <= high:
        raise Refusal(range_code, f'поле "{path}": {number} is out of range [{low}, {high}]')
    if number % Decimal(1).scaleb(-places) != 0:
        raise _invalid(path, f"at most {places} decimal places")
    return number


def _enum(value: Any, path: str, names: frozenset[str], codes: frozenset[int], code: int) -> str | int:
    if isinstance(value, str):
        if value not in names:
            raise Refusal(code, f'поле "{path}": unknown value {value[:64]!r}')
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in codes:
            raise Refusal(code, f'поле "{path}": unknown value {value}')
        return value
    raise _invalid(path, "must be a string or a number")


def _operator(value: Any) -> None:
    operator = _object(value, "operator", frozenset({"name", "vatin"}), ("name",))
    _string(operator["name"], "operator.name", 64)
    if "vatin" in operator:
        _string(operator["vatin"], "operator.vatin", 12, VATIN_RE)


def _contact(value: Any, path: str) -> None:
    text = _string(value, path, 64)
    if not (EMAIL_RE.fullmatch(text) or PHONE_RE.fullmatch(text)):
        raise _invalid(path, "must be an e-mail address or a phone number")


@dataclass(frozen=True, slots=True)
class ValidReceipt:
    total: Decimal
    names: list[str]
    electronically: bool


def _item(value: Any, path: str) -> tuple[str, Decimal]:
    item = _object(value, path, ITEM_KEYS, ITEM_REQUIRED)
    if item["type"] != "position":
        raise _invalid(f"{path}.type", 'only "position" items are modelled')
    name = _string(item["name"], f"{path}.name", 128)
    price = _number(item["price"], f"{path}.price", 2, Decimal(0), MAX_PRICE, 16)
    quantity = _number(item["quantity"], f"{path}.quantity", 3, Decimal(0), MAX_QUANTITY, 17)
    if quantity == 0:
        raise Refusal(17, f'поле "{path}.quantity": must be above 0')
    amount = _number(item["amount"], f"{path}.amount", 2, Decimal(0), MAX_PRICE, 16)
    tax = _object(item["tax"], f"{path}.tax", frozenset({"type", "sum"}), ("type",))
    if not isinstance(tax["type"], str):
        raise _invalid(f"{path}.tax.type", "must be a string")
    if tax["type"] not in TAX_TYPES:
        raise Refusal(144, f'поле "{path}.tax.type": unknown rate {tax["type"][:64]!r}')
    if "sum" in tax:
        _number(tax["sum"], f"{path}.tax.sum", 2, Decimal(0), MAX_PRICE, 16)
    if "paymentMethod" in item:
        _enum(item["paymentMethod"], f"{path}.paymentMethod", PAYMENT_METHODS, PAYMENT_METHOD_CODES, 216)
    if "paymentObject" in item:
        _enum(item["paymentObject"], f"{path}.paymentObject", PAYMENT_OBJECTS, PAYMENT_OBJECT_CODES, 217)
    if "measurementUnit" in item:
        unit = item["measurementUnit"]
        if isinstance(unit, bool) or not (
            (isinstance(unit, str) and unit in MEASUREMENT_UNITS) or (isinstance(unit, int) and 0 <= unit <= 255)
        ):
            raise _invalid(f"{path}.measurementUnit", "an FFD 1.2 unit name or a code 0..255")
    # The driver's rule: the line total is price x quantity, in kopecks, rounded half up.
    expected = (price * quantity).quantize(CENT, rounding=ROUND_HALF_UP)
    if amount != expected:
        raise Refusal(16, f'поле "{path}.amount": {amount} is not price x quantity = {expected}')
    return name, amount


def validate_receipt(task: Any) -> ValidReceipt:
    """Check a sell/sellReturn/buy/buyReturn task as the mock's register does; Refusal carries the driver's code
    and names the field (the module docstring lists which check gives which code)."""
    receipt = _object(task, "", RECEIPT_KEYS, ("type", "items", "payments"))
    if "taxationType" in receipt:
        if not isinstance(receipt["taxationType"], str):
            raise _invalid("taxationType", "must be a string")
        if receipt["taxationType"] not in TAXATION_TYPES:
            raise Refusal(143, f'поле "taxationType": unknown value {receipt["taxationType"][:64]!r}')
    electronically = _boolean(receipt.get("electronically", False), "electronically")
    _boolean(receipt.get("ignoreNonFiscalPrintErrors", False), "ignoreNonFiscalPrintErrors")
    if "operator" in receipt:
        _operator(receipt["operator"])
    contact = None
    if "clientInfo" in receipt:
        client = _object(receipt["clientInfo"], "clientInfo", frozenset({"emailOrPhone", "name", "vatin"}))
        if "emailOrPhone" in client:
            _contact(client["emailOrPhone"], "clientInfo.emailOrPhone")
            contact = client["emailOrPhone"]
        if "name" in client:
            _string(client["name"], "clientInfo.name", 256)
        if "vatin" in client:
            _string(client["vatin"], "clientInfo.vatin", 12, VATIN_RE)
    if "companyInfo" in receipt:
        company = _object(receipt["companyInfo"], "companyInfo", frozenset({"email"}), ("email",))
        _string(company["email"], "companyInfo.email", 64, EMAIL_RE)
    for key in ("paymentsPlace", "paymentsAddress"):
        if key in receipt:
            _string(receipt[key], key, 256)
    if electronically and contact is None:
        raise _invalid("clientInfo.emailOrPhone", "required when electronically is true")
    items = receipt["items"]
    if not isinstance(items, list) or not items:
        raise _invalid("items", "must be a non-empty array")
    if len(items) > MAX_ITEMS:
        raise Refusal(110, f'поле "items": {len(items)} items, at most {MAX_ITEMS}')
    names: list[str] = []
    items_sum = Decimal(0)
    for i, value in enumerate(items):
        name, amount = _item(value, f"items[{i}]")
        names.append(name)
        items_sum += amount
    payments = receipt["payments"]
    if not isinstance(payments, list) or not 1 <= len(payments) <= MAX_PAYMENTS:
        raise _invalid("payments", f"must be an array of 1..{MAX_PAYMENTS} payments")
    paid = non_cash = Decimal(0)
    for i, value in enumerate(payments):
        payment = _object(value, f"payments[{i}]", frozenset({"type", "sum"}), ("type", "sum"))
        kind = _enum(payment["type"], f"payments[{i}].type", PAYMENT_TYPES, PAYMENT_TYPE_CODES, 145)
        amount = _number(payment["sum"], f"payments[{i}].sum", 2, Decimal(0), MAX_PAYMENT, 501)
        paid += amount
        if kind not in ("cash", 0):
            non_cash += amount
    total = items_sum
    if "total" in receipt:
        total = _number(receipt["total"], "total", 2, Decimal(0), MAX_PAYMENT, 63)
    if items_sum > MAX_RECEIPT_TOTAL:
        raise Refusal(63, f"the items add up to {items_sum}, above {MAX_RECEIPT_TOTAL}")
    if total != items_sum:
        raise Refusal(227, f'поле "total": {total} is not the sum of the items, {items_sum}')
    if paid < total:
        raise Refusal(66, f"paid {paid} of {total}")
    if non_cash > total:
        raise Refusal(52, f"non-cash payments {non_cash} exceed the total {total}")
    return ValidReceipt(total, names, electronically)


def _validate_shift_task(task: dict[str, Any]) -> None:
    _object(task, "", SHIFT_TASK_KEYS, ("type",))
    if "operator" in task:
        _operator(task["operator"])
    if "electronically" in task:
        _boolean(task["electronically"], "electronically")


# ---- the register and its queue ----------------------------------------------------------------------------


class RegisterState:
    """The simulated register, the web server's queue and its worker; the handlers and the admin API share it."""

    def __init__(
        self,
        *,
        login: str | None = None,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
        **behaviour: Any,
    ) -> None:
        if (login is None) != (password is None):
            raise ValueError("login and password go together")
        self.login = login
        self.password = password
        self.clock = clock  # epoch seconds; the register's clock is this plus clock_offset_s
        self.behaviour = Behaviour()
        self.behaviour.update(behaviour)
        self._changed = asyncio.Event()
        self._work = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._clear()

    def _clear(self) -> None:
        self.clock_offset_s = 0.0
        self.requests: dict[str, QueuedRequest] = {}
        self.queue: deque[QueuedRequest] = deque()
        self.current: QueuedRequest | None = None
        self.blocked_uuid = ""
        self.block_reason = ""
        self.documents: list[FiscalDocument] = []
        self.fd_number = 0
        self.shift = ShiftRecord()
        self.pending_copy: FiscalDocument | None = None  # fiscalized, its paper copy not (finished) printed
        self.keys_updated_at = self.now()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_waiting = 0

    # -- plumbing --

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def now(self) -> float:
        return self.clock() + self.clock_offset_s

    def iso(self, moment: float) -> str:
        zone = timezone(timedelta(minutes=self.behaviour.utc_offset_minutes))
        return datetime.fromtimestamp(moment, zone).isoformat(timespec="seconds")

    def update_behaviour(self, changes: dict[str, Any]) -> None:
        self.behaviour.update(changes)
        self._changed.set()
        self.forward_to_ofd()

    def advance_clock(self, seconds: float) -> None:
        self.clock_offset_s += seconds

    def start_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="mock-atol-driver-worker")

    async def stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass

    async def reset(self) -> None:
        """Forget every request, document and counter (the behaviour stays); a task being run is dropped."""
        running = self._worker is not None
        await self.stop_worker()
        self._clear()
        if running:
            self.start_worker()

    # -- the queue --

    def enqueue(self, uuid: str, tasks: list[dict[str, Any]]) -> tuple[QueuedRequest, int]:
        """Queue a request; returns it and the count of unfinished requests ahead of it."""
        ahead = len(self.queue) + (self.current is not None)
        subtasks = [Subtask(task, task.get("type") if isinstance(task.get("type"), str) else None) for task in tasks]
        request = QueuedRequest(uuid, subtasks)
        self.requests[uuid] = request
        self.queue.append(request)
        self.max_waiting = max(self.max_waiting, len(self.queue))
        self._work.set()
        return request, ahead

    def cancel(self, request: QueuedRequest) -> bool:
        if request.canceled or not all(s.status == "wait" for s in request.subtasks):
            return False
        request.canceled = True
        for subtask in request.subtasks:
            subtask.fail(503, status="canceled")
        try:
            self.queue.remove(request)
        except ValueError:
            pass
        return True

    def queue_status(self) -> dict[str, Any]:
        finished = sum(1 for r in self.requests.values() if r.finished and not r.canceled)
        canceled = sum(1 for r in self.requests.values() if r.canceled)
        return {
            "number": len(self.queue) + (self.current is not None),
            "ready": finished,
            "canceled": canceled,
            "isBlocked": bool(self.blocked_uuid),
            "blockedUUID": self.blocked_uuid,
            "blockReason": self.block_reason,
        }

    async def _run(self) -> None:
        while True:
            while not self.queue:
                self._work.clear()
                await self._work.wait()
            request = self.queue.popleft()
            self.current = request
            try:
                await self._run_request(request)
            finally:
                self.current = None

    async def _run_request(self, request: QueuedRequest) -> None:
        failed = False
        for subtask in request.subtasks:
            if failed:
                subtask.fail(502, status="interrupted")
                continue
            subtask.status = "inProgress"
            self.count("tasks_run")
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._run_subtask(request, subtask)
            except Refusal as refusal:
                subtask.fail(refusal.code, refusal.detail)
            finally:
                self.in_flight -= 1
            if subtask.status == "error":
                failed = True
        request.finished = True
        log.debug("request %s: %s", request.uuid, [s.status for s in request.subtasks])

    async def _run_subtask(self, request: QueuedRequest, subtask: Subtask) -> None:
        kind = subtask.type
        if kind in RECEIPT_TYPES:
            await self._receipt(request, subtask, kind)
        elif kind in SHIFT_TYPES:
            await self._shift_report(request, subtask)
        elif kind in CORRECTION_TYPES:
            subtask.fail(501, f"{kind} is not modelled by this mock")
        elif kind in QUERIES:
            if self.behaviour.device_off:
                subtask.fail(2, "the register does not answer")
                return
            subtask.ready(QUERIES[kind](self, subtask.task))
        elif "type" not in subtask.task:
            subtask.fail(501, 'поле "type": required')
        elif kind is None:
            subtask.fail(501, 'поле "type": must be a string')
        else:
            subtask.fail(501, f"unknown task type {kind[:64]!r}")

    # -- fiscal tasks --

    async def _receipt(self, request: QueuedRequest, subtask: Subtask, kind: str) -> None:
        receipt = validate_receipt(subtask.task)
        if request.uuid in self.behaviour.refuse_uuids:
            subtask.fail(self.behaviour.refuse_code, "the mock refuses this request's receipt")
            return
        refused = [name for name in receipt.names if name in self.behaviour.refuse_names]
        if refused:
            code = self.behaviour.refuse_code
            subtask.fail(code, f"the mock refuses an item named {refused[0][:64]!r}")
            return
        if not await self._reach_register(request, subtask):
            return
        self._check_printer()
        auto_opened = self._shift_for_receipt(request)
        behaviour = self.behaviour
        fd_before = self.fd_number
        if behaviour.power_loss_next is not None:
            made, behaviour.power_loss_next = behaviour.power_loss_next == "made", None
            if made:
                self._make(request.uuid, kind, receipt, printed=False)
            log.info("mock register: power lost mid-print of %s (%s)", request.uuid, "made" if made else "not made")
            behaviour.device_off = True
            await self._blocked(request, subtask, fd_before, power_loss=True)
            return
        if behaviour.unknown_error_next is not None:
            made, behaviour.unknown_error_next = behaviour.unknown_error_next == "made", None
            if made:
                self._make(request.uuid, kind, receipt, printed=not receipt.electronically)
            subtask.fail(15, "the register's answer to the document was lost")
            return
        await self._print_time()
        if behaviour.device_off:  # switched off while printing: the document did not get closed
            await self._blocked(request, subtask, fd_before, power_loss=False)
            return
        runs_out = behaviour.paper_runs_out_next and not receipt.electronically
        if runs_out:
            behaviour.paper_runs_out_next = False
            behaviour.paper_present = False
        document = self._make(request.uuid, kind, receipt, printed=not (receipt.electronically or runs_out))
        warnings: dict[str, Any] = {"notPrinted": runs_out}
        if auto_opened:
            warnings["shiftAutoOpened"] = True
        subtask.ready({"fiscalParams": document.fiscal_params(), "warnings": warnings})

    async def _shift_report(self, request: QueuedRequest, subtask: Subtask) -> None:
        _validate_shift_task(subtask.task)
        if not await self._reach_register(request, subtask):
            return
        self._check_printer()
        state = self.shift_state()
        if subtask.type == "openShift" and state != "closed":
            raise Refusal(83, f"shift {self.shift.number} is {state}")
        if subtask.type == "closeShift" and state == "closed":
            raise Refusal(73, "no shift is open")
        fd_before = self.fd_number
        await self._print_time()
        if self.behaviour.device_off:
            await self._blocked(request, subtask, fd_before, power_loss=False)
            return
        if subtask.type == "openShift":
            document = self._open_shift(request.uuid)
        else:
            document = self._close_shift(request.uuid)
        subtask.ready({"fiscalParams": document.fiscal_params(), "warnings": {"notPrinted": False}})

    async def _reach_register(self, request: QueuedRequest, subtask: Subtask) -> bool:
        """False when the register is off: the task was blocked and has been settled."""
        if not self.behaviour.device_off:
            return True
        await self._blocked(request, subtask, self.fd_number, power_loss=False)
        return False

    def _check_printer(self) -> None:
        if self.behaviour.cover_open:
            raise Refusal(45, "")
        if not self.behaviour.paper_present:
            raise Refusal(44, "")

    def _shift_for_receipt(self, request: QueuedRequest) -> bool:
        """Raise when the shift refuses the receipt; True when it had to be opened for it."""
        state = self.shift_state()
        if state == "expired":
            raise Refusal(68, f"shift {self.shift.number} opened at {self.iso(self.shift.opened_at)}")
        if state == "closed":
            if not self.behaviour.auto_open_shift:
                raise Refusal(73, "")
            self._open_shift(request.uuid)
            return True
        return False

    async def _print_time(self) -> None:
        if self.behaviour.print_time_s > 0:
            await asyncio.sleep(self.behaviour.print_time_s)

    async def _blocked(self, request: QueuedRequest, subtask: Subtask, fd_before: int, *, power_loss: bool) -> None:
        """The web server lost the register mid-document: the queue stops until the register answers again
        (device_off false), then the FD number says whether the document was made."""
        subtask.fail(2, "the register stopped answering; the outcome is recovered when it is back", status="blocked")
        self.blocked_uuid, self.block_reason = request.uuid, "connectionError"
        log.warning("mock register: request %s blocked (connectionError)", request.uuid)
        loop = asyncio.get_running_loop()
        back_after = self.behaviour.power_back_after_s if power_loss else None
        deadline = None if back_after is None else loop.time() + back_after
        while self.behaviour.device_off:
            wait = BLOCKED_RECHECK_S
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    log.info("mock register: power is back")
                    self.behaviour.device_off = False
                    break
                wait = min(wait, left)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                pass
        self.blocked_uuid, self.block_reason = "", ""
        if self.fd_number > fd_before:
            document = self.documents[-1]
            warnings = {"notPrinted": document is self.pending_copy, "recovered": True}
            subtask.ready({"fiscalParams": document.fiscal_params(), "warnings": warnings})
        else:
            subtask.fail(2, "the document was not fiscalized")
        log.info("mock register: request %s settled %s", request.uuid, subtask.status)

    # -- the FN --

    def shift_state(self) -> str:
        if not self.shift.opened:
            return "closed"
        return "expired" if self.now() >= self.shift.opened_at + SHIFT_LENGTH_S else "opened"

    def _new_document(
        self, uuid: str, kind: str, total: Decimal, names: list[str], receipt_number: int | None, printed: bool
    ) -> FiscalDocument:
        self.fd_number += 1
        made_at = self.now()
        date_time = self.iso(made_at)
        digest = hashlib.sha256(f"{FN_NUMBER}|{self.fd_number}|{kind}|{total}|{date_time}|{uuid}".encode()).digest()
        sign = f"{int.from_bytes(digest[:8], 'big') % 10**10:010d}"
        document = FiscalDocument(
            fd=self.fd_number,
            kind=kind,
            uuid=uuid,
            total=total,
            items=names,
            shift=self.shift.number,
            receipt_number=receipt_number,
            made_at=made_at,
            date_time=date_time,
            sign=sign,
            printed=printed,
        )
        self.documents.append(document)
        self.shift.documents += 1
        self.forward_to_ofd()
        return document

    def _make(self, uuid: str, kind: str, receipt: ValidReceipt, *, printed: bool) -> FiscalDocument:
        self.shift.receipts += 1
        document = self._new_document(uuid, kind, receipt.total, receipt.names, self.shift.receipts, printed)
        if not printed and not receipt.electronically:  # an electronic receipt has no paper copy to finish
            self.pending_copy = document
        return document

    def _open_shift(self, uuid: str) -> FiscalDocument:
        self.shift = ShiftRecord(opened=True, number=self.shift.number + 1, opened_at=self.now())
        return self._new_document(uuid, "openShift", Decimal(0), [], None, True)

    def _close_shift(self, uuid: str) -> FiscalDocument:
        receipts = self.shift.receipts
        document = self._new_document(uuid, "closeShift", Decimal(0), [], None, True)
        document.receipts_count = receipts
        self.shift.opened = False
        return document

    def forward_to_ofd(self) -> None:
        if self.behaviour.ofd_online:
            for document in self.documents:
                document.sent = True

    def unsent(self) -> list[FiscalDocument]:
        return [d for d in self.documents if not d.sent]

    # -- admin views --

    def register_view(self) -> dict[str, Any]:
        return {
            "fiscalDocumentNumber": self.fd_number,
            "shift": {
                "state": self.shift_state(),
                "number": self.shift.number,
                "openedAt": self.iso(self.shift.opened_at) if self.shift.opened else None,
                "receipts": self.shift.receipts,
            },
            "pendingCopy": None if self.pending_copy is None else self.pending_copy.fd,
            "unsentToOfd": len(self.unsent()),
            "queue": self.queue_status(),
            "now": self.iso(self.now()),
            "clockOffsetS": self.clock_offset_s,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "requests": len(self.requests),
            "documents": len(self.documents),
            "max_tasks_in_flight": self.max_in_flight,
            "max_posts_waiting": self.max_waiting,
            "behaviour": asdict(self.behaviour),
        }


# ---- query tasks (no FD, no print time) --------------------------------------------------------------------


def _get_shift_status(state: RegisterState, task: Any) -> dict[str, Any]:
    shift_state = state.shift_state()
    status: dict[str, Any] = {"state": shift_state, "number": state.shift.number}
    if shift_state == "closed":
        status["expiredTime"] = state.iso(state.now())
        status["documentsCount"] = state.shift.documents
    else:
        status["expiredTime"] = state.iso(state.shift.opened_at + SHIFT_LENGTH_S)
    return {"shiftStatus": status}


def _get_device_status(state: RegisterState, task: Any) -> dict[str, Any]:
    return {
        "deviceStatus": {
            "blocked": False,
            "coverOpened": state.behaviour.cover_open,
            "paperPresent": state.behaviour.paper_present,
            "fiscal": True,
            "fnFiscal": True,
            "fnPresent": True,
            "cashDrawerOpened": False,
            "currentDateTime": state.iso(state.now()),
            "shift": state.shift_state(),
        }
    }


def _fn_validity(state: RegisterState) -> datetime:
    """The FN's end of validity: the start of that day, the register's local time."""
    zone = timezone(timedelta(minutes=state.behaviour.utc_offset_minutes))
    return datetime.combine(date.fromisoformat(state.behaviour.fn_validity_date), datetime.min.time(), zone)


def _fn_warnings(state: RegisterState) -> dict[str, bool]:
    unsent = state.unsent()
    return {
        "criticalError": False,
        "memoryOverflow": False,
        "needReplacement": _fn_validity(state).timestamp() - state.now() < FN_REPLACEMENT_WARNING_S,
        "ofdTimeout": bool(unsent) and state.now() - unsent[0].made_at > OFD_TIMEOUT_S,
        "resourceExhausted": False,
    }


def _get_fn_status(state: RegisterState, task: Any) -> dict[str, Any]:
    state.forward_to_ofd()
    return {
        "fnStatus": {
            "fiscalDocumentNumber": state.fd_number,
            "fiscalReceiptNumber": state.shift.receipts,
            "warnings": _fn_warnings(state),
        }
    }


def _ofd_exchange_status(state: RegisterState, task: Any) -> dict[str, Any]:
    state.forward_to_ofd()
    unsent = state.unsent()
    status: dict[str, Any] = {
        "notSentCount": len(unsent),
        "notSentFirstDocNumber": unsent[0].fd if unsent else 0,
        "lastSuccessKeysUpdate": state.iso(state.keys_updated_at),
    }
    if unsent:
        status["notSentFirstDocDateTime"] = unsent[0].date_time
    return {"status": status, "warnings": {"dataForSendIsEmpty": not unsent}}


def _get_fn_info(state: RegisterState, task: Any) -> dict[str, Any]:
    return {
        "fnInfo": {
            "serial": FN_NUMBER,
            "validityDate": _fn_validity(state).isoformat(timespec="seconds"),
            "livePhase": "fiscalMode",
            "ffdVersion": "1.2",
            "warnings": _fn_warnings(state),
        }
    }


def _get_last_fiscal_params(state: RegisterState, task: Any) -> dict[str, Any]:
    for_receipt = task.get("forReceipt", False)
    if not isinstance(for_receipt, bool):
        raise _invalid("forReceipt", "must be true or false")
    found = next(
        (d for d in reversed(state.documents) if not for_receipt or d.receipt_number is not None),
        None,
    )
    if found is None:  # ATOL's script leaves out what the FN cannot say
        return {
            "fiscalParams": {
                "fnNumber": FN_NUMBER,
                "registrationNumber": REGISTRATION_NUMBER,
                "shiftNumber": state.shift.number,
                "fnsUrl": FNS_URL,
            }
        }
    params = found.fiscal_params()
    params.pop("receiptsCount", None)
    if not for_receipt:
        params.pop("total", None)
        params.pop("fiscalReceiptNumber", None)
    return {"fiscalParams": params}


def _continue_print(state: RegisterState, task: Any) -> dict[str, Any]:
    if state.pending_copy is None:
        return {}
    if state.behaviour.cover_open:
        raise Refusal(45, "")
    if not state.behaviour.paper_present:
        raise Refusal(44, "")
    state.pending_copy.printed = True
    log.info("mock register: printed the pending copy of FD %d", state.pending_copy.fd)
    state.pending_copy = None
    return {}


QUERIES: dict[str, Callable[[RegisterState, Any], dict[str, Any]]] = {
    "getShiftStatus": _get_shift_status,
    "getDeviceStatus": _get_device_status,
    "getFnStatus": _get_fn_status,
    "ofdExchangeStatus": _ofd_exchange_status,
    "getFnInfo": _get_fn_info,
    "getLastFiscalParams": _get_last_fiscal_params,
    "continuePrint": _continue_print,
}


# ---- answers -----------------------------------------------------------------------------------------------


def _decimal_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Two decimals at most, so the shortest float repr spells exactly this decimal.
        return float(value)
    raise TypeError(type(value).__name__)


_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=_decimal_default)


def _answer(status: int, document: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=_encoder.encode(document).encode(),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _error(status: int, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return _answer(status, {"error": {"code": WEB_FAIL, "description": description}}, headers)


def _reset_connection(request: web.BaseRequest) -> web.Response:
    """A TCP reset instead of an answer."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(raw: bytes) -> Any:
    # Decimals, not floats: the register must see the number the client wrote, not its nearest binary fraction.
    return json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)


# ---- handlers ----------------------------------------------------------------------------------------------

STATE_KEY: web.AppKey[RegisterState] = web.AppKey("mock_atol_driver_state", RegisterState)


def _authorized(request: web.Request, state: RegisterState) -> bool:
    if state.login is None or state.password is None:
        return True
    # Decoded by hand: aiohttp 3.14 deprecates its BasicAuth helper.
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    login, sep, password = decoded.partition(":")
    expected = f"{state.login}:{state.password}".encode()
    return bool(sep) and secrets.compare_digest(f"{login}:{password}".encode(), expected)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Basic auth and the device id, for every protocol route but serverInfo."""
    if not request.path.startswith(PREFIX + "/") or request.path == f"{PREFIX}/serverInfo":
        return await handler(request)
    state = request.app[STATE_KEY]
    if not _authorized(request, state):
        state.count("unauthorized")
        return _error(401, "Требуется авторизация", {"WWW-Authenticate": 'Basic realm="fptr-web-requests"'})
    device = request.query.get("deviceID", DEFAULT_DEVICE)
    if device != DEFAULT_DEVICE:
        state.count("unknown_device")
        return _error(404, f"Устройство {device[:64]!r} не найдено")
    return await handler(request)


def _parse_post(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The uuid and the subtasks of a POST body; ValueError says what is wrong (answered 400)."""
    try:
        body = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    uuid = body.get("uuid")
    if not isinstance(uuid, str) or not 1 <= len(uuid) <= 128 or not uuid.isprintable():
        raise ValueError("uuid is required: a string of 1..128 printable characters")
    if "request" not in body:
        raise ValueError("request is required")
    tasks = body["request"]
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
        raise ValueError("request must be a task object or a non-empty array of them")
    fiscal = [t["type"] for t in tasks if isinstance(t.get("type"), str) and t["type"] in FISCAL_TYPES]
    if len(fiscal) > 1:
        raise ValueError(f"at most one fiscal task per request, got {', '.join(fiscal)}")
    return uuid, tasks


async def handle_post(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("posts")
    try:
        uuid, tasks = _parse_post(await request.read())
    except ValueError as exc:
        state.count("bad_posts")
        return _error(400, str(exc))
    if uuid in state.requests:
        state.count("duplicate_posts")
        return _error(409, f"Задание с uuid {uuid!r} уже существует")
    queued, ahead = state.enqueue(uuid, tasks)
    state.count("accepted")
    log.debug("request %s queued: %s", uuid, [s.type for s in queued.subtasks])
    holds_receipt = any(t.get("type") in RECEIPT_TYPES for t in tasks)
    if state.behaviour.lose_answers > 0 or (holds_receipt and state.behaviour.lose_receipt_answers > 0):
        if state.behaviour.lose_answers > 0:
            state.behaviour.lose_answers -= 1
        else:
            state.behaviour.lose_receipt_answers -= 1
        state.count("lost_answers")
        return _reset_connection(request)
    if holds_receipt and state.behaviour.receipt_answer_delay_s > 0:
        await asyncio.sleep(state.behaviour.receipt_answer_delay_s)
    status = state.queue_status()
    return _answer(
        201,
        {
            "number": ahead,
            "uuid": uuid,
            "isBlocked": status["isBlocked"],
            "blockedUUID": status["blockedUUID"],
            "blockReason": status["blockReason"],
        },
    )


async def handle_get(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("gets")
    queued = state.requests.get(request.match_info["uuid"])
    if queued is None:
        return _error(404, "Задание не найдено")
    shape = state.behaviour.result_shape
    return _answer(200, {"results": [s.answer(shape) for s in queued.subtasks]})


async def handle_delete(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("deletes")
    queued = state.requests.get(request.match_info["uuid"])
    if queued is None:
        return _error(404, "Задание не найдено")
    if not state.cancel(queued):
        state.count("cancel_refused")
        return _error(state.behaviour.cancel_refusal, "Задание уже выполняется или выполнено")
    state.count("canceled")
    return _answer(200, {})


async def handle_queue_status(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.count("queue_status_requests")
    return _answer(200, state.queue_status())


async def handle_server_info(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return _answer(
        200,
        {
            "serverVersion": SERVER_VERSION,
            "driverVersion": DRIVER_VERSION,
            "os": "Linux",
            "currentDateTime": state.iso(state.now()),
        },
    )


# ---- admin -------------------------------------------------------------------------------------------------


async def admin_behaviour(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        try:
            state.update_behaviour(await admin_body(request))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("mock ATOL driver behaviour: %s", asdict(state.behaviour))
    return web.json_response(asdict(state.behaviour))


async def admin_clock(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await admin_body(request)
    advance = body.get("advance_s")
    if body.keys() != {"advance_s"} or isinstance(advance, bool) or not isinstance(advance, (int, float)):
        return web.json_response({"error": 'the body must be {"advance_s": seconds}'}, status=400)
    if not 0 <= advance <= 10 * 365 * 86400:
        return web.json_response({"error": "advance_s must be in [0, 10 years]"}, status=400)
    state.advance_clock(float(advance))
    return web.json_response({"clock_offset_s": state.clock_offset_s, "now": state.iso(state.now())})


async def admin_documents(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.forward_to_ofd()
    return web.json_response({"documents": [d.summary() for d in state.documents]})


async def admin_register(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].register_view())


async def admin_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats())


async def admin_reset(request: web.Request) -> web.Response:
    await request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


def create_app(state: RegisterState | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_guard])
    app[STATE_KEY] = state if state is not None else RegisterState()

    async def worker(app: web.Application) -> Any:
        app[STATE_KEY].start_worker()
        yield
        await app[STATE_KEY].stop_worker()

    app.cleanup_ctx.append(worker)
    app.router.add_route("POST", f"{PREFIX}/requests", handle_post)
    app.router.add_route("GET", PREFIX + "/requests/{uuid}", handle_get)
    app.router.add_route("DELETE", PREFIX + "/requests/{uuid}", handle_delete)
    app.router.add_route("GET", f"{PREFIX}/getRequestsQueueStatus", handle_queue_status)
    app.router.add_route("GET", f"{PREFIX}/serverInfo", handle_server_info)
    app.router.add_route("GET", "/admin/behaviour", admin_behaviour)
    app.router.add_route("POST", "/admin/behaviour", admin_behaviour)
    app.router.add_route("POST", "/admin/clock", admin_clock)
    app.router.add_route("GET", "/admin/documents", admin_documents)
    app.router.add_route("GET", "/admin/register", admin_register)
    app.router.add_route("GET", "/admin/stats", admin_stats)
    app.router.add_route("POST", "/admin/reset", admin_reset)
    return app


# ---- running it --------------------------------------------------------------------------------------------


class MockRegister(MockServer):
    """A running mock: ``url`` is the web server's base (``http://HOST:PORT``, kktd appends ``/api/v2``),
    ``api_url`` that with ``/api/v2``, ``admin_url`` the admin API's; ``state`` the register itself."""

    def __init__(self, state: RegisterState, runner: web.AppRunner, site: web.TCPSite, host: str, port: int) -> None:
        super().__init__(runner, site, host, port)
        self.state = state

    @property
    def url(self) -> str:
        return self.origin

    @property
    def api_url(self) -> str:
        return self.url + PREFIX

    @property
    def admin_url(self) -> str:
        return f"{self.url}/admin"

    def set_behaviour(self, **changes: Any) -> None:
        self.state.update_behaviour(changes)

    def advance_clock(self, seconds: float) -> None:
        self.state.advance_clock(seconds)

    def documents(self) -> list[dict[str, Any]]:
        self.state.forward_to_ofd()
        return [d.summary() for d in self.state.documents]

    def stats(self) -> dict[str, Any]:
        return self.state.stats()


async def start_mock_register(host: str = "127.0.0.1", port: int = 0, **options: Any) -> MockRegister:
    """Start a mock in this event loop (port 0: a free one). ``options``: login and password (HTTP Basic on
    the protocol routes), clock (epoch seconds, the register's clock before /admin/clock moves it) and any
    Behaviour field."""
    state = RegisterState(**options)
    runner, site, bound = await MockServer.serve(create_app(state), host, port)
    mock = MockRegister(state, runner, site, host, bound)
    log.info("mock ATOL driver v10 register listening on %s (admin %s)", mock.url, mock.admin_url)
    return mock


async def start_embedded(settings: Any) -> EmbeddedMock:
    """`kktd serve --embedded-mock` (development): a mock in kktd's own event loop and the settings that send
    to it (kktd.upstreams.atol_driver.DriverSettings; a login and a password there are required here too)."""
    login = getattr(settings, "login", None)
    password = getattr(settings, "password", None)
    credentials = {"login": login, "password": password} if login is not None and password is not None else {}
    mock = await start_mock_register("127.0.0.1", 0, **credentials)
    return EmbeddedMock(
        dataclasses.replace(settings, url=mock.url),
        f"mock ATOL driver v10 register on {mock.url} (admin {mock.admin_url})",
        mock.close,
    )


async def _serve(host: str, port: int, options: dict[str, Any]) -> None:
    mock = await start_mock_register(host, port, **options)
    auth = ""
    if mock.state.login is not None:
        auth = (
            f"\nHTTP Basic: login {mock.state.login}, password {mock.state.password} "
            f'(atol_driver_login = "{mock.state.login}" and a file holding the password as '
            "atol_driver_password_file)"
        )
    banner = (
        f"mock ATOL driver v10 register: {mock.api_url}, admin {mock.admin_url}/stats\n"
        f'kktd settings for it: upstream = "atol-driver", atol_driver_url = "{mock.url}"{auth}'
    )
    await serve_until_signalled(mock, banner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kktd mock-atol-driver",
        description="Mock of ATOL driver v10's web server (/api/v2) with a simulated fiscal register.",
    )
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT (default {DEFAULT_LISTEN})")
    parser.add_argument("--print-time", type=float, default=0.2, help="seconds a fiscal document takes (0.2)")
    parser.add_argument("--login", default=None, help="require HTTP Basic with this login (and --password)")
    parser.add_argument("--password", default=None, help="the password of --login (a mock's)")
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds added to the register's clock at start, negative for the past (its documents dated then)",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM. Exit codes: 0 clean stop, 78 bad arguments, 74 cannot listen."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's own exit: 0 for --help, 2 for a usage error
        return EX_OK if exc.code in (0, None) else EX_CONFIG
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_listen(args.listen)
        if (args.login is None) != (args.password is None):
            raise ValueError("--login and --password go together")
        options: dict[str, Any] = {"print_time_s": args.print_time}
        if args.clock_offset:
            offset = args.clock_offset
            options["clock"] = lambda: time.time() + offset
        if args.login is not None:
            options.update(login=args.login, password=args.password)
        Behaviour().update({"print_time_s": args.print_time})
    except ValueError as exc:
        print(f"kktd mock-atol-driver: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        asyncio.run(_serve(host, port, options))
    except OSError as exc:
        print(f"kktd mock-atol-driver: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return EX_IOERR
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
