"""What every HTTP upstream's client session shares."""

from __future__ import annotations

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
