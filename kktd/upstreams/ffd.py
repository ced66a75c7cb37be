"""What every fiscal upstream shares of the FFD and of exact money: the codes of tag 2108 (the unit of a
quantity), and rubles and quantities as exact JSON number texts.

kktd stores integer kopecks and a quantity as a decimal text ("2.000"); a register's JSON wants rubles as
numbers with at most two decimals. A binary float cannot hold most kopeck amounts exactly, so no amount ever
passes through one: the number's text is formatted from the integer (24430 -> ``244.3``) and written into the
JSON verbatim by :func:`encode_json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kktd.errors import ErrorCode
from kktd.receipt import ReceiptInvalid

__all__ = [
    "MAX_ITEM_KOPECKS",
    "MAX_QUANTITY_MILLI",
    "MAX_TOTAL_KOPECKS",
    "MEASURE_CODES",
    "JsonNumber",
    "check_register_limits",
    "encode_json",
    "kopecks_to_rubles",
    "quantity_milli",
    "quantity_number",
]

# Tag 2108.
MEASURE_CODES: Mapping[str, int] = {
    "piece": 0,
    "gram": 10,
    "kilogram": 11,
    "ton": 12,
    "centimeter": 20,
    "decimeter": 21,
    "meter": 22,
    "square_centimeter": 30,
    "square_decimeter": 31,
    "square_meter": 32,
    "milliliter": 40,
    "liter": 41,
    "cubic_meter": 42,
    "kilowatt_hour": 50,
    "gigacalorie": 51,
    "day": 70,
    "hour": 71,
    "minute": 72,
    "second": 73,
    "kilobyte": 80,
    "megabyte": 81,
    "gigabyte": 82,
    "terabyte": 83,
    "other": 255,
}


class JsonNumber(str):
    """The exact text of a JSON number (``244.3``), written into the JSON as is (see encode_json)."""

    __slots__ = ()


def kopecks_to_rubles(kopecks: int) -> JsonNumber:
    """24430 -> '244.3', 24400 -> '244', 5 -> '0.05': the shortest decimal text equal to kopecks / 100."""
    if type(kopecks) is not int or kopecks < 0:
        raise ValueError("an amount must be a non-negative integer number of kopecks")
    rubles, cents = divmod(kopecks, 100)
    if cents == 0:
        return JsonNumber(str(rubles))
    return JsonNumber(f"{rubles}.{cents:02d}".rstrip("0"))


def quantity_milli(text: str) -> int:
    whole, _, fraction = text.partition(".")
    return int(whole) * 1000 + int(fraction.ljust(3, "0"))


def quantity_number(text: str) -> JsonNumber:
    """kktd's normalized quantity ("2.000", "0.250") -> the shortest JSON number text ("2", "0.25")."""
    milli = quantity_milli(text)
    whole, fraction = divmod(milli, 1000)
    if fraction == 0:
        return JsonNumber(str(whole))
    return JsonNumber(f"{whole}.{fraction:03d}".rstrip("0"))


_encode_string = json.JSONEncoder(ensure_ascii=False).encode


def encode_json(value: Any) -> str:
    """Compact JSON text in which a JsonNumber value is written as the number it spells, verbatim.

    Only what the mappings build is supported: dict, list, str, JsonNumber, int, bool, None.
    """
    if isinstance(value, JsonNumber):
        return str.__str__(value)
    if isinstance(value, str):
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_encode_string(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode_json(v) for v in value) + "]"
    # A float here would be exactly the imprecision this encoder exists to keep out.
    raise TypeError(f"cannot encode {type(value).__name__} as exact JSON")


# A register's limits, the same behind a cloud KKT and on the till: a price or an item's sum fits 32 bits of
# kopecks (42,949,672.95 rubles), a quantity at most 99,999.999, a receipt's total 8 digits of rubles.
MAX_ITEM_KOPECKS = 4_294_967_295
MAX_QUANTITY_MILLI = 99_999_999
MAX_TOTAL_KOPECKS = 9_999_999_999


def check_register_limits(receipt: Mapping[str, Any], whose: str) -> None:
    """Refuse (ReceiptInvalid, a 422 at intake) a validated canonical receipt beyond a register's limits;
    `whose` names them in the message ("the register's limit"). The payments add up to the total (kktd.receipt),
    so none can exceed the limit the total met."""
    for index, item in enumerate(receipt["items"]):
        path = f"items[{index}]"
        for name in ("price", "sum"):
            if item[name] > MAX_ITEM_KOPECKS:
                raise ReceiptInvalid(
                    ErrorCode.AMOUNT_OUT_OF_RANGE,
                    f"{path}.{name} must be at most {MAX_ITEM_KOPECKS} kopecks ({whose})",
                    f"{path}.{name}",
                )
        if quantity_milli(item["quantity"]) > MAX_QUANTITY_MILLI:
            raise ReceiptInvalid(
                "quantity_out_of_range", f"{path}.quantity must be at most 99999.999 ({whose})", f"{path}.quantity"
            )
    if receipt["total"] > MAX_TOTAL_KOPECKS:
        raise ReceiptInvalid(
            ErrorCode.AMOUNT_OUT_OF_RANGE,
            f"the receipt total must be at most {MAX_TOTAL_KOPECKS} kopecks ({whose})",
            "items",
        )
