"""HTTP handlers. Every answer is JSON; every error has a stable code and a log line."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec
from aiohttp import web

from kktd.clock import now_ms, rfc3339
from kktd.delivery import RegisterUnavailable
from kktd.errors import ApiError, BufferFull, ErrorCode, StorageUnavailable
from kktd.fiscal import fiscalized_at, qr_string, rfc3339_local
from kktd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kktd.metrics import Metrics
from kktd.openapi import spec_json
from kktd.receipt import IDEMPOTENCY_KEY_RE, MalformedBody, Receipt, ReceiptInvalid, decode_json, parse_receipt
from kktd.safetext import escape, forbidden_character, quoted
from kktd.server import EventSummary
from kktd.states import AlarmLevel, BreakerState, HealthStatus, pending_age_s, register_alarms
from kktd.store import Accepted, Conflict, ReceiptRow, ReceiptStatus, Store
from kktd.sync.housekeeping import RegisterWatch
from kktd.upstreams.base import Register

if TYPE_CHECKING:
    from kktd.config import Config
    from kktd.sync import SyncLoop
    from kktd.upstreams import IntakeCheck

log = logging.getLogger("kktd.api")

MAX_BODY = 64 * 1024
HEALTH_TIMEOUT_S = 2.0
BUFFER_FULL_RETRY_AFTER_S = 60
STORAGE_RETRY_AFTER_S = 5
DLQ_PAGE_MAX = 500
EXPORT_PAGE = 200  # receipts per store job while exporting: bounded memory, intake runs in between
RECEIPT_PATH = "/v1/kkt/receipt"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}
# Without the token: a load balancer's or systemd's health probe, and the metrics scraper.
OPEN_PATHS = frozenset({"/v1/health", "/metrics"})


class ClientGone(Exception):
    """The client hung up (or was cut off) before its request was read: nobody is left to answer."""


@dataclass
class Services:
    """What the handlers may use; the daemon owns all of it."""

    config: Config
    store: Store
    sync: SyncLoop | None = None
    intake_open: bool = True
    task_failures: dict[str, str] = field(default_factory=dict)
    started_monotonic: float = field(default_factory=time.monotonic)
    # What an attacker can multiply (timeouts, disconnects, refused tokens) is logged once per interval.
    events: EventSummary = field(default_factory=lambda: EventSummary(log))
    metrics: Metrics = field(default_factory=Metrics)
    # The upstream's own refusals at intake (e.g. a cloud register's limits), while the till can still fix them.
    intake_check: IntakeCheck | None = None


SERVICES = web.AppKey("services", Services)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status, error.headers)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure to its answer (status, stable code, one log line), and the bearer token where one is
    configured. One middleware, not two: each layer costs every request a few microseconds, and at one
    connection each of them is latency."""
    try:
        unauthorized = _refuse_without_token(request)
        if unauthorized is not None:
            return unauthorized
        _refuse_encoded_body(request)
        return await handler(request)
    except ClientGone as gone:
        request.app[SERVICES].events.event(
            "clients gone mid-request",
            logging.INFO,
            "%s %s: the client went away before its request was read (%s); nothing was stored",
            escape(request.method, 16),
            escape(request.path),
            gone,
        )
        return web.Response(status=400)  # never delivered: the connection is gone
    except ApiError as error:
        _log_error(request, error)
        return error_response(error)
    except ReceiptInvalid as invalid:
        refused = api_error(invalid)
        _log_error(request, refused)
        return error_response(refused)
    except web.HTTPRequestEntityTooLarge:
        too_large = ApiError(413, ErrorCode.BODY_TOO_LARGE, f"request body is larger than {MAX_BODY} bytes")
        _log_error(request, too_large)
        return error_response(too_large)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status, f"http_{exc.status}")
        http_error = ApiError(exc.status, code, exc.reason)
        _log_error(request, http_error)
        response = error_response(http_error)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", escape(request.method, 16), escape(request.path))
        return error_response(ApiError(500, ErrorCode.INTERNAL_ERROR, "internal error; see the kktd log"))


