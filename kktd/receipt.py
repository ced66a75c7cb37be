"""The receipt model (FFD tags in comments) and its validation.

Money is integer kopecks only: a float or a string amount is rejected, because a binary float cannot hold
kopecks exactly and a fiscal document must add up to the kopeck.

Two paths, one set of rules. parse_receipt parses the body strictly (decode_json: UTF-8, unique keys) and
converts the document into typed msgspec Structs (types, ranges, lengths, enumerations and unknown fields are
checked by msgspec in C), then checks what no type can say (item sums, totals, text content, the key) in
`_from_typed`. Only when that fast path refuses a body does the reference validator (`validate_receipt`, on
the same parsed document) run: it finds
the first broken rule in its fixed order and raises it with its stable code, message and field path, so a
client sees exactly the errors it always did. If the reference were to accept a body the fast path refused,
its result is used: the fast path can only ever cost time, never change an answer (tests/test_receipt_paths
checks both agree on generated receipts).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import msgspec

from kktd.errors import ErrorCode
from kktd.safetext import escape, forbidden_character, quoted

MAX_AMOUNT = 10**12  # exclusive upper bound for every amount, in kopecks
MAX_ITEMS = 100
MAX_PAYMENTS = 10
MAX_INTEGER_DIGITS = 32  # in a JSON body; the largest amount has 12

# The enumerations, once: as types for the typed decoder and as sets for the reference validator.
Operation = Literal["sale", "sale_refund", "purchase", "purchase_refund"]  # tag 1054
Taxation = Literal["osn", "usn_income", "usn_income_outcome", "esn", "patent"]  # tag 1055
VatRate = Literal[
    "none", "vat0", "vat5", "vat7", "vat10", "vat20", "vat22", "vat105", "vat107", "vat110", "vat120", "vat122"
]  # tag 1199
PaymentMethod = Literal[
    "full_payment", "full_prepayment", "prepayment", "advance", "partial_payment", "credit", "credit_payment"
]  # tag 1214
PaymentObject = Literal["commodity", "excise", "job", "service", "payment", "another"]  # tag 1212
PaymentType = Literal["cash", "electronic", "prepaid", "credit", "other"]
# Tag 2108, the unit of an item's quantity. Optional; "piece" when absent. The canonical form leaves "piece" out,
# so a receipt stored before the field existed keeps its hash and its meaning.
Measure = Literal[
    "piece",
    "gram",
    "kilogram",
    "ton",
    "centimeter",
    "decimeter",
    "meter",
    "square_centimeter",
    "square_decimeter",
    "square_meter",
    "milliliter",
    "liter",
    "cubic_meter",
    "kilowatt_hour",
    "gigacalorie",
    "day",
    "hour",
    "minute",
    "second",
    "kilobyte",
    "megabyte",
    "gigabyte",
    "terabyte",
    "other",
]
DEFAULT_MEASURE = "piece"

OPERATIONS = frozenset(get_args(Operation))
TAXATIONS = frozenset(get_args(Taxation))
VAT_RATES = frozenset(get_args(VatRate))
PAYMENT_METHODS = frozenset(get_args(PaymentMethod))
PAYMENT_OBJECTS = frozenset(get_args(PaymentObject))
PAYMENT_TYPES = frozenset(get_args(PaymentType))
MEASURES = frozenset(get_args(Measure))

RECEIPT_FIELDS = frozenset(
    {
        "idempotency_key",
        "pos_id",
        "operation",
        "taxation",
        "items",
        "payments",
        "customer_contact",
        "cashier",
    }
)
ITEM_FIELDS = frozenset(
    {
        "name",
        "price",
        "quantity",
        "sum",
        "vat",
        "payment_method",
        "payment_object",
        "measure",
    }
)
PAYMENT_FIELDS = frozenset({"type", "amount"})
CASHIER_FIELDS = frozenset({"name", "inn"})

IDEMPOTENCY_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
QUANTITY_RE = re.compile(r"(0|[1-9][0-9]{0,8})(?:\.([0-9]{1,3}))?")
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s.]+(?:\.[^@\s.]+)+")
PHONE_RE = re.compile(r"\+7[0-9]{10}")
INN_RE = re.compile(r"[0-9]{12}")


class ReceiptInvalid(Exception):
    """The receipt breaks a rule; nothing is stored. `code` is stable and machine-readable, `field` is the
    path of the offending value (``items[2].sum``) where there is one. The HTTP layer maps it to a 422."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class MalformedBody(ReceiptInvalid):
    """The body is not a JSON document at all (mapped to a 400)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """A validated receipt: `canonical` is the normalized form stored and sent to the OFD."""

    idempotency_key: str
    pos_id: str
    total: int
    canonical: dict[str, Any]
    canonical_json: str
    body_hash: str


# ---- the typed decoder (the fast path) ----

Amount = Annotated[int, msgspec.Meta(ge=0, lt=MAX_AMOUNT)]


class _ItemIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    price: Amount
    quantity: str | int  # strict decoding: a JSON true is not an int
    vat: VatRate
    payment_method: PaymentMethod
    payment_object: PaymentObject
    sum: Amount | None = None
    measure: Measure | None = None


class _PaymentIn(msgspec.Struct, forbid_unknown_fields=True):
    type: PaymentType
    amount: Amount


class _CashierIn(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    inn: str | None = None


class _ReceiptIn(msgspec.Struct, forbid_unknown_fields=True):
    pos_id: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    operation: Operation
    taxation: Taxation
    items: Annotated[list[_ItemIn], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    payments: Annotated[list[_PaymentIn], msgspec.Meta(min_length=1, max_length=MAX_PAYMENTS)]
    idempotency_key: str | None = None
    customer_contact: str | None = None
    cashier: _CashierIn | None = None


_DECODER = msgspec.json.Decoder(_ReceiptIn)  # bench/decoders.py's "msgspec" arm; not used by parse_receipt
_ENCODER = msgspec.json.Encoder(order="sorted")


def parse_receipt(body: bytes, header_key: str | None) -> Receipt:
    """Parse and validate a request body; raise ReceiptInvalid (MalformedBody for a body that is not a
    UTF-8 JSON document with unique keys) on the first violation."""
    data = decode_json(body)
    try:
        return _from_typed(_to_typed(data), header_key)
    except (msgspec.MsgspecError, ReceiptInvalid, UnicodeError):
        # UnicodeError: msgspec cannot match a key holding a lone surrogate (valid JSON, no character).
        pass  # refused: the reference path finds the first broken rule (or, if it accepts, answers instead)
    return validate_receipt(data, header_key)


def _to_typed(data: Any) -> _ReceiptIn:
    """The parsed document into the typed Structs. msgspec could also parse the bytes itself (12 instead of
    17 us per body, bench/decoders.py), but it keeps the last of two equal keys without a word (msgspec
    issue 648), and a duplicate key must be refused (decode_json): so decode_json parses, msgspec converts."""
    return msgspec.convert(data, _ReceiptIn, strict=True)


# RFC 8259 §8.1: JSON exchanged between systems is UTF-8, without a byte order mark. json.loads(bytes) would
# also detect and accept UTF-16 and UTF-32 and skip a UTF-8 BOM: a body that a strict proxy and kktd read
# differently is refused instead.
BYTE_ORDER_MARKS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_json(body: bytes) -> Any:
    """The JSON document in `body`: UTF-8, no byte order mark, no NaN/Infinity, no key twice in one object."""
    if body.startswith(BYTE_ORDER_MARKS):
        raise MalformedBody(
            ErrorCode.INVALID_ENCODING,
            "request body starts with a byte order mark: send UTF-8 JSON without one (RFC 8259)",
        )
    if b"\x00" in body:
        # Never in UTF-8 JSON (a NUL inside a string must be escaped): the body is UTF-16 or UTF-32.
        raise MalformedBody(
            ErrorCode.INVALID_ENCODING,
            "request body holds NUL bytes (UTF-16 or UTF-32?): only UTF-8 JSON is accepted (RFC 8259)",
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(
            ErrorCode.INVALID_ENCODING,
            f"request body is not valid UTF-8 (at byte {exc.start}): only UTF-8 JSON is accepted (RFC 8259)",
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_int=_integer)
    except RecursionError:
        raise MalformedBody(ErrorCode.NESTING_TOO_DEEP, "request body nests arrays or objects too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and the integer digit limit of int()
        raise MalformedBody(ErrorCode.INVALID_JSON, f"request body is not valid JSON: {escape(str(exc))}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Duplicate keys are legal JSON syntax, but parsers disagree about which one wins: a proxy that checks
    the first idempotency_key and kktd that stored the last would not be talking about the same receipt."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MalformedBody(ErrorCode.DUPLICATE_KEY, f"key {quoted(key)} appears more than once in one object")
            seen.add(key)
    return obj


def _integer(digits: str) -> int:
    # No amount has more than 12 digits; a longer number is refused before int() spends time on it.
    if len(digits) > MAX_INTEGER_DIGITS:
        raise MalformedBody(
            ErrorCode.NUMBER_TOO_LARGE,
            f"request body holds an integer of {len(digits)} digits (at most {MAX_INTEGER_DIGITS})",
        )
    return int(digits)


def _no_constant(name: str) -> Any:
    raise MalformedBody(ErrorCode.INVALID_JSON, f"{name} is not a JSON number (RFC 8259)")


def _from_typed(data: _ReceiptIn, header_key: str | None) -> Receipt:
    """The rules no type expresses, on a decoded receipt whose types, ranges and lengths hold already."""
    key = _idempotency_key(data.idempotency_key, header_key)
    items = [_typed_item(item) for item in data.items]
    total = sum(item["sum"] for item in items)
    paid = sum(payment.amount for payment in data.payments)
    if total >= MAX_AMOUNT or paid != total:
        raise ReceiptInvalid("refused", "the reference validator names the rule", None)
    canonical: dict[str, Any] = {
        "pos_id": _typed_text(data.pos_id),
        "operation": data.operation,
        "taxation": data.taxation,
        "items": items,
        "payments": [{"type": payment.type, "amount": payment.amount} for payment in data.payments],
        "total": total,
    }
    if data.customer_contact is not None:
        canonical["customer_contact"] = _contact(data.customer_contact)
    if data.cashier is not None:
        canonical["cashier"] = _typed_cashier(data.cashier)
    return _receipt(key, canonical)


def _typed_item(item: _ItemIn) -> dict[str, Any]:
    quantity_milli, quantity_text = _quantity(item.quantity, "quantity")
    expected_sum = (item.price * quantity_milli + 500) // 1000
    if (item.sum is not None and item.sum != expected_sum) or expected_sum >= MAX_AMOUNT:
        raise ReceiptInvalid("refused", "the reference validator names the rule", None)
    normalized: dict[str, Any] = {
        "name": _typed_text(item.name),
        "price": item.price,
        "quantity": quantity_text,
        "sum": expected_sum,
        "vat": item.vat,
        "payment_method": item.payment_method,
        "payment_object": item.payment_object,
    }
    if item.measure is not None and item.measure != DEFAULT_MEASURE:
        normalized["measure"] = item.measure
    return normalized


def _typed_cashier(cashier: _CashierIn) -> dict[str, str]:
    result: dict[str, str] = {}
    if cashier.name is not None:
        result["name"] = _typed_text(cashier.name)
    if cashier.inn is not None:
        if not INN_RE.fullmatch(cashier.inn):
            raise ReceiptInvalid("refused", "the reference validator names the rule", None)
        result["inn"] = cashier.inn
    return result


def _typed_text(value: str) -> str:
    """The content rules of _text (its length is the decoder's)."""
    if not value.strip() or forbidden_character(value) is not None:
        raise ReceiptInvalid("refused", "the reference validator names the rule", None)
    return value


# ---- the reference validator: every rule in its fixed order, each with its stable code and field ----


def validate_receipt(data: Any, header_key: str | None = None) -> Receipt:
    if not isinstance(data, dict):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, "request body must be a JSON object", None)
    _reject_unknown(data, RECEIPT_FIELDS, "")
    key = _idempotency_key(data.get("idempotency_key"), header_key)
    items = _list(data, "items", "", 1, MAX_ITEMS)
    normalized_items = [_item(item, f"items[{i}]") for i, item in enumerate(items)]
    total = sum(item["sum"] for item in normalized_items)
    if total >= MAX_AMOUNT:
        raise ReceiptInvalid(
            ErrorCode.AMOUNT_OUT_OF_RANGE, f"receipt total {total} must be below {MAX_AMOUNT} kopecks", "items"
        )
    payments = _list(data, "payments", "", 1, MAX_PAYMENTS)
    normalized_payments = [_payment(p, f"payments[{i}]") for i, p in enumerate(payments)]
    paid = sum(p["amount"] for p in normalized_payments)
    if paid != total:
        raise ReceiptInvalid(
            ErrorCode.PAYMENT_TOTAL_MISMATCH,
            f"payments add up to {paid} kopecks but the receipt total is {total}",
            "payments",
        )
    canonical: dict[str, Any] = {
        "pos_id": _text(data, "pos_id", "", 1, 32),
        "operation": _enum(data, "operation", "", OPERATIONS),
        "taxation": _enum(data, "taxation", "", TAXATIONS),
        "items": normalized_items,
        "payments": normalized_payments,
        "total": total,
    }
    if data.get("customer_contact") is not None:
        canonical["customer_contact"] = _contact(data["customer_contact"])
    if data.get("cashier") is not None:
        canonical["cashier"] = _cashier(data["cashier"])
    return _receipt(key, canonical)


