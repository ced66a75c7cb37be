"""The typed rows and results the store hands out."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReceiptStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not delivered yet
    SENT = "sent"  # fiscalized: the upstream acknowledged it
    FAILED = "failed"  # a dead letter: refused, or given up after max_attempts


@dataclass(frozen=True, slots=True)
class FiscalRecord:
    """The upstream's acknowledgement as stored with a sent receipt."""

    fiscal_document_number: int
    fiscal_sign: str
    ofd_received_at: str
    sent_ms: int


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
    fiscal: FiscalRecord | None  # set once sent


@dataclass(frozen=True, slots=True)
class PendingReceipt:
    seq: int
    receipt_id: str
    idempotency_key: str
    accepted_ms: int
    body: str


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
    sent: int = 0
    failed: int = 0

    @property
    def undelivered(self) -> int:
        return self.pending + self.failed

    def move(self, source: ReceiptStatus, target: ReceiptStatus, count: int) -> None:
        setattr(self, source, getattr(self, source) - count)
        setattr(self, target, getattr(self, target) + count)
