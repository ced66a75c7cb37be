"""Configuration: one TOML file, overridden by KKTD_* environment variables, overridden by CLI flags.

Every option is declared once (kktd/options.py): the common ones in COMMON_OPTIONS, each upstream's own in
its module. The file keys, the environment names and the flags are derived from that one table, so the three
sources can never drift apart. Each bad value is reported with the key and where it came from.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kktd import seller as seller_module
from kktd.errors import ConfigError
from kktd.options import DAY, ENV_PREFIX, Option, boolean, duration_in, file_path, int_in, mask_url, one_of
from kktd.seller import Seller, parse_seller
from kktd.states import AlarmLevel
from kktd.upstreams import DEFAULT_UPSTREAM, REGISTRY, UpstreamSettings, UpstreamSpec, upstream_options

__all__ = ["Config", "ConfigError", "OPTIONS", "add_arguments", "load", "mask_url"]

DEFAULT_CONFIG_PATH = Path("/etc/kktd/kktd.toml")
DEFAULT_STATE_DIR = Path("/var/lib/kktd")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    db: Path
    upstream: str
    upstream_settings: UpstreamSettings  # the chosen upstream's own typed settings
    seller: Seller  # kktd's own seller and terminal settings, which the upstream's settings were built with
    max_pending: int
    log_level: str
    batch_size: int
    sync_interval: float
    max_attempts: int
    backoff_max: float
    breaker_threshold: int
    breaker_reset: float
    pending_warn_age: float
    pending_critical_age: float
    retention_days: int
    drain_timeout: float
    embedded_mock: bool
    max_connections: int
    idle_timeout: float
    body_timeout: float
    api_token_file: Path | None
    # The bearer token itself (read from api_token_file or $CREDENTIALS_DIRECTORY/api_token): never shown.
    api_token: str | None = field(default=None, repr=False)

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"

    @property
    def spec(self) -> UpstreamSpec:
        """The chosen upstream's registry entry."""
        return REGISTRY[self.upstream]

    def pending_alarm(self, oldest_pending_age_s: float | None) -> AlarmLevel:
        """The alarm level for the age of the oldest pending receipt (the fiscal storage may hold unsent
        documents for at most 30 days)."""
        if oldest_pending_age_s is None or oldest_pending_age_s < self.pending_warn_age:
            return AlarmLevel.OK
        return AlarmLevel.CRITICAL if oldest_pending_age_s >= self.pending_critical_age else AlarmLevel.WARNING

    def describe(self) -> dict[str, Any]:
        """The effective configuration, safe to print or log (secrets masked or left out)."""
        shown = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("upstream_settings", "seller", "api_token")
        }
        shown["db"] = str(self.db)
        shown["api_token_file"] = str(self.api_token_file) if self.api_token_file else None
        shown["api_token"] = "set" if self.api_token else None
        shown["upstream_access"] = sorted(self.spec.access)
        shown.update(self.seller.describe())
        shown.update(self.upstream_settings.describe())
        return shown


DEFAULT_LISTEN = "127.0.0.1:8731"


def _listen(raw: Any) -> tuple[str, int]:
    text = str(raw)
    if "/" in text:
        raise ValueError("expected HOST:PORT, not a URL (e.g. 127.0.0.1:8731, no http:// and no path)")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8731")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int_in(1, 65535)(port_text) if port_text != "0" else 0
    return host, port


def _optional_file(raw: Any) -> Path | None:
    """A file path, or "" for none (TOML has no null)."""
    return None if str(raw) == "" else file_path(raw)


def _default_db() -> str:
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return str(Path(state) / "buffer.db") if state else str(DEFAULT_STATE_DIR / "buffer.db")