def _receipt(key: str, canonical: dict[str, Any]) -> Receipt:
    # The hash leaves the key out: the same receipt sent with its key in the header or in the body is the same.
    # Stored hashes must match replays after an upgrade, so these bytes are exactly what earlier versions made
    # with json.dumps(ensure_ascii=False, sort_keys=True, separators=(",", ":")), for every character
    # (tests/test_receipt_paths.py compares both encoders over all of Unicode); msgspec is 7 times faster.
    encoded = _ENCODER.encode(canonical)
    return Receipt(
        key, canonical["pos_id"], canonical["total"], canonical, encoded.decode(), hashlib.sha256(encoded).hexdigest()
    )


def _idempotency_key(body_key: Any, header_key: str | None) -> str:
    if body_key is not None and not isinstance(body_key, str):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, "idempotency_key must be a string", "idempotency_key")
    if body_key is not None and header_key is not None and body_key != header_key:
        raise ReceiptInvalid(
            ErrorCode.IDEMPOTENCY_KEY_MISMATCH,
            "the Idempotency-Key header and the body's idempotency_key differ",
            "idempotency_key",
        )
    key = body_key if body_key is not None else header_key
    if key is None:
        raise ReceiptInvalid(
            ErrorCode.MISSING_FIELD,
            "idempotency_key is required (in the body or the Idempotency-Key header)",
            "idempotency_key",
        )
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ReceiptInvalid(
            ErrorCode.INVALID_IDEMPOTENCY_KEY,
            "idempotency_key must be 1..64 characters of A-Z a-z 0-9 . _ : -",
            "idempotency_key",
        )
    return key


