"""The upstreams kktd can forward to, chosen by the `upstream` setting.

Adding one is a module implementing kktd.upstreams.base.Upstream, its mock in kktd_mocks/, and one entry in
REGISTRY below: the entry declares everything the rest of kktd reads about an upstream (its name, settings,
factory, intake check, delivery traits, what it needs of the machine, its mock). Nothing else in kktd names
an upstream (docs/upstreams.md; tests/test_toy_upstream.py proves it).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kktd.delivery import DEFAULT_TRAITS, DeliveryTraits
from kktd.options import Option
from kktd.seller import Seller
from kktd.upstreams import atol_driver, atol_v5, kktd_ofd
from kktd.upstreams.base import Upstream

# Refuses at intake (kktd.receipt.ReceiptInvalid, a 422) a canonical receipt this upstream is certain to refuse.
IntakeCheck = Callable[[Mapping[str, Any]], None]


class UpstreamSettings(Protocol):
    def describe(self) -> dict[str, Any]:
        """The settings, safe to print or log (secrets masked or left out)."""
        ...


class Access(enum.StrEnum):
    """What an upstream needs of the machine beyond kktd's own state directory (the unit grants it)."""

    NETWORK = "network"  # TCP to a host (loopback included)
    DEVICES = "devices"  # a device node (a serial or USB register driven directly)


@dataclass(frozen=True)
class EmbeddedMock:
    """A mock running inside kktd's own event loop (`--embedded-mock`, development): the settings pointing at
    it, what to log about it, and how to stop it."""

    settings: UpstreamSettings
    description: str
    close: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class MockSpec:
    """An upstream's development mock, a module outside the daemon's code: `kktd COMMAND ARGS` runs the
    module's `main(argv) -> int`; `--embedded-mock` awaits its `start_embedded(settings) -> EmbeddedMock`."""

    command: str
    module: str
    help: str

    def main(self, argv: list[str]) -> int:
        run: Callable[[list[str]], int] = importlib.import_module(self.module).main
        return run(argv)

    async def start_embedded(self, settings: UpstreamSettings) -> EmbeddedMock:
        start: Callable[[UpstreamSettings], Awaitable[EmbeddedMock]] = importlib.import_module(
            self.module
        ).start_embedded
        return await start(settings)


@dataclass(frozen=True)
class UpstreamSpec:
    """One registry entry: the adapter's own settings (joined to kktd's option table), the builder of its
    typed settings from the parsed values and kktd's seller settings (cross-field checks raise ConfigError
    naming the key), the factory of the adapter, its intake check if it has one, how the sync loop may drive
    it, what it needs of the machine, and its mock."""

    name: str
    options: tuple[Option, ...]
    settings: Callable[[Mapping[str, Any], Seller], UpstreamSettings]
    create: Callable[[Any], Upstream]
    intake_check: IntakeCheck | None = None
    traits: DeliveryTraits = DEFAULT_TRAITS
    access: frozenset[Access] = frozenset({Access.NETWORK})
    mock: MockSpec | None = None
    intake_codes: frozenset[str] = frozenset()  # the error codes of its own that intake_check refuses with
    # A warning logged at start for settings that run but cannot be what the operator meant (a packaged
    # default pointing at nothing real); None when the settings look deliberate.
    start_warning: Callable[[Any], str | None] | None = None


REGISTRY: dict[str, UpstreamSpec] = {
    spec.name: spec
    for spec in (
        UpstreamSpec(
            kktd_ofd.NAME,
            kktd_ofd.OPTIONS,
            kktd_ofd.settings,
            kktd_ofd.create,
            mock=MockSpec("mock-ofd", "kktd_mocks.ofd", "run the mock OFD server"),
            start_warning=kktd_ofd.start_warning,
        ),
        UpstreamSpec(
            atol_v5.NAME,
            atol_v5.OPTIONS,
            atol_v5.atol_settings,
            atol_v5.create,
            atol_v5.atol_intake_check,
            intake_codes=atol_v5.INTAKE_CODES,
            mock=MockSpec("mock-atol", "kktd_mocks.atol", "run the mock of ATOL Online v5"),
        ),
        UpstreamSpec(
            atol_driver.NAME,
            atol_driver.OPTIONS,
            atol_driver.driver_settings,
            atol_driver.create,
            atol_driver.driver_intake_check,
            # A register prints one receipt at a time (about one a second): one call on the wire, results asked
            # for often, since each takes the queue's next turn.
            traits=DeliveryTraits(max_in_flight=1, poll_interval_s=0.2),
            mock=MockSpec("mock-atol-driver", "kktd_mocks.atol_driver", "run the mock ATOL driver v10 register"),
            intake_codes=atol_driver.INTAKE_CODES,
        ),
    )
}
DEFAULT_UPSTREAM = kktd_ofd.NAME


def upstream_options() -> tuple[Option, ...]:
    return tuple(option for spec in REGISTRY.values() for option in spec.options)


def mocks() -> dict[str, MockSpec]:
    """The mock commands (`kktd mock-…`) by command name."""
    return {spec.mock.command: spec.mock for spec in REGISTRY.values() if spec.mock is not None}
