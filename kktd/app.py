"""Assembling kktd from a configuration: store, upstream, breaker, sync loop and web app.

One function used by the daemon and by the in-process tests alike, so the wiring exists once. Everything it
opens is registered on the caller's AsyncExitStack, to be closed in reverse order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

from aiohttp import web

from kktd import __version__, logs
from kktd.api import Services, create_app
from kktd.clock import Clock, Sleep
from kktd.config import Config
from kktd.metrics import Metrics, StateSnapshot
from kktd.store import Store
from kktd.sync import BreakerState, CircuitBreaker, SyncLoop
from kktd.upstreams import UpstreamSettings
from kktd.upstreams.base import Upstream

log = logging.getLogger("kktd.app")


@dataclass
class Assembled:
    config: Config
    store: Store
    upstream: Upstream
    breaker: CircuitBreaker
    sync: SyncLoop
    services: Services
    web_app: web.Application
    upstream_description: str  # where receipts go, safe to log


async def assemble(
    config: Config, stack: AsyncExitStack, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
) -> Assembled:
    metrics = Metrics()
    metrics.prepare_rejections(config.spec.intake_codes)
    store = await Store.open(config.db, config.max_pending, on_group_commit=metrics.group_committed)
    stack.push_async_callback(store.close, config.drain_timeout)
    settings = await _upstream_settings(config, stack)
    spec = config.spec
    upstream = spec.create(settings)
    await upstream.start()
    # Whichever upstream the loop has at the end (a reload may have replaced the first).
    stack.push_async_callback(lambda: sync.upstream.close())
    breaker = CircuitBreaker(config.breaker_threshold, config.breaker_reset, on_change=_log_breaker_change, clock=clock)
    sync = SyncLoop(store, upstream, breaker, config, clock=clock, sleep=sleep, metrics=metrics, traits=spec.traits)
    services = Services(config, store, sync, metrics=metrics, intake_check=spec.intake_check)
    metrics.bind_state(lambda: state_snapshot(services))
    described = ", ".join(f"{key}={value}" for key, value in settings.describe().items())
    return Assembled(
        config, store, upstream, breaker, sync, services, create_app(services), f"{config.upstream} ({described})"
    )


async def _upstream_settings(config: Config, stack: AsyncExitStack) -> UpstreamSettings:
    mock = config.spec.mock
    if not config.embedded_mock or mock is None:
        warning = config.spec.start_warning(config.upstream_settings) if config.spec.start_warning else None
        if warning is not None:
            log.warning("%s", warning, extra={"error_code": "default_upstream"})
        return config.upstream_settings  # config.load() allows embedded_mock only for an upstream with a mock
    # Development only (`make run`): the mock is a tool of its own, imported only here.
    embedded = await mock.start_embedded(config.upstream_settings)
    stack.push_async_callback(embedded.close)
    log.info("embedded mock: %s", embedded.description)
    return embedded.settings


def _log_breaker_change(old: BreakerState, new: BreakerState) -> None:
    level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
    log.log(level, "upstream circuit breaker %s -> %s", old, new)


def state_snapshot(services: Services) -> StateSnapshot:
    """What a scrape reports, from memory only: the writer's counters, the breaker, the loop's stats, the
    configuration in force (it may have been reloaded)."""
    store, sync, config = services.store, services.sync, services.config
    counts = {f.name: int(getattr(store.counts, f.name)) for f in dataclasses.fields(store.counts)}
    return StateSnapshot(
        receipts=counts,
        capacity=store.max_pending,
        oldest_pending_ms=store.counters.oldest_unsent_ms,
        db_path=store.path,
        upstream=sync.upstream.name if sync is not None else config.upstream,
        breaker_state=sync.breaker.state if sync is not None else BreakerState.CLOSED,
        last_delivery_ms=sync.stats.last_success_ms if sync is not None else None,
        pending_warn_age_s=config.pending_warn_age,
        pending_critical_age_s=config.pending_critical_age,
        version=__version__,
        journal_fallbacks=logs.journal_fallbacks(),
        register=sync.housekeeping.register.report if sync is not None else None,
    )
