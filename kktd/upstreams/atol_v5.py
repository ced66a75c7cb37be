"""ATOL Online v5 (a cloud KKT; Evotor's connector speaks the same protocol): a two-phase upstream.

``submit`` registers each receipt (``POST {base}/{group_code}/{sell|sell_refund|buy|buy_refund}``) and answers
``Registered`` with ATOL's ``uuid``; the sync loop commits it at once and from then on only ``poll``s
(``GET {base}/{group_code}/report/{uuid}``). ATOL deduplicates on ``external_id``: a registration whose answer
was lost is sent again under the same ``external_id`` and the error-33 answer carries the original ``uuid``.

The client trusts nothing it is told: an answer is an outcome only when it matches the protocol exactly;
anything else is ``bad_answer``. Failures that concern every receipt (no network, a refused login, a blocked
user) raise UpstreamUnavailable; a failure of one receipt's own request while others got answers is that
receipt's ``Undelivered``. The password and the token never reach a log line or an exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeGuard

import aiohttp
import msgspec
import yarl

from kktd.credentials import parse_secret_path, read_secret
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
    StillProcessing,
    SubmitOutcome,
    Undelivered,
    UpstreamUnavailable,
)
from kktd.errors import ConfigError
from kktd.options import Option, duration_in, int_in, string
from kktd.seller import Seller
from kktd.upstreams.atol_v5_mapping import (
    ATOL_OPERATIONS,
    INTAKE_CODES,
    Company,
    atol_intake_check,
    registration_body,
)
from kktd.upstreams.http import HttpUpstream, bad_answer, invalid_field

__all__ = [
    "DEFAULT_URL",
    "NAME",
    "OPTIONS",
    "AtolOnlineV5",
    "AtolSettings",
    "INTAKE_CODES",
    "atol_intake_check",
    "atol_settings",
    "create",
    "parse_atol_url",
    "parse_group_code",
    "parse_login",
    "read_password",
]

log = logging.getLogger("kktd.upstreams.atol_v5")

NAME = "atol-online-v5"
DEFAULT_URL = "https://online.atol.ru/possystem/v5"
PASSWORD_CREDENTIAL = "atol_password"  # the file name under $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
MAX_BATCH = 100
MAX_RESPONSE_BYTES = 256 << 10  # a report is ~1 KiB; far more is not an answer to our request
MAX_TOKEN_LEN = 1000
MAX_UUID_LEN = 128
MAX_TEXT_LEN = 512  # of ATOL's error text kept in a dead letter
INTEGRATOR = "kktd"  # getToken's optional "source"

# Codes of section 7.1 of the specification.
CODE_TOKEN_MISSING, CODE_TOKEN_EXPIRED = 10, 11
CODE_DUPLICATE = 33
CODE_NOT_READY = 34
# Refusals of the request's content: the document was not registered, and resending it unchanged cannot help.
CONTENT_REFUSALS = frozenset({13, 31, 32, 40})
# Failures of ATOL itself before or while it took the document: resending under the same external_id is safe
# (a document it did take answers 33 with its uuid).
TRANSIENT_CODES = frozenset({0, 1, 50})
# Driver errors whose remedy in section 7.2 is "the KKT failed: send the receipt again": not fiscalized.
RESEND_DRIVER_CODES = frozenset({36, 40})


@dataclass(frozen=True, slots=True)
class _AuthProblem:
    reason: str
    operator_action: str


AUTH_PROBLEMS: Mapping[int, _AuthProblem] = {
    12: _AuthProblem(
        "auth_failed",
        "ATOL Online refused the login or password: check atol_login and the password "
        "file (atol_password_file, or $CREDENTIALS_DIRECTORY/atol_password)",
    ),
    14: _AuthProblem(
        "user_blocked", "ATOL Online has blocked this user: ask ATOL Online support to unblock atol_login"
    ),
    20: _AuthProblem("group_mismatch", "the group code does not belong to this login: check atol_group_code"),
    21: _AuthProblem(
        "group_not_v5",
        "the group is not on protocol v5 (FFD 1.2): move it to FFD 1.2 in ATOL "
        "Online's cabinet, or check atol_group_code",
    ),
}

# ---- settings ----------------------------------------------------------------------------------------------

LOGIN_RE = re.compile(r"\S{1,100}")
GROUP_CODE_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")


@dataclass(frozen=True, slots=True)
class AtolSettings:
    url: str
    login: str
    password: str
    group_code: str
    company: Company
    concurrency: int = 4
    timeout: float = 10.0
    password_file: Path | None = None  # where the password was read (shown by describe())

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.describe().items())
        return f"AtolSettings({shown})"

    def describe(self) -> dict[str, Any]:
        """Safe to print or log: the password is masked."""
        return {
            "atol_url": self.url,
            "atol_login": self.login,
            "atol_password": "***",
            "atol_password_file": None if self.password_file is None else str(self.password_file),
            "atol_group_code": self.group_code,
            **self.company.describe(),
            "upstream_concurrency": self.concurrency,
            "atol_timeout": self.timeout,
        }


def parse_atol_url(raw: Any) -> str:
    text = string(raw).strip()
    try:
        url = yarl.URL(text)
    except (ValueError, TypeError):
        raise ValueError("must be an http:// or https:// URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host, e.g. " + DEFAULT_URL)
    if url.user or url.password:
        raise ValueError("must not hold credentials (the login and password are settings of their own)")
    if url.query_string or url.fragment:
        raise ValueError("must not have a query or a fragment")
    return text.rstrip("/")


def parse_login(raw: Any) -> str:
    text = string(raw)
    if not LOGIN_RE.fullmatch(text):
        raise ValueError("must be 1..100 characters without spaces")
    return text


def parse_group_code(raw: Any) -> str:
    text = string(raw)
    if not GROUP_CODE_RE.fullmatch(text):
        raise ValueError("must be 1..100 characters of A-Z a-z 0-9 . _ -")
    return text


def read_password(path: Path) -> str:
    """The password in ``path`` (one trailing newline ignored). ValueError never quotes the file's content."""
    return read_secret(path, "password")


