"""The till's own fiscal register through ATOL driver v10's local web server (`/api/v2`): a two-phase upstream.

``submit`` posts each receipt as one request of the web server's queue, ``[getFnStatus, sell]``, under a task
uuid derived from the receipt and its external id (so the uuid is known before the request is sent, and the loop
commits the registration right after); ``poll`` reads ``GET /api/v2/requests/{uuid}``. The queue runs one
task at a time on the device; kktd sends one receipt per call, in the order they were accepted, and each only
once the one before it has run (so that nothing prints between a receipt of unknown outcome and the register's
answer that settles it; a blocked queue holds every receipt back).

Outcomes, by the driver's error codes (docs/atol-driver.md has the table and the reasons):

* ``ready``: fiscalized; the fiscal data is stored (a ``notPrinted`` copy is finished with ``continuePrint``
  once paper is back);
* not printed and safe to print again (no paper, cover open, device busy, shift over 24 h or closed, the
  request interrupted or cancelled): ``NotRegistered``, registered again under a new uuid once the register can
  take it; meanwhile receipts wait and health names the operator's action;
* content refused (the task's data): a dead letter with the driver's code and text;
* unknown (the register lost power or the link mid-document): a ``blocked`` queue is the driver's own recovery,
  kktd waits for it; a plain error of the link or the FN is settled by asking the register for its last
  document and comparing its number with the one read right before the receipt: never by printing again blindly.

A shift is opened before the first receipt when closed, closed (Z report) and reopened after 24 hours when
``atol_driver_auto_shift`` is on; otherwise receipts wait for the operator's ``kktd shift close``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar

import aiohttp
import msgspec
import yarl

from kktd.credentials import parse_secret_path, secret_from
from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    FiscalData,
    Fiscalized,
    NotRegistered,
    Outgoing,
    PollOutcome,
    Refused,
    Registered,
    RegisterReport,
    RegisterUnavailable,
    Shift,
    ShiftState,
    StillProcessing,
    SubmitOutcome,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.errors import ConfigError
from kktd.options import Option, boolean, duration_in, string
from kktd.safetext import escape
from kktd.seller import Seller
from kktd.upstreams.atol_driver_mapping import (
    FN_STATUS_TASK,
    INTAKE_CODES,
    Operator,
    driver_intake_check,
    receipt_task,
    request_body,
    task_uuid,
)
from kktd.upstreams.http import HttpUpstream, bad_answer, invalid_field

__all__ = [
    "DEFAULT_URL",
    "INTAKE_CODES",
    "NAME",
    "OPTIONS",
    "AtolDriver",
    "DriverSettings",
    "create",
    "driver_intake_check",
    "driver_settings",
]

log = logging.getLogger("kktd.upstreams.atol_driver")

NAME = "atol-driver"
DEFAULT_URL = "http://127.0.0.1:16732"
PASSWORD_CREDENTIAL = "atol_driver_password"
MAX_ANSWER_BYTES = 256 << 10
MAX_TEXT_LEN = 300  # of the driver's error text kept in a dead letter
SHIFT_CHECK_S = 60.0  # how long a shift state read from the register is trusted before a receipt
CONTROL_POLL_S = 0.05  # how often a control task (shift, status) is asked for while the register runs it
MAX_BAD_ANSWERS = 10  # unreadable answers about one receipt before it goes to a person
MAX_EVIDENCE = 64  # unknown outcomes whose evidence was read before the next receipt, kept until polled
LAST_RECEIPT_TASK: Mapping[str, Any] = {"type": "getLastFiscalParams", "forReceipt": True}

# ---- the driver's error codes, by what they mean for the receipt (libfptr10; docs/atol-driver.md) ----------

SHIFT_EXPIRED_CODES = frozenset({68, 141})  # the shift is over 24 hours: close it, then print again
SHIFT_CLOSED_CODES = frozenset({73})  # the shift is closed: open it, then print again
PAPER_CODES = frozenset({44})
COVER_CODES = frozenset({45})
PRINTER_CODES = frozenset({46, 114})  # printer fault, print head overheated
BUSY_CODES = frozenset({55, 82})  # a previous operation is unfinished, a receipt is open: the script cancels it
NEVER_RAN_CODES = frozenset({502})  # interrupted by an earlier subtask's error
# The FN cannot sign more until a person acts (it expired, is full, or the OFD backlog is too old): receipts wait.
FN_BLOCKED_CODES = frozenset({120, 121, 136, 137, 139, 140})
# getFnStatus warnings under which the FN signs nothing: receipts keep waiting.
FN_STOP_WARNINGS = ("criticalError", "memoryOverflow", "resourceExhausted", "ofdTimeout")
# The link or the FN failed during the document: it may or may not have been fiscalized.
UNKNOWN_OUTCOME_CODES = frozenset({1, 2, 3, 4, 15, 115, 116, 117, 118, 119, 159, 166, 177, 241})
# Everything else (501 task invalid, 16/17 sums and quantities, 66 not fully paid, 143-145 taxation and tax …)
# is a refusal of the receipt's content: a dead letter with the driver's code.

RECEIPT_TYPES = frozenset({"sell", "sellReturn", "buy", "buyReturn"})
TERMINAL = frozenset({"ready", "error", "interrupted", "canceled"})


@dataclass(frozen=True, slots=True)
class _Problem:
    reason: str
    action: str


DEVICE_PROBLEMS: Mapping[int, _Problem] = {
    **{code: _Problem("paper_out", "load paper into the register; kktd prints what waits") for code in PAPER_CODES},
    **{code: _Problem("cover_open", "close the register's cover; kktd prints what waits") for code in COVER_CODES},
    **{
        code: _Problem("printer_fault", "the register's printer failed: check it (paper jam, head overheated)")
        for code in PRINTER_CODES
    },
    **{
        code: _Problem(
            "fn_blocked",
            "the register's FN signs no more documents (expired, full, or its OFD backlog is too old): "
            "check the register's OFD connection or replace the FN",
        )
        for code in FN_BLOCKED_CODES
    },
}
# The web server answers but the register does not (unplugged, switched off, its cable): receipts wait.
UNREACHABLE = _Problem(
    "register_unreachable",
    "the register does not answer its driver: check its power and cable; kktd prints what waits",
)


def _problem_of(code: int) -> _Problem | None:
    """What a person must do about a task the register did not carry out, when the code says."""
    if code in DEVICE_PROBLEMS:
        return DEVICE_PROBLEMS[code]
    return UNREACHABLE if code in UNKNOWN_OUTCOME_CODES else None


SHIFT_ACTION = (
    "the register's shift is over 24 hours: close it with `kktd shift close` (prints the Z report), "
    "or set atol_driver_auto_shift = true"
)

# ---- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriverSettings:
    url: str = DEFAULT_URL
    timeout: float = 10.0
    operator: Operator = field(default_factory=Operator)
    auto_shift: bool = True
    device_id: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None

    def describe(self) -> dict[str, Any]:
        """Safe to print or log: the password is masked."""
        return {
            "atol_driver_url": self.url,
            "atol_driver_timeout": self.timeout,
            "atol_driver_auto_shift": self.auto_shift,
            "atol_driver_device_id": self.device_id,
            "atol_driver_login": self.login,
            "atol_driver_password": None if self.password is None else "***",
            "atol_driver_password_file": None if self.password_file is None else str(self.password_file),
            "cashier_name": self.operator.name,
            "cashier_inn": self.operator.inn,
        }


def parse_driver_url(raw: Any) -> str:
    text = string(raw).strip()
    try:
        url = yarl.URL(text)
    except (ValueError, TypeError):
        raise ValueError(f"must be an http:// URL such as {DEFAULT_URL}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"must be an http:// URL with a host, e.g. {DEFAULT_URL}")
    if url.user or url.password:
        raise ValueError("must not hold credentials (the login and the password file are settings of their own)")
    if url.query_string or url.fragment or url.path not in ("", "/"):
        raise ValueError(f"must be the web server's address only (e.g. {DEFAULT_URL}); kktd adds /api/v2")
    return text.rstrip("/")


def parse_device_id(raw: Any) -> str | None:
    text = string(raw)
    if text == "":
        return None  # "" = unset: the web server's default device
    if not 0 < len(text) <= 64 or not all(c.isalnum() or c in "-_." for c in text):
        raise ValueError("must be 1..64 characters of letters, digits, - _ .")
    return text


def parse_login(raw: Any) -> str | None:
    text = string(raw)
    if text == "":
        return None  # "" = unset: the web server has no users
    if not 0 < len(text) <= 100 or ":" in text or not text.isprintable() or " " in text:
        raise ValueError("must be 1..100 printable characters without spaces or ':'")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("atol_driver_url", parse_driver_url, DEFAULT_URL, "ATOL driver v10 web server (upstream atol-driver)"),
    Option(
        "atol_driver_timeout", duration_in(0.05, 600), 10.0, "timeout of one request to the web server (atol-driver)"
    ),
    Option(
        "atol_driver_auto_shift",
        boolean,
        True,
        "close a shift over 24 hours (Z report) and open the next one by itself (atol-driver)",
    ),
    Option("atol_driver_device_id", parse_device_id, None, "the web server's device id; unset: its default device"),
    Option("atol_driver_login", parse_login, None, "HTTP Basic login of the web server, if it asks for one"),
    Option(
        "atol_driver_password_file",
        parse_secret_path,
        None,
        "file holding that login's password (default $CREDENTIALS_DIRECTORY/atol_driver_password)",
    ),
)


def driver_settings(
    values: Mapping[str, Any], seller: Seller, environ: Mapping[str, str] | None = None
) -> DriverSettings:
    """Validate this upstream's settings; ConfigError names every bad key. The operator printed on receipts
    that name no cashier is kktd's cashier_name / cashier_inn; the seller's INN and address are the register's
    own (registered in its FN), so none is sent."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for option in OPTIONS:
        raw = values.get(option.key)
        try:
            parsed[option.key] = option.default if raw is None else option.parse(raw)
        except ValueError as exc:
            problems.append(f"{option.key} = {raw!r}: {exc}")
            parsed[option.key] = option.default
    secret = ConfigError.collect(
        problems,
        lambda: secret_from(
            parsed["atol_driver_password_file"], "atol_driver_password_file", PASSWORD_CREDENTIAL, environ
        ),
    )
    login = parsed["atol_driver_login"]
    if login is not None and secret is None and not problems:
        problems.append(
            f"atol_driver_password_file: required with atol_driver_login (or a systemd credential "
            f"{PASSWORD_CREDENTIAL}: LoadCredential={PASSWORD_CREDENTIAL}:/path)"
        )
    if problems:
        raise ConfigError(*problems)
    return DriverSettings(
        url=parsed["atol_driver_url"],
        timeout=parsed["atol_driver_timeout"],
        operator=Operator(seller.cashier_name, seller.cashier_inn),
        auto_shift=parsed["atol_driver_auto_shift"],
        device_id=parsed["atol_driver_device_id"],
        login=login,
        password=None if secret is None or login is None else secret[1],
        password_file=None if secret is None or login is None else secret[0],
    )


