"""Declaring a setting once: its key, parser, default and help. The TOML key, the `KKTD_*` variable and the
`kktd serve` flag are derived from it (kktd/config.py), so the three sources never drift apart. Every
upstream adapter declares its own settings with the same machinery.

A parser takes the raw value (a TOML value, or a string from the environment or a flag) and returns the
typed value, or raises ValueError with a message that completes "KEY (from SOURCE) = VALUE: ...".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

ENV_PREFIX = "KKTD_"
DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DAY = 86400.0

Parser = Callable[[Any], Any]
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Option:
    key: str
    parse: Parser
    default: Any
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def int_in(low: int, high: int) -> Parser:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError("must be an integer")
        try:
            value = int(raw) if isinstance(raw, (int, str)) else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError("must be an integer")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def duration_in(low: float, high: float) -> Parser:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError("must be a duration such as 5, 2.5s, 500ms, 10m, 3d")
        if isinstance(raw, (int, float)):
            value = float(raw)
        else:
            match = DURATION_RE.fullmatch(str(raw))
            if match is None:
                raise ValueError("must be a duration such as 5, 2.5s, 500ms, 10m, 3d")
            value = float(match.group(1)) * DURATION_UNITS[match.group(2)]
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds")
        return value

    return parse


def http_url(raw: Any) -> str:
    text = str(raw)
    try:
        parsed = URL(text)
    except (ValueError, TypeError):
        raise ValueError("must be an http:// or https:// URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def string(raw: Any) -> str:
    """A value that must be a string as given (a TOML string, or any environment or flag value)."""
    if not isinstance(raw, str):
        raise ValueError("must be a string")
    return raw


def file_path(raw: Any) -> Path:
    text = str(raw)
    if not text or "\x00" in text:
        raise ValueError("must be a file path")
    return Path(text)


def one_of(*choices: str) -> Parser:
    def parse(raw: Any) -> str:
        text = str(raw).lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def mask_url(url: str) -> str:
    """The URL safe to print or log: credentials in it are masked."""
    parsed = URL(url)
    if parsed.user or parsed.password:
        parsed = parsed.with_user("***").with_password(None)
    return str(parsed)