COMMON_OPTIONS: tuple[Option, ...] = (
    Option("listen", _listen, DEFAULT_LISTEN, "HOST:PORT to listen on (default 127.0.0.1:8731)"),
    Option("db", file_path, None, "buffer database (default $STATE_DIRECTORY/buffer.db or /var/lib/kktd/buffer.db)"),
    Option(
        "upstream",
        one_of(*REGISTRY),
        DEFAULT_UPSTREAM,
        f"where receipts are forwarded: {', '.join(REGISTRY)} (default {DEFAULT_UPSTREAM})",
    ),
    Option("max_pending", int_in(1, 100_000_000), 200_000, "buffer capacity: undelivered receipts"),
    Option("log_level", one_of(*LOG_LEVELS), "info", "debug, info, warning or error"),
    Option("batch_size", int_in(1, 100), 50, "receipts per upstream request"),
    Option("sync_interval", duration_in(0.01, DAY), 5.0, "idle sync interval"),
    Option("max_attempts", int_in(1, 1_000_000), 20, "failed deliveries before a receipt is dead-lettered"),
    Option("backoff_max", duration_in(0.01, DAY), 60.0, "cap of the retry backoff"),
    Option("breaker_threshold", int_in(1, 1000), 5, "consecutive upstream failures that open the circuit breaker"),
    Option("breaker_reset", duration_in(0.01, DAY), 30.0, "how long the breaker stays open before a trial"),
    Option("pending_warn_age", duration_in(1, 30 * DAY), 3 * DAY, "warn when the oldest pending is older"),
    Option("pending_critical_age", duration_in(1, 30 * DAY), 25 * DAY, "error when the oldest pending is older"),
    Option("retention_days", int_in(1, 3650), 90, "days to keep sent receipts"),
    Option("drain_timeout", duration_in(0, 300), 10.0, "on stop, how long to wait for in-flight work"),
    Option(
        "embedded_mock",
        boolean,
        False,
        "run the upstream's mock inside the process and send to it (development, `make run`)",
    ),
    Option(
        "max_connections",
        int_in(1, 100_000),
        1024,
        "client connections open at once (lowered to fit the descriptor limit); at the cap the one silent "
        "longest is dropped",
    ),
    Option(
        "idle_timeout",
        duration_in(0.1, 3600),
        10.0,
        "a connection must send a complete request head within this of opening or of its last answer",
    ),
    Option("body_timeout", duration_in(0.1, 3600), 10.0, "how long a request body may take to arrive"),
    Option(
        "api_token_file",
        _optional_file,
        None,
        "file holding the API bearer token (default $CREDENTIALS_DIRECTORY/api_token if it exists); "
        "required to listen beyond loopback",
    ),
)
OPTIONS: tuple[Option, ...] = COMMON_OPTIONS + seller_module.OPTIONS + upstream_options()
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}
UPSTREAM_KEYS = frozenset(option.key for option in upstream_options())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and one flag per option; an unset flag leaves no value, so only explicit flags override.

    SUPPRESS rather than None: a subcommand's unset flag must not erase the same flag given before the
    subcommand (`kktd --listen 127.0.0.1:9 check-config`).
    """
    unset = argparse.SUPPRESS
    parser.add_argument(
        "--config", default=unset, help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if it exists)"
    )
    for option in OPTIONS:
        if option.parse is boolean:
            # --x / --no-x: an option that defaults to true must be switchable off by a flag too.
            parser.add_argument(
                option.flag, dest=option.key, action=argparse.BooleanOptionalAction, default=unset, help=option.help
            )
        else:
            parser.add_argument(option.flag, dest=option.key, default=unset, help=option.help)


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
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = _parse(key, value, source)
        except ConfigError as exc:
            # Reported, and the default stands in so that the checks after it still run.
            problems.extend(exc.problems)
            values[key] = _default_value(key)
    config = ConfigError.collect(problems, lambda: _build(values, environ))
    if problems or config is None:
        raise ConfigError(*_first_per_key(problems))
    return config


def _first_per_key(problems: list[str]) -> list[str]:
    """A wrong value's default may fail a later check of the same key ("required"): report the value only."""
    seen: set[str] = set()
    kept: list[str] = []
    for problem in problems:
        key = problem.split(" ", 1)[0].rstrip(":")
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def _default_value(key: str) -> Any:
    return _default_db() if key == "db" else _parse(key, OPTIONS_BY_KEY[key].default, "default")


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
    if value is None:  # an option without a default that nobody set
        return None
    try:
        return OPTIONS_BY_KEY[key].parse(value)
    except ValueError as exc:
        raise ConfigError(f"{key} (from {source}) = {value!r}: {exc}") from None


def _build(values: dict[str, Any], environ: Mapping[str, str]) -> Config:
    problems: list[str] = []
    if values["pending_critical_age"] <= values["pending_warn_age"]:
        problems.append(
            "pending_critical_age: must be greater than pending_warn_age "
            f"({values['pending_critical_age']:g}s <= {values['pending_warn_age']:g}s)"
        )
    spec = REGISTRY[values["upstream"]]
    if values["embedded_mock"] and spec.mock is None:
        with_mocks = ", ".join(name for name, other in REGISTRY.items() if other.mock is not None)
        problems.append(f"embedded_mock: upstream {spec.name} has no mock (upstreams with one: {with_mocks})")
    host, port = values.pop("listen")
    token_answer = ConfigError.collect(problems, lambda: _api_token(values["api_token_file"], environ))
    token_file, token = token_answer if token_answer is not None else (None, None)
    values["api_token_file"] = token_file
    if token_answer is not None and token is None and not is_loopback(host):
        problems.append(
            f"listen = {host}:{port}: beyond loopback the API would be open to the network without "
            f"authentication; set api_token_file (or the systemd credential api_token) or listen on 127.0.0.1"
        )
    upstream_values = {key: values.pop(key) for key in UPSTREAM_KEYS}
    seller_values = {key: values.pop(key) for key in seller_module.KEYS}
    seller = ConfigError.collect(problems, lambda: parse_seller(seller_values))
    settings = ConfigError.collect(problems, lambda: spec.settings(upstream_values, seller or Seller()))
    if problems or seller is None or settings is None:
        raise ConfigError(*problems)
    return Config(
        listen_host=host, listen_port=port, upstream_settings=settings, seller=seller, api_token=token, **values
    )


API_TOKEN_CREDENTIAL = "api_token"
MIN_TOKEN_LENGTH = 16


def _api_token(explicit: Path | None, environ: Mapping[str, str]) -> tuple[Path | None, str | None]:
    """The bearer token: from api_token_file, else the systemd credential, else none."""
    path = explicit
    if path is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        candidate = Path(credentials) / API_TOKEN_CREDENTIAL if credentials else None
        if candidate is None or not candidate.exists():
            return None, None
        path = candidate
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"api_token_file = {path}: cannot be read: {reason}") from None
    if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            f"api_token_file = {path}: the token must be at least {MIN_TOKEN_LENGTH} printable "
            f"ASCII characters without spaces (e.g. `openssl rand -hex 32`)"
        )
    return path, token


def is_loopback(host: str) -> bool:
    """Only a literal loopback address or `localhost` counts: a name could resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
