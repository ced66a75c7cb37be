"""The upstreams kktd can forward to, chosen by the `upstream` setting.

Adding one is a module implementing kktd.upstreams.base.Upstream plus one entry in REGISTRY; nothing else
in kktd changes (docs/upstreams.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kktd.delivery import DeliveryTraits
from kktd.options import Option
from kktd.upstreams import atol_v5, kktd_ofd
from kktd.upstreams.base import Upstream

# Refuses at intake (kktd.receipt.ReceiptInvalid, a 422) a canonical receipt this upstream is certain to refuse.
IntakeCheck = Callable[[Mapping[str, Any]], None]


class UpstreamSettings(Protocol):
    def describe(self) -> dict[str, Any]:
        """The settings, safe to print or log (secrets masked or left out)."""
        ...


@dataclass(frozen=True)
class UpstreamSpec:
    """One registry entry: the adapter's own settings (joined to kktd's option table), the builder of its
    typed settings from the parsed values (cross-field checks raise ConfigError naming the key), the
    factory of the adapter, and its intake check, if it has one."""

    name: str
    options: tuple[Option, ...]
    settings: Callable[[Mapping[str, Any]], UpstreamSettings]
    create: Callable[[Any], Upstream]
    intake_check: IntakeCheck | None = None
    traits: DeliveryTraits = DeliveryTraits()


REGISTRY: dict[str, UpstreamSpec] = {
    spec.name: spec for spec in (
        UpstreamSpec(kktd_ofd.OfdClient.name, kktd_ofd.OPTIONS, kktd_ofd.settings, kktd_ofd.create),
        UpstreamSpec(atol_v5.NAME, atol_v5.OPTIONS, atol_v5.atol_settings, atol_v5.create,
                     atol_v5.atol_intake_check),
    )
}
DEFAULT_UPSTREAM = kktd_ofd.OfdClient.name


def upstream_options() -> tuple[Option, ...]:
    return tuple(option for spec in REGISTRY.values() for option in spec.options)