OPTIONS: tuple[Option, ...] = (
    Option(
        "atol_url",
        parse_atol_url,
        DEFAULT_URL,
        "base URL of ATOL Online v5, or of Evotor's connector (upstream atol-online-v5)",
    ),
    Option("atol_login", parse_login, None, "ATOL Online login, from the integration settings (atol-online-v5)"),
    Option("atol_group_code", parse_group_code, None, "ATOL Online group code of the KKTs (atol-online-v5)"),
    Option(
        "atol_password_file",
        parse_secret_path,
        None,
        "file holding the ATOL Online password (default $CREDENTIALS_DIRECTORY/atol_password)",
    ),
    Option(
        "upstream_concurrency",
        int_in(1, 64),
        4,
        "HTTP requests to the upstream in flight at once, registrations and polls together (atol-online-v5)",
    ),
    Option("atol_timeout", duration_in(0.05, 600), 10.0, "timeout of one ATOL Online request (atol-online-v5)"),
)
_REQUIRED = ("atol_login", "atol_group_code")
# kktd's own seller settings (kktd/seller.py) that every ATOL receipt carries (tags 1018, 1117, 1187).
SELLER_REQUIRES = ("company_inn", "company_email", "company_payment_address")


def _setting(values: Mapping[str, Any], spec: Option) -> Any:
    raw = values.get(spec.key)
    if raw is None:
        if spec.key in _REQUIRED:
            raise ConfigError(f"{spec.key}: required when upstream = {NAME}")
        return spec.default
    try:
        return spec.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{spec.key} = {raw!r}: {exc}") from None


