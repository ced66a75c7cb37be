"""parse_receipt under fuzzing: whatever the bytes, it returns a Receipt or raises ReceiptInvalid, and the
error it raises is safe to answer and to log."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st

from kktd.api import api_error
from kktd.receipt import MAX_AMOUNT, Receipt, ReceiptInvalid, parse_receipt
from kktd.safetext import FORBIDDEN_TEXT_RE
from tests.fuzzing import encoded, fuzz_settings, header_keys, hostile_bodies, mutated_receipts

CODE_RE = re.compile(r"[a-z][a-z_]{2,40}")
MAX_MESSAGE = 600  # a few hundred characters of escaped client text plus kktd's own words


def check_outcome(body: bytes, header_key: str | None) -> Receipt | ReceiptInvalid:
    try:
        receipt = parse_receipt(body, header_key)
    except ReceiptInvalid as invalid:
        check_error(invalid)
        return invalid
    # Anything else (RecursionError, UnicodeEncodeError, KeyError ...) propagates and fails the test.
    check_receipt(receipt, header_key)
    return receipt


def check_error(invalid: ReceiptInvalid) -> None:
    assert CODE_RE.fullmatch(invalid.code), invalid.code
    for text in (invalid.message, invalid.field or ""):
        assert len(text) <= MAX_MESSAGE, (invalid.code, len(text))
        assert FORBIDDEN_TEXT_RE.search(text) is None, repr(text)
        text.encode("utf-8")  # a lone surrogate here would turn the error answer into a 500
    answer = api_error(invalid)
    assert answer.status in (400, 422)
    json.dumps(answer.body(), ensure_ascii=False).encode("utf-8")


def check_receipt(receipt: Receipt, header_key: str | None) -> None:
    receipt.canonical_json.encode("utf-8")
    assert 0 <= receipt.total < MAX_AMOUNT
    for text in _texts(receipt.canonical):
        assert FORBIDDEN_TEXT_RE.search(text) is None, repr(text)
    # Normalization is a fixed point: the stored form (less its computed total) parses to the same receipt.
    stored = {k: v for k, v in receipt.canonical.items() if k != "total"}
    again = parse_receipt(json.dumps(stored, ensure_ascii=False).encode(), receipt.idempotency_key)
    assert (again.body_hash, again.total) == (receipt.body_hash, receipt.total)


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)] + [k for k in value]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


@fuzz_settings(3000)
@given(body=hostile_bodies, header_key=header_keys)
def test_any_body_is_a_receipt_or_a_receipt_error(body: bytes, header_key: str | None) -> None:
    check_outcome(body, header_key)


@fuzz_settings(1000)
@given(body=encoded(mutated_receipts()))
def test_mutated_receipts_reach_validation(body: bytes) -> None:
    check_outcome(body, None)


def test_generators_reach_both_outcomes_and_many_codes() -> None:
    """The fuzzer is only as good as what it reaches: valid receipts and a wide spread of error codes."""
    seen: set[str] = set()

    @fuzz_settings(1500, scaled=False)  # the same reach in make test and make fuzz
    @given(body=hostile_bodies)
    def collect(body: bytes) -> None:
        outcome = check_outcome(body, None)
        seen.add(outcome.code if isinstance(outcome, ReceiptInvalid) else "accepted")

    collect()
    expected = {
        "accepted",
        "invalid_json",
        "invalid_encoding",
        "duplicate_key",
        "unknown_field",
        "invalid_type",
        "invalid_value",
        "nesting_too_deep",
        "missing_field",
    }
    assert expected <= seen, sorted(expected - seen)


@fuzz_settings(300)
@given(text=st.text(min_size=1, max_size=30))
def test_any_printable_name_without_forbidden_characters_is_kept_exactly(text: str) -> None:
    body = {
        "idempotency_key": "k-1",
        "pos_id": "POS-1",
        "operation": "sale",
        "taxation": "osn",
        "items": [
            {
                "name": text,
                "price": 100,
                "quantity": "1",
                "vat": "none",
                "payment_method": "full_payment",
                "payment_object": "commodity",
            }
        ],
        "payments": [{"type": "cash", "amount": 100}],
    }
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    outcome = check_outcome(raw, None)
    if FORBIDDEN_TEXT_RE.search(text) is None and text.strip() and isinstance(outcome, Receipt):
        assert outcome.canonical["items"][0]["name"] == text
    elif FORBIDDEN_TEXT_RE.search(text) is not None:
        assert isinstance(outcome, ReceiptInvalid)
