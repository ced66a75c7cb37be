"""`systemctl reload kktd` (SIGHUP): what a new configuration changes, and which of it takes effect live.

plan() compares the running configuration with the one just loaded; the daemon applies the live changes,
names in a warning each change that needs a restart (and keeps the running value for it), and logs every
change as old -> new, with secrets masked the way `kktd check-config` shows them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kktd.config import Config

# Read by the sync loop, the health check, the store's capacity check, the logger and the stop sequence
# each time they are used: a new value simply applies from the next use on.
LIVE_KEYS = frozenset(
    {
        "log_level",
        "sync_interval",
        "pending_warn_age",
        "pending_critical_age",
        "max_attempts",
        "backoff_max",
        "retention_days",
        "drain_timeout",
        "max_pending",
        # Read by each request (kktd/api.py): a new body deadline or API token applies to the next request.
        "body_timeout",
        "api_token_file",
        "api_token",
    }
)
# Bound at start: the socket, the database, which upstream, the mock, the delivery policy's batch size and
# the breaker's thresholds (its state machine is built with them).
RESTART_KEYS = frozenset(
    {
        "listen_host",
        "listen_port",
        "db",
        "upstream",
        "embedded_mock",
        "batch_size",
        "breaker_threshold",
        "breaker_reset",
        # The listening socket's connection cap and the connections' idle/head deadline (kktd/server.py).
        "max_connections",
        "idle_timeout",
    }
)
SHOWN_AS = {"listen_host": "listen", "listen_port": "listen"}


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    old: str
    new: str


@dataclass(frozen=True)
class ReloadPlan:
    live: tuple[Change, ...]
    needs_restart: tuple[Change, ...]
    upstream_changed: bool  # the upstream's own settings (URL, timeout, credentials) differ
    effective: Config  # what runs from now on: the new values, except those that need a restart

    @property
    def unchanged(self) -> bool:
        return not self.live and not self.needs_restart


def _shown(config: Config, key: str) -> str:
    described = config.describe()
    if key in ("listen_host", "listen_port"):
        return config.listen
    value: Any = described.get(key, getattr(config, key, None))
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan(old: Config, new: Config) -> ReloadPlan:
    live: list[Change] = []
    restart: list[Change] = []
    seen_restart: set[str] = set()
    for field in dataclasses.fields(Config):
        key = field.name
        # The seller's settings take effect through the upstream's settings, compared below.
        if key in ("upstream_settings", "seller") or getattr(old, key) == getattr(new, key):
            continue
        shown = SHOWN_AS.get(key, key)
        change = Change(shown, _shown(old, key), _shown(new, key))
        if key in RESTART_KEYS:
            if shown not in seen_restart:
                restart.append(change)
                seen_restart.add(shown)
        else:
            live.append(change)
    upstream_changed = False
    keep = {key: getattr(old, key) for key in RESTART_KEYS}
    if new.upstream != old.upstream or new.embedded_mock or old.embedded_mock:
        # Another upstream's settings (or the embedded mock's URL) only make sense after a restart.
        keep["upstream_settings"] = old.upstream_settings
        if new.upstream == old.upstream and new.upstream_settings != old.upstream_settings:
            restart.extend(_upstream_changes(old, new))
    elif new.upstream_settings != old.upstream_settings:
        upstream_changed = True
        live.extend(_upstream_changes(old, new))
    if "upstream_settings" in keep:
        keep["seller"] = old.seller  # the seller goes with the upstream's settings it was built into
    if new.seller != old.seller and new.upstream_settings == old.upstream_settings:
        # Settings the upstream does not send: nothing to apply, but the change is shown where it belongs.
        (restart if "upstream_settings" in keep else live).extend(_seller_changes(old, new))
    effective = dataclasses.replace(new, **keep)
    return ReloadPlan(tuple(live), tuple(restart), upstream_changed, effective)


def _seller_changes(old: Config, new: Config) -> list[Change]:
    before, after = old.seller.describe(), new.seller.describe()
    return [Change(key, str(before[key]), str(after[key])) for key in before if before[key] != after[key]]


def _upstream_changes(old: Config, new: Config) -> list[Change]:
    before, after = old.upstream_settings.describe(), new.upstream_settings.describe()
    changes = [
        Change(key, str(before.get(key)), str(after.get(key)))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    ]
    # Settings that differ while their masked forms do not: credentials (a password, a token file's content).
    return changes or [Change(f"{new.upstream} credentials", "***", "*** (changed)")]
