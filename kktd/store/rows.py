"""The typed rows and results the store hands out."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kktd.delivery import FiscalData


class ReceiptStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not delivered yet
    SUBMITTED = "submitted"  # a two-phase upstream registered it; its result is polled, never resubmitted
    SENT = "sent"  # fiscalized: the upstream acknowledged it
    FAILED = "failed"  # a dead letter: refused, or given up after max_attempts
    RESOLVED = "resolved"  # a dead letter the operator closed with a reason: kept for audit, never sent


@dataclass(frozen=True, slots=True)
class Registration:
    """Where a receipt stands with a two-phase upstream."""

    external_id: str  # what it is (or will be) registered under
    registrations: int  # how many times it had to be registered again under a new external id
    reference: str | None  # the upstream's own id, once it took the document
    submitted_ms: int | None


@dataclass(frozen=True, slots=True)
class ReceiptRow:
    receipt_id: str
    idempotency_key: str
    body: str  # canonical JSON
    total: int
    status: ReceiptStatus
    attempts: int
    last_error: str | None
    accepted_ms: int
    updated_ms: int
    fiscal: FiscalData | None  # set once sent: what the upstream said, as stored
    sent_ms: int | None  # when kktd recorded it as sent
    registration: Registration
    seq: int = 0  # position in the store: what paging (after_seq) continues from
    resolution: str | None = None  # status resolved: why the operator closed the dead letter


@dataclass(frozen=True, slots=True)
class Accepted:
    receipt_id: str
    created: bool
    total: int
    accepted_ms: int
    status: ReceiptStatus


@dataclass(frozen=True, slots=True)
class Conflict:
    """The idempotency key is taken by a receipt with a different body."""

    receipt_id: str


@dataclass
class Counts:
    """Receipts per status, kept by the writer as it moves rows (no COUNT query after start-up)."""

    pending: int = 0
    submitted: int = 0
    sent: int = 0
    failed: int = 0
    resolved: int = 0

    @property
    def undelivered(self) -> int:
        return self.pending + self.submitted + self.failed

    @property
    def unsent(self) -> int:
        """Not fiscalized yet, and still on their way (dead letters aside)."""
        return self.pending + self.submitted

    def move(self, source: ReceiptStatus, target: ReceiptStatus, count: int) -> None:
        setattr(self, source, getattr(self, source) - count)
        setattr(self, target, getattr(self, target) + count)
