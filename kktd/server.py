"""The listening socket, guarded against clients that hold connections without finishing requests.

aiohttp alone keeps an idle keep-alive connection for an hour, never closes a connection that trickles its
request head or body, and accepts until the process runs out of descriptors, after which asyncio logs every
failed accept with a traceback. Here:

- the idle/head deadline: a connection must complete a request head within `idle_timeout` of opening or of
  its previous answer (aiohttp's keep-alive timer, armed at connection start, does both);
- the body deadline: the handler reads a body for at most `body_timeout` (kktd.api);
- a cap on open connections, below the descriptor limit read at start: at the cap, the connection heard from
  least recently is dropped to make room (idle keep-alives and tricklers, not a till that is posting);
- accept errors and every kind of connection event an attacker can multiply are logged once per interval
  with a count, never once per occurrence.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

log = logging.getLogger("kktd.server")

# Descriptors kktd needs besides client connections: the database, its WAL and shm, the upstream pool,
# the notify and journal sockets, the listening socket, Python's own; and one spare to accept at the cap.
RESERVED_DESCRIPTORS = 64
SUMMARY_INTERVAL_S = 10.0
# How long a dropped or refused client may linger in the kernel before the transport is aborted.
LINGERING_TIME_S = 2.0


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int
    idle_timeout: float
    body_timeout: float


@dataclass(frozen=True)
class DescriptorBudget:
    soft_limit: int
    hard_limit: int
    connection_cap: int

    def describe(self) -> str:
        return (
            f"descriptor limit {self.soft_limit} (hard {self.hard_limit}), "
            f"at most {self.connection_cap} client connections"
        )


def descriptor_budget(max_connections: int, limits: tuple[int, int] | None = None) -> DescriptorBudget:
    """The connection cap: the configured maximum, lowered to fit under the soft descriptor limit."""
    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    soft_n = soft if soft != resource.RLIM_INFINITY else 1 << 20
    hard_n = hard if hard != resource.RLIM_INFINITY else 1 << 20
    cap = max(1, min(max_connections, soft_n - RESERVED_DESCRIPTORS))
    return DescriptorBudget(soft_n, hard_n, cap)


class EventSummary:
    """Events an attacker can multiply, logged as the first of each kind in an interval and then one line
    with the count of the rest: the log stays a few lines a minute whatever the rate."""

    def __init__(
        self, logger: logging.Logger, interval: float = SUMMARY_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._window_start: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._flusher: asyncio.TimerHandle | None = None

    def event(self, kind: str, level: int, message: str, *args: Any) -> None:
        now = self._clock()
        start = self._window_start.get(kind)
        if start is not None and now - start < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            self._schedule_flush()
            return
        self._flush_kind(kind)
        self._window_start[kind] = now
        self._log.log(level, message, *args)

    def flush(self) -> None:
        for kind in list(self._suppressed):
            self._flush_kind(kind)

    def _flush_kind(self, kind: str) -> None:
        count = self._suppressed.pop(kind, 0)
        if count:
            self._log.warning("%d more %s in the last %.0fs (logged once per interval)", count, kind, self._interval)

    def _schedule_flush(self) -> None:
        if self._flusher is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def run() -> None:
            self._flusher = None
            now = self._clock()
            for kind, start in list(self._window_start.items()):
                if now - start >= self._interval:
                    self._flush_kind(kind)
                    del self._window_start[kind]
            if self._suppressed:
                self._schedule_flush()

        self._flusher = loop.call_later(self._interval, run)

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()


class _GuardedConnection(asyncio.Protocol):
    """Stands between the transport and aiohttp's request handler: counts the connection and notes when
    the client was last heard from. Every callback is passed through unchanged."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self.last_heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_heard = self._guard.clock()
        self._guard.opened(self)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = self._guard.clock()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.closed(self)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class ConnectionGuard:
    """A protocol factory around aiohttp's: at most `cap` connections; at the cap the one heard from least
    recently is aborted to make room for the new one."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        cap: int,
        summary: EventSummary,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self.cap = cap
        self.clock = clock
        self._summary = summary
        self._open: dict[_GuardedConnection, None] = {}  # insertion-ordered set
        self.evicted_total = 0
        self.peak = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedConnection(self, self._factory())

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def opened(self, connection: _GuardedConnection) -> None:
        while len(self._open) >= self.cap:
            self._evict()
        self._open[connection] = None
        self.peak = max(self.peak, len(self._open))

    def closed(self, connection: _GuardedConnection) -> None:
        self._open.pop(connection, None)

    def _evict(self) -> None:
        victim = min(self._open, key=lambda c: c.last_heard)
        del self._open[victim]
        self.evicted_total += 1
        self._summary.event(
            "connections dropped at the cap",
            logging.WARNING,
            "%d client connections open (the cap): dropped the one silent longest (%.1fs) to take a new one",
            self.cap,
            self.clock() - victim.last_heard,
        )
        if victim.transport is not None:
            victim.transport.abort()


class GuardedSite(web.BaseSite):
    """web.TCPSite with the ConnectionGuard in front of aiohttp's protocol factory."""

    __slots__ = ("_host", "_port", "_reuse_address", "guard", "_cap", "_summary")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, cap: int, summary: EventSummary, *, backlog: int = 1024
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._cap = cap
        self._summary = summary
        self.guard: ConnectionGuard | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self._cap, self._summary)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.guard, self._host, self._port, backlog=self._backlog, reuse_address=True
        )


def runner_options(limits: ServerLimits) -> dict[str, Any]:
    """aiohttp RequestHandler options: the keep-alive timer (armed at connection start too) is the idle and
    request-head deadline; a body left unread is drained for a short while only, then the connection closed.
    Bodies are never decompressed by aiohttp: kktd refuses a Content-Encoding with its own 415 (api.py) before
    anything reads the body, instead of a decoder failing mid-read."""
    return {
        "keepalive_timeout": limits.idle_timeout,
        "lingering_time": min(LINGERING_TIME_S, limits.body_timeout),
        "auto_decompress": False,
    }


def install_accept_error_summary(
    loop: asyncio.AbstractEventLoop, summary: EventSummary, budget: DescriptorBudget
) -> None:
    """asyncio reports each failed accept() (EMFILE, ENFILE, ENOBUFS, ENOMEM) to the loop's exception handler,
    which logs a traceback every time: counted here instead, one line per interval."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            exc = context.get("exception")
            summary.event("accept errors", logging.ERROR, "cannot accept a connection: %s (%s)", exc, budget.describe())
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