def _refuse_without_token(request: web.Request) -> web.Response | None:
    """With a token configured, every endpoint but OPEN_PATHS needs `Authorization: Bearer <token>`."""
    services = request.app[SERVICES]
    token = services.config.api_token
    if token is None or request.path in OPEN_PATHS or presents_token(request, token):
        return None
    services.events.event(
        "requests without a valid token",
        logging.WARNING,
        "%s %s -> 401 unauthorized: no valid bearer token",
        escape(request.method, 16),
        escape(request.path),
    )
    return error_response(
        ApiError(
            401,
            ErrorCode.UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer <token>",
            headers={"WWW-Authenticate": 'Bearer realm="kktd"'},
        )
    )


def _refuse_encoded_body(request: web.Request) -> None:
    """Bodies come as they are (a receipt is under a kilobyte): a compressed one is refused before anything
    reads it, with the connection closed, so no decoder ever meets it (aiohttp's would fail mid-read)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {quoted(encoding, 32)} is not accepted: send the body uncompressed",
            headers={"Connection": "close"},
        )


def _require_json(request: web.Request) -> None:
    """A route that takes a JSON body: any other Content-Type is a 415."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type must be application/json (got {quoted(request.content_type or 'none', 64)})",
        )


def presents_token(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Constant time: how much of a guess matched must not show in the answer's timing.
    return hmac.compare_digest(presented.strip().encode("utf-8", "surrogateescape"), token.encode())


def api_error(invalid: ReceiptInvalid) -> ApiError:
    """A receipt that breaks a rule is a 422; a body that is not JSON at all, a 400."""
    return ApiError(400 if isinstance(invalid, MalformedBody) else 422, invalid.code, invalid.message, invalid.field)


def _log_error(request: web.Request, error: ApiError) -> None:
    level = logging.ERROR if error.status >= 500 else logging.INFO
    where = f" field={error.field}" if error.field else ""
    # The method and path are the client's: escaped and cut short like every client text in a log line.
    line = f"{escape(request.method, 16)} {escape(request.path)} -> {error.status} {error.code}{where}: {error.message}"
    if error.code == ErrorCode.BODY_TIMEOUT:
        request.app[SERVICES].events.event("request bodies too slow", level, "%s", line)
    else:
        log.log(level, "%s", line, extra={"error_code": error.code})
    if request.method == "POST" and request.path == RECEIPT_PATH:
        request.app[SERVICES].metrics.intake_rejected(error.code)


# ---- receipts ----


async def post_receipt(request: web.Request) -> web.Response:
    started = time.perf_counter()
    services = request.app[SERVICES]
    if not services.intake_open:
        raise _retry_later(ErrorCode.SHUTTING_DOWN, "kktd is stopping; retry in a moment", STORAGE_RETRY_AFTER_S)
    if services.store.damage is not None:
        raise ApiError(
            503, ErrorCode.STORAGE_UNAVAILABLE, f"the database is damaged, nothing is accepted: {services.store.damage}"
        )
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, ErrorCode.BODY_TOO_LARGE, f"request body is larger than {MAX_BODY} bytes")
    _require_json(request)
    body = await read_body(request, services.config.body_timeout)
    receipt = parse_receipt(body, request.headers.get("Idempotency-Key"))
    result = await _stored_instead_of_refusal(services, receipt) or await _accept(services, receipt)
    if isinstance(result, Conflict):
        raise ApiError(
            409,
            ErrorCode.IDEMPOTENCY_CONFLICT,
            f"idempotency key {receipt.idempotency_key} is already used by receipt "
            f"{result.receipt_id} with a different body",
            "idempotency_key",
        )
    return _accepted_response(result, receipt.idempotency_key, services, started)


