"""The states kktd reports, one enum each, and the one computation of the oldest pending receipt's age.

Every place that shows or compares one of these (the status and health answers, /metrics, the journal, the
CLI) takes it from here; the receipt's own status is kktd.store.ReceiptStatus.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kktd.clock import now_ms
from kktd.delivery import RegisterReport


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


# A register's FN stops signing when its oldest document unsent to the OFD is 30 days old (54-FZ).
REGISTER_BACKLOG_WARN_S = 3 * 86400
REGISTER_BACKLOG_CRITICAL_S = 25 * 86400
FN_EXPIRY_WARN_S = 30 * 86400


@dataclass(frozen=True, slots=True)
class RegisterAlarm:
    text: str
    critical: bool
    action: str


def register_alarms(report: RegisterReport, now: int) -> list[RegisterAlarm]:
    """What in a register's report needs a person: an old OFD backlog, an FN near its end, no paper."""
    alarms: list[RegisterAlarm] = []
    if report.oldest_unsent_ms is not None:
        age = max(0, now - report.oldest_unsent_ms) / 1000
        if age >= REGISTER_BACKLOG_WARN_S:
            alarms.append(
                RegisterAlarm(
                    f"{report.unsent_documents} documents not sent to the OFD by the register, the oldest "
                    f"{age / 86400:.1f} days old (its FN stops at 30)",
                    age >= REGISTER_BACKLOG_CRITICAL_S,
                    "check the register's connection to the OFD (network, OFD settings of the register)",
                )
            )
    if report.fn_valid_until_ms is not None:
        left = (report.fn_valid_until_ms - now) / 1000
        if left < FN_EXPIRY_WARN_S:
            alarms.append(
                RegisterAlarm(
                    f"the register's FN expires in {max(0.0, left) / 86400:.0f} days",
                    left <= 0,
                    "order a new FN and have the register re-registered with it",
                )
            )
    if not report.paper_present:
        alarms.append(RegisterAlarm("the register has no paper", False, "load paper into the register"))
    if report.cover_open:
        alarms.append(RegisterAlarm("the register's cover is open", False, "close the register's cover"))
    return alarms
