"""The `kktd-ofd` upstream: kktd's own OFD wire protocol (docs/contract.md), one phase.

The client never trusts the OFD: an answer is taken as acknowledgements only when it matches the
protocol exactly (status 200, JSON object, one result per receipt in order, typed fields). Anything else
raises :class:`UpstreamUnavailable`, so the receipts stay pending and are resent; the OFD deduplicates on
``idempotency_key``, which makes resending after a lost answer safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, ClassVar

import aiohttp
import msgspec
import yarl

from kktd.clock import rfc3339
from kktd.delivery import (
    AwaitingResult,
    FailureKind,
    FiscalData,
    Fiscalized,
    Outgoing,
    PollOutcome,
    Refused,
    SubmitOutcome,
    UpstreamUnavailable,
)
from kktd.options import Option, duration_in, http_url, mask_url
from kktd.seller import Seller
from kktd.upstreams.http import HttpUpstream, bad_answer, invalid_field

__all__ = [
    "MAX_BATCH",
    "NAME",
    "OPTIONS",
    "KktdOfdSettings",
    "OfdAck",
    "OfdClient",
    "OfdItem",
    "OfdRejection",
    "OfdResult",
]

NAME = "kktd-ofd"
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
    # Optional in the protocol (docs/contract.md): the register's identity, which the receipt's QR code needs.
    fn_number: str | None = None
    kkt_registration_number: str | None = None
    shift_number: int | None = None
    receipt_number: int | None = None


@dataclass(frozen=True, slots=True)
class OfdRejection:
    """The OFD refused this receipt for good (resending the same content will not help)."""

    receipt_id: str
    code: str
    message: str


OfdResult = OfdAck | OfdRejection


def _is_rfc3339(value: str) -> bool:
    if not 10 < len(value) <= 64 or value[10] not in "Tt":
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


# The answer, decoded by msgspec in stages, so that each way it can be wrong keeps its own reason: the
# envelope (shape), then each result's receipt id and kind, then the acknowledgement or the rejection itself.
# Strict types: true is not document number 1, 1.0 is not an integer, null is not a sign.


class _Answer(msgspec.Struct):
    results: list[msgspec.Raw]


class _Result(msgspec.Struct):
    """What decides which kind of result this is, and whose."""

    receipt_id: object = None
    error: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    fiscal_document_number: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    fiscal_sign: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_Digits = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern="^[0-9]+$")]


class _Ack(msgspec.Struct):
    fiscal_document_number: Annotated[int, msgspec.Meta(gt=0)]
    fiscal_sign: Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_SIGN_LEN)]
    ofd_received_at: str
    fn_number: _Digits | None = None
    kkt_registration_number: _Digits | None = None
    shift_number: Annotated[int, msgspec.Meta(ge=0)] | None = None
    receipt_number: Annotated[int, msgspec.Meta(ge=0)] | None = None


class _Error(msgspec.Struct):
    code: Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_CODE_LEN)]
    message: str


_ANSWER = msgspec.json.Decoder(_Answer)
_RESULT = msgspec.json.Decoder(_Result)
_ACK = msgspec.json.Decoder(_Ack)
_ERROR = msgspec.json.Decoder(_Error)


def _parse_ack(index: int, receipt_id: str, raw: msgspec.Raw) -> OfdAck:
    try:
        ack = _ACK.decode(raw)
    except msgspec.ValidationError as exc:
        raise bad_answer("invalid_ack", f"result {index}: {invalid_field(exc)}") from None
    if not _is_rfc3339(ack.ofd_received_at):
        raise bad_answer("invalid_ack", f"result {index}: ofd_received_at")
    return OfdAck(
        receipt_id,
        ack.fiscal_document_number,
        ack.fiscal_sign,
        ack.ofd_received_at,
        ack.fn_number,
        ack.kkt_registration_number,
        ack.shift_number,
        ack.receipt_number,
    )


def _parse_rejection(index: int, receipt_id: str, result: _Result) -> OfdRejection:
    if result.fiscal_document_number is not msgspec.UNSET or result.fiscal_sign is not msgspec.UNSET:
        # Both an ack and an error: we cannot tell what the OFD did.
        raise bad_answer("invalid_rejection", f"result {index}: ack and error together")
    assert not isinstance(result.error, msgspec.UnsetType)  # the caller's test
    try:
        error = _ERROR.decode(result.error)
    except msgspec.ValidationError as exc:
        raise bad_answer("invalid_rejection", f"result {index}: error.{invalid_field(exc)}") from None
    return OfdRejection(receipt_id, error.code, error.message)


def parse_results(items: Sequence[OfdItem], body: bytes) -> list[OfdResult]:
    """Check an answer's body against the batch sent; raise UpstreamUnavailable unless it fits exactly."""
    try:
        body.decode("utf-8")  # the stages below skip over text they do not decode yet: check it all first
        results = _ANSWER.decode(body).results
    except UnicodeDecodeError:
        raise bad_answer("not_json") from None
    except msgspec.ValidationError:
        raise bad_answer("shape", "expected an object with a results list") from None
    except msgspec.DecodeError:
        raise bad_answer("not_json") from None
    if len(results) != len(items):
        raise bad_answer("length_mismatch", f"{len(results)} results for {len(items)} receipts")
    parsed: list[OfdResult] = []
    for index, (item, raw) in enumerate(zip(items, results)):
        try:
            result = _RESULT.decode(raw)
        except msgspec.ValidationError:
            raise bad_answer("shape", f"result {index} is not an object") from None
        if result.receipt_id != item.receipt_id:
            raise bad_answer("receipt_id_mismatch", f"result {index}")
        if result.error is not msgspec.UNSET:
            parsed.append(_parse_rejection(index, item.receipt_id, result))
        else:
            parsed.append(_parse_ack(index, item.receipt_id, raw))
    return parsed


HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def _check_head(status: int, content_type: str) -> None:
    if status != 200:
        raise UpstreamUnavailable(FailureKind.MAYBE_SENT, f"http_{status}")
    if content_type != "application/json":
        raise bad_answer("content_type")


class OfdClient(HttpUpstream):
    """The `kktd-ofd` upstream: sends batches to ``POST {base_url}/v1/receipts`` over one keep-alive HTTP
    session; the answer carries each receipt's result (one phase)."""

    name: ClassVar[str] = NAME
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
        self._connection_limit = connection_limit
        self._max_answer_bytes = MAX_RESPONSE_BYTES

    async def send_batch(self, items: Sequence[OfdItem]) -> list[OfdResult]:
        """Post ``items`` (1..100) and return one result per item, in order.

        Raises UpstreamUnavailable for any transport failure or malformed answer; cancellation propagates.
        """
        if not 0 < len(items) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} receipts, got {len(items)}")
        body = ("[" + ",".join(item.encode() for item in items) + "]").encode()
        answer = await self._exchange("POST", self._url, body, HEADERS, head_check=_check_head)
        return parse_results(items, answer.body)

    async def submit(self, batch: Sequence[Outgoing]) -> list[SubmitOutcome]:
        items = [OfdItem(r.receipt_id, r.external_id, rfc3339(r.accepted_ms), receipt_json=r.body) for r in batch]
        outcomes: list[SubmitOutcome] = []
        for result in await self.send_batch(items):
            if isinstance(result, OfdAck):
                fiscal = FiscalData(
                    result.fiscal_document_number,
                    result.fiscal_sign,
                    result.ofd_received_at,
                    fn_number=result.fn_number,
                    shift_number=result.shift_number,
                    receipt_number=result.receipt_number,
                    kkt_registration_number=result.kkt_registration_number,
                )
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


DEFAULT_URL = "http://127.0.0.1:9000"

OPTIONS: tuple[Option, ...] = (
    Option("ofd_url", http_url, DEFAULT_URL, "base URL of the OFD (upstream kktd-ofd)"),
    Option("ofd_timeout", duration_in(0.05, 600), 10.0, "timeout of one OFD request (upstream kktd-ofd)"),
)


def start_warning(settings: KktdOfdSettings) -> str | None:
    """The package's default (kktd's own protocol on a local port) is a placeholder: no real OFD speaks it."""
    if settings.url != DEFAULT_URL:
        return None
    return (
        f"upstream {NAME} at the default ofd_url {DEFAULT_URL}: receipts are stored but go nowhere unless an "
        "OFD speaking kktd's protocol listens there; set upstream (e.g. atol-online-v5) and its settings in "
        "/etc/kktd/kktd.toml, then systemctl restart kktd"
    )


def settings(values: Mapping[str, Any], seller: Seller) -> KktdOfdSettings:
    """kktd's own protocol carries the receipt as stored: no seller setting is sent (the OFD knows the seller)."""
    return KktdOfdSettings(url=values["ofd_url"], timeout=values["ofd_timeout"])


def create(settings: KktdOfdSettings) -> OfdClient:
    return OfdClient(settings.url, settings.timeout)