async def _stored_instead_of_refusal(services: Services, receipt: Receipt) -> Accepted | Conflict | None:
    """The upstream's intake rule is for new receipts: a key stored already (perhaps under another upstream,
    before a switch) answers as its stored receipt does, a replay or the key's conflict. None when the rule
    takes the receipt. The key is looked up only when the rule refuses, so a new receipt keeps its one round
    trip to the writer."""
    if services.intake_check is None:
        return None
    try:
        services.intake_check(receipt.canonical)
    except ReceiptInvalid:
        stored = await _storage(services.store.replay(receipt))
        if stored is None:
            raise
        return stored
    return None


async def _accept(services: Services, receipt: Receipt) -> Accepted | Conflict:
    try:
        return await services.store.accept(receipt)
    except BufferFull as exc:
        raise _retry_later(
            ErrorCode.BUFFER_FULL, f"{exc}; nothing was stored, retry later", BUFFER_FULL_RETRY_AFTER_S
        ) from None
    except StorageUnavailable as exc:
        raise _retry_later(
            ErrorCode.STORAGE_UNAVAILABLE, f"the receipt was not stored: {exc}", STORAGE_RETRY_AFTER_S
        ) from None


def _retry_later(code: ErrorCode, message: str, after_s: int) -> ApiError:
    """A 503 that tells the till when to retry with the same idempotency key."""
    return ApiError(503, code, message, headers={"Retry-After": str(after_s)})


async def read_body(request: web.Request, timeout: float) -> bytes:
    """The whole body within `timeout`: a client trickling it does not hold a connection and a handler."""
    if request.content.is_eof():
        # All of it arrived with the head (a receipt is under a kilobyte): nothing to wait for, no timer.
        return await request.read()
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(
            408,
            ErrorCode.BODY_TIMEOUT,
            f"the request body did not arrive within {timeout:g}s",
            headers={"Connection": "close"},
        ) from None
    except ConnectionError as exc:
        raise ClientGone(str(exc) or type(exc).__name__) from None


def _accepted_response(result: Accepted, key: str, services: Services, started: float) -> web.Response:
    story = {"receipt_id": result.receipt_id, "idempotency_key": key}
    if result.created:
        services.metrics.intake_accepted(time.perf_counter() - started)
        log.debug("receipt %s accepted key=%s total=%d", result.receipt_id, key, result.total, extra=story)
        if services.sync is not None:
            services.sync.wake()
    else:
        services.metrics.intake_replayed(time.perf_counter() - started)
        log.info("receipt %s replayed for idempotency key %s", result.receipt_id, key, extra=story)
    # The hot path's answer has a fixed shape of ids, integers and fixed words: formatted directly.
    body = (
        f'{{"receipt_id":"{result.receipt_id}","status":"{result.status}","total":{result.total},'
        f'"accepted_at":"{rfc3339(result.accepted_ms)}"}}'
    )
    return web.Response(body=body.encode(), status=201 if result.created else 200, headers=JSON_HEADERS)


async def get_receipt(request: web.Request) -> web.Response:
    receipt_id = request.match_info["receipt_id"]
    """One receipt as stored, its customer contact masked unless the caller presented the token
    (contacts_masked)."""
    row = await _storage(request.app[SERVICES].store.get(receipt_id))
    if row is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no receipt {quoted(receipt_id, 64)}")
    return json_response(present_receipt(row, mask_contact=contacts_masked(request)))


async def find_receipt(request: web.Request) -> web.Response:
    """`GET /v1/kkt/receipt?idempotency_key=K`: after a timeout the till knows its key, not kktd's id."""
    key = request.query.get("idempotency_key")
    if key is None:
        raise ApiError(400, ErrorCode.INVALID_QUERY, "idempotency_key is required", "idempotency_key")
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        # A query parameter like any other (400 invalid_query): invalid_idempotency_key is the body's 422.
        raise ApiError(
            400,
            ErrorCode.INVALID_QUERY,
            "idempotency_key must be 1..64 characters of A-Z a-z 0-9 . _ : -",
            "idempotency_key",
        )
    row = await _storage(request.app[SERVICES].store.get_by_key(key))
    if row is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no receipt with idempotency_key {key}")
    return json_response(present_receipt(row, mask_contact=contacts_masked(request)))


