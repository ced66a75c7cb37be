"""The sync loop's housekeeping, a task of its own beside the deliveries: the alarm on the age of the oldest
pending receipt (the fiscal storage holds unsent documents for at most 30 days), the retention of sent
receipts, and, when the upstream is a register kktd drives itself, that register's own report (its OFD backlog,
FN expiry, paper). The delivery loop nudges it on each of its turns; what is due is decided by the injected clock, so
the housekeeping never sleeps on a clock of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kktd.clock import Clock, now_ms
from kktd.delivery import RegisterReport, RegisterUnavailable, UpstreamUnavailable
from kktd.errors import StorageUnavailable
from kktd.states import AlarmLevel, pending_age_s, register_alarms
from kktd.store import Store
from kktd.upstreams.base import Register, Upstream

if TYPE_CHECKING:
    from kktd.config import Config

log = logging.getLogger("kktd.sync")

RETENTION_EVERY_S = 3600.0
RETENTION_BATCH = 500
ALARM_EVERY_S = 60.0
REGISTER_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class RegisterWatch:
    """The register's last report (None until one was read) and when; the error of the last try if it failed."""

    report: RegisterReport | None = None
    read_ms: int | None = None
    error: str | None = None


class Housekeeping:
    def __init__(
        self,
        store: Store,
        config: Callable[[], Config],
        clock: Clock,
        stop: asyncio.Event,
        upstream: Callable[[], Upstream] | None = None,
    ) -> None:
        self.store = store
        self._config = config  # the configuration in force (a reload replaces it)
        self._upstream = upstream  # the upstream in force (a reload may replace it)
        self.register = RegisterWatch()
        self._next_register = 0.0
        self._register_alarms: frozenset[str] = frozenset()
        self._clock = clock
        self._stop = stop
        self._due = asyncio.Event()
        self._next_retention = 0.0
        self._next_alarm = 0.0
        self._alarm_level = AlarmLevel.OK

    def nudge(self) -> None:
        """Look at the clock again (each turn of the delivery loop, and on stop)."""
        self._due.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            await self._due.wait()
            self._due.clear()
            if not self._stop.is_set():
                await self._run_due()

    async def _run_due(self) -> None:
        now = self._clock()
        try:
            if now >= self._next_alarm:
                self._next_alarm = now + ALARM_EVERY_S
                await self.check_pending_age()
            if now >= self._next_retention:
                self._next_retention = now + RETENTION_EVERY_S
                await self.prune()
            if now >= self._next_register:
                self._next_register = now + REGISTER_EVERY_S
                await self.check_register()
        except StorageUnavailable as exc:
            log.warning("housekeeping skipped, storage unavailable: %s", exc)

    async def check_pending_age(self) -> AlarmLevel:
        age = pending_age_s(await self.store.oldest_unsent_ms())
        level = self._config().pending_alarm(age)
        if level is not AlarmLevel.OK and age is not None:
            text = (
                f"oldest pending receipt is {age / 86400:.1f} days old "
                f"(pending={self.store.counts.pending}); the fiscal storage holds unsent documents "
                f"for at most 30 days"
            )
            log.log(logging.ERROR if level is AlarmLevel.CRITICAL else logging.WARNING, "%s", text)
        elif self._alarm_level is not AlarmLevel.OK:
            log.info("oldest pending receipt age back under the warning threshold")
        self._alarm_level = level
        return level

    async def check_register(self) -> RegisterWatch:
        """Ask a register upstream for its report (through its single queue); log each alarm when it starts."""
        upstream = self._upstream() if self._upstream is not None else None
        if not isinstance(upstream, Register):
            return self.register
        try:
            report = await upstream.report()
        except (RegisterUnavailable, UpstreamUnavailable) as exc:
            return self._report_failed(str(exc))
        except Exception as exc:
            log.error("reading the register's report failed: %s", type(exc).__name__, exc_info=True)
            return self._report_failed(type(exc).__name__)
        self.register = RegisterWatch(report, now_ms())
        alarms = register_alarms(report, now_ms())
        for alarm in alarms:
            if alarm.text not in self._register_alarms:
                log.log(logging.ERROR if alarm.critical else logging.WARNING, "register: %s", alarm.text)
        if self._register_alarms and not alarms:
            log.info("register: no alarm any more")
        self._register_alarms = frozenset(a.text for a in alarms)
        return self.register

    def _report_failed(self, error: str) -> RegisterWatch:
        if self.register.error is None:
            log.warning("the register's report could not be read: %s", error)
        self.register = RegisterWatch(self.register.report, self.register.read_ms, error)
        return self.register

    async def prune(self) -> int:
        retention_days = self._config().retention_days
        cutoff = now_ms() - retention_days * 86_400_000
        deleted = 0
        while not self._stop.is_set():
            count = await self.store.prune_sent(cutoff, RETENTION_BATCH)
            deleted += count
            if count < RETENTION_BATCH:
                break
            await asyncio.sleep(0)  # let intake in between batches
        if deleted:
            log.info("retention: pruned %d sent receipts older than %d days", deleted, retention_days)
        return deleted
