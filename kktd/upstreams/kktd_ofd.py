"""The `kktd-ofd` upstream: kktd's own OFD wire protocol (docs/contract.md), one phase.

The client never trusts the OFD: an answer is taken as acknowledgements only when it matches the
protocol exactly (status 200, JSON object, one result per receipt in order, typed fields). Anything else
raises :class:`UpstreamUnavailable`, so the receipts stay pending and are resent; the OFD deduplicates on
``idempotency_key``, which makes resending after a lost answer safe.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeGuard

import aiohttp
import yarl

from kktd.clock import rfc3339
from kktd.options import Option, duration_in, http_url, mask_url
from kktd.delivery import (AwaitingResult, FailureKind, FiscalData, Fiscalized, Outgoing, PollOutcome, Refused,
    SubmitOutcome, UpstreamUnavailable)
from kktd.upstreams.http import HttpUpstream, client_session, read_capped

__all__ = [
    "MAX_BATCH",
    "OPTIONS",
    "KktdOfdSettings",
    "OfdAck",
    "OfdClient",
    "OfdItem",
    "OfdRejection",
    "OfdResult",
]

MAX_BATCH = 100
# 100 results are ~20 KiB; anything far beyond that is not an answer to our request.
MAX_RESPONSE_BYTES = 1 << 20
_MAX_SIGN_LEN = 256
_MAX_CODE_LEN = 128

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class OfdItem:
    """One receipt as sent to the OFD.

    Give the normalized receipt either as a mapping (``receipt``) or, cheaper, as its canonical JSON
    text (``receipt_json``, e.g. straight from the buffer). ``receipt_json`` is sent verbatim when set,
    so it must be a JSON object produced by kktd itself.
    """

    receipt_id: str
    idempotency_key: str
    accepted_at: str
    receipt: Mapping[str, Any] | None = field(default=None, compare=False)
    receipt_json: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.receipt is None and self.receipt_json is None:
            raise ValueError("OfdItem needs receipt or receipt_json")

    def encode(self) -> str:
        """The item's JSON text on the wire."""
        body = self.receipt_json if self.receipt_json is not None else _dumps(self.receipt)
        # Assembling the envelope by hand avoids re-encoding the (pre-encoded) receipt.
        return (
            f'{{"receipt_id":{_dumps(self.receipt_id)},'
            f'"idempotency_key":{_dumps(self.idempotency_key)},'
            f'"accepted_at":{_dumps(self.accepted_at)},'
            f'"receipt":{body}}}'
        )


@dataclass(frozen=True, slots=True)
class OfdAck:
    """The OFD registered the receipt: it is fiscalized."""

    receipt_id: str
    fiscal_document_number: int
    fiscal_sign: str
    ofd_received_at: str


@dataclass(frozen=True, slots=True)
class OfdRejection:
    """The OFD refused this receipt for good (resending the same content will not help)."""

    receipt_id: str
    code: str
    message: str


OfdResult = OfdAck | OfdRejection


def _bad(what: str, detail: str | None = None) -> UpstreamUnavailable:
    return UpstreamUnavailable(FailureKind.BAD_ANSWER, f"bad_response: {what}", detail)


def _is_rfc3339(value: object) -> TypeGuard[str]:
    if not isinstance(value, str) or not 10 < len(value) <= 64 or value[10] not in "Tt":
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


def _parse_ack(index: int, receipt_id: str, result: dict[str, Any]) -> OfdAck:
    fdn = result.get("fiscal_document_number")
    sign = result.get("fiscal_sign")
    received = result.get("ofd_received_at")
    # bool is an int subclass: True must not pass as document number 1.
    if type(fdn) is not int or fdn <= 0:
        raise _bad("invalid_ack", f"result {index}: fiscal_document_number")
    if not isinstance(sign, str) or not sign or len(sign) > _MAX_SIGN_LEN:
        raise _bad("invalid_ack", f"result {index}: fiscal_sign")
    if not _is_rfc3339(received):
        raise _bad("invalid_ack", f"result {index}: ofd_received_at")
    return OfdAck(receipt_id, fdn, sign, received)


def _parse_rejection(index: int, receipt_id: str, result: dict[str, Any]) -> OfdRejection:
    error = result["error"]
    if "fiscal_document_number" in result or "fiscal_sign" in result:
        # Both an ack and an error: we cannot tell what the OFD did.
        raise _bad("invalid_rejection", f"result {index}: ack and error together")
    if not isinstance(error, dict):
        raise _bad("invalid_rejection", f"result {index}: error")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not code or len(code) > _MAX_CODE_LEN:
        raise _bad("invalid_rejection", f"result {index}: error.code")
    if not isinstance(message, str):
        raise _bad("invalid_rejection", f"result {index}: error.message")
    return OfdRejection(receipt_id, code, message)


