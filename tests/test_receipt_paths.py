"""kktd/receipt.py has two paths over one set of rules: the typed msgspec decoder (fast) and the reference
validator (every rule in order, with its code and field). The fast path may refuse more than it must (the
reference then answers), but whatever it accepts the reference must accept too, as the very same receipt;
and the canonical JSON (whose hash is stored and compared on replays) must be byte for byte what json.dumps
made before, for every character.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kktd import receipt as receipt_module
from kktd.receipt import (
    MAX_AMOUNT,
    MEASURES,
    OPERATIONS,
    PAYMENT_METHODS,
    PAYMENT_OBJECTS,
    PAYMENT_TYPES,
    TAXATIONS,
    VAT_RATES,
    Receipt,
    ReceiptInvalid,
    parse_receipt,
    sample_receipt,
    validate_receipt,
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-2 * MAX_AMOUNT, 2 * MAX_AMOUNT)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def mostly(good: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nine times in ten, else `anything` (one_of would draw them evenly)."""
    return st.integers(0, 9).flatmap(lambda n: good if n < 9 else anything)


# Each strategy mostly draws what the rules allow (so that accepted receipts are common) and sometimes
# anything at all: the boundaries (lengths, blanks, control characters, lone surrogates, big numbers).
ANY_TEXT = st.text(min_size=0, max_size=130)
GOOD_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=32).filter(str.strip)
TEXT = mostly(GOOD_TEXT, ANY_TEXT)
GOOD_KEYS = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)
KEYS = mostly(GOOD_KEYS, st.text(max_size=70))
GOOD_QUANTITIES = mostly(
    st.from_regex(r"[1-9][0-9]{0,4}(\.[0-9]{1,3})?", fullmatch=True) | st.integers(1, 10**4),
    st.from_regex(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,3})?", fullmatch=True),
)
QUANTITIES = mostly(GOOD_QUANTITIES, st.integers(-5, 10**10) | st.text(max_size=12))
AMOUNTS = mostly(st.integers(0, 10**6), st.integers(-1, 2 * MAX_AMOUNT))


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    price = draw(AMOUNTS)
    quantity = draw(QUANTITIES)
    item: dict[str, Any] = {
        "name": draw(TEXT),
        "price": price,
        "quantity": quantity,
        "vat": draw(mostly(st.sampled_from(sorted(VAT_RATES)), st.text(max_size=6))),
        "payment_method": draw(st.sampled_from(sorted(PAYMENT_METHODS))),
        "payment_object": draw(st.sampled_from(sorted(PAYMENT_OBJECTS))),
    }
    if draw(st.sampled_from([False, False, True])):
        item["measure"] = draw(mostly(st.sampled_from(sorted(MEASURES)), st.none() | st.text(max_size=8)))
    if draw(st.booleans()):
        try:
            milli, _ = receipt_module._quantity(quantity, "q")
            item["sum"] = (price * milli + 500) // 1000 + draw(mostly(st.just(0), st.sampled_from([1, -1])))
        except (ReceiptInvalid, TypeError):
            item["sum"] = draw(AMOUNTS)
    return item


