"""The typed rows and results the store hands out."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ReceiptStatus(enum.StrEnum):
    PENDING = "pending"  # accepted, not delivered yet
    SUBMITTED = "submitted"  # a two-phase upstream registered it; its result is polled, never resubmitted
    SENT = "sent"  # fiscalized: the upstream acknowledged it
    FAILED = "failed"  # a dead letter: refused, or given up after max_attempts


@dataclass(frozen=True, slots=True)
class FiscalRecord:
    """The upstream's acknowledgement as stored with a sent receipt."""

    fiscal_document_number: int
    fiscal_sign: str
    ofd_received_at: str
    sent_ms: int
    fn_number: str | None = None
    shift_number: int | None = None
    receipt_number: int | None = None
    kkt_registration_number: str | None = None
    ofd_receipt_url: str | None = None


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
    fiscal: FiscalRecord | None  # set once sent
    registration: Registration
    seq: int = 0  # position in the store: what paging (after_seq) continues from


@dataclass(frozen=True, slots=True)
class PendingReceipt:
    seq: int
    receipt_id: str
    idempotency_key: str
    accepted_ms: int
    body: str
    external_id: str


@dataclass(frozen=True, slots=True)
class SubmittedReceipt:
    seq: int
    receipt_id: str
    external_id: str
    reference: str


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