def _item(item: Any, path: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, f"{path} must be an object", path)
    _reject_unknown(item, ITEM_FIELDS, path)
    price = _amount(item, "price", path)
    quantity_milli, quantity_text = _quantity(item.get("quantity"), f"{path}.quantity")
    # Half-up to the kopeck; everything is non-negative so integer arithmetic rounds exactly.
    expected_sum = (price * quantity_milli + 500) // 1000
    if item.get("sum") is None:
        item_sum = expected_sum
    else:
        item_sum = _amount(item, "sum", path)
        if item_sum != expected_sum:
            raise ReceiptInvalid(
                ErrorCode.ITEM_SUM_MISMATCH,
                f"{path}.sum is {item_sum} but price x quantity rounds to {expected_sum} kopecks",
                f"{path}.sum",
            )
    if item_sum >= MAX_AMOUNT:
        raise ReceiptInvalid(
            ErrorCode.AMOUNT_OUT_OF_RANGE, f"{path}.sum must be below {MAX_AMOUNT} kopecks", f"{path}.sum"
        )
    normalized = {
        "name": _text(item, "name", path, 1, 128),
        "price": price,
        "quantity": quantity_text,
        "sum": item_sum,
        "vat": _enum(item, "vat", path, VAT_RATES),
        "payment_method": _enum(item, "payment_method", path, PAYMENT_METHODS),
        "payment_object": _enum(item, "payment_object", path, PAYMENT_OBJECTS),
    }
    if item.get("measure") is not None:
        measure = _enum(item, "measure", path, MEASURES)
        if measure != DEFAULT_MEASURE:
            normalized["measure"] = measure
    return normalized