def parse_results(items: Sequence[OfdItem], document: object) -> list[OfdResult]:
    """Check a decoded answer against the batch sent; raise UpstreamUnavailable unless it fits exactly."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise _bad("shape", "expected an object with a results list")
    results = document["results"]
    if len(results) != len(items):
        raise _bad("length_mismatch", f"{len(results)} results for {len(items)} receipts")
    parsed: list[OfdResult] = []
    for index, (item, result) in enumerate(zip(items, results)):
        if not isinstance(result, dict):
            raise _bad("shape", f"result {index} is not an object")
        if result.get("receipt_id") != item.receipt_id:
            raise _bad("receipt_id_mismatch", f"result {index}")
        if "error" in result:
            parsed.append(_parse_rejection(index, item.receipt_id, result))
        else:
            parsed.append(_parse_ack(index, item.receipt_id, result))
    return parsed


def _classify(exc: BaseException) -> UpstreamUnavailable:
    """Map a transport failure to a stable reason; the detail names the error class and OS error only."""
    detail = type(exc).__name__
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError) and os_error.strerror:
        detail = f"{detail}: {os_error.strerror}"
    # Order matters: aiohttp's timeout errors are also connection errors, and a connect timeout is both.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)  # nothing was sent
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamUnavailable(FailureKind.MAYBE_SENT, "timeout", detail)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        # The request may have reached the OFD: the answer, not the receipt, is what got lost.
        return UpstreamUnavailable(FailureKind.MAYBE_SENT, "connection_lost", detail)
    if isinstance(exc, aiohttp.ClientResponseError):
        return _bad("http_protocol", detail)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamUnavailable(FailureKind.MAYBE_SENT, "client_error", detail)
    return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)


class OfdClient(HttpUpstream):
    """The `kktd-ofd` upstream: sends batches to ``POST {base_url}/v1/receipts`` over one keep-alive HTTP
    session; the answer carries each receipt's result (one phase)."""

    name: ClassVar[str] = "kktd-ofd"
    two_phase: ClassVar[bool] = False
    max_batch = MAX_BATCH

    def __init__(self, base_url: str, timeout_s: float, *, connection_limit: int = 2) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        url = yarl.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            # Do not echo the URL: it may carry credentials.
            raise ValueError("OFD base URL must be an absolute http(s) URL")
        self._url = url.with_path(url.path.rstrip("/") + "/v1/receipts").with_query(None)
        # A connect that takes half the budget has failed: reporting it as connect_error (nothing was
        # sent) rather than timeout keeps an unreachable OFD from counting as failed deliveries.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s / 2)
        self._limit = connection_limit
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = client_session(self._limit, self._timeout)

    async def send_batch(self, items: Sequence[OfdItem]) -> list[OfdResult]:
        """Post ``items`` (1..100) and return one result per item, in order.

        Raises UpstreamUnavailable for any transport failure or malformed answer; cancellation propagates.
        """
        if not 0 < len(items) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} receipts, got {len(items)}")
        if self._session is None or self._session.closed:
            await self.start()
        assert self._session is not None
        body = ("[" + ",".join(item.encode() for item in items) + "]").encode()
        document = await self._post(self._session, body)
        return parse_results(items, document)

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> object:
        try:
            async with session.post(
                self._url,
                data=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                allow_redirects=False,
            ) as response:
                if response.status != 200:
                    raise UpstreamUnavailable(FailureKind.MAYBE_SENT, f"http_{response.status}")
                if response.content_type != "application/json":
                    raise _bad("content_type")
                raw = await self._read_capped(response)
        except UpstreamUnavailable:
            raise
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            # Not chained: aiohttp's messages can quote the URL, and with it any credentials in it.
            raise _classify(exc) from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _bad("not_json") from None

    @staticmethod
    async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
        raw = await read_capped(response, MAX_RESPONSE_BYTES)
        if raw is None:
            raise _bad("too_large")
        return raw

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        items = [OfdItem(r.receipt_id, r.external_id, rfc3339(r.accepted_ms), receipt_json=r.body) for r in batch]
        outcomes: list[SubmitOutcome] = []
        for result in await self.send_batch(items):
            if isinstance(result, OfdAck):
                fiscal = FiscalData(result.fiscal_document_number, result.fiscal_sign, result.ofd_received_at)
                outcomes.append(Fiscalized(result.receipt_id, fiscal))
            else:
                outcomes.append(Refused(result.receipt_id, result.code, result.message))
        return outcomes

    async def poll(self, awaiting: Sequence[AwaitingResult]) -> list[PollOutcome]:
        raise TypeError("kktd-ofd is a one-phase upstream: its answers carry the results, nothing is polled")


# ---- settings ----

@dataclass(frozen=True)
class KktdOfdSettings:
    url: str
    timeout: float

    def describe(self) -> dict[str, Any]:
        return {"ofd_url": mask_url(self.url), "ofd_timeout": self.timeout}


OPTIONS: tuple[Option, ...] = (
    Option("ofd_url", http_url, "http://127.0.0.1:9000", "base URL of the OFD (upstream kktd-ofd)"),
    Option("ofd_timeout", duration_in(0.05, 600), 10.0, "timeout of one OFD request (upstream kktd-ofd)"),
)


def settings(values: Mapping[str, Any]) -> KktdOfdSettings:
    return KktdOfdSettings(url=values["ofd_url"], timeout=values["ofd_timeout"])


def create(settings: KktdOfdSettings) -> OfdClient:
    return OfdClient(settings.url, settings.timeout)
