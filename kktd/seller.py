"""The seller and terminal settings every fiscal upstream needs: the seller's INN (tag 1018), e-mail (1117), the
place of settlement (1187) and the cashier printed when a receipt names none (tags 1021, 1203).

They are kktd's own settings, declared once here like every other option (kktd/options.py); an upstream's
registry entry names the ones it requires (UpstreamSpec.seller_requires) and its settings builder receives
the parsed Seller. The taxation system is not among them: every receipt names its own (tag 1055 is a
requisite of each receipt, and a register may be registered for several), so a default would never apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kktd.errors import ConfigError
from kktd.options import CONTROL_CHARS_RE, Option, string

__all__ = ["OPTIONS", "Seller", "inn_is_valid", "parse_seller"]

INN_10_WEIGHTS = (2, 4, 10, 3, 5, 9, 4, 6, 8)
INN_11_WEIGHTS = (7, 2, 4, 10, 3, 5, 9, 4, 6, 8)
INN_12_WEIGHTS = (3, 7, 2, 4, 10, 3, 5, 9, 4, 6, 8)
EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s.]+(?:\.[^@\s.]+)+")


def _check_digit(digits: str, weights: tuple[int, ...]) -> int:
    return sum(int(d) * w for d, w in zip(digits, weights, strict=False)) % 11 % 10


def inn_is_valid(inn: str) -> bool:
    """A 10-digit (organisation) or 12-digit (person) INN with correct check digits."""
    if not inn.isascii() or not inn.isdigit():
        return False
    if len(inn) == 10:
        return _check_digit(inn, INN_10_WEIGHTS) == int(inn[9])
    if len(inn) == 12:
        return _check_digit(inn, INN_11_WEIGHTS) == int(inn[10]) and _check_digit(inn, INN_12_WEIGHTS) == int(inn[11])
    return False


def parse_company_inn(raw: Any) -> str:
    text = string(raw) if not isinstance(raw, int) or isinstance(raw, bool) else str(raw)
    if not text.isascii() or not text.isdigit() or len(text) not in (10, 12):
        raise ValueError("must be the seller's INN: 10 or 12 digits")
    if not inn_is_valid(text):
        raise ValueError("is not a valid INN (its check digits do not match)")
    return text


def parse_company_email(raw: Any) -> str:
    text = string(raw)
    if len(text) > 64 or not EMAIL_RE.fullmatch(text):
        raise ValueError("must be an e-mail address of at most 64 characters")
    return text


def parse_payment_address(raw: Any) -> str:
    text = string(raw)
    if not text.strip() or len(text) > 256:
        raise ValueError("must be 1..256 characters (the shop's site or the place of settlement)")
    if CONTROL_CHARS_RE.search(text):
        raise ValueError("must not contain control characters")
    return text


def parse_cashier_name(raw: Any) -> str:
    text = string(raw)
    if not text.strip() or len(text) > 64 or CONTROL_CHARS_RE.search(text):
        raise ValueError("must be 1..64 characters without control characters")
    return text


def parse_cashier_inn(raw: Any) -> str:
    text = string(raw) if not isinstance(raw, int) or isinstance(raw, bool) else str(raw)
    if len(text) != 12 or not inn_is_valid(text):
        raise ValueError("must be the cashier's personal INN: 12 digits with valid check digits")
    return text


def _unset_or(parse: Callable[[Any], str]) -> Callable[[Any], str | None]:
    """ "" is unset (TOML has no null: the shipped kktd.toml lists every key with its default)."""

    def parse_or_unset(raw: Any) -> str | None:
        return None if raw == "" else parse(raw)

    return parse_or_unset


OPTIONS: tuple[Option, ...] = (
    Option(
        "company_inn", _unset_or(parse_company_inn), None, "seller's INN, as in the fiscal storage: 10 or 12 digits"
    ),
    Option("company_email", _unset_or(parse_company_email), None, "seller's e-mail on every receipt"),
    Option(
        "company_payment_address",
        _unset_or(parse_payment_address),
        None,
        "place of settlement, e.g. the shop's site or address",
    ),
    Option("cashier_name", _unset_or(parse_cashier_name), None, "cashier printed when a receipt names none"),
    Option("cashier_inn", _unset_or(parse_cashier_inn), None, "that cashier's personal INN (12 digits)"),
)
KEYS = tuple(option.key for option in OPTIONS)


@dataclass(frozen=True, slots=True)
class Seller:
    """The parsed seller settings; None where unset or "" (each upstream requires what it sends)."""

    company_inn: str | None = None
    company_email: str | None = None
    company_payment_address: str | None = None
    cashier_name: str | None = None
    cashier_inn: str | None = None

    def required(self, upstream: str, keys: Iterable[str]) -> tuple[str, ...]:
        """The values of `keys`, in order; ConfigError naming each that is unset."""
        missing = [key for key in keys if getattr(self, key) is None]
        if missing:
            raise ConfigError(*(f"{key}: required when upstream = {upstream}" for key in missing))
        return tuple(getattr(self, key) for key in keys)

    def describe(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in KEYS}


def parse_seller(values: Mapping[str, Any]) -> Seller:
    """The seller from raw or already parsed values by key (others ignored); ConfigError names the key."""
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    for option in OPTIONS:
        raw = values.get(option.key)
        if raw is None:
            continue
        try:
            parsed[option.key] = option.parse(raw)
        except ValueError as exc:
            problems.append(f"{option.key} = {raw!r}: {exc}")
    if parsed.get("cashier_inn") is not None and parsed.get("cashier_name") is None:
        problems.append("cashier_inn: set only with cashier_name (the INN is the named cashier's)")
    if problems:
        raise ConfigError(*problems)
    return Seller(**parsed)