def atol_settings(values: Mapping[str, Any], seller: Seller, environ: Mapping[str, str] | None = None) -> AtolSettings:
    """Validate this upstream's settings (raw or already parsed values, by option key); ConfigError names the key.

    The password comes from ``atol_password_file`` or, when that is unset, from systemd's credential
    ``$CREDENTIALS_DIRECTORY/atol_password``: never from the TOML file or the environment.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    parsed: dict[str, Any] = {}
    for spec in OPTIONS:
        try:
            parsed[spec.key] = _setting(values, spec)
        except ConfigError as exc:
            problems.extend(exc.problems)
            parsed[spec.key] = None
    company = ConfigError.collect(problems, lambda: _company(seller))
    password = ConfigError.collect(problems, lambda: _password(parsed["atol_password_file"], environ))
    if problems or company is None or password is None:
        raise ConfigError(*problems)
    password_path = password[0]
    return AtolSettings(
        url=parsed["atol_url"],
        login=parsed["atol_login"],
        password=password[1],
        group_code=parsed["atol_group_code"],
        company=company,
        concurrency=parsed["upstream_concurrency"],
        timeout=parsed["atol_timeout"],
        password_file=password_path,
    )


def _password(explicit: Path | None, environ: Mapping[str, str]) -> tuple[Path, str]:
    """The password file (``atol_password_file`` or the systemd credential) and the password in it."""
    if explicit is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY", "")
        if not credentials:
            raise ConfigError(
                f"atol_password_file: required when upstream = {NAME} (or a systemd credential "
                f"{PASSWORD_CREDENTIAL}: LoadCredential={PASSWORD_CREDENTIAL}:/path)"
            )
        path = Path(credentials) / PASSWORD_CREDENTIAL
        key = f"atol_password_file (default $CREDENTIALS_DIRECTORY/{PASSWORD_CREDENTIAL})"
    else:
        path, key = explicit, "atol_password_file"
    try:
        return path, read_password(path)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _company(seller: Seller) -> Company:
    inn, email, address = seller.required(NAME, SELLER_REQUIRES)
    return Company(inn, email, address, seller.cashier_name, seller.cashier_inn)


def create(settings: AtolSettings) -> AtolOnlineV5:
    return AtolOnlineV5(settings)


# ---- answers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AtolError:
    """The ``error`` object of an answer."""

    code: int
    text: str
    type: str | None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    document: dict[str, Any]
    error: AtolError | None


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT_LEN else text[:MAX_TEXT_LEN] + "…"


class _ErrorObject(msgspec.Struct):
    """The ``error`` object of an answer (section 7.1); strict: true is not code 1."""

    code: int
    text: str
    type: str | None = None


def _parse_error(document: dict[str, Any]) -> AtolError | None:
    error = document.get("error")
    if error is None:
        return None
    if not isinstance(error, dict):
        raise bad_answer("error", "error is neither null nor an object")
    try:
        parsed = msgspec.convert(error, _ErrorObject, strict=True)
    except msgspec.ValidationError as exc:
        raise bad_answer("error", f"error.{invalid_field(exc)}") from None
    return AtolError(parsed.code, _short(parsed.text), parsed.type)


def _is_uuid(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_UUID_LEN and value.isprintable()


def _auth_unavailable(error: AtolError) -> UpstreamUnavailable | None:
    problem = AUTH_PROBLEMS.get(error.code)
    if problem is None:
        return None
    return UpstreamUnavailable(
        FailureKind.NOT_SENT, problem.reason, f"ATOL error {error.code}", operator_action=problem.operator_action
    )


def _http_failure(answer: _Answer, *, sent: bool) -> UpstreamUnavailable:
    """An answer that is neither an outcome nor an error code this client acts on."""
    maybe = FailureKind.MAYBE_SENT if sent else FailureKind.NOT_SENT
    if answer.error is not None and answer.error.code in TRANSIENT_CODES:
        return UpstreamUnavailable(maybe, f"atol_error_{answer.error.code}", f"HTTP {answer.status}")
    if answer.error is not None:
        return bad_answer("unexpected_error_code", f"code {answer.error.code} with HTTP {answer.status}")
    return bad_answer("unexpected_answer", f"HTTP {answer.status}")


_Text = Annotated[str, msgspec.Meta(min_length=1)]


class _Payload(msgspec.Struct):
    """The ``payload`` of a ``done`` report (section 5.2), strictly typed: true is not a number, "1" neither."""

    fiscal_document_number: Annotated[int, msgspec.Meta(ge=1)]
    fiscal_document_attribute: Annotated[int, msgspec.Meta(ge=0)]
    receipt_datetime: Annotated[_Text, msgspec.Meta(max_length=64)]
    fn_number: Annotated[_Text, msgspec.Meta(max_length=32)]
    shift_number: Annotated[int, msgspec.Meta(ge=0)]
    fiscal_receipt_number: Annotated[int, msgspec.Meta(ge=0)]
    ecr_registration_number: Annotated[_Text, msgspec.Meta(max_length=32)]
    ofd_receipt_url: Annotated[_Text, msgspec.Meta(max_length=2048)] | None = None
    fns_site: Annotated[_Text, msgspec.Meta(max_length=256)] | None = None
    ofd_inn: Annotated[str, msgspec.Meta(pattern="^[0-9]{10}$|^[0-9]{12}$")] | None = None


def parse_fiscal_data(payload: object) -> FiscalData:
    """The ``payload`` of a ``done`` report -> FiscalData; raises bad_answer unless every field is well-typed."""
    if not isinstance(payload, dict):
        raise bad_answer("invalid_payload", "payload is not an object")
    try:
        done = msgspec.convert(payload, _Payload, strict=True)
    except msgspec.ValidationError as exc:
        raise bad_answer("invalid_payload", f"payload.{invalid_field(exc)}") from None
    return FiscalData(
        fiscal_document_number=done.fiscal_document_number,
        fiscal_sign=str(done.fiscal_document_attribute),
        registered_at=done.receipt_datetime,
        fn_number=done.fn_number,
        shift_number=done.shift_number,
        receipt_number=done.fiscal_receipt_number,
        kkt_registration_number=done.ecr_registration_number,
        ofd_receipt_url=done.ofd_receipt_url,
        fns_url=done.fns_site,
        ofd_inn=done.ofd_inn,
    )


@dataclass(slots=True)
class _Call:
    """One submit() or poll(): once getToken failed for it, its other requests give up at once."""

    token_failure: UpstreamUnavailable | None = None


# ---- the client --------------------------------------------------------------------------------------------


class AtolOnlineV5(HttpUpstream):
    """The ATOL Online v5 upstream (kktd.upstreams.base.Upstream, two-phase)."""

    name: ClassVar[str] = NAME
    two_phase: ClassVar[bool] = True

    def __init__(self, settings: AtolSettings, *, tz: tzinfo | None = None) -> None:
        self.max_batch = MAX_BATCH
        self._settings = settings
        self._tz = tz  # None: the terminal's local time (ATOL's timestamp); tests pin one
        base = yarl.URL(settings.url)
        self._base = base.with_path(base.path.rstrip("/"))
        self._group = settings.group_code
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout, sock_connect=settings.timeout / 2)
        # Registrations and polls share these slots: ATOL sees at most `concurrency` of them at once.
        self._slots = asyncio.Semaphore(settings.concurrency)
        # One connection more than the slots: a getToken never waits for a pooled connection.
        self._connection_limit = settings.concurrency + 1
        self._max_answer_bytes = MAX_RESPONSE_BYTES
        self._token: str | None = None
        self._token_lock = asyncio.Lock()
        self._auth_failure: UpstreamUnavailable | None = None  # the last auth refusal, logged once
        self.tokens_obtained = 0

    def __repr__(self) -> str:
        return f"AtolOnlineV5(url={self._settings.url!r}, group_code={self._group!r})"

    # -- the Upstream protocol --

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        """Register each receipt (one request each, at most ``concurrency`` at once)."""
        return await self._each(batch, self._register)

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        """Ask for the result of each registered document (one ``report/{uuid}`` request each)."""
        return await self._each(awaiting, self._report)

    async def _each(self, items: Sequence[Any], one: Callable[[_Call, Any], Awaitable[Any]]) -> list[Any]:
        """One request per receipt under one token; a transport failure answers for its receipt only."""
        self._check_batch(items)
        call = _Call()
        await self._ensure_token(call)
        return self._settle(await asyncio.gather(*(self._guard(i.receipt_id, one(call, i)) for i in items)))

    # -- one document --

    async def _register(self, call: _Call, outgoing: Outgoing) -> SubmitOutcome:
        try:
            receipt = json.loads(outgoing.body)
            operation = ATOL_OPERATIONS[receipt["operation"]]
            body = registration_body(
                receipt, outgoing.external_id, outgoing.accepted_ms, self._settings.company, self._tz
            )
        except (ValueError, KeyError, TypeError) as exc:
            # A stored receipt kktd cannot map (it predates a rule of this upstream): a person must look at it.
            return Refused(
                outgoing.receipt_id,
                "atol_unmappable",
                f"the stored receipt cannot be mapped to ATOL Online v5: {type(exc).__name__}: {exc}",
            )
        answer = await self._authorized(call, "POST", self._base / self._group / operation, body.encode())
        return self._registration_outcome(outgoing, answer)

    def _registration_outcome(self, outgoing: Outgoing, answer: _Answer) -> SubmitOutcome:
        error, document = answer.error, answer.document
        if error is not None and document.get("status") == "done":
            raise bad_answer("status_and_error", f"status done with error {error.code}")
        if error is None:
            if answer.status != 200 or document.get("status") not in ("wait", "done"):
                raise _http_failure(answer, sent=True)
            uuid = document.get("uuid")
            if not _is_uuid(uuid):
                raise bad_answer("invalid_uuid", "registration answer")
            return Registered(outgoing.receipt_id, uuid)
        if error.code == CODE_DUPLICATE:
            # The document exists under this external_id (our earlier request got through): adopt its uuid.
            uuid = document.get("uuid")
            if not _is_uuid(uuid):
                raise bad_answer("duplicate_without_uuid", "error 33 without the original uuid")
            return Registered(outgoing.receipt_id, uuid)
        if error.code in CONTENT_REFUSALS:
            return Refused(outgoing.receipt_id, f"atol_{error.code}", error.text)
        raise _http_failure(answer, sent=True)

    async def _report(self, call: _Call, awaiting: AwaitingResult) -> PollOutcome:
        url = self._base / self._group / "report" / awaiting.reference
        answer = await self._authorized(call, "GET", url, None)
        return self._report_outcome(awaiting, answer)

    def _report_outcome(self, awaiting: AwaitingResult, answer: _Answer) -> PollOutcome:
        document, error = answer.document, answer.error
        status = document.get("status")
        if status == "done" and error is not None:
            raise bad_answer("status_and_error", f"status done with error {error.code}")
        if answer.status == 200 and status == "done" and error is None:
            self._check_identity(awaiting, document)
            return Fiscalized(awaiting.receipt_id, parse_fiscal_data(document.get("payload")))
        if answer.status == 200 and status == "wait" and (error is None or error.code == CODE_NOT_READY):
            return StillProcessing(awaiting.receipt_id)
        if status == "fail" and error is not None and (error.type == "timeout" or error.code not in TRANSIENT_CODES):
            self._check_identity(awaiting, document)
            code = f"atol_{error.code}"
            # Section 7.1: the document timed out in ATOL's queue, no KKT took it (type "timeout"; its code reads
            # -1 in clients and in the table's layout); section 7.2: the KKT failed and the remedy is to send it
            # again. Not fiscalized either way: register it anew.
            if error.type == "timeout" or (error.type == "driver" and error.code in RESEND_DRIVER_CODES):
                return NotRegistered(awaiting.receipt_id, code, error.text)
            # Any other failure (the KKT refused the content, an INN mismatch, a KKT fault of unknown effect)
            # goes to a person: registering it again could fiscalize it twice.
            return Refused(awaiting.receipt_id, code, error.text)
        raise _http_failure(answer, sent=True)

    @staticmethod
    def _check_identity(awaiting: AwaitingResult, document: dict[str, Any]) -> None:
        uuid = document.get("uuid")
        if uuid is not None and uuid != awaiting.reference:
            raise bad_answer("uuid_mismatch", "report of another document")
        external_id = document.get("external_id")
        if external_id is not None and external_id != awaiting.external_id:
            raise bad_answer("external_id_mismatch", "report of another document")

    # -- token --

    async def _ensure_token(self, call: _Call) -> str:
        if self._token is not None:
            return self._token
        return await self._new_token(call, None)

    async def _new_token(self, call: _Call, stale: str | None) -> str:
        """getToken, once for all requests that saw ``stale`` refused; a refusal ends the attempts of this call."""
        async with self._token_lock:
            if call.token_failure is not None:
                raise call.token_failure
            if self._token is not None and self._token != stale:
                return self._token  # another request already replaced it
            self._token = None
            try:
                answer = await self._request("POST", self._base / "getToken", self._credentials(), None, sent=False)
                token = self._token_from(answer)
            except UpstreamUnavailable as exc:
                call.token_failure = exc
                raise
            self._token = token
            self.tokens_obtained += 1
            if self._auth_failure is not None:
                log.info("atol: ATOL Online accepts the login again")
                self._auth_failure = None
            log.info("atol: new token obtained from ATOL Online")
            return token

    def _credentials(self) -> bytes:
        return json.dumps(
            {"login": self._settings.login, "pass": self._settings.password, "source": INTEGRATOR}, ensure_ascii=False
        ).encode()

    def _token_from(self, answer: _Answer) -> str:
        if answer.error is not None:
            auth = _auth_unavailable(answer.error)
            if auth is not None:
                raise self._remember_auth_failure(auth)
            raise _http_failure(answer, sent=False)
        token = answer.document.get("token")
        if (
            answer.status != 200
            or not isinstance(token, str)
            or not 0 < len(token) <= MAX_TOKEN_LEN
            or not token.isprintable()
        ):
            raise bad_answer("invalid_token_answer", f"getToken HTTP {answer.status}")
        return token

    async def _authorized(self, call: _Call, method: str, url: yarl.URL, body: bytes | None) -> _Answer:
        # The token is read once a slot is ours: a request that waited for one uses the token of its time.
        # getToken takes no slot (it is rare, and a slot held while waiting for it must not starve it).
        token, answer = await self._in_slot(call, method, url, body)
        if answer.error is not None and answer.error.code in (CODE_TOKEN_MISSING, CODE_TOKEN_EXPIRED):
            # ATOL asks for a new token only after it said the old one is no good; then the call is retried once.
            log.info("atol: the token was refused (error %d); getting a new one", answer.error.code)
            await self._new_token(call, token)
            token, answer = await self._in_slot(call, method, url, body)
            if answer.error is not None and answer.error.code in (CODE_TOKEN_MISSING, CODE_TOKEN_EXPIRED):
                raise UpstreamUnavailable(
                    FailureKind.NOT_SENT, "token_rejected", f"a new token was refused too (error {answer.error.code})"
                )
        if answer.error is not None:
            auth = _auth_unavailable(answer.error)
            if auth is not None:
                raise self._remember_auth_failure(auth)
        return answer

    async def _in_slot(self, call: _Call, method: str, url: yarl.URL, body: bytes | None) -> tuple[str, _Answer]:
        async with self._slots:
            token = await self._ensure_token(call)
            return token, await self._request(method, url, body, token, sent=True)

    def _remember_auth_failure(self, auth: UpstreamUnavailable) -> UpstreamUnavailable:
        """Keep the refusal for status; log it once per reason, not once per receipt."""
        if self._auth_failure is None or self._auth_failure.reason != auth.reason:
            log.error("atol: %s: %s", auth.reason, auth.operator_action)
        self._auth_failure = auth
        return auth

    # -- HTTP --

    async def _request(
        self, method: str, url: yarl.URL, body: bytes | None, token: str | None, *, sent: bool
    ) -> _Answer:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json; charset=utf-8"
        if token is not None:
            headers["Token"] = token
        answer = await self._exchange(method, url, body, headers, sent=sent)
        return self._decode(answer.status, answer.content_type, answer.body, sent=sent)

    @staticmethod
    def _decode(status: int, content_type: str, raw: bytes, *, sent: bool) -> _Answer:
        maybe = FailureKind.MAYBE_SENT if sent else FailureKind.NOT_SENT
        try:
            document = json.loads(raw) if content_type == "application/json" else None
        except (ValueError, UnicodeDecodeError):
            document = None
        if not isinstance(document, dict):
            if status >= 500:
                return_error = UpstreamUnavailable(maybe, f"http_{status}")
            elif status in (408, 429):
                return_error = UpstreamUnavailable(FailureKind.NOT_SENT, f"http_{status}")
            else:
                return_error = bad_answer("not_json", f"HTTP {status}")
            raise return_error
        error = _parse_error(document)
        if status >= 500 and (error is None or error.code in TRANSIENT_CODES):
            raise UpstreamUnavailable(maybe, f"http_{status}")
        return _Answer(status, document, error)

    # -- batch bookkeeping --

    def _check_batch(self, batch: Sequence[object]) -> None:
        if not 0 < len(batch) <= self.max_batch:
            raise ValueError(f"a call takes 1..{self.max_batch} receipts, got {len(batch)}")

    @staticmethod
    async def _guard(receipt_id: str, call: Any) -> Any:
        try:
            return await call
        except UpstreamUnavailable as exc:
            return Undelivered(receipt_id, exc)

    @staticmethod
    def _settle(results: list[Any]) -> list[Any]:
        """Return the outcomes; raise when no receipt got an answer (the most telling failure of the call)."""
        failures = [r.error for r in results if isinstance(r, Undelivered)]
        if len(failures) < len(results):
            return results
        for wanted in (lambda e: e.operator_action is not None, lambda e: e.kind is FailureKind.MAYBE_SENT):
            for failure in failures:
                if wanted(failure):
                    raise failure
        raise failures[0]
