"""Configuration: one TOML file, overridden by KKTD_* environment variables, overridden by CLI flags.

Every option is declared once in OPTIONS; the file keys, the environment names and the flags are derived from
it, so the three sources can never drift apart. Each bad value is reported with the key and where it came from.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from yarl import URL

from kktd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/kktd/kktd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/kktd")
ENV_PREFIX = "KKTD_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    db: Path
    ofd_url: str
    max_pending: int
    log_level: str
    batch_size: int
    sync_interval: float
    max_attempts: int
    backoff_max: float
    ofd_timeout: float
    breaker_threshold: int
    breaker_reset: float
    pending_warn_age: float
    pending_critical_age: float
    retention_days: int
    drain_timeout: float
    embedded_mock_ofd: bool

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    def pending_alarm(self, oldest_pending_age_s: float | None) -> str:
        """ok, warning or critical for the age of the oldest pending receipt (the fiscal storage may hold
        unsent documents for at most 30 days)."""
        if oldest_pending_age_s is None or oldest_pending_age_s < self.pending_warn_age:
            return "ok"
        return "critical" if oldest_pending_age_s >= self.pending_critical_age else "warning"

    def describe(self) -> dict[str, Any]:
        """The effective configuration, safe to print or log (credentials in the OFD URL are masked)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["db"] = str(self.db)
        shown["ofd_url"] = mask_url(self.ofd_url)
        return shown


def mask_url(url: str) -> str:
    parsed = URL(url)
    if parsed.user or parsed.password:
        parsed = parsed.with_user("***").with_password(None)
    return str(parsed)


# ---- value parsers: each takes the raw value (a TOML value or a string) and returns the typed value ----

Parser = Callable[[Any], Any]


def _int_in(low: int, high: int) -> Parser:
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


def _duration_in(low: float, high: float) -> Parser:
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


def _listen(raw: Any) -> tuple[str, int]:
    text = str(raw)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8731")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = _int_in(1, 65535)(port_text) if port_text != "0" else 0
    return host, port


def _url(raw: Any) -> str:
    text = str(raw)
    try:
        parsed = URL(text)
    except (ValueError, TypeError):
        raise ValueError("must be an http:// or https:// URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text.rstrip("/")


def _path(raw: Any) -> Path:
    text = str(raw)
    if not text or "\x00" in text:
        raise ValueError("must be a file path")
    return Path(text)


def _log_level(raw: Any) -> str:
    text = str(raw).lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


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


def _default_db() -> str:
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return str(Path(state) / "buffer.db") if state else str(DEFAULT_STATE_DIR / "buffer.db")


DAY = 86400.0
OPTIONS: tuple[Option, ...] = (
    Option("listen", _listen, "127.0.0.1:8731", "HOST:PORT to listen on (default 127.0.0.1:8731)"),
    Option("db", _path, None, "buffer database (default $STATE_DIRECTORY/buffer.db or /var/lib/kktd/buffer.db)"),
    Option("ofd_url", _url, "http://127.0.0.1:9000", "base URL of the OFD"),
    Option("max_pending", _int_in(1, 100_000_000), 200_000, "buffer capacity: undelivered receipts"),
    Option("log_level", _log_level, "info", "debug, info, warning or error"),
    Option("batch_size", _int_in(1, 100), 50, "receipts per OFD request"),
    Option("sync_interval", _duration_in(0.01, DAY), 5.0, "idle sync interval"),
    Option("max_attempts", _int_in(1, 1_000_000), 20, "failed deliveries before a receipt is dead-lettered"),
    Option("backoff_max", _duration_in(0.01, DAY), 60.0, "cap of the retry backoff"),
    Option("ofd_timeout", _duration_in(0.05, 600), 10.0, "timeout of one OFD request"),
    Option("breaker_threshold", _int_in(1, 1000), 5, "consecutive OFD failures that open the circuit breaker"),
    Option("breaker_reset", _duration_in(0.01, DAY), 30.0, "how long the breaker stays open before a trial"),
    Option("pending_warn_age", _duration_in(1, 30 * DAY), 3 * DAY, "warn when the oldest pending is older"),
    Option("pending_critical_age", _duration_in(1, 30 * DAY), 25 * DAY, "error when the oldest pending is older"),
    Option("retention_days", _int_in(1, 3650), 90, "days to keep sent receipts"),
    Option("drain_timeout", _duration_in(0, 300), 10.0, "on stop, how long to wait for in-flight work"),
    Option("embedded_mock_ofd", _bool, False, "run a mock OFD inside the process (development, `make run`)"),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per option; defaults stay None so only explicit flags override."""
    parser.add_argument("--config", help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if it exists)")
    for option in OPTIONS:
        if option.parse is _bool:
            parser.add_argument(option.flag, dest=option.key, action="store_const", const=True, help=option.help)
        else:
            parser.add_argument(option.flag, dest=option.key, help=option.help)


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Merge defaults < file < environment < flags and validate every value."""
    environ = os.environ if environ is None else environ
    flag_values = vars(args) if args is not None else {}
    raw: dict[str, tuple[Any, str]] = {o.key: (o.default, "default") for o in OPTIONS}
    raw["db"] = (_default_db(), "default")
    for key, value in _read_file(flag_values.get("config") or environ.get(ENV_PREFIX + "CONFIG"), raw).items():
        raw[key] = value
    for option in OPTIONS:
        if option.env in environ:
            raw[option.key] = (environ[option.env], option.env)
        if flag_values.get(option.key) is not None:
            raw[option.key] = (flag_values[option.key], option.flag)
    values = {key: _parse(key, value, source) for key, (value, source) in raw.items()}
    return _build(values)


def _read_file(explicit: str | None, raw: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if not explicit and not path.exists():
        return {}
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    result: dict[str, tuple[Any, str]] = {}
    for key, value in document.items():
        if key not in raw:
            raise ConfigError(f"{key} (in {path}): unknown key; known keys: {', '.join(sorted(raw))}")
        result[key] = (value, str(path))
    return result


def _parse(key: str, value: Any, source: str) -> Any:
    try:
        return OPTIONS_BY_KEY[key].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{key} (from {source}) = {value!r}: {exc}") from None


def _build(values: dict[str, Any]) -> Config:
    if values["pending_critical_age"] <= values["pending_warn_age"]:
        raise ConfigError(
            "pending_critical_age: must be greater than pending_warn_age "
            f"({values['pending_critical_age']:g}s <= {values['pending_warn_age']:g}s)"
        )
    host, port = values.pop("listen")
    return Config(listen_host=host, listen_port=port, **values)