def present_receipt(row: ReceiptRow, mask_contact: bool = False) -> dict[str, Any]:
    stored = json.loads(row.body)
    if mask_contact and "customer_contact" in stored:
        stored["customer_contact"] = mask_contact_text(stored["customer_contact"])
    result: dict[str, Any] = {
        "receipt_id": row.receipt_id,
        "idempotency_key": row.idempotency_key,
        "status": row.status,
        "total": row.total,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "accepted_at": rfc3339(row.accepted_ms),
        "updated_at": rfc3339(row.updated_ms),
        "receipt": stored,
        "resolution": row.resolution,
        "upstream": {
            "external_id": row.registration.external_id,
            "registrations": row.registration.registrations,
            "reference": row.registration.reference,
            "submitted_at": rfc3339(row.registration.submitted_ms) if row.registration.submitted_ms else None,
        },
        "ofd": None,
    }
    fiscal = row.fiscal
    if fiscal is not None:
        moment = fiscalized_at(fiscal.registered_at)
        result["ofd"] = {
            "fiscal_document_number": fiscal.fiscal_document_number,
            "fiscal_sign": fiscal.fiscal_sign,
            # One RFC 3339 time with the terminal's offset for every upstream, whatever form the upstream used.
            "fiscalized_at": rfc3339_local(moment) if moment is not None else fiscal.registered_at,
            "sent_at": rfc3339(row.sent_ms) if row.sent_ms is not None else None,
            "fn_number": fiscal.fn_number,
            "shift_number": fiscal.shift_number,
            "receipt_number": fiscal.receipt_number,
            "kkt_registration_number": fiscal.kkt_registration_number,
            "ofd_receipt_url": fiscal.ofd_receipt_url,
            "fns_url": fiscal.fns_url,
            "ofd_inn": fiscal.ofd_inn,
            "qr": qr_string(fiscal, stored.get("operation", ""), row.total),
        }
    return result


