"""Hypothesis strategies of valid kktd receipts (the request bodies a till posts), shared by the upstreams'
mapping tests: within an upstream's limits, or over kktd's whole range (the intake check then decides)."""

from __future__ import annotations

from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from kktd import receipt as receipt_module

# Printable text without the characters kktd refuses in a name (control, bidi and invisible formatting).
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp")), min_size=1, max_size=128).filter(
    str.strip
)
contacts = st.one_of(
    st.from_regex(r"\A[a-z0-9._]{1,20}@[a-z0-9]{1,10}\.[a-z]{2,5}\Z"), st.from_regex(r"\A\+7[0-9]{10}\Z")
)


@st.composite
def items(draw: st.DrawFn, max_quantity_milli: int, max_item_kopecks: int) -> dict[str, Any]:
    """An item whose quantity is at most max_quantity_milli thousandths and whose price and sum are at most
    max_item_kopecks."""
    milli = draw(st.one_of(st.integers(1, max_quantity_milli), st.sampled_from([1000, 2000, 500, 1, 333])))
    price_limit = min(max_item_kopecks, (max_item_kopecks * 1000 - 500) // milli)
    price = draw(st.one_of(st.integers(0, price_limit), st.sampled_from([0, 1, 99, 8990, 24430, price_limit])))
    item: dict[str, Any] = {
        "name": draw(texts),
        "price": price,
        "quantity": f"{milli // 1000}.{milli % 1000:03d}",
        "vat": draw(st.sampled_from(sorted(receipt_module.VAT_RATES))),
        "payment_method": draw(st.sampled_from(sorted(receipt_module.PAYMENT_METHODS))),
        "payment_object": draw(st.sampled_from(sorted(receipt_module.PAYMENT_OBJECTS))),
    }
    if draw(st.booleans()):
        item["measure"] = draw(st.sampled_from(sorted(receipt_module.MEASURES)))
    if draw(st.booleans()):
        item["sum"] = (price * milli + 500) // 1000
    return item


@st.composite
def receipts(
    draw: st.DrawFn,
    max_quantity_milli: int,
    max_item_kopecks: int,
    max_total: int | None = None,
    contact_required: bool = False,
    max_items: int = 8,
) -> dict[str, Any]:
    """A valid receipt whose payments add up to its total (at most max_total when given)."""
    chosen = draw(st.lists(items(max_quantity_milli, max_item_kopecks), min_size=1, max_size=max_items))
    total = sum((i["price"] * int(i["quantity"].replace(".", "")) + 500) // 1000 for i in chosen)
    assume(max_total is None or total <= max_total)
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=4)))
    bounds = [0, *cuts, total]
    payments = [
        {"type": draw(st.sampled_from(sorted(receipt_module.PAYMENT_TYPES))), "amount": high - low}
        for low, high in zip(bounds, bounds[1:], strict=False)
    ]
    body: dict[str, Any] = {
        "idempotency_key": draw(st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")),
        "pos_id": "POS-1",
        "operation": draw(st.sampled_from(sorted(receipt_module.OPERATIONS))),
        "taxation": draw(st.sampled_from(sorted(receipt_module.TAXATIONS))),
        "items": chosen,
        "payments": payments,
    }
    if contact_required or draw(st.booleans()):
        body["customer_contact"] = draw(contacts)
    if draw(st.booleans()):
        cashier: dict[str, str] = {"name": draw(texts.map(lambda t: t[:64]).filter(str.strip))}
        if draw(st.booleans()):
            cashier["inn"] = draw(st.from_regex(r"\A[0-9]{12}\Z"))
        body["cashier"] = cashier
    return body