def _payment(payment: Any, path: str) -> dict[str, Any]:
    if not isinstance(payment, dict):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, f"{path} must be an object", path)
    _reject_unknown(payment, PAYMENT_FIELDS, path)
    return {"type": _enum(payment, "type", path, PAYMENT_TYPES), "amount": _amount(payment, "amount", path)}


def _cashier(cashier: Any) -> dict[str, str]:
    if not isinstance(cashier, dict):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, "cashier must be an object", "cashier")
    _reject_unknown(cashier, CASHIER_FIELDS, "cashier")
    result: dict[str, str] = {}
    if cashier.get("name") is not None:
        result["name"] = _text(cashier, "name", "cashier", 1, 64)
    if cashier.get("inn") is not None:
        inn = cashier["inn"]
        if not isinstance(inn, str):
            raise ReceiptInvalid(ErrorCode.INVALID_TYPE, "cashier.inn must be a string of 12 digits", "cashier.inn")
        if not INN_RE.fullmatch(inn):
            raise ReceiptInvalid(ErrorCode.INVALID_INN, "cashier.inn must be exactly 12 digits", "cashier.inn")
        result["inn"] = inn
    return result


def _contact(contact: Any) -> str:
    if not isinstance(contact, str):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, "customer_contact must be a string", "customer_contact")
    if (
        len(contact) > 64
        or forbidden_character(contact) is not None
        or not (EMAIL_RE.fullmatch(contact) or PHONE_RE.fullmatch(contact))
    ):
        raise ReceiptInvalid(
            ErrorCode.INVALID_CONTACT,
            "customer_contact must be an e-mail address or a phone number like +79991234567",
            "customer_contact",
        )
    return contact


