"""The daemon's lifecycle: open and recover the buffer, start the server, start the sync loop, READY=1;
on SIGTERM: STOPPING=1, stop intake, finish in-flight commits, cancel and await the loop, close the database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable

import sdnotify  # type: ignore[import-untyped]
from aiohttp import web

from kktd import __version__
from kktd.api import Services, create_app
from kktd.buffer import Buffer
from kktd.config import Config, mask_url
from kktd.errors import CorruptDatabase
from kktd.ofd import CircuitBreaker, OfdClient
from kktd.sync import SyncLoop

log = logging.getLogger("kktd.daemon")

STATUS_EVERY_S = 5.0


class Notifier:
    """sd_notify messages; silent when not started by systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    def send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC, if systemd asked this very process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.services: Services | None = None
        self.fatal: Exception | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        async with AsyncExitStack() as stack:
            buffer = await Buffer.open(self.config.db, self.config.max_pending)
            stack.push_async_callback(buffer.close, self.config.drain_timeout)
            ofd_url = await self._ofd_url(stack)
            client = OfdClient(ofd_url, self.config.ofd_timeout)
            await client.start()
            stack.push_async_callback(client.close)
            breaker = CircuitBreaker(self.config.breaker_threshold, self.config.breaker_reset,
                                     on_change=_log_breaker_change)
            sync = SyncLoop(buffer, client, breaker, self.config)
            services = Services(self.config, buffer, sync,
                                faults_enabled=os.environ.get("KKTD_TEST_FAULTS") == "1")
            self.services = services
            stack.push_async_callback(self._stop_sync, sync)
            runner = await self._start_server(services)
            stack.push_async_callback(self._stop_intake, services, runner)
            self._supervise("sync", sync.run, critical=True)
            interval = watchdog_interval()
            if interval is not None:
                self._supervise("watchdog", lambda: self._watchdog(interval), critical=True)
            self._supervise("status", self._status_updates)
            self._supervise("integrity", self._deferred_integrity_check)
            self.notifier.send(f"READY=1\nSTATUS={self._status_line()}")
            log.info("kktd %s ready: listening on http://%s, OFD %s, database %s, pending=%d",
                     __version__, self.config.listen, mask_url(ofd_url), self.config.db, buffer.counts.pending)
            if services.faults_enabled:
                log.warning("test fault hooks are enabled (KKTD_TEST_FAULTS=1): never in production")
            await self.stop_requested.wait()
        if self.fatal is not None:
            raise self.fatal
        log.info("kktd stopped cleanly")
        return 0

    def _on_stop_signal(self, signum: int) -> None:
        if self.stop_requested.is_set():
            return
        self.notifier.send("STOPPING=1\nSTATUS=stopping")
        log.info("received %s: stopping (drain deadline %gs)", signal.Signals(signum).name,
                 self.config.drain_timeout)
        self.stop_requested.set()

    async def _ofd_url(self, stack: AsyncExitStack) -> str:
        if not self.config.embedded_mock_ofd:
            return self.config.ofd_url
        from kktd.mock_ofd import start_mock_ofd  # development only: keep it out of normal start-up

        mock = await start_mock_ofd("127.0.0.1", 0)
        stack.push_async_callback(mock.close)
        log.info("embedded mock OFD on %s (admin %s)", mock.url, mock.admin_url)
        return str(mock.url)

    async def _start_server(self, services: Services) -> web.AppRunner:
        app = create_app(services)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.config.drain_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.config.listen_host, self.config.listen_port, reuse_address=True,
                           backlog=1024)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        return runner

    async def _stop_intake(self, services: Services, runner: web.AppRunner) -> None:
        # New requests get 503 shutting_down; requests already inside a handler finish their commit.
        services.intake_open = False
        await runner.cleanup()
        log.info("intake stopped; in-flight requests finished")

    async def _stop_sync(self, sync: SyncLoop) -> None:
        sync.request_stop()
        task = self.tasks.get("sync")
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("sync loop did not stop within %gs; cancelling", self.config.drain_timeout)
        for name, task in self.tasks.items():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _supervise(self, name: str, factory: Callable[[], Awaitable[Any]], critical: bool = False) -> None:
        """Run a background task; a crash is logged and shown in health. A critical task (the sync loop, the
        watchdog) cannot be done without: kktd then stops cleanly and exits 70, and systemd restarts it,
        rather than keep taking receipts it would never forward."""
        async def guarded() -> None:
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a crash must be logged and shown in health
                log.critical("background task %s crashed: %r", name, exc, exc_info=True)
                if self.services is not None:
                    self.services.task_failures[name] = repr(exc)
                self.notifier.send(f"STATUS=degraded: task {name} crashed")
                if critical and self.fatal is None:
                    self.fatal = RuntimeError(f"background task {name} crashed: {exc!r}")
                    self.notifier.send("STOPPING=1")
                    self.stop_requested.set()

        self.tasks[name] = asyncio.get_running_loop().create_task(guarded(), name=f"kktd-{name}")

    async def _deferred_integrity_check(self) -> None:
        assert self.services is not None
        damage = await self.services.buffer.verify_in_background()
        if damage is None:
            return
        # Intake refuses from here on (storage_unavailable); what was acknowledged stays where it is.
        self.fatal = CorruptDatabase(damage)
        self.notifier.send("STOPPING=1\nSTATUS=database damaged: see the log")
        log.critical("%s: kktd stops taking receipts and exits", damage)
        self.stop_requested.set()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only after a round trip through the database writer: a wedged writer stops the pings."""
        assert self.services is not None
        buffer = self.services.buffer
        healthy = True
        while True:
            try:
                await asyncio.wait_for(buffer.ping(), interval)
            except Exception as exc:  # noqa: BLE001 - any failure means: do not ping
                if healthy:
                    log.error("database writer did not answer within %.1fs (%r): withholding watchdog pings",
                              interval, exc)
                healthy = False
            else:
                if not healthy:
                    log.info("database writer answers again; watchdog pings resumed")
                healthy = True
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _status_updates(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            self.notifier.send(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        assert self.services is not None
        counts = self.services.buffer.counts
        sync = self.services.sync
        breaker = str(sync.breaker.state) if sync is not None else "n/a"
        return f"pending={counts.pending} failed={counts.failed} sent={counts.sent} ofd={breaker}"


def _log_breaker_change(old: Any, new: Any) -> None:
    level = logging.WARNING if str(new) == "open" else logging.INFO
    log.log(level, "OFD circuit breaker %s -> %s", old, new)
