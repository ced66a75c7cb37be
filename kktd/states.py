"""The states kktd reports, one enum each, and the one computation of the oldest pending receipt's age.

Every place that shows or compares one of these (the status and health answers, /metrics, the journal, the
CLI) takes it from here; the receipt's own status is kktd.store.ReceiptStatus.
"""

from __future__ import annotations

import enum

from kktd.clock import now_ms


class AlarmLevel(enum.StrEnum):
    """How old the oldest pending receipt is against pending_warn_age and pending_critical_age (the fiscal
    storage holds unsent documents for at most 30 days)."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class HealthStatus(enum.StrEnum):
    """`GET /v1/health`: ok; warning (kktd works, something needs a look); error (answered with 503)."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


def pending_age_s(oldest_ms: int | None, now: int | None = None) -> float | None:
    """Seconds since the oldest receipt not fiscalized yet was accepted (`oldest_ms`, epoch milliseconds),
    None when there is none. A clock stepped back reads 0, never a negative age."""
    if oldest_ms is None:
        return None
    return max(0.0, ((now_ms() if now is None else now) - oldest_ms) / 1000)
