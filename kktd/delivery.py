"""The delivery types the store, the sync loop and the upstreams share: what goes out (a stored receipt to
submit, a registered document to ask about), what comes back (the typed outcomes the loop records) and how a
call can fail. A neutral module: the store records outcomes without importing any upstream.

One-phase upstreams answer a submission with ``Fiscalized`` or ``Refused``. Two-phase upstreams ("accepted,
result later") answer with ``Registered`` and their own reference, which the loop commits at once; from then
on the receipt is only ever polled, never submitted again under the same external id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FailureKind(enum.StrEnum):
    """What a failed call may have done upstream: decides whether the failure says anything about a receipt."""

    NOT_SENT = "not_sent"  # nothing can have reached the upstream (connection refused, unreachable, auth refused)
    MAYBE_SENT = "maybe_sent"  # the request may have arrived (timeout, connection lost after sending, 5xx)
    BAD_ANSWER = "bad_answer"  # the upstream answered, but not by its protocol


class UpstreamUnavailable(Exception):
    """The upstream could not be used; nothing is marked delivered.

    ``reason`` is short and stable (``connect_error``, ``timeout``, ``http_503``, ``auth_failed`` …) so it can
    be logged, counted and compared; ``detail`` adds context for people. Neither ever holds URLs, credentials,
    tokens or text the upstream sent. ``operator_action`` is set when only a person can fix it (a wrong
    password, a blocked account): receipts wait, health turns ``warning`` with this text.
    """

    def __init__(
        self, kind: FailureKind, reason: str, detail: str | None = None, *, operator_action: str | None = None
    ) -> None:
        super().__init__(reason if detail is None else f"{reason} ({detail})")
        self.kind = kind
        self.reason = reason
        self.detail = detail
        self.operator_action = operator_action


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A stored receipt to submit."""

    receipt_id: str
    idempotency_key: str
    # What the upstream deduplicates on for this registration: the idempotency key, or (after the upstream
    # said a document was not registered) a new id derived from it, committed before it is ever sent.
    external_id: str
    accepted_ms: int  # when kktd accepted the receipt (epoch milliseconds)
    body: str  # the receipt's canonical JSON (kktd.receipt), exactly as stored
    seq: int = field(default=0, compare=False)  # its place in the buffer: where the loop's next page starts


@dataclass(frozen=True, slots=True)
class AwaitingResult:
    """A receipt a two-phase upstream registered and whose result is not known yet."""

    receipt_id: str
    external_id: str
    reference: str  # the upstream's own id for the document (e.g. a uuid it assigned)
    seq: int = field(default=0, compare=False)  # its place in the buffer: where the loop's next page starts


@dataclass(frozen=True, slots=True)
class FiscalData:
    """What the fiscal register says about a fiscalized receipt (FFD tags in comments)."""

    fiscal_document_number: int  # 1040
    fiscal_sign: str  # 1077
    registered_at: str  # 1012, when the document was fiscalized, as the upstream gave it
    fn_number: str | None = None  # 1041
    shift_number: int | None = None  # 1038
    receipt_number: int | None = None  # 1042, number of the receipt in its shift
    kkt_registration_number: str | None = None  # 1037
    ofd_receipt_url: str | None = None
    fns_url: str | None = None  # 1060, the FNS site where a buyer checks the receipt
    ofd_inn: str | None = None  # 1017, the INN of the OFD the register sends to


@dataclass(frozen=True, slots=True)
class Fiscalized:
    """Done: the receipt is fiscalized (marked sent, with its fiscal data)."""

    receipt_id: str
    fiscal: FiscalData


@dataclass(frozen=True, slots=True)
class Refused:
    """The upstream refuses this receipt's content for good (a dead letter, with the upstream's code and text)."""

    receipt_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Registered:
    """Two-phase: the upstream took the document; its result comes later under ``reference``."""

    receipt_id: str
    reference: str


@dataclass(frozen=True, slots=True)
class StillProcessing:
    """Two-phase poll: no result yet; poll again later."""

    receipt_id: str


@dataclass(frozen=True, slots=True)
class NotRegistered:
    """Two-phase poll: the document failed without being fiscalized (e.g. timed out in the upstream's queue);
    it must be registered again under a new external id."""

    receipt_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Undelivered:
    """This receipt's own call failed while others in the batch got answers."""

    receipt_id: str
    error: UpstreamUnavailable


SubmitOutcome = Fiscalized | Refused | Registered | Undelivered
PollOutcome = Fiscalized | Refused | StillProcessing | NotRegistered | Undelivered


@dataclass(frozen=True, slots=True)
class DeliveryTraits:
    """How the sync loop may drive an upstream, as its registry entry declares it."""

    # Calls on the wire at once while all is well: a serial device (a local register) takes one at a time.
    max_in_flight: int = 2
    # Two-phase upstreams: a registered document's result is asked for at most once per this many seconds.
    poll_interval_s: float = 1.0


DEFAULT_TRAITS = DeliveryTraits()  # what an upstream's registry entry gets unless it declares its own


# ---- a register kktd drives itself (a local device behind its driver) ------------------------------------


class ShiftState(enum.StrEnum):
    """A fiscal register's shift: receipts need an open one, and one lasts at most 24 hours."""

    CLOSED = "closed"
    OPEN = "open"
    EXPIRED = "expired"  # open for more than 24 hours: it must be closed (Z report) before the next receipt


@dataclass(frozen=True, slots=True)
class Shift:
    state: ShiftState
    number: int | None = None
    expires_at: str | None = None  # when its 24 hours run out, the register's local time (RFC 3339)


@dataclass(frozen=True, slots=True)
class RegisterReport:
    """What a local register says of itself: its shift, the documents its FN has not yet got to the OFD (the
    FN stops after 30 days of an unsent one), when the FN expires, its paper."""

    shift: Shift
    unsent_documents: int
    oldest_unsent_ms: int | None  # epoch milliseconds of the oldest unsent document, None when none
    fn_valid_until_ms: int | None  # epoch milliseconds; None when the register does not say
    paper_present: bool
    cover_open: bool
    fn_warnings: tuple[str, ...] = ()  # the FN's own warnings by name (needReplacement, memoryOverflow …)


class RegisterUnavailable(Exception):
    """A shift command could not be carried out: the register or its driver did not answer, or refused it
    (``reason`` is stable, ``detail`` for people; neither holds the driver's text unescaped)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