def expected_sum(item: dict[str, Any]) -> int:
    """The item's sum as the client would compute it (0 where its price or quantity is no good)."""
    if isinstance(item.get("sum"), int):
        return int(item["sum"])
    try:
        milli, _ = receipt_module._quantity(item["quantity"], "q")
    except ReceiptInvalid:
        return 0
    price = item["price"] if isinstance(item["price"], int) else 0
    return int((price * milli + 500) // 1000)


@st.composite
def receipts(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "pos_id": draw(TEXT.map(lambda t: t[:34])),
        "operation": draw(st.sampled_from(sorted(OPERATIONS))),
        "taxation": draw(st.sampled_from(sorted(TAXATIONS))),
        "items": draw(st.lists(items(), min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=4)),
    }
    if draw(mostly(st.just(True), st.just(False))):
        body["idempotency_key"] = draw(KEYS)
    total = sum(expected_sum(item) for item in body["items"])
    payments = [{"type": draw(st.sampled_from(sorted(PAYMENT_TYPES))), "amount": total}]
    if draw(st.booleans()) and total > 1:
        split = draw(st.integers(0, total))
        payments = [{"type": "cash", "amount": split}, {"type": "electronic", "amount": total - split}]
    body["payments"] = payments
    if draw(st.sampled_from([False, False, True])):
        body["customer_contact"] = draw(
            st.sampled_from(["buyer@example.ru", "+79991234567", "a\x08@b.ru"]) | st.emails() | TEXT
        )
    if draw(st.sampled_from([False, False, True])):
        body["cashier"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": TEXT.map(lambda t: t[:66]),
                    "inn": st.from_regex(r"[0-9]{12}", fullmatch=True) | TEXT,
                },
            )
        )
    return body


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A receipt (mostly close to valid), sometimes with one value anywhere replaced, removed or added."""
    body = draw(receipts())
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        target: Any = body
        while isinstance(target, (dict, list)) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
            if not isinstance(target[key], (dict, list)):
                break
            target = target[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if isinstance(target, dict) and target:
            key = draw(st.sampled_from(sorted(target)))
            if action == "remove":
                del target[key]
            elif action == "replace":
                target[key] = draw(JSON_VALUES)
            else:
                target[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        elif isinstance(target, list) and target and action == "replace":
            target[draw(st.integers(0, len(target) - 1))] = draw(JSON_VALUES)
    return body


def typed_path(body: bytes, header_key: str | None) -> Receipt | None:
    """The fast path alone: None where it refuses (and the reference would answer)."""
    try:
        return receipt_module._from_typed(receipt_module._to_typed(receipt_module.decode_json(body)), header_key)
    except (msgspec.MsgspecError, ReceiptInvalid, UnicodeError):
        return None


def reference(body: bytes, header_key: str | None) -> Receipt | ReceiptInvalid:
    try:
        return validate_receipt(receipt_module.decode_json(body), header_key)
    except ReceiptInvalid as exc:
        return exc


def check_agree(data: dict[str, Any], header_key: str | None, ensure_ascii: bool) -> Receipt | None:
    body = json.dumps(data, ensure_ascii=ensure_ascii).encode()
    fast = typed_path(body, header_key)
    expected = reference(body, header_key)
    if fast is not None:
        assert fast == expected, (data, header_key)
    answered = parse_receipt_outcome(body, header_key)
    if isinstance(expected, ReceiptInvalid):
        assert isinstance(answered, ReceiptInvalid)
        assert (type(answered), answered.code, answered.field, answered.message) == (
            type(expected),
            expected.code,
            expected.field,
            expected.message,
        )
    else:
        assert answered == expected
    return fast


def parse_receipt_outcome(body: bytes, header_key: str | None) -> Receipt | ReceiptInvalid:
    try:
        return parse_receipt(body, header_key)
    except ReceiptInvalid as exc:
        return exc


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.sampled_from(["none", "none", "none", "same", "other"]), KEYS, st.booleans())
def test_fast_path_accepts_only_what_the_reference_accepts(
    data: dict[str, Any], header: str, other: str, ensure_ascii: bool
) -> None:
    body_key = data.get("idempotency_key")
    same = body_key if isinstance(body_key, str) else other
    header_key = {"none": None, "same": same, "other": other}[header]
    check_agree(data, header_key, ensure_ascii)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.data())
def test_fast_path_takes_every_valid_receipt(count: int, data: st.DataObject) -> None:
    """Valid receipts (the bench's kind) never fall back to the slow reference path."""
    body = sample_receipt(data.draw(st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)))
    body["items"] = [copy.deepcopy(body["items"][i % 2]) for i in range(count)]
    for item in body["items"]:
        item["name"] = data.draw(
            st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=128).filter(str.strip)
        )
        item.pop("sum", None)
    total = sum(
        (item["price"] * receipt_module._quantity(item["quantity"], "q")[0] + 500) // 1000 for item in body["items"]
    )
    body["payments"] = [{"type": "cash", "amount": total}]
    assert check_agree(body, None, ensure_ascii=data.draw(st.booleans())) is not None


def test_canonical_json_is_json_dumps_for_every_character() -> None:
    """The stored hash of a receipt accepted by an earlier kktd must match its replay: the msgspec encoder's
    bytes equal json.dumps(ensure_ascii=False, sort_keys=True, compact) for every code point (surrogates are
    refused by validation), in keys' order and around numbers alike."""
    encoder = receipt_module._ENCODER
    chunk = 4096
    for start in range(0, 0x110000, chunk):
        text = "".join(chr(c) for c in range(start, min(start + chunk, 0x110000)) if not 0xD800 <= c <= 0xDFFF)
        value = {"z": text, "a": [{"name": text, "sum": MAX_AMOUNT - 1, "quantity": "1.000"}], "total": 0}
        expected = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
        assert encoder.encode(value) == expected, hex(start)
