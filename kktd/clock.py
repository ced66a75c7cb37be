"""Time, as both sides of kktd read it: the store and the HTTP layer, the sync loop and the upstreams.

Injected clocks (`Clock`, `Sleep`) let the sync loop's retry and backoff tests run in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]  # monotonic seconds
Sleep = Callable[[float], Awaitable[None]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339(ms: int) -> str:
    """A stored millisecond timestamp as UTC RFC 3339, e.g. 2026-11-24T03:22:32.410Z (on every intake
    answer: kept cheap)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