def _quantity(value: Any, path: str) -> tuple[int, str]:
    """Return the quantity in thousandths and its normalized text ("1.000")."""
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)):
        kind = "missing" if value is None else type(value).__name__
        code = ErrorCode.MISSING_FIELD if value is None else ErrorCode.INVALID_TYPE
        raise ReceiptInvalid(code, f'{path} must be a decimal string like "1.000" (got {kind})', path)
    match = QUANTITY_RE.fullmatch(value) if isinstance(value, str) else QUANTITY_RE.fullmatch(str(value))
    if match is None:
        raise ReceiptInvalid(
            ErrorCode.INVALID_QUANTITY, f"{path} must be a decimal number with at most 3 decimal places", path
        )
    whole, fraction = match.group(1), match.group(2) or ""
    milli = int(whole) * 1000 + int(fraction.ljust(3, "0"))
    if milli <= 0:
        raise ReceiptInvalid(ErrorCode.INVALID_QUANTITY, f"{path} must be greater than zero", path)
    return milli, f"{milli // 1000}.{milli % 1000:03d}"


def _amount(obj: dict[str, Any], name: str, parent: str) -> int:
    path = _join(parent, name)
    value = obj.get(name)
    if value is None:
        raise ReceiptInvalid(ErrorCode.MISSING_FIELD, f"{path} is required", path)
    if type(value) is not int:  # bool is an int subclass and floats/strings are never money here
        raise ReceiptInvalid(
            ErrorCode.INVALID_TYPE, f"{path} must be an integer number of kopecks (got {type(value).__name__})", path
        )
    if not 0 <= value < MAX_AMOUNT:
        raise ReceiptInvalid(
            ErrorCode.AMOUNT_OUT_OF_RANGE, f"{path} must be between 0 and {MAX_AMOUNT - 1} kopecks", path
        )
    return value


