"""The upstreams kktd can forward to, chosen by the `upstream` setting.

Adding one is a module implementing kktd.upstreams.base.Upstream plus one entry in REGISTRY; nothing else
in kktd changes (docs/upstreams.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kktd.options import Option
from kktd.upstreams import kktd_ofd
from kktd.upstreams.base import Upstream


class UpstreamSettings(Protocol):
    def describe(self) -> dict[str, Any]:
        """The settings, safe to print or log (secrets masked or left out)."""
        ...


@dataclass(frozen=True)
class UpstreamSpec:
    """One registry entry: the adapter's own settings (joined to kktd's option table), the builder of its
    typed settings from the parsed values (cross-field checks raise ConfigError naming the key), and the
    factory of the adapter."""

    name: str
    options: tuple[Option, ...]
    settings: Callable[[Mapping[str, Any]], UpstreamSettings]
    create: Callable[[Any], Upstream]


REGISTRY: dict[str, UpstreamSpec] = {
    spec.name: spec for spec in (
        UpstreamSpec(kktd_ofd.OfdClient.name, kktd_ofd.OPTIONS, kktd_ofd.settings, kktd_ofd.create),
    )
}
DEFAULT_UPSTREAM = kktd_ofd.OfdClient.name


def upstream_options() -> tuple[Option, ...]:
    return tuple(option for spec in REGISTRY.values() for option in spec.options)
