"""What the HTTP mocks share: serving an aiohttp app on a port of its own, going offline (the listening
socket really closed, connections refused) and online again on the same port, the listen address."""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Self

from aiohttp import web

SHUTDOWN_TIMEOUT_S = 1.0


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6HOST]:PORT' -> (host, port); ValueError names what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class MockServer:
    """One running mock app: ``origin`` is ``http://HOST:PORT``; ``go_offline()`` / ``go_online()``; ``close()``."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, host: str, port: int) -> None:
        self._runner = runner
        self._site: web.TCPSite | None = site
        self.host = host
        self.port = port

    @classmethod
    async def serve(cls, app: web.Application, host: str, port: int) -> tuple[web.AppRunner, web.TCPSite, int]:
        """Start `app` on host:port (port 0: a free one); the runner, the site and the port bound."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = int(runner.addresses[0][1]) if port == 0 else port
        return runner, site, bound

    @property
    def origin(self) -> str:
        return f"http://{format_host(self.host)}:{self.port}"

    async def go_offline(self) -> None:
        """Close the listening socket: new connections are refused, pooled ones are dropped."""
        if self._site is None:
            return
        site, self._site = self._site, None
        await site.stop()
        server = self._runner.server
        for connection in list(server.connections) if server is not None else ():
            connection.force_close()

    async def go_online(self) -> None:
        """Listen on the same port again."""
        if self._site is None:
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self._site = site

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_until_signalled(mock: MockServer, banner: str) -> None:
    """`kktd mock-…` in the foreground: print what to point kktd at, serve until SIGINT or SIGTERM, close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        print(banner, flush=True)
        await stop.wait()
    finally:
        await mock.close()


async def admin_body(request: web.Request) -> dict[str, Any]:
    """The JSON object an admin request carries ({} for none); 400 for anything else."""
    try:
        body = await request.json() if request.can_read_body else {}
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text='{"error":"body is not JSON"}', content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error":"body must be an object"}', content_type="application/json")
    return body