def _text(obj: dict[str, Any], name: str, parent: str, min_len: int, max_len: int) -> str:
    path = _join(parent, name)
    value = obj.get(name)
    if value is None:
        raise ReceiptInvalid(ErrorCode.MISSING_FIELD, f"{path} is required", path)
    if not isinstance(value, str):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, f"{path} must be a string (got {type(value).__name__})", path)
    if not min_len <= len(value) <= max_len or not value.strip():
        raise ReceiptInvalid(ErrorCode.INVALID_LENGTH, f"{path} must be {min_len}..{max_len} characters", path)
    bad = forbidden_character(value)
    if bad is not None:
        raise ReceiptInvalid(
            ErrorCode.INVALID_VALUE,
            f"{path} must not hold control, bidirectional-override or "
            f"other invisible formatting characters (it holds {bad})",
            path,
        )
    return value


def _enum(obj: dict[str, Any], name: str, parent: str, allowed: frozenset[str]) -> str:
    path = _join(parent, name)
    value = obj.get(name)
    if value is None:
        raise ReceiptInvalid(ErrorCode.MISSING_FIELD, f"{path} is required", path)
    if not isinstance(value, str):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, f"{path} must be a string (got {type(value).__name__})", path)
    if value not in allowed:
        raise ReceiptInvalid(ErrorCode.INVALID_VALUE, f"{path} must be one of: {', '.join(sorted(allowed))}", path)
    return value


def _list(obj: dict[str, Any], name: str, parent: str, min_len: int, max_len: int) -> list[Any]:
    path = _join(parent, name)
    value = obj.get(name)
    if value is None:
        raise ReceiptInvalid(ErrorCode.MISSING_FIELD, f"{path} is required", path)
    if not isinstance(value, list):
        raise ReceiptInvalid(ErrorCode.INVALID_TYPE, f"{path} must be an array (got {type(value).__name__})", path)
    if not min_len <= len(value) <= max_len:
        raise ReceiptInvalid(
            ErrorCode.INVALID_COUNT, f"{path} must hold {min_len}..{max_len} entries (got {len(value)})", path
        )
    return value


def _reject_unknown(obj: dict[str, Any], allowed: frozenset[str], parent: str) -> None:
    unknown = obj.keys() - allowed
    if unknown:
        # The name is the client's: escaped and cut short in both the message and the field path.
        name = escape(min(unknown), limit=64)
        path = _join(parent, name)
        raise ReceiptInvalid(ErrorCode.UNKNOWN_FIELD, f"{path} is not a known field", path)


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def sample_receipt(key: str, pos_id: str = "POS-001") -> dict[str, Any]:
    """A small valid receipt, used by `make run`'s printed curl, the tests and the benchmark."""
    return {
        "idempotency_key": key,
        "pos_id": pos_id,
        "operation": "sale",
        "taxation": "usn_income",
        "items": [
            {
                "name": "Молоко 3,2% 1 л",
                "price": 8990,
                "quantity": "2.000",
                "sum": 17980,
                "vat": "vat10",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            },
            {
                "name": "Хлеб бородинский",
                "price": 6450,
                "quantity": "1.000",
                "vat": "vat10",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            },
        ],
        "payments": [{"type": "electronic", "amount": 24430}],
    }
