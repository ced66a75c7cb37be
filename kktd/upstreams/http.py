"""What every HTTP upstream shares: its client session and the session's lifecycle, one exchange (request,
capped read, transport failures classified), and one vocabulary of failure reasons.

Reasons are stable words an operator can grep the journal for, the same for every HTTP upstream:
`connect_error` (nothing was sent), `timeout` and `connection_lost` (the request may have arrived),
`client_error`, `http_NNN`, and `bad_answer: WHAT` for an answer that is not one of the protocol's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Self

import aiohttp
import msgspec
import yarl

from kktd.delivery import FailureKind, UpstreamUnavailable


def client_session(connection_limit: int, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
    """A keep-alive session to one upstream, answers checked by the caller (no raise_for_status)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connection_limit, enable_cleanup_closed=False),
        timeout=timeout,
        raise_for_status=False,
        # Proxies from the environment must not capture fiscal traffic silently.
        trust_env=False,
    )


def bad_answer(what: str, detail: str | None = None) -> UpstreamUnavailable:
    """The upstream answered, but not with anything its protocol allows: resent later, never trusted."""
    return UpstreamUnavailable(FailureKind.BAD_ANSWER, f"bad_answer: {what}", detail)


def classify_transport(exc: BaseException, *, sent: bool = True) -> UpstreamUnavailable:
    """A transport failure -> a stable reason; the detail names the error class and OS error only (aiohttp's
    messages can quote the URL, and with it credentials, or a token header).

    ``sent`` False: nothing that could change the upstream's state was on its way (a login), so not_sent
    whatever happened to the connection.
    """
    detail = type(exc).__name__
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError) and os_error.strerror:
        detail = f"{detail}: {os_error.strerror}"
    maybe = FailureKind.MAYBE_SENT if sent else FailureKind.NOT_SENT
    # Order matters: aiohttp's timeout errors are connection errors too, and a connect timeout is both.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamUnavailable(maybe, "timeout", detail)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
        # The request may have arrived: the answer, not the request, is what got lost.
        return UpstreamUnavailable(maybe, "connection_lost", detail)
    if isinstance(exc, aiohttp.ClientResponseError):
        return bad_answer("http_protocol", detail)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamUnavailable(maybe, "client_error", detail)
    # An OSError outside aiohttp's wrappers: the socket could not be used, so nothing went out.
    return UpstreamUnavailable(FailureKind.NOT_SENT, "connect_error", detail)


def invalid_field(exc: msgspec.ValidationError) -> str:
    """The field a msgspec ValidationError is about, for a bad_answer's detail: "Expected `int`, got `str` - at
    `$.payload.shift_number`" -> "payload.shift_number"; "Object missing required field `fn_number`" ->
    "fn_number". Never the value itself (an answer's text is the upstream's, not ours to log)."""
    text = str(exc)
    _, at, path = text.rpartition(" - at `$")
    if at:
        return path.rstrip("`").lstrip(".") or "value"
    _, missing, name = text.rpartition("missing required field `")
    return name.rstrip("`") if missing else "value"


@dataclass(frozen=True, slots=True)
class RawAnswer:
    status: int
    content_type: str
    body: bytes


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit` bytes (not an answer to our request:
    reading on would only let the upstream fill kktd's memory)."""
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class HttpUpstream:
    """Owns one client session: `start()` opens it, `close()` closes it; usable as an async context manager.
    A subclass sets `_connection_limit`, `_timeout` and `_max_answer_bytes`, and exchanges through
    `_exchange()`."""

    _session: aiohttp.ClientSession | None = None
    _connection_limit: int = 2
    _timeout: aiohttp.ClientTimeout
    _max_answer_bytes: int

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            self._session = client_session(self._connection_limit, self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _exchange(
        self,
        method: str,
        url: yarl.URL,
        body: bytes | None,
        headers: Mapping[str, str],
        *,
        sent: bool = True,
        head_check: Callable[[int, str], None] | None = None,
    ) -> RawAnswer:
        """One request and its whole answer (at most `_max_answer_bytes`); every failure is an
        UpstreamUnavailable with a reason above, never chained (the cause may quote the URL or headers).
        `head_check(status, content_type)` may refuse the answer (raise UpstreamUnavailable) before its body
        is read."""
        if self._session is None or self._session.closed:
            await self.start()
        assert self._session is not None
        try:
            async with self._session.request(
                method, url, data=body, headers=dict(headers), allow_redirects=False
            ) as response:
                if head_check is not None:
                    head_check(response.status, response.content_type)
                raw = await read_capped(response, self._max_answer_bytes)
                if raw is None:
                    raise bad_answer("too_large")
                return RawAnswer(response.status, response.content_type, raw)
        except UpstreamUnavailable:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise classify_transport(exc, sent=sent) from None
