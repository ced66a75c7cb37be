"""The daemon's systemd lifecycle, top to bottom:

open and recover the store, start the server, start the sync loop, READY=1; on SIGTERM: STOPPING=1, stop
intake, finish in-flight commits, stop the loop, close the upstream and the database. On SIGHUP
(`systemctl reload kktd`): RELOADING=1, re-read the configuration, apply what can change live, READY=1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import sdnotify  # type: ignore[import-untyped]
from aiohttp import web

from kktd import __version__, logs, reload
from kktd.app import Assembled, assemble
from kktd.config import Config
from kktd.errors import ConfigError, CorruptDatabase
from kktd.server import (
    DescriptorBudget,
    EventSummary,
    GuardedSite,
    ServerLimits,
    descriptor_budget,
    install_accept_error_summary,
    runner_options,
)
from kktd.upstreams import REGISTRY
from kktd.upstreams.base import Upstream

log = logging.getLogger("kktd.daemon")

STATUS_EVERY_S = 5.0
# Signals kktd does not stop on. SIGUSR1/SIGUSR2: a status line in the log (an operator's `kill -USR1`, or a
# stray signal from a misdirected logrotate script, must not kill a daemon holding receipts). SIGPIPE:
# ignored, so a peer that hangs up is an EPIPE error on that socket, never a dead process. SIGHUP is the
# reload (kktd's operations part), not here.
STATUS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

# A hook that may add to the assembled daemon before it serves (the test-only fault entry point uses it).
Extension = Callable[[Assembled], None]
# Loads the configuration again from the same sources as at start (file, environment, flags).
Reloader = Callable[[], Config]


class Notifier:
    """sd_notify messages; silent when not started by systemd (no NOTIFY_SOCKET).

    The socket is non-blocking: a datagram queue that nobody drains (10 messages by default,
    net.unix.max_dgram_qlen) would otherwise block the event loop in sendto() and with it every till. A
    message that does not fit is dropped, and that is logged once until one fits again.

    sdnotify is used for one thing, opening the socket (NOTIFY_SOCKET, abstract '@' addresses included): it
    is the project's chosen sd_notify binding (the design fixes the dependency set), a single pure-Python file
    with no dependencies of its own. Its notify() is not used: it blocks on a full queue and swallows every
    error, where kktd must neither block the event loop nor stay silent."""

    def __init__(self) -> None:
        notifier = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None
        self._socket = notifier.socket if notifier is not None else None
        if self._socket is not None:
            self._socket.setblocking(False)
        self._dropping = False

    def send(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send(message.encode("latin-1", "replace"))
        except BlockingIOError:
            if not self._dropping:
                log.warning(
                    "the notify socket is full (the service manager is not reading it): dropping "
                    "notifications until it is (first dropped: %s)",
                    message.split("\n")[0],
                )
            self._dropping = True
            return
        except OSError as exc:
            log.warning("cannot send to the notify socket: %s", exc.strerror or exc)
            return
        if self._dropping:
            log.info("the notify socket takes notifications again")
            self._dropping = False


def settle_heap() -> None:
    """Everything start-up made (modules, the app, caches) lives as long as the process: collect once, then
    move it out of the garbage collector's reach (gc.freeze). Without it the first full collection, a few
    hundred milliseconds into the first load, walks all of it while every till waits: 13 ms here, the
    worst latency of the first second after READY."""
    gc.collect()
    gc.freeze()


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
    def __init__(
        self,
        config: Config,
        extension: Extension | None = None,
        reloader: Reloader | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.on_ready = on_ready  # called once the port is bound and READY=1 sent (make run's welcome)
        self.extension = extension
        self.reloader = reloader
        self._reloading: asyncio.Task[None] | None = None
        self.notifier = Notifier()
        self.stop_requested = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.kktd: Assembled | None = None
        self.fatal: Exception | None = None
        self.site: GuardedSite | None = None
        self.summary = EventSummary(logging.getLogger("kktd.server"))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        # Until the daemon is up a SIGHUP is ignored rather than killing it (its default action).
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        for signum in STATUS_SIGNALS:
            loop.add_signal_handler(signum, self._on_status_signal, signum)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        budget = descriptor_budget(self.config.max_connections)
        log.info("%s (max_connections %d)", budget.describe(), self.config.max_connections)
        if budget.connection_cap < self.config.max_connections:
            log.warning(
                "max_connections %d does not fit the descriptor limit %d: capped at %d (raise "
                "LimitNOFILE= to allow more)",
                self.config.max_connections,
                budget.soft_limit,
                budget.connection_cap,
            )
        install_accept_error_summary(loop, self.summary, budget)
        async with AsyncExitStack() as stack:
            kktd = self.kktd = await assemble(self.config, stack)
            if self.extension is not None:
                self.extension(kktd)
            stack.push_async_callback(self._stop_sync)
            stack.callback(self.summary.close)
            runner = await self._start_server(kktd.web_app, budget)
            stack.push_async_callback(self._stop_intake, runner)
            self._supervise("sync", kktd.sync.run, critical=True)
            interval = watchdog_interval()
            if interval is not None:
                self._supervise("watchdog", lambda: self._watchdog(interval), critical=True)
            self._supervise("status", self._status_updates)
            self._supervise("integrity", self._deferred_integrity_check)
            self._supervise("event-loop-lag", kktd.services.metrics.watch_event_loop)
            settle_heap()
            self.notifier.send(f"READY=1\nSTATUS={self._status_line()}")
            if self.on_ready is not None:
                self.on_ready()
            log.info(
                "kktd %s ready: listening on http://%s, upstream %s, database %s, pending=%d",
                __version__,
                self.config.listen,
                kktd.upstream_description,
                self.config.db,
                kktd.store.counts.pending,
            )
            await self.stop_requested.wait()
        if self.fatal is not None:
            raise self.fatal
        log.info("kktd stopped cleanly")
        return 0

    def _on_status_signal(self, signum: int) -> None:
        guard = self.site.guard if self.site is not None else None
        connections = (
            f" connections={guard.open_connections} (peak {guard.peak}, dropped at the cap {guard.evicted_total})"
            if guard is not None
            else ""
        )
        log.info(
            "received %s: not a stop signal; status %s%s",
            signal.Signals(signum).name,
            self._status_line() if self.kktd is not None else "starting",
            connections,
        )

    def _on_stop_signal(self, signum: int) -> None:
        if self.stop_requested.is_set():
            return
        self.notifier.send("STOPPING=1\nSTATUS=stopping")
        log.info("received %s: stopping (drain deadline %gs)", signal.Signals(signum).name, self.config.drain_timeout)
        self.stop_requested.set()

    # ---- reload ----

    def _on_reload_signal(self) -> None:
        if self.kktd is None or self.stop_requested.is_set():
            log.info("SIGHUP ignored: kktd is %s", "stopping" if self.stop_requested.is_set() else "starting")
            return
        if self.reloader is None:
            log.warning("SIGHUP ignored: this kktd was started without a configuration to reload")
            return
        if self._reloading is not None and not self._reloading.done():
            log.info("SIGHUP ignored: a reload is already in progress")
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload(), name="kktd-reload")

    async def _reload(self) -> None:
        assert self.kktd is not None and self.reloader is not None
        # systemd documents RELOADING=1 with the monotonic time, then READY=1 once done (sd_notify(3)).
        self.notifier.send(
            f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\nSTATUS=reloading the configuration"
        )
        try:
            try:
                new = self.reloader()
            except ConfigError as exc:
                log.error(
                    "reload refused, the running configuration stays: %s", exc, extra={"error_code": "invalid_config"}
                )
                return
            await self._apply(reload.plan(self.config, new))
        except Exception:
            log.exception("reload failed; the running configuration stays")
        finally:
            self.notifier.send(f"READY=1\nSTATUS={self._status_line()}")

    async def _apply(self, plan: reload.ReloadPlan) -> None:
        assert self.kktd is not None
        kktd, new = self.kktd, plan.effective
        if plan.upstream_changed:
            # The new upstream starts first: if it cannot, nothing changes.
            upstream = REGISTRY[new.upstream].create(new.upstream_settings)
            await upstream.start()
            previous = kktd.sync.replace_upstream(upstream)
            # Kept with the daemon's tasks: a stop cancels it, and its `finally` still closes the old one.
            self.tasks[f"close-upstream-{id(previous)}"] = asyncio.get_running_loop().create_task(
                self._close_after_cycle(previous)
            )
        logs.set_level(new.log_level)
        kktd.store.set_capacity(new.max_pending)
        kktd.sync.config = new
        kktd.services.config = new
        kktd.config = new
        self.config = new
        kktd.sync.wake()  # a new interval or upstream applies now, not after the old interval
        for change in plan.live:
            log.info("reload: %s: %s -> %s", change.key, change.old, change.new)
        for change in plan.needs_restart:
            log.warning(
                "reload: %s: %s -> %s needs a restart (systemctl restart kktd); still %s",
                change.key,
                change.old,
                change.new,
                change.old,
            )
        log.info(
            "configuration reloaded: %s",
            "nothing changed"
            if plan.unchanged
            else f"{len(plan.live)} applied, {len(plan.needs_restart)} need a restart",
        )

    async def _close_after_cycle(self, upstream: Upstream) -> None:
        """Batches already on the wire may still use the replaced upstream: close it once none runs."""
        assert self.kktd is not None
        try:
            await self.kktd.sync.idle()
        finally:
            await upstream.close()

    async def _start_server(self, app: web.Application, budget: DescriptorBudget) -> web.AppRunner:
        limits = ServerLimits(budget.connection_cap, self.config.idle_timeout, self.config.body_timeout)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.config.drain_timeout,
            **runner_options(limits),
        )
        await runner.setup()
        site = GuardedSite(
            runner, self.config.listen_host, self.config.listen_port, limits.max_connections, self.summary, backlog=1024
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self.site = site
        return runner

    async def _stop_intake(self, runner: web.AppRunner) -> None:
        # New requests get 503 shutting_down; requests already inside a handler finish their commit.
        assert self.kktd is not None
        self.kktd.services.intake_open = False
        await runner.cleanup()
        log.info("intake stopped; in-flight requests finished")

    async def _stop_sync(self) -> None:
        assert self.kktd is not None
        self.kktd.sync.request_stop()
        task = self.tasks.get("sync")
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), self.config.drain_timeout)
            except TimeoutError:
                log.warning("sync loop did not stop within %gs; cancelling", self.config.drain_timeout)
        for task in self.tasks.values():
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
            except Exception as exc:
                log.critical("background task %s crashed: %r", name, exc, exc_info=True)
                if self.kktd is not None:
                    self.kktd.services.task_failures[name] = repr(exc)
                self.notifier.send(f"STATUS=degraded: task {name} crashed")
                if critical and self.fatal is None:
                    self.fatal = RuntimeError(f"background task {name} crashed: {exc!r}")
                    self.notifier.send("STOPPING=1")
                    self.stop_requested.set()

        self.tasks[name] = asyncio.get_running_loop().create_task(guarded(), name=f"kktd-{name}")

    async def _deferred_integrity_check(self) -> None:
        assert self.kktd is not None
        damage = await self.kktd.store.verify_in_background()
        if damage is None:
            return
        # Intake refuses from here on (storage_unavailable); what was acknowledged stays where it is.
        self.fatal = CorruptDatabase(damage)
        self.notifier.send("STOPPING=1\nSTATUS=database damaged: see the log")
        log.critical("%s: kktd stops taking receipts and exits", damage)
        self.stop_requested.set()

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only after a round trip through the database writer: a wedged writer stops the pings."""
        assert self.kktd is not None
        store = self.kktd.store
        healthy = True
        while True:
            try:
                await asyncio.wait_for(store.ping(), interval)
            except Exception as exc:
                if healthy:
                    log.error(
                        "database writer did not answer within %.1fs (%r): withholding watchdog pings", interval, exc
                    )
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
        assert self.kktd is not None
        counts = self.kktd.store.counts
        return f"pending={counts.pending} failed={counts.failed} sent={counts.sent} ofd={self.kktd.breaker.state}"