def create(settings: DriverSettings) -> AtolDriver:
    return AtolDriver(settings)


# ---- answers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Result:
    """One subtask's entry of ``GET /requests/{uuid}``, in either of the shapes the web servers use."""

    status: str
    code: int
    description: str
    result: dict[str, Any] | None


def _short(text: str) -> str:
    return escape(text, MAX_TEXT_LEN)


def _parse_results(document: object) -> list[_Result]:
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise bad_answer("no_results", "the answer has no results list")
    parsed = []
    for entry in document["results"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            raise bad_answer("invalid_result", "a result without a status")
        error = entry.get("error")
        if isinstance(error, dict):
            code, description = error.get("code", 0), error.get("description", "")
        else:  # the flat shape of the older web server
            code, description = entry.get("errorCode", 0), entry.get("errorDescription", "")
        if type(code) is not int or not isinstance(description, str):
            raise bad_answer("invalid_error", "a result's error is not a code and a text")
        result = entry.get("result")
        parsed.append(_Result(entry["status"], code, description, result if isinstance(result, dict) else None))
    return parsed


_Count = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
_Digits = Annotated[str, msgspec.Meta(pattern="^[0-9]{1,20}$")]


class _FiscalParams(msgspec.Struct):
    """What kktd keeps of a document's fiscalParams: bounded and of their FFD form (ASCII digits where the
    FFD has numbers), since it is printed in a QR code and stored in SQLite's 64-bit integers."""

    fiscalDocumentNumber: Annotated[int, msgspec.Meta(ge=1, le=2**32)]
    fiscalDocumentSign: Annotated[str, msgspec.Meta(pattern="^[0-9]{1,10}$")]
    fiscalDocumentDateTime: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    fnNumber: _Digits | None = None
    registrationNumber: _Digits | None = None
    shiftNumber: _Count | None = None
    fiscalReceiptNumber: _Count | None = None
    fnsUrl: Annotated[str, msgspec.Meta(max_length=256, pattern="^[!-~]+$")] | None = None
    total: Annotated[float, msgspec.Meta(ge=0, le=1e12)] | None = None


def parse_fiscal_params(result: Mapping[str, Any] | None) -> FiscalData:
    params = None if result is None else result.get("fiscalParams")
    try:
        done = msgspec.convert(params, _FiscalParams, strict=True)
    except msgspec.ValidationError as exc:
        raise bad_answer("invalid_fiscal_params", invalid_field(exc)) from None
    return FiscalData(
        fiscal_document_number=done.fiscalDocumentNumber,
        fiscal_sign=done.fiscalDocumentSign,
        registered_at=done.fiscalDocumentDateTime,
        fn_number=done.fnNumber,
        shift_number=done.shiftNumber,
        receipt_number=done.fiscalReceiptNumber,
        kkt_registration_number=done.registrationNumber,
        fns_url=done.fnsUrl,
    )


def _epoch_ms(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text[:64])
        if moment.tzinfo is None:
            moment = moment.astimezone()
        return int(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        return None


def _shift_from(result: Mapping[str, Any] | None) -> Shift:
    status = None if result is None else result.get("shiftStatus")
    if not isinstance(status, dict):
        raise bad_answer("invalid_shift_status", "getShiftStatus without shiftStatus")
    raw = status.get("state")
    state = SHIFT_STATES.get(raw) if isinstance(raw, str) else None
    if state is None:
        raise bad_answer("invalid_shift_status", "unknown shift state")
    number = status.get("number")
    expires = status.get("expiredTime")
    # The register's time is shown to the operator: only a well-formed ISO 8601 time, never its text as such.
    shown = expires if isinstance(expires, str) and _epoch_ms(expires) is not None and expires.isascii() else None
    if state is ShiftState.CLOSED:
        shown = None  # a closed shift has no 24 hours running (the driver reports its clock there)
    return Shift(state, number if type(number) is int and 0 <= number < 2**32 else None, shown)


SHIFT_STATES = {"closed": ShiftState.CLOSED, "opened": ShiftState.OPEN, "expired": ShiftState.EXPIRED}


@dataclass(frozen=True, slots=True)
class _Reference:
    """What kktd commits for a registration: the task uuid and the receipt's total, which settles an unknown
    outcome against the register's last document. Stored as ``uuid`` or ``uuid;total=KOPECKS``."""

    uuid: str
    total: int | None = None

    def __str__(self) -> str:
        return self.uuid if self.total is None else f"{self.uuid};total={self.total}"

    @classmethod
    def parse(cls, text: str) -> _Reference:
        task, _, rest = text.partition(";total=")
        return cls(task, int(rest) if rest.isdigit() else None)


# ---- the client --------------------------------------------------------------------------------------------


class AtolDriver(HttpUpstream):
    """The ATOL driver v10 upstream (kktd.upstreams.base.Upstream, two-phase; and a kktd.upstreams.base.Register)."""

    name: ClassVar[str] = NAME
    two_phase: ClassVar[bool] = True

    def __init__(self, settings: DriverSettings, *, clock: Any = time.monotonic) -> None:
        self.max_batch = 1  # one receipt per request: the register prints one at a time
        self._settings = settings
        base = yarl.URL(settings.url)
        self._api = base.with_path("/api/v2")
        self._query = {} if settings.device_id is None else {"deviceID": settings.device_id}
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout, sock_connect=min(settings.timeout, 5.0))
        self._connection_limit = 2
        self._max_answer_bytes = MAX_ANSWER_BYTES
        self._headers = {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}
        if settings.login is not None and settings.password is not None:
            pair = f"{settings.login}:{settings.password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self._clock = clock
        # What kktd knows of the register between receipts, learned from its answers.
        self._shift: Shift | None = None
        self._shift_read_at = 0.0
        self._device_problem: _Problem | None = None
        self._continue_print = False
        # One receipt in the web server's queue at a time: the task uuid of the receipt posted last, until its
        # result is known; and, for a receipt whose outcome was unknown, the register's last receipt read right
        # after it, before the next receipt could print (the evidence its poll settles it by).
        self._previous: str | None = None
        self._evidence: dict[str, _Result] = {}
        self._bad_answers: dict[str, int] = {}  # receipt id -> unreadable answers about it in a row
        # Shift commands, status reads and the checks before a receipt run one sequence at a time.
        self._control = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AtolDriver(url={self._settings.url!r})"

    # -- the Upstream protocol --

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        """Register each receipt, one request after the other (the loop sends one per call: max_batch 1)."""
        return await _answer_checked(lambda: self._each(batch, self._register))

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        return await _answer_checked(lambda: self._each(awaiting, self._result))

    async def _each(self, items: Sequence[Any], one: Any) -> list[Any]:
        """One by one, in order: a failure before any answer raises; after one, the rest are Undelivered."""
        outcomes: list[Any] = []
        for item in items:
            try:
                outcomes.append(await one(item))
            except UpstreamUnavailable as exc:
                if not outcomes:
                    raise
                outcomes.extend(Undelivered(rest.receipt_id, exc) for rest in items[len(outcomes) :])
                break
        return outcomes

    async def _register(self, outgoing: Outgoing) -> SubmitOutcome:
        try:
            receipt = json.loads(outgoing.body)
            task = receipt_task(receipt, self._settings.operator)
            total = int(receipt["total"])
        except (ValueError, KeyError, TypeError) as exc:
            return Refused(
                outgoing.receipt_id,
                "atol_driver_unmappable",
                f"the stored receipt cannot be mapped to a driver task: {type(exc).__name__}",
            )
        task_id = task_uuid(outgoing.receipt_id, outgoing.external_id)
        async with self._control:
            try:
                await self._after_previous(task_id)
                await self._ready_for_receipts()
            except UpstreamUnavailable as exc:
                # Whatever happened to the checks and shift tasks before it, the receipt itself was not sent.
                raise UpstreamUnavailable(
                    FailureKind.NOT_SENT, exc.reason, exc.detail, operator_action=exc.operator_action
                ) from None
            self._previous = task_id  # before the POST: a lost answer may still have queued it
            await self._enqueue(task_id, [FN_STATUS_TASK, task])
        return Registered(outgoing.receipt_id, str(_Reference(task_id, total)))

    async def _after_previous(self, task_id: str) -> None:
        """The receipt posted before this one has run (the queue would run this one after it anyway), so that
        no receipt prints between another's unknown outcome and the evidence that settles it: that evidence
        (the register's last receipt) is read here, right after it, and kept for its poll. A blocked queue
        holds every receipt back."""
        previous = self._previous
        if previous is None or previous == task_id:
            return
        deadline = self._clock() + self._settings.timeout * 3
        delay = CONTROL_POLL_S / 8
        while True:
            results = await self._results(previous)
            if results is None or len(results) != 2:
                break  # forgotten by the web server (its poll says so), or never queued: nothing to wait for
            receipt = results[1]
            if receipt.status == "blocked":
                raise _blocked(receipt)
            if receipt.status in TERMINAL:
                if receipt.status == "error" and receipt.code in UNKNOWN_OUTCOME_CODES:
                    await self._read_evidence(previous)
                break
            if self._clock() > deadline:
                raise UpstreamUnavailable(
                    FailureKind.NOT_SENT, "register_busy", "the receipt before has not finished printing"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONTROL_POLL_S)
        self._previous = None

    async def _read_evidence(self, task_id: str) -> None:
        [last] = await self._run([LAST_RECEIPT_TASK])
        if last.status != "ready":
            raise _unanswered(last)  # nothing is sent until the register can say
        self._evidence[task_id] = last
        while len(self._evidence) > MAX_EVIDENCE:
            del self._evidence[next(iter(self._evidence))]

    async def _result(self, item: AwaitingResult) -> PollOutcome:
        """One receipt's result. A bad answer about it is its own (Undelivered, the next receipts are asked
        about all the same); after MAX_BAD_ANSWERS in a row it goes to a person as a dead letter, never
        printed again."""
        try:
            outcome = await self._result_of(item)
        except UpstreamUnavailable as exc:
            if exc.kind is not FailureKind.BAD_ANSWER:
                raise
            strikes = self._bad_answers.get(item.receipt_id, 0) + 1
            self._bad_answers[item.receipt_id] = strikes
            if strikes < MAX_BAD_ANSWERS:
                return Undelivered(item.receipt_id, exc)
            outcome = Refused(
                item.receipt_id,
                "atol_driver_bad_answer",
                f"the web server's answers about this receipt could not be read {strikes} times ({exc.reason}): "
                "check the register's documents",
            )
        self._bad_answers.pop(item.receipt_id, None)
        return outcome

    async def _result_of(self, item: AwaitingResult) -> PollOutcome:
        reference = _Reference.parse(item.reference)
        results = await self._results(reference.uuid)
        if results is None:
            await self._check_device_known()
            # The web server does not know the task (its results were purged, or its queue was lost): what
            # happened can only be learned from the register's documents, which a person compares.
            return Refused(
                item.receipt_id,
                "atol_driver_unknown_task",
                f"the web server no longer knows task {reference.uuid}: compare the register's last documents "
                "with this receipt before sending it again",
            )
        if len(results) != 2:
            raise bad_answer("result_count", f"{len(results)} results for a request of 2 tasks")
        before, receipt = results
        outcome = await self._outcome(item, reference, before, receipt)
        if not isinstance(outcome, StillProcessing):
            self._evidence.pop(reference.uuid, None)
            if self._previous == reference.uuid:
                self._previous = None  # settled: the next receipt need not wait for it
        return outcome

    async def _outcome(
        self, item: AwaitingResult, reference: _Reference, before: _Result, receipt: _Result
    ) -> PollOutcome:
        status = receipt.status
        if status in ("wait", "inProgress"):
            return StillProcessing(item.receipt_id)
        if status == "blocked":
            raise _blocked(receipt)
        if status == "ready":
            fiscal = parse_fiscal_params(receipt.result)
            total = _total_kopecks(receipt.result)
            if reference.total is not None and total is not None and total != reference.total:
                # The task under this uuid is another receipt (a uuid another kktd used too): never this one's data.
                return Refused(
                    item.receipt_id,
                    "atol_driver_foreign_task",
                    f"the register's task {reference.uuid} fiscalized {total} kopecks, this receipt is "
                    f"{reference.total}: check the register's documents",
                )
            if receipt.result is not None and _not_printed(receipt.result):
                self._continue_print = True
                log.warning("receipt %s fiscalized but its paper copy not printed", item.receipt_id)
            return Fiscalized(item.receipt_id, fiscal)
        code = f"atol_driver_{receipt.code}"
        text = _short(receipt.description) or f"driver error {receipt.code}"
        if status in ("interrupted", "canceled"):
            if before.status == "error" and before.code in UNKNOWN_OUTCOME_CODES:
                self._device_problem = UNREACHABLE
            return NotRegistered(item.receipt_id, code, f"never ran: {text}")
        if status != "error":
            raise bad_answer("unknown_status", escape(status, 32))
        return await self._refused_or_retried(item, reference, before, receipt, code, text)

    async def _refused_or_retried(
        self, item: AwaitingResult, reference: _Reference, before: _Result, receipt: _Result, code: str, text: str
    ) -> PollOutcome:
        number = receipt.code
        if number in SHIFT_EXPIRED_CODES | SHIFT_CLOSED_CODES:
            # Read the shift again before the next receipt: this answer may be older than a shift kktd has
            # renewed since (several receipts refused for the same expired shift must not close the new one).
            self._shift = None
            return NotRegistered(item.receipt_id, code, text)
        if number in DEVICE_PROBLEMS:
            self._device_problem = DEVICE_PROBLEMS[number]
            return NotRegistered(item.receipt_id, code, text)
        if number in BUSY_CODES | NEVER_RAN_CODES:
            return NotRegistered(item.receipt_id, code, text)
        if number in UNKNOWN_OUTCOME_CODES:
            return await self._settle_unknown(item, reference, before, code, text)
        return Refused(item.receipt_id, code, text)

    async def _settle_unknown(
        self, item: AwaitingResult, reference: _Reference, before: _Result, code: str, text: str
    ) -> PollOutcome:
        """The receipt failed with an error of the link or the FN: fiscalized or not, the register knows. Its
        FN document number before the receipt (the request's first task) and its last receipt now decide."""
        last_before = _fn_document_number(before.result)
        if last_before is None:
            # Nothing to compare with: a person must look (printing it again blindly could fiscalize it twice).
            return Refused(
                item.receipt_id,
                "atol_driver_unknown_outcome",
                f"{code}: {text}; the register could not say whether it was fiscalized: check its last documents",
            )
        last = self._evidence.get(reference.uuid)
        if last is None and self._previous != reference.uuid:
            # No evidence read right after it, and this process did not post it last (kktd restarted since, or
            # the upstream was reloaded): a receipt may have printed after it, so the register's last receipt
            # now proves nothing. A person compares (printing it again blindly could fiscalize it twice).
            return Refused(
                item.receipt_id,
                "atol_driver_unknown_outcome",
                f"{code}: {text}; kktd restarted before it could ask the register: check the register's documents",
            )
        if last is None:
            # Nothing was posted after this one: the register's last receipt now is the evidence.
            async with self._control:
                [last] = await self._run([LAST_RECEIPT_TASK])
        if last.status != "ready":
            # The register cannot answer now (the link that failed the receipt, often): the receipt stays
            # registered and is asked about again, never given up on for a moment's silence.
            raise _unanswered(last)
        if not _has_fiscal_document(last.result):
            # The FN holds no receipt at all (ATOL's script then leaves the number out): none was fiscalized.
            log.info(
                "receipt %s was not fiscalized (%s, the FN holds no receipt); printing it again", item.receipt_id, code
            )
            return NotRegistered(item.receipt_id, code, f"{text} (not fiscalized: the FN holds no receipt)")
        params = parse_fiscal_params(last.result)
        if params.fiscal_document_number <= last_before:
            log.info("receipt %s was not fiscalized (%s); printing it again", item.receipt_id, code)
            return NotRegistered(item.receipt_id, code, f"{text} (not fiscalized: FN document {last_before} is last)")
        total = _total_kopecks(last.result)
        if params.fiscal_document_number == last_before + 1 and (reference.total is None or total == reference.total):
            log.info(
                "receipt %s was fiscalized before the error (%s): document %d",
                item.receipt_id,
                code,
                params.fiscal_document_number,
            )
            return Fiscalized(item.receipt_id, params)
        return Refused(
            item.receipt_id,
            "atol_driver_unknown_outcome",
            f"{code}: {text}; the register's last document ({params.fiscal_document_number}) is not this receipt: "
            "check its documents",
        )

    # -- before a receipt: the device and the shift --

    async def _ready_for_receipts(self) -> None:
        """Raise UpstreamUnavailable with the operator's action while the register cannot take a receipt; open
        or renew the shift when kktd may."""
        if self._device_problem is not None:
            await self._check_device()
        if self._continue_print:
            await self._finish_copy()
        shift = self._shift
        if shift is None or self._clock() - self._shift_read_at > SHIFT_CHECK_S:
            shift = await self._read_shift()
        if shift.state is ShiftState.EXPIRED:
            if not self._settings.auto_shift:
                raise UpstreamUnavailable(FailureKind.NOT_SENT, "shift_expired", operator_action=SHIFT_ACTION)
            log.warning("the register's shift is over 24 hours: closing it (Z report) and opening the next")
            await self._fiscal_control("closeShift")
            shift = Shift(ShiftState.CLOSED)
        if shift.state is ShiftState.CLOSED:
            log.info("opening the register's shift")
            await self._fiscal_control("openShift")
            await self._read_shift()

    async def _check_device(self) -> None:
        problem = self._device_problem
        assert problem is not None
        if problem.reason in ("paper_out", "cover_open", "printer_fault", "register_unreachable"):
            [status] = await self._run([{"type": "getDeviceStatus"}])
            device = (status.result or {}).get("deviceStatus")
            if status.status != "ready" or not isinstance(device, dict):
                raise _waiting(problem)
            if device.get("paperPresent") is False:
                raise _waiting(DEVICE_PROBLEMS[44])
            if device.get("coverOpened") is True:
                raise _waiting(DEVICE_PROBLEMS[45])
            log.info("the register is ready again (%s cleared)", problem.reason)
            self._device_problem = None
            return
        # An FN condition: while the FN itself still warns (full, exhausted, its OFD backlog too old, failed),
        # receipts wait with the action; once it does not, the next receipt is tried (and says if it is still so).
        [status] = await self._run([{"type": "getFnStatus"}])
        warnings = _part(_part(status.result, "fnStatus"), "warnings")
        if status.status != "ready" or any(warnings.get(name) is True for name in FN_STOP_WARNINGS):
            raise _waiting(problem)
        log.info("the register's FN warns no more (%s cleared); trying a receipt", problem.reason)
        self._device_problem = None

    async def _finish_copy(self) -> None:
        """A receipt was fiscalized but its paper copy not (finished) printed: ``continuePrint`` before the next
        receipt. Without paper (or with the cover open) receipts wait for the operator."""
        [done] = await self._run([{"type": "continuePrint"}])
        if done.status != "ready":
            problem = _problem_of(done.code)
            if problem is not None:
                self._device_problem = problem
                raise _waiting(problem)
            # The register will not print it (the copy is its business; the receipt's data is stored): go on.
            log.warning("the register refused to finish a receipt's copy (continuePrint: driver error %d)", done.code)
        else:
            log.info("the register printed the copy it had not finished")
        self._continue_print = False

    async def _read_shift(self) -> Shift:
        [result] = await self._run([{"type": "getShiftStatus"}])
        if result.status != "ready":
            if _problem_of(result.code) is UNREACHABLE:
                raise _waiting(UNREACHABLE)
            raise UpstreamUnavailable(
                FailureKind.NOT_SENT, "register_error", f"getShiftStatus: driver error {result.code}"
            )
        self._shift = _shift_from(result.result)
        self._shift_read_at = self._clock()
        return self._shift

    async def _fiscal_control(self, kind: str) -> _Result:
        task: dict[str, Any] = {"type": kind}
        if self._settings.operator.name is not None:
            task["operator"] = {"name": self._settings.operator.name} | (
                {"vatin": self._settings.operator.inn} if self._settings.operator.inn else {}
            )
        # Whatever happens now, the shift is read again before the next receipt (a failed or unanswered
        # closeShift leaves the shift in a state kktd does not know).
        self._shift = None
        [result] = await self._run([task])
        if result.status != "ready":
            problem = _problem_of(result.code)
            if problem is not None:
                self._device_problem = problem
                raise _waiting(problem)
            raise UpstreamUnavailable(
                FailureKind.NOT_SENT,
                "register_error",
                f"{kind}: driver error {result.code}",
                operator_action=f"the register refused {kind} (driver error {result.code}): check it",
            )
        self._shift = None
        return result

    # -- the Register protocol: the operator's commands and the register's own state --

    async def shift(self) -> Shift:
        async with self._control:
            return await self._register_call(self._read_shift)

    async def open_shift(self) -> Shift:
        async with self._control:
            return await self._register_call(self._open)

    async def close_shift(self) -> Shift:
        async with self._control:
            return await self._register_call(self._close)

    async def report(self) -> RegisterReport:
        async with self._control:
            return await self._register_call(self._report)

    async def _open(self) -> Shift:
        shift = await self._read_shift()
        if shift.state is not ShiftState.CLOSED:
            raise RegisterUnavailable("shift_not_closed", f"the shift is {shift.state} already")
        await self._fiscal_control("openShift")
        return await self._read_shift()

    async def _close(self) -> Shift:
        shift = await self._read_shift()
        if shift.state is ShiftState.CLOSED:
            raise RegisterUnavailable("shift_closed", "the shift is closed already")
        await self._fiscal_control("closeShift")
        return await self._read_shift()

    async def _report(self) -> RegisterReport:
        results = await self._run(
            [
                {"type": "getShiftStatus"},
                {"type": "getDeviceStatus"},
                {"type": "ofdExchangeStatus"},
                {"type": "getFnInfo"},
            ]
        )
        if any(r.status != "ready" for r in results):
            failed = next(r for r in results if r.status != "ready")
            if _problem_of(failed.code) is UNREACHABLE:
                raise RegisterUnavailable(UNREACHABLE.reason, UNREACHABLE.action)
            raise RegisterUnavailable("register_error", f"driver error {failed.code}")
        shift, device, ofd, fn = results
        self._shift, self._shift_read_at = _shift_from(shift.result), self._clock()
        device_status = _part(device.result, "deviceStatus")
        exchange = _part(ofd.result, "status")
        fn_info = _part(fn.result, "fnInfo")
        unsent = exchange.get("notSentCount", 0)
        if type(unsent) is not int or not 0 <= unsent < 2**32:
            raise RegisterUnavailable("bad_answer", "ofdExchangeStatus: notSentCount is not a count")
        warnings = _part(fn_info, "warnings")
        return RegisterReport(
            shift=self._shift,
            unsent_documents=unsent,
            oldest_unsent_ms=_epoch_ms(exchange.get("notSentFirstDocDateTime")) if unsent else None,
            fn_valid_until_ms=_epoch_ms(fn_info.get("validityDate")),
            paper_present=device_status.get("paperPresent") is not False,
            cover_open=device_status.get("coverOpened") is True,
            fn_warnings=tuple(sorted(escape(str(k), 40) for k, v in warnings.items() if v is True))[:16],
        )

    @staticmethod
    async def _register_call(step: Any) -> Any:
        try:
            return await _answer_checked(step)
        except UpstreamUnavailable as exc:
            raise RegisterUnavailable(exc.reason, exc.operator_action or str(exc)) from None

    # -- the web server's queue --

    async def _run(self, tasks: list[Mapping[str, Any]]) -> list[_Result]:
        """Post a control request (under a fresh uuid; a lost answer is retried under the same one) and wait
        until every subtask has finished."""
        task_id = f"kktd-control-{uuid.uuid4()}"
        try:
            await self._enqueue(task_id, tasks)
        except UpstreamUnavailable as exc:
            if exc.kind is not FailureKind.MAYBE_SENT:
                raise
            # The answer (or a keep-alive connection the web server had closed) was lost or late: the same uuid
            # again, 409 if the first POST got there.
            await self._enqueue(task_id, tasks)
        deadline = self._clock() + self._settings.timeout * 3
        while True:
            results = await self._results(task_id)
            if results is None:
                raise bad_answer("control_task_lost", "the web server forgot a task it took")
            if len(results) != len(tasks):
                raise bad_answer("result_count", f"{len(results)} results for a request of {len(tasks)} tasks")
            if all(r.status in TERMINAL for r in results):
                return results
            if self._clock() > deadline:
                raise UpstreamUnavailable(
                    FailureKind.MAYBE_SENT,
                    "register_timeout",
                    "the register has not finished it yet: it is in the register's queue and may still be "
                    "carried out (kktd shift status tells)",
                )
            await asyncio.sleep(CONTROL_POLL_S)

    async def _enqueue(self, task_id: str, tasks: list[Mapping[str, Any]]) -> None:
        """POST the request; 201 (taken) and 409 (already taken: our earlier request got there) both mean the
        task is in the queue."""
        answer = await self._exchange(
            "POST", (self._api / "requests").with_query(self._query), request_body(task_id, tasks), self._headers
        )
        if answer.status in (201, 409):
            return
        raise self._failure(answer.status, answer.body, "POST requests")

    async def _check_device_known(self) -> None:
        """A 404 for a task is a forgotten task only if the device is known: the queue status of the device
        answers 404 too when the device id is wrong (then nothing is concluded about any receipt)."""
        url = (self._api / "getRequestsQueueStatus").with_query(self._query)
        answer = await self._exchange("GET", url, None, self._headers, sent=False)
        if answer.status != 200:
            raise self._failure(answer.status, answer.body, "GET getRequestsQueueStatus")

    async def _results(self, task_id: str) -> list[_Result] | None:
        url = (self._api / "requests" / task_id).with_query(self._query)
        answer = await self._exchange("GET", url, None, self._headers, sent=False)
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise self._failure(answer.status, answer.body, "GET requests")
        try:
            document = json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            raise bad_answer("not_json", "GET requests") from None
        return _parse_results(document)

    def _failure(self, status: int, body: bytes, what: str) -> UpstreamUnavailable:
        if status == 401:
            return UpstreamUnavailable(
                FailureKind.NOT_SENT,
                "auth_failed",
                f"{what}: HTTP 401",
                operator_action="the driver's web server refused the login: check atol_driver_login and "
                "atol_driver_password_file",
            )
        if status == 404:
            return UpstreamUnavailable(
                FailureKind.NOT_SENT,
                "unknown_device",
                f"{what}: HTTP 404",
                operator_action="the driver's web server has no such device (or no default one): check "
                "atol_driver_device_id and the web server's device settings",
            )
        if status >= 500:
            return UpstreamUnavailable(FailureKind.MAYBE_SENT, f"http_{status}", what)
        return bad_answer("unexpected_answer", f"{what}: HTTP {status}")


def _blocked(receipt: _Result) -> UpstreamUnavailable:
    """The driver lost the register mid-document and settles it itself when the register answers again."""
    return UpstreamUnavailable(
        FailureKind.NOT_SENT,
        "register_blocked",
        f"driver error {receipt.code}",
        operator_action="the register stopped answering in the middle of a receipt: check its power and "
        "cable; the driver settles that receipt when the register is back",
    )


def _unanswered(result: _Result) -> UpstreamUnavailable:
    """The register could not answer getLastFiscalParams: what it knows is asked again later."""
    problem = _problem_of(result.code)
    return UpstreamUnavailable(
        FailureKind.NOT_SENT,
        "register_unreachable" if problem is UNREACHABLE else "register_error",
        f"getLastFiscalParams: driver error {result.code}",
        operator_action=(problem or UNREACHABLE).action,
    )


def _part(result: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """An object inside a task's result ({} when the register left it out or sent something else)."""
    value = None if result is None else result.get(key)
    return value if isinstance(value, dict) else {}


PARSE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, OverflowError, IndexError, RecursionError)


async def _answer_checked(step: Any) -> Any:
    """Run one adapter call; an answer of the web server that the parsing above did not foresee (a shape no
    protocol version has) is a bad answer, never an exception that would stop the sync loop."""
    try:
        return await step()
    except PARSE_ERRORS as exc:
        log.error("atol-driver: an answer of the web server could not be read (%s)", type(exc).__name__)
        raise bad_answer("unreadable", type(exc).__name__) from None


def _waiting(problem: _Problem) -> UpstreamUnavailable:
    """The register cannot take a receipt until a person acts: receipts wait, health names the action."""
    return UpstreamUnavailable(FailureKind.NOT_SENT, problem.reason, operator_action=problem.action)


def _not_printed(result: Mapping[str, Any]) -> bool:
    warnings = result.get("warnings")
    return isinstance(warnings, dict) and warnings.get("notPrinted") is True


def _fn_document_number(result: Mapping[str, Any] | None) -> int | None:
    status = None if result is None else result.get("fnStatus")
    number = status.get("fiscalDocumentNumber") if isinstance(status, dict) else None
    return number if type(number) is int else None


def _has_fiscal_document(result: Mapping[str, Any] | None) -> bool:
    """getLastFiscalParams names a document (with no receipt on the FN yet it gives the FN's own fields only)."""
    params = None if result is None else result.get("fiscalParams")
    return not isinstance(params, dict) or "fiscalDocumentNumber" in params


def _total_kopecks(result: Mapping[str, Any] | None) -> int | None:
    params = None if result is None else result.get("fiscalParams")
    total = params.get("total") if isinstance(params, dict) else None
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total <= 1e12:
        return None  # NaN and infinities fail the range too
    return round(total * 100)
