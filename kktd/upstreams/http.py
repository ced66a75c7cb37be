"""What every HTTP upstream shares: its client session and the session's lifecycle."""

from __future__ import annotations

from typing import Self

import aiohttp


def client_session(connection_limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A keep-alive session to one upstream, answers checked by the caller (no raise_for_status)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connection_limit, enable_cleanup_closed=False),
        timeout=timeout,
        raise_for_status=False,
        # Proxies from the environment must not capture fiscal traffic silently.
        trust_env=False,
    )


class HttpUpstream:
    """Owns one client session: `start()` (the adapter's) opens it, `close()` closes it; usable as an async
    context manager."""

    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit` bytes (not an answer to our request:
    reading on would only let the upstream fill kktd's memory)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