async def _storage(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except StorageUnavailable as exc:
        raise _retry_later(ErrorCode.STORAGE_UNAVAILABLE, str(exc), STORAGE_RETRY_AFTER_S) from None


# ---- buffer, sync, dead letters ----


async def buffer_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return json_response(await collect_status(services))


async def collect_status(services: Services) -> dict[str, Any]:
    store = services.store
    counts = store.counts
    oldest_ms = await _storage(store.oldest_unsent_ms())
    oldest_age = pending_age_s(oldest_ms)
    status: dict[str, Any] = {
        "counts": {
            "pending": counts.pending,
            "submitted": counts.submitted,
            "sent": counts.sent,
            "failed": counts.failed,
            "resolved": counts.resolved,
        },
        "capacity": store.max_pending,
        "fill_ratio": round(counts.undelivered / store.max_pending, 6),
        "oldest_pending_age_s": round(oldest_age, 3) if oldest_age is not None else None,
        "oldest_pending_alarm": services.config.pending_alarm(oldest_age),
        "db_size_bytes": await store.size_bytes(),
        "writer": {"commits": store.counters.commits, "rows_committed": store.counters.committed_rows},
    }
    if services.sync is not None:
        status["sync"] = dataclasses.asdict(services.sync.status())
        if isinstance(services.sync.upstream, Register):
            status["register"] = present_register(services.sync.housekeeping.register)
    return status


def present_register(watch: RegisterWatch) -> dict[str, Any]:
    """A register upstream's own report as the housekeeping last read it (every minute)."""
    report = watch.report
    view: dict[str, Any] = {
        "read_at": rfc3339(watch.read_ms) if watch.read_ms is not None else None,
        "error": watch.error,
        "shift": None,
        "unsent_documents": None,
        "oldest_unsent_at": None,
        "fn_valid_until": None,
        "paper_present": None,
        "cover_open": None,
        "fn_warnings": [],
        "alarms": [],
    }
    if report is not None:
        view.update(
            shift={"state": report.shift.state, "number": report.shift.number, "expires_at": report.shift.expires_at},
            unsent_documents=report.unsent_documents,
            oldest_unsent_at=rfc3339(report.oldest_unsent_ms) if report.oldest_unsent_ms is not None else None,
            fn_valid_until=rfc3339(report.fn_valid_until_ms) if report.fn_valid_until_ms is not None else None,
            paper_present=report.paper_present,
            cover_open=report.cover_open,
            fn_warnings=list(report.fn_warnings),
            alarms=[
                {"text": a.text, "critical": a.critical, "action": a.action} for a in register_alarms(report, now_ms())
            ],
        )
    return view


async def sync_now(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.sync is None:
        raise ApiError(503, ErrorCode.SYNC_UNAVAILABLE, "the sync loop is not running")
    return json_response(dataclasses.asdict(await services.sync.run_once_now()))


async def list_dead_letters(request: web.Request) -> web.Response:
    limit = _int_query(request, "limit", 100, 1, DLQ_PAGE_MAX)
    after = _int_query(request, "after_seq", 0, 0, 2**63 - 1)
    services = request.app[SERVICES]
    rows = await _storage(services.store.dead_letters(limit, after))
    # Where the next page starts (null on the last one): pass it back as after_seq.
    next_after = rows[-1].seq if len(rows) == limit else None
    masked = contacts_masked(request)
    return json_response(
        {
            "dead_letters": [present_receipt(row, mask_contact=masked) for row in rows],
            "count": len(rows),
            "next_after_seq": next_after,
            "contacts_masked": masked,
        }
    )


def contacts_masked(request: web.Request) -> bool:
    """Customer contacts are personal data: the receipt, the export and the dead-letter listing show them
    only to a caller who presented the API token. With no token configured nobody can present it, so every
    caller (the operator's `kktd receipt` and `kktd export` too) sees them masked; to see them whole, configure
    api_token_file (or the api_token credential): the CLI reads the same configuration and presents the token.
    """
    token = request.app[SERVICES].config.api_token
    return token is None or not presents_token(request, token)


def mask_contact_text(contact: str) -> str:
    """buyer@example.ru -> b***@example.ru; +79991234567 -> +7999***4567."""
    local, at, domain = contact.partition("@")
    if at:
        return f"{local[:1]}***@{domain}"
    return f"{contact[:5]}***{contact[-4:]}" if len(contact) > 9 else "***"


async def _not_a_dead_letter(services: Services, receipt_id: str) -> NoReturn:
    """Why a requeue or a resolve changed nothing: 404 for an unknown receipt, 409 for one that is not failed."""
    row = await _storage(services.store.get(receipt_id))
    if row is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"no receipt {quoted(receipt_id, 64)}")
    raise ApiError(409, ErrorCode.NOT_DEAD_LETTER, f"receipt {receipt_id} is {row.status}, not {ReceiptStatus.FAILED}")


async def requeue_dead_letter(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    receipt_id = request.match_info["receipt_id"]
    changed = await _storage(services.store.requeue(receipt_id))
    if not changed:
        await _not_a_dead_letter(services, receipt_id)
    log.info("receipt %s requeued from the dead-letter list", receipt_id, extra={"receipt_id": receipt_id})
    if services.sync is not None:
        services.sync.wake()
    return json_response({"receipt_id": receipt_id, "status": "pending"})


# ---- a register kktd drives itself: its shift ----


def _register(services: Services) -> Register:
    upstream = services.sync.upstream if services.sync is not None else None
    if not isinstance(upstream, Register):
        name = upstream.name if upstream is not None else services.config.upstream
        raise ApiError(
            409, ErrorCode.NO_REGISTER, f"upstream {name} is not a register kktd drives: it has no shift of its own"
        )
    return upstream


async def _shift_command(request: web.Request, command: str) -> web.Response:
    """`GET /v1/kkt/shift`, `POST /v1/kkt/shift/open`, `POST /v1/kkt/shift/close` (the Z report): through the
    register's single queue, after the receipts already in it."""
    services = request.app[SERVICES]
    register = _register(services)
    peer = request.remote or "?"
    if command != "status":
        log.warning("shift %s requested by the operator (from %s)", command, peer, extra={"error_code": "shift"})
    try:
        if command == "open":
            shift = await register.open_shift()
        elif command == "close":
            shift = await register.close_shift()
        else:
            shift = await register.shift()
    except RegisterUnavailable as exc:
        if exc.reason in ("shift_closed", "shift_not_closed"):
            raise ApiError(409, ErrorCode.SHIFT_STATE, exc.detail) from None
        if exc.reason == "register_timeout":
            raise ApiError(503, ErrorCode.REGISTER_UNAVAILABLE, f"{command}: {exc.detail}") from None
        raise ApiError(503, ErrorCode.REGISTER_UNAVAILABLE, f"the register did not do it: {exc}") from None
    if command != "status" and services.sync is not None:
        # The report in status, health and /metrics shows the new shift now, not at the next minute.
        await services.sync.housekeeping.check_register()
    return json_response({"state": shift.state, "number": shift.number, "expires_at": shift.expires_at})


async def shift_status(request: web.Request) -> web.Response:
    return await _shift_command(request, "status")


async def open_shift(request: web.Request) -> web.Response:
    return await _shift_command(request, "open")


async def close_shift(request: web.Request) -> web.Response:
    return await _shift_command(request, "close")


MAX_REASON_LEN = 500


async def resolve_dead_letter(request: web.Request) -> web.Response:
    """Close a dead letter that will never be sent (refused for its content, fiscalized by hand on another
    register...): kept for audit and the export as `resolved` with the reason; it leaves the dead-letter
    warning, the alert and the pending count. Body: {"reason": "..."}."""
    services = request.app[SERVICES]
    receipt_id = request.match_info["receipt_id"]
    reason = await _resolution_reason(request)
    changed = await _storage(services.store.resolve(receipt_id, reason))
    if not changed:
        await _not_a_dead_letter(services, receipt_id)
    peer = request.remote or "?"
    log.warning(
        "receipt %s resolved by the operator (from %s): %s",
        receipt_id,
        peer,
        quoted(reason, 200),
        extra={"receipt_id": receipt_id, "error_code": "resolved"},
    )
    return json_response({"receipt_id": receipt_id, "status": ReceiptStatus.RESOLVED, "resolution": reason})


class _ResolutionIn(msgspec.Struct, forbid_unknown_fields=True):
    reason: str


async def _resolution_reason(request: web.Request) -> str:
    """The body {"reason": "..."}: JSON by the receipt route's rules, then a typed struct."""
    _require_json(request)
    body = await read_body(request, request.app[SERVICES].config.body_timeout)
    # The receipt route's rules for a body (UTF-8 without BOM or NUL, no key twice, bounded depth), then the
    # typed struct: msgspec refuses a wrong type where it meets it.
    document = decode_json(body)
    try:
        reason = msgspec.convert(document, _ResolutionIn, strict=True).reason
    except msgspec.ValidationError as error:
        raise _resolution_refusal(str(error)) from None
    if not reason.strip():
        raise ApiError(
            422, ErrorCode.MISSING_FIELD, "reason is required: why this receipt will never be sent", "reason"
        )
    if len(reason) > MAX_REASON_LEN or forbidden_character(reason) is not None:
        raise ApiError(
            422,
            ErrorCode.INVALID_VALUE,
            f"reason must be at most {MAX_REASON_LEN} characters of printable text",
            "reason",
        )
    return reason.strip()


def _resolution_refusal(problem: str) -> ApiError:
    """msgspec's account of a body that is JSON but not {"reason": "..."}, as kktd's codes."""
    if "- at `$" not in problem and problem.startswith("Expected `object`"):
        return ApiError(400, ErrorCode.INVALID_JSON, 'the body must be a JSON object: {"reason": "..."}')
    if problem.startswith("Object missing required field"):
        return ApiError(
            422, ErrorCode.MISSING_FIELD, "reason is required: why this receipt will never be sent", "reason"
        )
    if problem.startswith("Object contains unknown field"):
        name = escape(problem.partition("`")[2].rpartition("`")[0], 64)
        return ApiError(422, ErrorCode.UNKNOWN_FIELD, f'{name} is not a known field: only "reason" is', name)
    return ApiError(422, ErrorCode.INVALID_TYPE, "reason must be a string", "reason")


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, ErrorCode.INVALID_QUERY, f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise ApiError(400, ErrorCode.INVALID_QUERY, f"{name} must be between {low} and {high}", name)
    return value


# ---- health ----


async def health(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    problems: list[str] = [f"task {name} crashed: {why}" for name, why in services.task_failures.items()]
    if services.store.damage is not None:
        problems.append(f"database damaged: {services.store.damage}")
    if services.store.commit_failure is not None:
        problems.append(f"the database refuses commits, intake is refused: {services.store.commit_failure}")
    try:
        await asyncio.wait_for(services.store.ping(), HEALTH_TIMEOUT_S)
    except (TimeoutError, StorageUnavailable) as exc:
        problems.append(f"database does not answer: {exc or 'timeout'}")
    warnings: list[str] = []
    body: dict[str, Any] = {
        "pending": services.store.counts.pending,
        "uptime_s": round(time.monotonic() - services.started_monotonic, 3),
    }
    if not problems:
        status = await collect_status(services)
        body["oldest_pending_age_s"] = status["oldest_pending_age_s"]
        alarm = status["oldest_pending_alarm"]
        if alarm == AlarmLevel.CRITICAL:
            problems.append(
                f"oldest pending receipt is {status['oldest_pending_age_s']:.0f}s old: "
                f"past pending_critical_age, fiscal storage limit is near"
            )
        elif alarm == AlarmLevel.WARNING:
            warnings.append(f"oldest pending receipt is {status['oldest_pending_age_s']:.0f}s old")
        if "sync" in status:
            body["sync"] = status["sync"]
            if status["sync"]["operator_action"]:
                warnings.append(f"{status['sync']['upstream']} refuses kktd: {status['sync']['operator_action']}")
            if status["sync"]["breaker"] != BreakerState.CLOSED:
                warnings.append(f"upstream circuit breaker is {status['sync']['breaker']}")
        for alarm in status.get("register", {}).get("alarms", []):
            (problems if alarm["critical"] else warnings).append(f"register: {alarm['text']}: {alarm['action']}")
    if problems:
        body.update(status=HealthStatus.ERROR, problems=problems, warnings=warnings)
        return json_response(body, 503)
    body.update(status=HealthStatus.WARNING if warnings else HealthStatus.OK, warnings=warnings)
    return json_response(body)


async def openapi_description(request: web.Request) -> web.Response:
    return web.Response(body=spec_json(), headers=JSON_HEADERS)


# ---- operations: metrics and export ----


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. Built from memory only (counters, the writer's counts): a scrape never waits
    for the database, so it cannot slow intake."""
    body = request.app[SERVICES].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def _time_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        # An unencoded "+03:00" arrives as " 03:00" (a query's + is a space): say so, it is the usual slip.
        hint = "; encode + as %2B (a bare + in a query means a space)" if " " in raw else ""
        raise ApiError(
            400,
            ErrorCode.INVALID_QUERY,
            f"{name} must be an RFC 3339 time with a zone, e.g. 2026-11-01T00:00:00Z{hint}",
            name,
        )
    return int(moment.timestamp() * 1000)


async def export_receipts(request: web.Request) -> web.StreamResponse:
    """Receipts accepted in [since, until), oldest first, as JSON lines (application/x-ndjson), streamed: the
    store is read a page at a time, each page its own short job, so an export of any size holds little
    memory and never holds up intake. Customer contacts are masked unless the caller presented the token
    (contacts_masked)."""
    services = request.app[SERVICES]
    masked = contacts_masked(request)
    since_ms = _time_query(request, "since") or 0
    until_ms = _time_query(request, "until")
    if until_ms is not None and until_ms < since_ms:
        raise ApiError(400, ErrorCode.INVALID_QUERY, "until must not be before since", "until")
    first = await _storage(services.store.receipts_accepted_between(since_ms, until_ms, None, EXPORT_PAGE))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8"})
    try:
        return await _stream_export(request, response, first, since_ms, until_ms, masked)
    except ConnectionError as exc:
        # The reader went away mid-export (a closed pipe, a reset): its business, not an error of kktd's.
        log.info("export ended by the client after part of it was sent (%s)", type(exc).__name__)
        return response


async def _stream_export(
    request: web.Request,
    response: web.StreamResponse,
    first: list[ReceiptRow],
    since_ms: int,
    until_ms: int | None,
    masked: bool,
) -> web.StreamResponse:
    services = request.app[SERVICES]
    await response.prepare(request)
    rows, exported = first, 0
    while rows:
        await response.write(
            b"".join(
                json.dumps(
                    present_receipt(row, mask_contact=masked), ensure_ascii=False, separators=(",", ":")
                ).encode()
                + b"\n"
                for row in rows
            )
        )
        exported += len(rows)
        if len(rows) < EXPORT_PAGE:
            break
        try:
            rows = await services.store.receipts_accepted_between(since_ms, until_ms, rows[-1].receipt_id, EXPORT_PAGE)
        except StorageUnavailable as exc:
            # The answer has begun: the only honest signal left is to cut it short (no final chunk), which
            # every HTTP client reports as an incomplete body.
            log.error("export cut short after %d receipts: storage unavailable: %s", exported, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
    await response.write_eof()
    log.info(
        "exported %d receipts accepted in [%s, %s)",
        exported,
        rfc3339(since_ms),
        rfc3339(until_ms) if until_ms is not None else "now",
    )
    return response


def create_app(services: Services) -> web.Application:
    spec_json()  # read now: a package without its API description fails at start, not on a request
    app = web.Application(middlewares=[api_middleware], client_max_size=MAX_BODY)
    app[SERVICES] = services
    app.router.add_post("/v1/kkt/receipt", post_receipt)
    app.router.add_get("/v1/kkt/receipt", find_receipt)
    app.router.add_get("/v1/kkt/receipt/{receipt_id}", get_receipt)
    app.router.add_get("/v1/kkt/buffer/status", buffer_status)
    app.router.add_post("/v1/kkt/buffer/sync", sync_now)
    app.router.add_get("/v1/kkt/dlq", list_dead_letters)
    app.router.add_post("/v1/kkt/dlq/{receipt_id}/requeue", requeue_dead_letter)
    app.router.add_post("/v1/kkt/dlq/{receipt_id}/resolve", resolve_dead_letter)
    app.router.add_get("/v1/kkt/shift", shift_status)
    app.router.add_post("/v1/kkt/shift/open", open_shift)
    app.router.add_post("/v1/kkt/shift/close", close_shift)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi_description)
    app.router.add_get("/v1/kkt/receipts", export_receipts, allow_head=False)
    # Stays open when the API gets access control (as /v1/health): Prometheus scrapes it.
    app.router.add_get("/metrics", metrics)
    return app
